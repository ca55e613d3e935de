#include "model/config.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include <boost/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "common/status.h"
#include "model/json_util.h"

namespace pd::model {
namespace {

namespace json = boost::json;
using internal::FloatForJson;
using internal::JsonKindName;
using internal::ToAbslView;
using internal::ToJsonView;

// Reads typed fields of one JSON object; `prefix` ("" or "rope_scaling.") makes
// the error messages name the full path of the field.
class FieldReader {
 public:
  FieldReader(const json::object& obj, std::string prefix)
      : obj_(obj), prefix_(std::move(prefix)) {}

  // Absent keys leave *out unchanged. Integers given as integral floats (2.0)
  // are accepted.
  absl::Status Int64(const char* key, int64_t* out) const {
    const json::value* v = obj_.if_contains(key);
    if (v == nullptr) return absl::OkStatus();
    if (v->is_int64()) {
      *out = v->get_int64();
      return absl::OkStatus();
    }
    if (v->is_uint64()) return OutOfRange(key, absl::StrCat(v->get_uint64()));
    if (v->is_double()) {
      double d = v->get_double();
      if (!std::isfinite(d) || d != std::floor(d)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "config.json: field '", prefix_, key, "' must be an integer, got ", d));
      }
      // 2^63 is exactly representable; anything at or beyond it does not fit.
      if (d >= 9223372036854775808.0 || d < -9223372036854775808.0) {
        return OutOfRange(key, absl::StrCat(d));
      }
      *out = static_cast<int64_t>(d);
      return absl::OkStatus();
    }
    return WrongType(key, "an integer", *v);
  }

  absl::Status Int(const char* key, int* out) const {
    int64_t x = *out;
    PD_RETURN_IF_ERROR(Int64(key, &x));
    if (x < std::numeric_limits<int>::min() || x > std::numeric_limits<int>::max()) {
      return OutOfRange(key, absl::StrCat(x));
    }
    *out = static_cast<int>(x);
    return absl::OkStatus();
  }

  absl::Status Float(const char* key, float* out) const {
    const json::value* v = obj_.if_contains(key);
    if (v == nullptr) return absl::OkStatus();
    double d;
    if (v->is_int64()) {
      d = double(v->get_int64());
    } else if (v->is_uint64()) {
      d = double(v->get_uint64());
    } else if (v->is_double()) {
      d = v->get_double();
    } else {
      return WrongType(key, "a number", *v);
    }
    if (std::isfinite(d) && std::fabs(d) > double(std::numeric_limits<float>::max())) {
      return OutOfRange(key, absl::StrCat(d));
    }
    *out = static_cast<float>(d);
    return absl::OkStatus();
  }

  absl::Status Bool(const char* key, bool* out) const {
    const json::value* v = obj_.if_contains(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_bool()) return WrongType(key, "a bool", *v);
    *out = v->get_bool();
    return absl::OkStatus();
  }

  absl::Status String(const char* key, std::string* out) const {
    const json::value* v = obj_.if_contains(key);
    if (v == nullptr) return absl::OkStatus();
    if (!v->is_string()) return WrongType(key, "a string", *v);
    *out = std::string(ToAbslView(v->get_string()));
    return absl::OkStatus();
  }

  absl::Status WrongType(const char* key, const char* want, const json::value& v) const {
    return absl::InvalidArgumentError(absl::StrCat("config.json: field '", prefix_, key,
                                                   "' must be ", want, ", got ",
                                                   JsonKindName(v)));
  }

 private:
  absl::Status OutOfRange(const char* key, const std::string& value) const {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: field '", prefix_, key, "' is out of range: ", value));
  }

  const json::object& obj_;
  std::string prefix_;
};

absl::Status ParseRopeScaling(const json::value& v, ModelConfig* c) {
  if (v.is_null()) {
    c->rope.yarn = false;
    return absl::OkStatus();
  }
  if (!v.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.json: field 'rope_scaling' must be an object or null, got ", JsonKindName(v)));
  }
  FieldReader r(v.get_object(), "rope_scaling.");
  // Newer Hugging Face configs spell the key "rope_type"; DeepSeek's use "type".
  std::string type;
  const char* type_key = v.get_object().contains("rope_type") ? "rope_type" : "type";
  PD_RETURN_IF_ERROR(r.String(type_key, &type));
  if (type != "yarn") {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: field 'rope_scaling.", type_key, "' must be \"yarn\", got \"",
                     type, "\" (only YaRN or plain RoPE with rope_scaling null is supported)"));
  }
  c->rope.yarn = true;
  PD_RETURN_IF_ERROR(r.Float("factor", &c->rope.factor));
  PD_RETURN_IF_ERROR(
      r.Int64("original_max_position_embeddings", &c->rope.original_max_position));
  PD_RETURN_IF_ERROR(r.Float("beta_fast", &c->rope.beta_fast));
  PD_RETURN_IF_ERROR(r.Float("beta_slow", &c->rope.beta_slow));
  PD_RETURN_IF_ERROR(r.Float("mscale", &c->rope_mscale));
  PD_RETURN_IF_ERROR(r.Float("mscale_all_dim", &c->rope_mscale_all_dim));
  return absl::OkStatus();
}

absl::Status ParseQuantization(const json::value& v, ModelConfig* c) {
  if (v.is_null()) {
    c->fp8_weights = false;
    return absl::OkStatus();
  }
  if (!v.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: field 'quantization_config' must be an object or null, got ",
                     JsonKindName(v)));
  }
  const json::object& o = v.get_object();
  FieldReader r(o, "quantization_config.");
  std::string method, fmt = "e4m3", scale_fmt;
  PD_RETURN_IF_ERROR(r.String("quant_method", &method));
  PD_RETURN_IF_ERROR(r.String("fmt", &fmt));
  PD_RETURN_IF_ERROR(r.String("scale_fmt", &scale_fmt));
  if (method != "fp8") {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.json: field 'quantization_config.quant_method' must be \"fp8\", got \"", method,
        "\""));
  }
  if (fmt != "e4m3") {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.json: field 'quantization_config.fmt' must be \"e4m3\", got \"", fmt, "\""));
  }
  if (!scale_fmt.empty() && scale_fmt != "ue8m0") {
    return absl::InvalidArgumentError(absl::StrCat(
        "config.json: field 'quantization_config.scale_fmt' must be \"ue8m0\" or absent, got \"",
        scale_fmt, "\""));
  }
  c->fp8_weights = true;
  c->scale_ue8m0 = scale_fmt == "ue8m0";
  if (const json::value* b = o.if_contains("weight_block_size")) {
    const char* kWant = "config.json: field 'quantization_config.weight_block_size' must be ";
    if (!b->is_array() || b->get_array().size() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat(kWant, "an array of two integers, got ", JsonKindName(*b)));
    }
    json::object dims;
    dims["rows"] = b->get_array()[0];
    dims["cols"] = b->get_array()[1];
    FieldReader dr(dims, "quantization_config.weight_block_size.");
    int rows = 0, cols = 0;
    PD_RETURN_IF_ERROR(dr.Int("rows", &rows));
    PD_RETURN_IF_ERROR(dr.Int("cols", &cols));
    if (rows != cols) {
      return absl::InvalidArgumentError(
          absl::StrCat(kWant, "square, got [", rows, ", ", cols, "]"));
    }
    c->weight_block_size = rows;
  }
  return absl::OkStatus();
}

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("config: field '", field, "' ", what));
}

#define PD_CONFIG_REQUIRE_POSITIVE_(field)                                              \
  do {                                                                                  \
    if (!(c.field > 0)) return Invalid(#field, absl::StrCat("must be > 0, got ", c.field)); \
  } while (0)

bool IsPowerOfTwoInt(int64_t x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

float ModelConfig::SoftmaxScale() const {
  return kernels::YarnSoftmaxScale(qk_head_dim(), rope, rope_mscale);
}

kernels::KvLayout ModelConfig::Layout() const {
  kernels::KvLayout l;
  l.kv_lora_rank = kv_lora_rank;
  l.rope_dim = qk_rope_head_dim;
  l.index_head_dim = index_head_dim;
  l.summary_block = misa_k_block_size;
  return l;
}

kernels::SelectionConfig ModelConfig::Selection() const {
  kernels::SelectionConfig s;
  s.mode = selection_mode;
  s.heads = index_n_heads;
  s.head_dim = index_head_dim;
  s.topk = index_topk;
  s.misa_heads = misa_topk_heads;
  s.misa_block = misa_k_block_size;
  s.dagger_candidates = misa_stage1_topk;
  s.hisa_block = hisa_block_size;
  s.hisa_topk_blocks = hisa_topk_blocks;
  return s;
}

absl::StatusOr<ModelConfig> ParseConfigJson(absl::string_view text) {
  boost::system::error_code ec;
  json::value root = json::parse(ToJsonView(text), ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: not valid JSON: ", ec.message()));
  }
  if (!root.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: top level must be an object, got ", JsonKindName(root)));
  }
  const json::object& o = root.get_object();
  ModelConfig c;
  FieldReader r(o, "");
  PD_RETURN_IF_ERROR(r.String("model_type", &c.model_type));
  PD_RETURN_IF_ERROR(r.Int64("vocab_size", &c.vocab_size));
  PD_RETURN_IF_ERROR(r.Int("hidden_size", &c.hidden_size));
  PD_RETURN_IF_ERROR(r.Int("intermediate_size", &c.intermediate_size));
  PD_RETURN_IF_ERROR(r.Int("moe_intermediate_size", &c.moe_intermediate_size));
  PD_RETURN_IF_ERROR(r.Int("num_hidden_layers", &c.num_hidden_layers));
  PD_RETURN_IF_ERROR(r.Int("first_k_dense_replace", &c.first_k_dense_replace));
  PD_RETURN_IF_ERROR(r.Int("moe_layer_freq", &c.moe_layer_freq));
  PD_RETURN_IF_ERROR(r.Int("num_attention_heads", &c.num_attention_heads));
  PD_RETURN_IF_ERROR(r.Int("q_lora_rank", &c.q_lora_rank));
  PD_RETURN_IF_ERROR(r.Int("kv_lora_rank", &c.kv_lora_rank));
  PD_RETURN_IF_ERROR(r.Int("qk_nope_head_dim", &c.qk_nope_head_dim));
  PD_RETURN_IF_ERROR(r.Int("qk_rope_head_dim", &c.qk_rope_head_dim));
  PD_RETURN_IF_ERROR(r.Int("v_head_dim", &c.v_head_dim));
  PD_RETURN_IF_ERROR(r.Int("n_routed_experts", &c.n_routed_experts));
  PD_RETURN_IF_ERROR(r.Int("n_shared_experts", &c.n_shared_experts));
  PD_RETURN_IF_ERROR(r.Int("num_experts_per_tok", &c.num_experts_per_tok));
  PD_RETURN_IF_ERROR(r.Int("n_group", &c.n_group));
  PD_RETURN_IF_ERROR(r.Int("topk_group", &c.topk_group));
  PD_RETURN_IF_ERROR(r.Bool("norm_topk_prob", &c.norm_topk_prob));
  PD_RETURN_IF_ERROR(r.Float("routed_scaling_factor", &c.routed_scaling_factor));
  PD_RETURN_IF_ERROR(r.String("scoring_func", &c.scoring_func));
  PD_RETURN_IF_ERROR(r.String("topk_method", &c.topk_method));
  PD_RETURN_IF_ERROR(r.Float("rms_norm_eps", &c.rms_norm_eps));
  PD_RETURN_IF_ERROR(r.Int64("max_position_embeddings", &c.max_position_embeddings));
  PD_RETURN_IF_ERROR(r.Int64("bos_token_id", &c.bos_token_id));
  PD_RETURN_IF_ERROR(r.Int64("eos_token_id", &c.eos_token_id));
  PD_RETURN_IF_ERROR(r.Bool("tie_word_embeddings", &c.tie_word_embeddings));
  PD_RETURN_IF_ERROR(r.Float("rope_theta", &c.rope.theta));
  if (const json::value* v = o.if_contains("rope_scaling")) {
    PD_RETURN_IF_ERROR(ParseRopeScaling(*v, &c));
  } else {
    c.rope.yarn = false;
  }
  PD_RETURN_IF_ERROR(r.Int("index_n_heads", &c.index_n_heads));
  PD_RETURN_IF_ERROR(r.Int("index_head_dim", &c.index_head_dim));
  PD_RETURN_IF_ERROR(r.Int("index_topk", &c.index_topk));
  if (const json::value* v = o.if_contains("quantization_config")) {
    PD_RETURN_IF_ERROR(ParseQuantization(*v, &c));
  } else {
    c.fp8_weights = false;
  }
  PD_RETURN_IF_ERROR(r.Int("misa_topk_heads", &c.misa_topk_heads));
  PD_RETURN_IF_ERROR(r.Int("misa_k_block_size", &c.misa_k_block_size));
  PD_RETURN_IF_ERROR(r.Int("misa_stage1_topk", &c.misa_stage1_topk));
  PD_RETURN_IF_ERROR(r.Int("hisa_block_size", &c.hisa_block_size));
  PD_RETURN_IF_ERROR(r.Int("hisa_topk_blocks", &c.hisa_topk_blocks));
  std::string mode;
  PD_RETURN_IF_ERROR(r.String("selection_mode", &mode));
  if (o.contains("selection_mode") &&
      !kernels::ParseSelectionMode(std::string_view(mode), &c.selection_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat("config.json: field 'selection_mode' must be one of \"dense\", \"misa\", "
                     "\"misa_dagger\", \"hisa\", got \"",
                     mode, "\""));
  }
  c.rope.dim = c.qk_rope_head_dim;
  PD_RETURN_IF_ERROR(ValidateConfig(c));
  return c;
}

absl::StatusOr<ModelConfig> LoadConfig(const std::string& path) {
  PD_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  absl::StatusOr<ModelConfig> c = ParseConfigJson(text);
  if (!c.ok()) return Annotate(c.status(), path);
  return c;
}

std::string ConfigToJson(const ModelConfig& c) {
  // Keys in alphabetical order, as Hugging Face's to_json_string writes them.
  json::object o;
  o["architectures"] = json::array{"DeepseekV32ForCausalLM"};
  o["bos_token_id"] = c.bos_token_id;
  o["eos_token_id"] = c.eos_token_id;
  o["first_k_dense_replace"] = c.first_k_dense_replace;
  o["hidden_size"] = c.hidden_size;
  o["hisa_block_size"] = c.hisa_block_size;
  o["hisa_topk_blocks"] = c.hisa_topk_blocks;
  o["index_head_dim"] = c.index_head_dim;
  o["index_n_heads"] = c.index_n_heads;
  o["index_topk"] = c.index_topk;
  o["intermediate_size"] = c.intermediate_size;
  o["kv_lora_rank"] = c.kv_lora_rank;
  o["max_position_embeddings"] = c.max_position_embeddings;
  o["misa_k_block_size"] = c.misa_k_block_size;
  o["misa_stage1_topk"] = c.misa_stage1_topk;
  o["misa_topk_heads"] = c.misa_topk_heads;
  o["model_type"] = ToJsonView(c.model_type);
  o["moe_intermediate_size"] = c.moe_intermediate_size;
  o["moe_layer_freq"] = c.moe_layer_freq;
  o["n_group"] = c.n_group;
  o["n_routed_experts"] = c.n_routed_experts;
  o["n_shared_experts"] = c.n_shared_experts;
  o["norm_topk_prob"] = c.norm_topk_prob;
  o["num_attention_heads"] = c.num_attention_heads;
  o["num_experts_per_tok"] = c.num_experts_per_tok;
  o["num_hidden_layers"] = c.num_hidden_layers;
  o["q_lora_rank"] = c.q_lora_rank;
  o["qk_nope_head_dim"] = c.qk_nope_head_dim;
  o["qk_rope_head_dim"] = c.qk_rope_head_dim;
  if (c.fp8_weights) {
    json::object q;
    q["activation_scheme"] = "dynamic";
    q["fmt"] = "e4m3";
    q["quant_method"] = "fp8";
    if (c.scale_ue8m0) q["scale_fmt"] = "ue8m0";
    q["weight_block_size"] = json::array{c.weight_block_size, c.weight_block_size};
    o["quantization_config"] = std::move(q);
  }
  o["rms_norm_eps"] = FloatForJson(c.rms_norm_eps);
  if (c.rope.yarn) {
    json::object s;
    s["beta_fast"] = FloatForJson(c.rope.beta_fast);
    s["beta_slow"] = FloatForJson(c.rope.beta_slow);
    s["factor"] = FloatForJson(c.rope.factor);
    s["mscale"] = FloatForJson(c.rope_mscale);
    s["mscale_all_dim"] = FloatForJson(c.rope_mscale_all_dim);
    s["original_max_position_embeddings"] = c.rope.original_max_position;
    s["type"] = "yarn";
    o["rope_scaling"] = std::move(s);
  } else {
    o["rope_scaling"] = nullptr;
  }
  o["rope_theta"] = FloatForJson(c.rope.theta);
  o["routed_scaling_factor"] = FloatForJson(c.routed_scaling_factor);
  o["scoring_func"] = ToJsonView(c.scoring_func);
  o["selection_mode"] = kernels::SelectionModeName(c.selection_mode);
  o["tie_word_embeddings"] = c.tie_word_embeddings;
  o["topk_group"] = c.topk_group;
  o["topk_method"] = ToJsonView(c.topk_method);
  o["torch_dtype"] = "bfloat16";
  o["v_head_dim"] = c.v_head_dim;
  o["vocab_size"] = c.vocab_size;
  return internal::PrettyJson(o);
}

absl::Status ValidateConfig(const ModelConfig& c) {
  PD_CONFIG_REQUIRE_POSITIVE_(vocab_size);
  PD_CONFIG_REQUIRE_POSITIVE_(hidden_size);
  PD_CONFIG_REQUIRE_POSITIVE_(num_hidden_layers);
  PD_CONFIG_REQUIRE_POSITIVE_(num_attention_heads);
  PD_CONFIG_REQUIRE_POSITIVE_(q_lora_rank);
  PD_CONFIG_REQUIRE_POSITIVE_(kv_lora_rank);
  PD_CONFIG_REQUIRE_POSITIVE_(qk_nope_head_dim);
  PD_CONFIG_REQUIRE_POSITIVE_(qk_rope_head_dim);
  PD_CONFIG_REQUIRE_POSITIVE_(v_head_dim);
  PD_CONFIG_REQUIRE_POSITIVE_(moe_layer_freq);
  PD_CONFIG_REQUIRE_POSITIVE_(rms_norm_eps);
  PD_CONFIG_REQUIRE_POSITIVE_(max_position_embeddings);
  PD_CONFIG_REQUIRE_POSITIVE_(index_n_heads);
  PD_CONFIG_REQUIRE_POSITIVE_(index_head_dim);
  PD_CONFIG_REQUIRE_POSITIVE_(index_topk);
  PD_CONFIG_REQUIRE_POSITIVE_(misa_topk_heads);
  PD_CONFIG_REQUIRE_POSITIVE_(misa_k_block_size);
  PD_CONFIG_REQUIRE_POSITIVE_(misa_stage1_topk);
  PD_CONFIG_REQUIRE_POSITIVE_(hisa_block_size);
  PD_CONFIG_REQUIRE_POSITIVE_(hisa_topk_blocks);
  if (c.first_k_dense_replace < 0 || c.first_k_dense_replace > c.num_hidden_layers) {
    return Invalid("first_k_dense_replace",
                   absl::StrCat("must be in [0, num_hidden_layers = ", c.num_hidden_layers,
                                "], got ", c.first_k_dense_replace));
  }
  // Layers [k, L) are MoE where l % moe_layer_freq == 0 (IsMoeLayer), dense otherwise.
  const int64_t k = c.first_k_dense_replace, layers = c.num_hidden_layers,
                freq = c.moe_layer_freq;
  const bool any_moe = (k + freq - 1) / freq * freq < layers;
  const bool any_dense =
      k > 0 || (freq > 1 && (layers - k >= 2 || (layers - k == 1 && k % freq != 0)));
  if (any_dense) PD_CONFIG_REQUIRE_POSITIVE_(intermediate_size);

  // Projection widths must fit the int fields that carry them.
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  if (int64_t(c.num_attention_heads) * (c.qk_head_dim() + c.v_head_dim) > kIntMax) {
    return Invalid("num_attention_heads",
                   "* (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) overflows int");
  }
  if (int64_t(c.index_n_heads) * c.index_head_dim > kIntMax) {
    return Invalid("index_n_heads", "* index_head_dim overflows int");
  }
  if (c.kv_lora_rank % kernels::kQuantGroup != 0) {
    return Invalid("kv_lora_rank", absl::StrCat("must be a multiple of ", kernels::kQuantGroup,
                                                " (FP8 cache scale groups), got ",
                                                c.kv_lora_rank));
  }
  if (c.qk_rope_head_dim % 2 != 0) {
    return Invalid("qk_rope_head_dim",
                   absl::StrCat("must be even (rotary pairs), got ", c.qk_rope_head_dim));
  }
  if (c.rope.dim != c.qk_rope_head_dim) {
    return Invalid("qk_rope_head_dim", absl::StrCat("(", c.qk_rope_head_dim,
                                                    ") must equal rope.dim (", c.rope.dim, ")"));
  }
  if (!IsPowerOfTwoInt(c.index_head_dim)) {
    return Invalid("index_head_dim", absl::StrCat("must be a power of two (Hadamard), got ",
                                                  c.index_head_dim));
  }
  if (c.index_head_dim <= c.qk_rope_head_dim) {
    return Invalid("index_head_dim",
                   absl::StrCat("(", c.index_head_dim, ") must be > qk_rope_head_dim (",
                                c.qk_rope_head_dim, ")"));
  }
  if (any_moe) {
    PD_CONFIG_REQUIRE_POSITIVE_(moe_intermediate_size);
    PD_CONFIG_REQUIRE_POSITIVE_(n_routed_experts);
    PD_CONFIG_REQUIRE_POSITIVE_(num_experts_per_tok);
    PD_CONFIG_REQUIRE_POSITIVE_(n_group);
    PD_CONFIG_REQUIRE_POSITIVE_(topk_group);
    PD_CONFIG_REQUIRE_POSITIVE_(routed_scaling_factor);
    if (c.n_shared_experts < 0) {
      return Invalid("n_shared_experts", absl::StrCat("must be >= 0, got ", c.n_shared_experts));
    }
    if (c.n_routed_experts % c.n_group != 0) {
      return Invalid("n_routed_experts", absl::StrCat("(", c.n_routed_experts,
                                                      ") must be a multiple of n_group (",
                                                      c.n_group, ")"));
    }
    const int per_group = c.n_routed_experts / c.n_group;
    if (per_group < 2) {
      return Invalid("n_group", absl::StrCat("leaves ", per_group,
                                             " expert(s) per group; group scores sum the "
                                             "top-2 experts, so n_routed_experts / n_group "
                                             "must be >= 2"));
    }
    if (c.topk_group > c.n_group) {
      return Invalid("topk_group", absl::StrCat("(", c.topk_group, ") must be <= n_group (",
                                                c.n_group, ")"));
    }
    if (c.num_experts_per_tok > c.topk_group * per_group) {
      return Invalid("num_experts_per_tok",
                     absl::StrCat("(", c.num_experts_per_tok,
                                  ") must be <= topk_group * n_routed_experts / n_group (",
                                  c.topk_group * per_group, ")"));
    }
    if (c.scoring_func != "sigmoid") {
      return Invalid("scoring_func",
                     absl::StrCat("must be \"sigmoid\", got \"", c.scoring_func, "\""));
    }
    if (c.topk_method != "noaux_tc") {
      return Invalid("topk_method",
                     absl::StrCat("must be \"noaux_tc\", got \"", c.topk_method, "\""));
    }
  }
  if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size) {
    return Invalid("bos_token_id", absl::StrCat("must be in [0, vocab_size = ", c.vocab_size,
                                                "), got ", c.bos_token_id));
  }
  if (c.eos_token_id < 0 || c.eos_token_id >= c.vocab_size) {
    return Invalid("eos_token_id", absl::StrCat("must be in [0, vocab_size = ", c.vocab_size,
                                                "), got ", c.eos_token_id));
  }
  if (!(c.rope.theta > 0)) {
    return Invalid("rope_theta", absl::StrCat("must be > 0, got ", c.rope.theta));
  }
  if (c.rope.yarn) {
    if (!(c.rope.factor >= 1)) {
      return Invalid("rope_scaling.factor", absl::StrCat("must be >= 1, got ", c.rope.factor));
    }
    if (c.rope.original_max_position <= 0) {
      return Invalid("rope_scaling.original_max_position_embeddings",
                     absl::StrCat("must be > 0, got ", c.rope.original_max_position));
    }
    if (!(c.rope.beta_fast > c.rope.beta_slow) || !(c.rope.beta_slow > 0)) {
      return Invalid("rope_scaling.beta_fast",
                     absl::StrCat("and rope_scaling.beta_slow must satisfy beta_fast > "
                                  "beta_slow > 0, got ",
                                  c.rope.beta_fast, " and ", c.rope.beta_slow));
    }
    if (!std::isfinite(c.rope_mscale) || !std::isfinite(c.rope_mscale_all_dim)) {
      return Invalid("rope_scaling.mscale", "and mscale_all_dim must be finite");
    }
  }
  if (c.fp8_weights && c.weight_block_size <= 0) {
    return Invalid("quantization_config.weight_block_size",
                   absl::StrCat("must be > 0, got ", c.weight_block_size));
  }
  if (c.misa_topk_heads > c.index_n_heads) {
    return Invalid("misa_topk_heads", absl::StrCat("must be in [1, index_n_heads = ",
                                                   c.index_n_heads, "], got ",
                                                   c.misa_topk_heads));
  }
  if (c.misa_k_block_size % kernels::kPageTokens != 0) {
    return Invalid("misa_k_block_size",
                   absl::StrCat("must be a multiple of ", kernels::kPageTokens, ", got ",
                                c.misa_k_block_size));
  }
  if (c.misa_stage1_topk < c.index_topk) {
    return Invalid("misa_stage1_topk",
                   absl::StrCat("(", c.misa_stage1_topk, ") must be >= index_topk (",
                                c.index_topk, ")"));
  }
  if (c.hisa_topk_blocks < 2) {
    return Invalid("hisa_topk_blocks",
                   absl::StrCat("must be >= 2 (the first and last visible blocks are always "
                                "kept), got ",
                                c.hisa_topk_blocks));
  }
  return absl::OkStatus();
}

#undef PD_CONFIG_REQUIRE_POSITIVE_

absl::StatusOr<ModelConfig> PresetConfig(absl::string_view name) {
  ModelConfig c;  // the defaults are DeepSeek-V3.2's values
  c.rope.dim = c.qk_rope_head_dim;
  c.rope.theta = 10000.0f;
  c.rope.yarn = true;
  c.rope.factor = 40.0f;
  c.rope.original_max_position = 4096;
  c.rope.beta_fast = 32.0f;
  c.rope.beta_slow = 1.0f;
  c.rope_mscale = 1.0f;
  c.rope_mscale_all_dim = 1.0f;
  if (name == "v32") return c;
  if (name == "tiny") {
    c.vocab_size = 258;  // byte-level: 0-255 bytes, 256 BOS, 257 EOS
    c.bos_token_id = 256;
    c.eos_token_id = 257;
    c.hidden_size = 256;
    c.num_hidden_layers = 4;
    c.first_k_dense_replace = 1;
    c.intermediate_size = 512;
    c.moe_intermediate_size = 128;
    c.n_routed_experts = 8;
    c.num_experts_per_tok = 2;
    c.n_group = 4;
    c.topk_group = 2;
    c.n_shared_experts = 1;
    c.num_attention_heads = 4;
    c.q_lora_rank = 128;
    c.kv_lora_rank = 128;
    c.qk_nope_head_dim = 32;
    c.qk_rope_head_dim = 32;
    c.rope.dim = 32;
    c.v_head_dim = 32;
    c.index_n_heads = 8;
    c.index_head_dim = 64;
    c.index_topk = 256;
    c.misa_topk_heads = 2;
    c.misa_k_block_size = 256;
    c.misa_stage1_topk = 1024;
    c.hisa_block_size = 64;
    c.hisa_topk_blocks = 16;
    c.selection_mode = kernels::SelectionMode::kMisa;
    c.fp8_weights = true;
    c.weight_block_size = 128;
    c.scale_ue8m0 = true;
    c.max_position_embeddings = 163840;
    c.rms_norm_eps = 1e-6f;
    return c;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown model preset \"", name, "\" (known presets: tiny, v32)"));
}

}  // namespace pd::model
