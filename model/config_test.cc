#include "model/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "common/mapped_file.h"

namespace pd::model {
namespace {

using ::testing::HasSubstr;

// The Hugging Face config.json of DeepSeek-V3.2 (deepseek-ai/DeepSeek-V3.2-Exp),
// unrelated keys included.
constexpr char kV32ConfigJson[] = R"json({
  "architectures": ["DeepseekV32ForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "auto_map": {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"
  },
  "bos_token_id": 0,
  "eos_token_id": 1,
  "ep_size": 1,
  "first_k_dense_replace": 3,
  "hidden_act": "silu",
  "hidden_size": 7168,
  "index_head_dim": 128,
  "index_n_heads": 64,
  "index_topk": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 18432,
  "kv_lora_rank": 512,
  "max_position_embeddings": 163840,
  "model_type": "deepseek_v32",
  "moe_intermediate_size": 2048,
  "moe_layer_freq": 1,
  "n_group": 8,
  "n_routed_experts": 256,
  "n_shared_experts": 1,
  "norm_topk_prob": true,
  "num_attention_heads": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 61,
  "num_key_value_heads": 128,
  "num_nextn_predict_layers": 1,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "quantization_config": {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128]
  },
  "rms_norm_eps": 1e-06,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn"
  },
  "rope_theta": 10000,
  "routed_scaling_factor": 2.5,
  "scoring_func": "sigmoid",
  "tie_word_embeddings": false,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "torch_dtype": "bfloat16",
  "transformers_version": "4.44.2",
  "use_cache": true,
  "v_head_dim": 128,
  "vocab_size": 129280
})json";

// Replaces the first occurrence of `from` (which must exist) in the V3.2 text.
std::string V32With(const std::string& from, const std::string& to) {
  std::string s = kV32ConfigJson;
  size_t pos = s.find(from);
  EXPECT_NE(pos, std::string::npos) << from;
  if (pos != std::string::npos) s.replace(pos, from.size(), to);
  return s;
}

void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.moe_intermediate_size, b.moe_intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.first_k_dense_replace, b.first_k_dense_replace);
  EXPECT_EQ(a.moe_layer_freq, b.moe_layer_freq);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.q_lora_rank, b.q_lora_rank);
  EXPECT_EQ(a.kv_lora_rank, b.kv_lora_rank);
  EXPECT_EQ(a.qk_nope_head_dim, b.qk_nope_head_dim);
  EXPECT_EQ(a.qk_rope_head_dim, b.qk_rope_head_dim);
  EXPECT_EQ(a.v_head_dim, b.v_head_dim);
  EXPECT_EQ(a.n_routed_experts, b.n_routed_experts);
  EXPECT_EQ(a.n_shared_experts, b.n_shared_experts);
  EXPECT_EQ(a.num_experts_per_tok, b.num_experts_per_tok);
  EXPECT_EQ(a.n_group, b.n_group);
  EXPECT_EQ(a.topk_group, b.topk_group);
  EXPECT_EQ(a.norm_topk_prob, b.norm_topk_prob);
  EXPECT_EQ(a.routed_scaling_factor, b.routed_scaling_factor);
  EXPECT_EQ(a.scoring_func, b.scoring_func);
  EXPECT_EQ(a.topk_method, b.topk_method);
  EXPECT_EQ(a.rms_norm_eps, b.rms_norm_eps);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_id, b.eos_token_id);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.rope.dim, b.rope.dim);
  EXPECT_EQ(a.rope.theta, b.rope.theta);
  EXPECT_EQ(a.rope.yarn, b.rope.yarn);
  if (a.rope.yarn && b.rope.yarn) {  // the YaRN parameters mean nothing without YaRN
    EXPECT_EQ(a.rope.factor, b.rope.factor);
    EXPECT_EQ(a.rope.original_max_position, b.rope.original_max_position);
    EXPECT_EQ(a.rope.beta_fast, b.rope.beta_fast);
    EXPECT_EQ(a.rope.beta_slow, b.rope.beta_slow);
    EXPECT_EQ(a.rope_mscale, b.rope_mscale);
    EXPECT_EQ(a.rope_mscale_all_dim, b.rope_mscale_all_dim);
  }
  EXPECT_EQ(a.index_n_heads, b.index_n_heads);
  EXPECT_EQ(a.index_head_dim, b.index_head_dim);
  EXPECT_EQ(a.index_topk, b.index_topk);
  EXPECT_EQ(a.fp8_weights, b.fp8_weights);
  if (a.fp8_weights && b.fp8_weights) {  // block and scale format only matter for fp8
    EXPECT_EQ(a.weight_block_size, b.weight_block_size);
    EXPECT_EQ(a.scale_ue8m0, b.scale_ue8m0);
  }
  EXPECT_EQ(a.misa_topk_heads, b.misa_topk_heads);
  EXPECT_EQ(a.misa_k_block_size, b.misa_k_block_size);
  EXPECT_EQ(a.misa_stage1_topk, b.misa_stage1_topk);
  EXPECT_EQ(a.hisa_block_size, b.hisa_block_size);
  EXPECT_EQ(a.hisa_topk_blocks, b.hisa_topk_blocks);
  EXPECT_EQ(a.selection_mode, b.selection_mode);
}

TEST(ConfigTest, ParsesRealDeepSeekV32Config) {
  absl::StatusOr<ModelConfig> c = ParseConfigJson(kV32ConfigJson);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "deepseek_v32");
  EXPECT_EQ(c->vocab_size, 129280);
  EXPECT_EQ(c->hidden_size, 7168);
  EXPECT_EQ(c->intermediate_size, 18432);
  EXPECT_EQ(c->moe_intermediate_size, 2048);
  EXPECT_EQ(c->num_hidden_layers, 61);
  EXPECT_EQ(c->first_k_dense_replace, 3);
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->num_attention_heads, 128);
  EXPECT_EQ(c->q_lora_rank, 1536);
  EXPECT_EQ(c->kv_lora_rank, 512);
  EXPECT_EQ(c->qk_nope_head_dim, 128);
  EXPECT_EQ(c->qk_rope_head_dim, 64);
  EXPECT_EQ(c->qk_head_dim(), 192);
  EXPECT_EQ(c->v_head_dim, 128);
  EXPECT_EQ(c->n_routed_experts, 256);
  EXPECT_EQ(c->n_shared_experts, 1);
  EXPECT_EQ(c->num_experts_per_tok, 8);
  EXPECT_EQ(c->n_group, 8);
  EXPECT_EQ(c->topk_group, 4);
  EXPECT_TRUE(c->norm_topk_prob);
  EXPECT_FLOAT_EQ(c->routed_scaling_factor, 2.5f);
  EXPECT_EQ(c->scoring_func, "sigmoid");
  EXPECT_EQ(c->topk_method, "noaux_tc");
  EXPECT_EQ(c->rms_norm_eps, 1e-6f);
  EXPECT_EQ(c->max_position_embeddings, 163840);
  EXPECT_EQ(c->bos_token_id, 0);
  EXPECT_EQ(c->eos_token_id, 1);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->index_n_heads, 64);
  EXPECT_EQ(c->index_head_dim, 128);
  EXPECT_EQ(c->index_topk, 2048);
  EXPECT_TRUE(c->fp8_weights);
  EXPECT_EQ(c->weight_block_size, 128);
  EXPECT_TRUE(c->scale_ue8m0);
  // No MISA keys in the HF file: the released patch's defaults apply.
  EXPECT_EQ(c->misa_topk_heads, 8);
  EXPECT_EQ(c->misa_k_block_size, 1024);
  EXPECT_EQ(c->misa_stage1_topk, 8192);
  EXPECT_EQ(c->selection_mode, kernels::SelectionMode::kMisa);
  EXPECT_FALSE(c->IsMoeLayer(2));
  EXPECT_TRUE(c->IsMoeLayer(3));
  EXPECT_TRUE(c->IsMoeLayer(60));
}

TEST(ConfigTest, YarnFieldsAndSoftmaxScale) {
  absl::StatusOr<ModelConfig> c = ParseConfigJson(kV32ConfigJson);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->rope.yarn);
  EXPECT_EQ(c->rope.dim, 64);
  EXPECT_EQ(c->rope.theta, 10000.0f);
  EXPECT_EQ(c->rope.factor, 40.0f);
  EXPECT_EQ(c->rope.original_max_position, 4096);
  EXPECT_EQ(c->rope.beta_fast, 32.0f);
  EXPECT_EQ(c->rope.beta_slow, 1.0f);
  EXPECT_EQ(c->rope_mscale, 1.0f);
  EXPECT_EQ(c->rope_mscale_all_dim, 1.0f);
  // algorithms.md section 1: 192^-0.5 * mscale^2, mscale = 0.1 ln(40) + 1.
  const double mscale = 0.1 * std::log(40.0) + 1.0;
  const double want = std::pow(192.0, -0.5) * mscale * mscale;
  EXPECT_NEAR(c->SoftmaxScale(), want, 1e-6 * want);

  // rope_scaling null: plain RoPE, scale 192^-0.5.
  absl::StatusOr<ModelConfig> plain = ParseConfigJson(
      V32With(R"("rope_scaling": {)", R"("rope_scaling": null, "unused_rope": {)"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(plain->rope.yarn);
  EXPECT_NEAR(plain->SoftmaxScale(), std::pow(192.0, -0.5), 1e-7);

  // Newer HF spelling "rope_type".
  absl::StatusOr<ModelConfig> typed =
      ParseConfigJson(V32With(R"("type": "yarn")", R"("rope_type": "yarn")"));
  ASSERT_TRUE(typed.ok()) << typed.status();
  EXPECT_TRUE(typed->rope.yarn);

  absl::StatusOr<ModelConfig> linear =
      ParseConfigJson(V32With(R"("type": "yarn")", R"("type": "linear")"));
  ASSERT_FALSE(linear.ok());
  EXPECT_EQ(linear.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(linear.status().message(), HasSubstr("'rope_scaling.type'"));
}

TEST(ConfigTest, MisaFieldsAndSelectionMode) {
  absl::StatusOr<ModelConfig> c = ParseConfigJson(
      V32With(R"("vocab_size": 129280)",
              R"("vocab_size": 129280, "misa_topk_heads": 16, "misa_k_block_size": 512,
                 "misa_stage1_topk": 4096, "hisa_block_size": 64, "hisa_topk_blocks": 32,
                 "selection_mode": "misa_dagger")"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->misa_topk_heads, 16);
  EXPECT_EQ(c->misa_k_block_size, 512);
  EXPECT_EQ(c->misa_stage1_topk, 4096);
  EXPECT_EQ(c->hisa_block_size, 64);
  EXPECT_EQ(c->hisa_topk_blocks, 32);
  EXPECT_EQ(c->selection_mode, kernels::SelectionMode::kMisaDagger);

  kernels::SelectionConfig s = c->Selection();
  EXPECT_EQ(s.mode, kernels::SelectionMode::kMisaDagger);
  EXPECT_EQ(s.heads, 64);
  EXPECT_EQ(s.head_dim, 128);
  EXPECT_EQ(s.topk, 2048);
  EXPECT_EQ(s.misa_heads, 16);
  EXPECT_EQ(s.misa_block, 512);
  EXPECT_EQ(s.dagger_candidates, 4096);
  EXPECT_EQ(s.hisa_block, 64);
  EXPECT_EQ(s.hisa_topk_blocks, 32);

  kernels::KvLayout l = c->Layout();
  EXPECT_EQ(l.kv_lora_rank, 512);
  EXPECT_EQ(l.rope_dim, 64);
  EXPECT_EQ(l.index_head_dim, 128);
  EXPECT_EQ(l.summary_block, 512);
  EXPECT_EQ(l.MlaTokenBytes(), 656u);  // algorithms.md section 2

  absl::StatusOr<ModelConfig> bad = ParseConfigJson(
      V32With(R"("vocab_size": 129280)", R"("vocab_size": 129280, "selection_mode": "sparse")"));
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("'selection_mode'"));
  EXPECT_THAT(bad.status().message(), HasSubstr("sparse"));
}

TEST(ConfigTest, QuantizationConfigAbsentMeansBf16) {
  std::string text = kV32ConfigJson;
  size_t a = text.find("\"quantization_config\"");
  size_t b = text.find("\"rms_norm_eps\"");
  ASSERT_NE(a, std::string::npos);
  text.erase(a, b - a);
  absl::StatusOr<ModelConfig> c = ParseConfigJson(text);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_FALSE(c->fp8_weights);

  absl::StatusOr<ModelConfig> no_ue8m0 =
      ParseConfigJson(V32With(R"("scale_fmt": "ue8m0",)", ""));
  ASSERT_TRUE(no_ue8m0.ok()) << no_ue8m0.status();
  EXPECT_TRUE(no_ue8m0->fp8_weights);
  EXPECT_FALSE(no_ue8m0->scale_ue8m0);

  absl::StatusOr<ModelConfig> int8 =
      ParseConfigJson(V32With(R"("quant_method": "fp8")", R"("quant_method": "int8")"));
  ASSERT_FALSE(int8.ok());
  EXPECT_THAT(int8.status().message(), HasSubstr("'quantization_config.quant_method'"));

  absl::StatusOr<ModelConfig> rect =
      ParseConfigJson(V32With("[128, 128]", "[128, 64]"));
  ASSERT_FALSE(rect.ok());
  EXPECT_THAT(rect.status().message(), HasSubstr("'quantization_config.weight_block_size'"));
}

TEST(ConfigTest, IntegralFloatsAcceptedOthersRejected) {
  absl::StatusOr<ModelConfig> c =
      ParseConfigJson(V32With(R"("hidden_size": 7168)", R"("hidden_size": 7168.0)"));
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 7168);

  absl::StatusOr<ModelConfig> frac =
      ParseConfigJson(V32With(R"("hidden_size": 7168)", R"("hidden_size": 7168.5)"));
  ASSERT_FALSE(frac.ok());
  EXPECT_EQ(frac.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(frac.status().message(),
              HasSubstr("config.json: field 'hidden_size' must be an integer, got 7168.5"));

  absl::StatusOr<ModelConfig> huge =
      ParseConfigJson(V32With(R"("hidden_size": 7168)", R"("hidden_size": 1e12)"));
  ASSERT_FALSE(huge.ok());
  EXPECT_THAT(huge.status().message(), HasSubstr("'hidden_size' is out of range"));

  // Floats may be given as integers ("factor": 40 above) and vice versa.
  absl::StatusOr<ModelConfig> f =
      ParseConfigJson(V32With(R"("routed_scaling_factor": 2.5)", R"("routed_scaling_factor": 3)"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->routed_scaling_factor, 3.0f);
}

TEST(ConfigTest, WrongTypesNameTheField) {
  struct Case {
    std::string from, to, message;
  };
  const std::vector<Case> cases = {
      {R"("hidden_size": 7168)", R"("hidden_size": "7168")",
       "config.json: field 'hidden_size' must be an integer, got string"},
      {R"("vocab_size": 129280)", R"("vocab_size": [129280])",
       "config.json: field 'vocab_size' must be an integer, got array"},
      {R"("q_lora_rank": 1536)", R"("q_lora_rank": null)",
       "config.json: field 'q_lora_rank' must be an integer, got null"},
      {R"("norm_topk_prob": true)", R"("norm_topk_prob": 1)",
       "config.json: field 'norm_topk_prob' must be a bool, got integer"},
      {R"("rms_norm_eps": 1e-06)", R"("rms_norm_eps": "1e-6")",
       "config.json: field 'rms_norm_eps' must be a number, got string"},
      {R"("scoring_func": "sigmoid")", R"("scoring_func": 1)",
       "config.json: field 'scoring_func' must be a string, got integer"},
      {R"("factor": 40)", R"("factor": "40")",
       "config.json: field 'rope_scaling.factor' must be a number, got string"},
      {R"("original_max_position_embeddings": 4096)",
       R"("original_max_position_embeddings": true)",
       "config.json: field 'rope_scaling.original_max_position_embeddings' must be an integer, "
       "got bool"},
      {R"("rope_scaling": {)", R"("rope_scaling": 3, "x": {)",
       "config.json: field 'rope_scaling' must be an object or null, got integer"},
      {R"("quantization_config": {)", R"("quantization_config": "fp8", "x": {)",
       "config.json: field 'quantization_config' must be an object or null, got string"},
  };
  for (const Case& k : cases) {
    absl::StatusOr<ModelConfig> c = ParseConfigJson(V32With(k.from, k.to));
    ASSERT_FALSE(c.ok()) << k.to;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << k.to;
    EXPECT_EQ(c.status().message(), k.message) << k.to;
  }
}

TEST(ConfigTest, NotJsonOrNotObject) {
  absl::StatusOr<ModelConfig> c = ParseConfigJson("{\"hidden_size\": 7168,");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("not valid JSON"));
  c = ParseConfigJson("[1, 2]");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("must be an object, got array"));
}

TEST(ConfigTest, RoundTripsThroughJson) {
  std::vector<ModelConfig> configs;
  for (const char* name : {"tiny", "v32"}) {
    absl::StatusOr<ModelConfig> c = PresetConfig(name);
    ASSERT_TRUE(c.ok()) << c.status();
    configs.push_back(*c);
  }
  // Every field off its preset value: bf16, plain RoPE, tied, odd floats.
  ModelConfig odd = configs[0];
  odd.model_type = "deepseek_v32_test";
  odd.vocab_size = 300;
  odd.bos_token_id = 3;
  odd.eos_token_id = 299;
  odd.hidden_size = 192;
  odd.intermediate_size = 384;
  odd.moe_intermediate_size = 96;
  odd.num_hidden_layers = 5;
  odd.first_k_dense_replace = 2;
  odd.moe_layer_freq = 2;
  odd.num_attention_heads = 6;
  odd.q_lora_rank = 96;
  odd.kv_lora_rank = 256;
  odd.qk_nope_head_dim = 48;
  odd.qk_rope_head_dim = 16;
  odd.rope.dim = 16;
  odd.v_head_dim = 40;
  odd.n_routed_experts = 12;
  odd.n_shared_experts = 2;
  odd.num_experts_per_tok = 3;
  odd.n_group = 3;
  odd.topk_group = 1;
  odd.norm_topk_prob = false;
  odd.routed_scaling_factor = 1.7f;
  odd.rms_norm_eps = 3.3e-7f;
  odd.max_position_embeddings = 12345;
  odd.tie_word_embeddings = true;
  odd.rope.theta = 12345.678f;
  odd.rope.yarn = false;
  odd.index_n_heads = 12;
  odd.index_head_dim = 32;
  odd.index_topk = 100;
  odd.fp8_weights = false;
  odd.misa_topk_heads = 5;
  odd.misa_k_block_size = 192;
  odd.misa_stage1_topk = 333;
  odd.hisa_block_size = 32;
  odd.hisa_topk_blocks = 7;
  odd.selection_mode = kernels::SelectionMode::kHisa;
  ASSERT_TRUE(ValidateConfig(odd).ok()) << ValidateConfig(odd);
  configs.push_back(odd);
  ModelConfig yarn = configs[0];
  yarn.rope.factor = 3.1f;
  yarn.rope.original_max_position = 1000;
  yarn.rope.beta_fast = 17.25f;
  yarn.rope.beta_slow = 0.3f;
  yarn.rope_mscale = 0.707f;
  yarn.rope_mscale_all_dim = 0.9f;
  yarn.scale_ue8m0 = false;
  yarn.weight_block_size = 64;
  yarn.selection_mode = kernels::SelectionMode::kDense;
  configs.push_back(yarn);

  for (const ModelConfig& c : configs) {
    std::string text = ConfigToJson(c);
    absl::StatusOr<ModelConfig> back = ParseConfigJson(text);
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
    SCOPED_TRACE(text);
    ExpectSameConfig(c, *back);
    EXPECT_EQ(ConfigToJson(*back), text);
  }
  // The HF spelling of the fields.
  std::string text = ConfigToJson(configs[1]);
  EXPECT_THAT(text, HasSubstr("\"rms_norm_eps\": 1e-06"));
  EXPECT_THAT(text, HasSubstr("\"weight_block_size\": [128, 128]"));
  EXPECT_THAT(text, HasSubstr("\"type\": \"yarn\""));
  EXPECT_THAT(text, HasSubstr("\"routed_scaling_factor\": 2.5"));
  EXPECT_THAT(ConfigToJson(odd), HasSubstr("\"rope_scaling\": null"));
  EXPECT_THAT(ConfigToJson(odd), HasSubstr("\"selection_mode\": \"hisa\""));
}

TEST(ConfigTest, ValidationErrorsNameTheField) {
  absl::StatusOr<ModelConfig> base = PresetConfig("tiny");
  ASSERT_TRUE(base.ok());
  ASSERT_TRUE(ValidateConfig(*base).ok()) << ValidateConfig(*base);
  struct Case {
    const char* field;
    std::function<void(ModelConfig&)> mutate;
  };
  const std::vector<Case> cases = {
      {"hidden_size", [](ModelConfig& c) { c.hidden_size = 0; }},
      {"vocab_size", [](ModelConfig& c) { c.vocab_size = -1; }},
      {"num_hidden_layers", [](ModelConfig& c) { c.num_hidden_layers = 0; }},
      {"num_attention_heads", [](ModelConfig& c) { c.num_attention_heads = 0; }},
      {"q_lora_rank", [](ModelConfig& c) { c.q_lora_rank = -5; }},
      {"v_head_dim", [](ModelConfig& c) { c.v_head_dim = 0; }},
      {"rms_norm_eps", [](ModelConfig& c) { c.rms_norm_eps = 0.0f; }},
      {"intermediate_size", [](ModelConfig& c) { c.intermediate_size = 0; }},
      {"moe_intermediate_size", [](ModelConfig& c) { c.moe_intermediate_size = 0; }},
      {"kv_lora_rank", [](ModelConfig& c) { c.kv_lora_rank = 192; }},
      {"index_head_dim", [](ModelConfig& c) { c.index_head_dim = 96; }},
      {"index_head_dim", [](ModelConfig& c) { c.index_head_dim = 32; }},  // not > rope (32)
      {"qk_rope_head_dim", [](ModelConfig& c) { c.qk_rope_head_dim = c.rope.dim = 31; }},
      {"qk_rope_head_dim", [](ModelConfig& c) { c.rope.dim = 16; }},
      {"n_routed_experts", [](ModelConfig& c) { c.n_routed_experts = 9; }},
      {"n_group", [](ModelConfig& c) { c.n_group = 8; c.topk_group = 2; }},  // 1 per group
      {"topk_group", [](ModelConfig& c) { c.topk_group = 5; }},
      {"num_experts_per_tok", [](ModelConfig& c) { c.num_experts_per_tok = 5; }},
      {"misa_topk_heads", [](ModelConfig& c) { c.misa_topk_heads = 0; }},
      {"misa_topk_heads", [](ModelConfig& c) { c.misa_topk_heads = 9; }},
      {"misa_stage1_topk", [](ModelConfig& c) { c.misa_stage1_topk = 255; }},
      {"hisa_topk_blocks", [](ModelConfig& c) { c.hisa_topk_blocks = 1; }},
      {"first_k_dense_replace", [](ModelConfig& c) { c.first_k_dense_replace = 5; }},
      {"misa_k_block_size", [](ModelConfig& c) { c.misa_k_block_size = 0; }},
      {"misa_k_block_size", [](ModelConfig& c) { c.misa_k_block_size = 100; }},
      {"bos_token_id", [](ModelConfig& c) { c.bos_token_id = 258; }},
      {"eos_token_id", [](ModelConfig& c) { c.eos_token_id = -1; }},
      {"rope_scaling.factor", [](ModelConfig& c) { c.rope.factor = 0.5f; }},
      {"rope_scaling.beta_fast", [](ModelConfig& c) { c.rope.beta_fast = 0.5f; }},
      {"quantization_config.weight_block_size", [](ModelConfig& c) { c.weight_block_size = 0; }},
      {"scoring_func", [](ModelConfig& c) { c.scoring_func = "softmax"; }},
      {"topk_method", [](ModelConfig& c) { c.topk_method = "greedy"; }},
      {"moe_layer_freq", [](ModelConfig& c) { c.moe_layer_freq = 0; }},
  };
  for (const Case& k : cases) {
    ModelConfig c = *base;
    k.mutate(c);
    absl::Status s = ValidateConfig(c);
    ASSERT_FALSE(s.ok()) << k.field;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << k.field;
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat("'", k.field, "'"))) << k.field;
  }
  // ParseConfigJson validates too.
  absl::StatusOr<ModelConfig> c =
      ParseConfigJson(V32With(R"("kv_lora_rank": 512)", R"("kv_lora_rank": 500)"));
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("'kv_lora_rank'"));
  // A model without MoE layers needs no valid expert fields.
  ModelConfig dense = *base;
  dense.first_k_dense_replace = dense.num_hidden_layers;
  dense.n_routed_experts = 0;
  EXPECT_TRUE(ValidateConfig(dense).ok()) << ValidateConfig(dense);
}

TEST(ConfigTest, Presets) {
  absl::StatusOr<ModelConfig> v32 = PresetConfig("v32");
  ASSERT_TRUE(v32.ok());
  absl::StatusOr<ModelConfig> parsed = ParseConfigJson(kV32ConfigJson);
  ASSERT_TRUE(parsed.ok());
  ExpectSameConfig(*v32, *parsed);  // the preset is the real config
  EXPECT_TRUE(ValidateConfig(*v32).ok());

  absl::StatusOr<ModelConfig> t = PresetConfig("tiny");
  ASSERT_TRUE(t.ok());
  EXPECT_TRUE(ValidateConfig(*t).ok()) << ValidateConfig(*t);
  EXPECT_EQ(t->vocab_size, 258);
  EXPECT_EQ(t->bos_token_id, 256);
  EXPECT_EQ(t->eos_token_id, 257);
  EXPECT_EQ(t->hidden_size, 256);
  EXPECT_EQ(t->num_hidden_layers, 4);
  EXPECT_EQ(t->first_k_dense_replace, 1);
  EXPECT_EQ(t->intermediate_size, 512);
  EXPECT_EQ(t->moe_intermediate_size, 128);
  EXPECT_EQ(t->n_routed_experts, 8);
  EXPECT_EQ(t->num_experts_per_tok, 2);
  EXPECT_EQ(t->n_group, 4);
  EXPECT_EQ(t->topk_group, 2);
  EXPECT_EQ(t->n_shared_experts, 1);
  EXPECT_EQ(t->num_attention_heads, 4);
  EXPECT_EQ(t->q_lora_rank, 128);
  EXPECT_EQ(t->kv_lora_rank, 128);
  EXPECT_EQ(t->qk_nope_head_dim, 32);
  EXPECT_EQ(t->qk_rope_head_dim, 32);
  EXPECT_EQ(t->rope.dim, 32);
  EXPECT_EQ(t->v_head_dim, 32);
  EXPECT_EQ(t->index_n_heads, 8);
  EXPECT_EQ(t->index_head_dim, 64);
  EXPECT_EQ(t->index_topk, 256);
  EXPECT_EQ(t->misa_topk_heads, 2);
  EXPECT_EQ(t->misa_k_block_size, 256);
  EXPECT_EQ(t->misa_stage1_topk, 1024);
  EXPECT_EQ(t->hisa_block_size, 64);
  EXPECT_EQ(t->hisa_topk_blocks, 16);
  EXPECT_EQ(t->selection_mode, kernels::SelectionMode::kMisa);
  EXPECT_TRUE(t->fp8_weights);
  EXPECT_EQ(t->weight_block_size, 128);
  EXPECT_TRUE(t->rope.yarn);
  EXPECT_EQ(t->rope.factor, 40.0f);
  EXPECT_EQ(t->max_position_embeddings, 163840);
  EXPECT_EQ(t->rms_norm_eps, 1e-6f);

  absl::StatusOr<ModelConfig> bad = PresetConfig("v3");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.status().message(), HasSubstr("\"v3\""));
  EXPECT_THAT(bad.status().message(), HasSubstr("tiny"));
  EXPECT_THAT(bad.status().message(), HasSubstr("v32"));
}

TEST(ConfigTest, LoadConfigFromFile) {
  const std::string dir = ::testing::TempDir() + "/config_test_" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(WriteStringToFile(dir + "/config.json", kV32ConfigJson).ok());
  absl::StatusOr<ModelConfig> c = LoadConfig(dir + "/config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 7168);

  ASSERT_TRUE(WriteStringToFile(dir + "/bad.json", V32With("7168", "\"x\"")).ok());
  c = LoadConfig(dir + "/bad.json");
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr(dir + "/bad.json"));
  EXPECT_THAT(c.status().message(), HasSubstr("'hidden_size'"));

  c = LoadConfig(dir + "/missing.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace pd::model
