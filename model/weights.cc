#include "model/weights.h"

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/numeric.h"
#include "model/safetensors.h"

namespace pd::model {
namespace {

using kernels::DType;

// Resolves the tensors of one checkpoint against a config. Error messages name
// the shard file (or the index, for a tensor that is missing) and the tensor.
class Loader {
 public:
  Loader(const SafetensorsCheckpoint& ckpt, const ModelConfig& c) : ckpt_(ckpt), c_(c) {}

  // A 2-D weight [rows, cols] of dtype F8_E4M3 (with its F32 "_scale_inv"
  // block scales), BF16, F16 or F32.
  absl::Status Matrix(const std::string& name, int64_t rows, int64_t cols,
                      kernels::WeightView* out) const {
    PD_ASSIGN_OR_RETURN(const TensorInfo* t, ckpt_.Get(name));
    PD_RETURN_IF_ERROR(CheckShape(*t, {rows, cols}));
    if (t->dtype != DType::kFP8E4M3 && t->dtype != DType::kBF16 && t->dtype != DType::kF16 &&
        t->dtype != DType::kF32) {
      return absl::InvalidArgumentError(absl::StrCat(Where(*t), " has dtype ",
                                                     kernels::DTypeName(t->dtype),
                                                     ", expected one of F8_E4M3, BF16, F16, F32"));
    }
    PD_RETURN_IF_ERROR(CheckAligned(*t));
    kernels::WeightView v;
    v.data = t->bytes.data();
    v.dtype = t->dtype;
    v.rows = rows;
    v.cols = cols;
    v.ld = cols;
    if (t->dtype == DType::kFP8E4M3) {
      const int64_t b = c_.weight_block_size;
      const std::string scale_name = name + "_scale_inv";
      const TensorInfo* s = ckpt_.Find(scale_name);
      if (s == nullptr) {
        return absl::NotFoundError(absl::StrCat(Where(*t), " is F8_E4M3 but its block scales ",
                                                scale_name, " are missing"));
      }
      if (s->dtype != DType::kF32) {
        return absl::InvalidArgumentError(absl::StrCat(
            Where(*s), " has dtype ", kernels::DTypeName(s->dtype), ", expected F32"));
      }
      PD_RETURN_IF_ERROR(CheckShape(*s, {(rows + b - 1) / b, (cols + b - 1) / b}));
      PD_RETURN_IF_ERROR(CheckAligned(*s));
      v.scale = reinterpret_cast<const float*>(s->bytes.data());
      v.scale_ld = (cols + b - 1) / b;
      v.block = int(b);
    }
    *out = v;
    return absl::OkStatus();
  }

  // A 1-D tensor [n] of dtype BF16, F16 or F32, converted to fp32.
  absl::Status Vector(const std::string& name, int64_t n, std::vector<float>* out) const {
    PD_ASSIGN_OR_RETURN(const TensorInfo* t, ckpt_.Get(name));
    PD_RETURN_IF_ERROR(CheckShape(*t, {n}));
    out->resize(size_t(n));
    const uint8_t* p = t->bytes.data();
    for (int64_t i = 0; i < n; ++i) {
      switch (t->dtype) {
        case DType::kF32: std::memcpy(&(*out)[i], p + 4 * i, 4); break;
        case DType::kBF16:
        case DType::kF16: {
          uint16_t h;
          std::memcpy(&h, p + 2 * i, 2);
          (*out)[i] = t->dtype == DType::kBF16 ? kernels::Bf16ToFloat(h) : kernels::Fp16ToFloat(h);
          break;
        }
        default:
          return absl::InvalidArgumentError(absl::StrCat(Where(*t), " has dtype ",
                                                         kernels::DTypeName(t->dtype),
                                                         ", expected one of BF16, F16, F32"));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Ffn(const std::string& prefix, int64_t inter, FfnWeights* f) const {
    const int64_t hidden = c_.hidden_size;
    PD_RETURN_IF_ERROR(Matrix(prefix + "gate_proj.weight", inter, hidden, &f->gate));
    PD_RETURN_IF_ERROR(Matrix(prefix + "up_proj.weight", inter, hidden, &f->up));
    return Matrix(prefix + "down_proj.weight", hidden, inter, &f->down);
  }

  absl::Status Layer(int l, LayerWeights* w) const {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const int64_t hidden = c_.hidden_size, heads = c_.num_attention_heads;
    const int64_t ih = c_.index_n_heads, id = c_.index_head_dim;
    PD_RETURN_IF_ERROR(Vector(p + "input_layernorm.weight", hidden, &w->attn_norm));
    PD_RETURN_IF_ERROR(Matrix(p + "self_attn.q_a_proj.weight", c_.q_lora_rank, hidden, &w->q_a));
    PD_RETURN_IF_ERROR(Vector(p + "self_attn.q_a_layernorm.weight", c_.q_lora_rank, &w->q_a_norm));
    PD_RETURN_IF_ERROR(Matrix(p + "self_attn.q_b_proj.weight", heads * c_.qk_head_dim(),
                              c_.q_lora_rank, &w->q_b));
    PD_RETURN_IF_ERROR(Matrix(p + "self_attn.kv_a_proj_with_mqa.weight",
                              c_.kv_lora_rank + c_.qk_rope_head_dim, hidden, &w->kv_a));
    PD_RETURN_IF_ERROR(
        Vector(p + "self_attn.kv_a_layernorm.weight", c_.kv_lora_rank, &w->kv_a_norm));
    PD_RETURN_IF_ERROR(Matrix(p + "self_attn.kv_b_proj.weight",
                              heads * (c_.qk_nope_head_dim + c_.v_head_dim), c_.kv_lora_rank,
                              &w->kv_b));
    PD_RETURN_IF_ERROR(
        Matrix(p + "self_attn.o_proj.weight", hidden, heads * c_.v_head_dim, &w->o));
    PD_RETURN_IF_ERROR(
        Matrix(p + "self_attn.indexer.wq_b.weight", ih * id, c_.q_lora_rank, &w->idx_wq_b));
    PD_RETURN_IF_ERROR(Matrix(p + "self_attn.indexer.wk.weight", id, hidden, &w->idx_wk));
    PD_RETURN_IF_ERROR(Vector(p + "self_attn.indexer.k_norm.weight", id, &w->idx_k_norm_w));
    PD_RETURN_IF_ERROR(Vector(p + "self_attn.indexer.k_norm.bias", id, &w->idx_k_norm_b));
    PD_RETURN_IF_ERROR(Matrix(p + "self_attn.indexer.weights_proj.weight", ih, hidden,
                              &w->idx_weights_proj));
    PD_RETURN_IF_ERROR(Vector(p + "post_attention_layernorm.weight", hidden, &w->ffn_norm));
    w->moe = c_.IsMoeLayer(l);
    if (!w->moe) return Ffn(p + "mlp.", c_.intermediate_size, &w->dense);
    const int64_t experts = c_.n_routed_experts;
    PD_RETURN_IF_ERROR(Matrix(p + "mlp.gate.weight", experts, hidden, &w->router));
    PD_RETURN_IF_ERROR(Vector(p + "mlp.gate.e_score_correction_bias", experts, &w->router_bias));
    w->experts.resize(size_t(experts));
    for (int64_t e = 0; e < experts; ++e) {
      PD_RETURN_IF_ERROR(
          Ffn(absl::StrCat(p, "mlp.experts.", e, "."), c_.moe_intermediate_size, &w->experts[e]));
    }
    if (c_.n_shared_experts > 0) {
      PD_RETURN_IF_ERROR(Ffn(p + "mlp.shared_experts.",
                             int64_t(c_.n_shared_experts) * c_.moe_intermediate_size,
                             &w->shared));
    }
    return absl::OkStatus();
  }

 private:
  std::string Where(const TensorInfo& t) const {
    return absl::StrCat(ckpt_.ShardFileName(t.shard), ": tensor ", t.name);
  }

  absl::Status CheckShape(const TensorInfo& t, const std::vector<int64_t>& want) const {
    if (t.shape == want) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(Where(t), " has shape ", ShapeString(t.shape),
                                                   ", expected ", ShapeString(want)));
  }

  // WeightView reads elements in place, so they must be aligned to their size.
  absl::Status CheckAligned(const TensorInfo& t) const {
    const size_t size = kernels::DTypeSize(t.dtype);
    if (reinterpret_cast<uintptr_t>(t.bytes.data()) % size == 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(
        Where(t), " is stored at a file offset that is not a multiple of its ", size,
        "-byte element size; it cannot be read in place"));
  }

  const SafetensorsCheckpoint& ckpt_;
  const ModelConfig& c_;
};

}  // namespace

ModelWeights::ModelWeights() = default;
ModelWeights::~ModelWeights() = default;

absl::StatusOr<std::unique_ptr<ModelWeights>> LoadWeights(const std::string& dir,
                                                          const ModelConfig& config) {
  PD_RETURN_IF_ERROR(Annotate(ValidateConfig(config), absl::StrCat("LoadWeights(", dir, ")")));
  PD_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsCheckpoint> ckpt,
                      SafetensorsCheckpoint::Open(dir));
  auto w = std::make_unique<ModelWeights>();
  w->config = config;
  Loader loader(*ckpt, config);
  PD_RETURN_IF_ERROR(
      loader.Matrix("model.embed_tokens.weight", config.vocab_size, config.hidden_size, &w->embed));
  w->layers.resize(size_t(config.num_hidden_layers));
  for (int l = 0; l < config.num_hidden_layers; ++l) {
    PD_RETURN_IF_ERROR(loader.Layer(l, &w->layers[l]));
  }
  PD_RETURN_IF_ERROR(loader.Vector("model.norm.weight", config.hidden_size, &w->final_norm));
  if (config.tie_word_embeddings) {
    w->lm_head = w->embed;
  } else {
    PD_RETURN_IF_ERROR(
        loader.Matrix("lm_head.weight", config.vocab_size, config.hidden_size, &w->lm_head));
  }
  w->fingerprint = ckpt->Fingerprint(ConfigToJson(config));
  w->checkpoint = std::move(ckpt);
  return w;
}

}  // namespace pd::model
