// Model configuration: every field of a Hugging Face DeepSeek-V3.2 config.json
// that shapes the model, the MISA fields, and the selection mode.
#ifndef PD_MODEL_CONFIG_H_
#define PD_MODEL_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/indexer.h"
#include "kernels/kv_layout.h"
#include "kernels/ops.h"

namespace pd::model {

struct ModelConfig {
  // --- Hugging Face config.json fields (DeepSeek-V3.2 names) ---
  std::string model_type = "deepseek_v32";
  int64_t vocab_size = 129280;
  int hidden_size = 7168;
  int intermediate_size = 18432;        // dense FFN
  int moe_intermediate_size = 2048;     // per expert
  int num_hidden_layers = 61;
  int first_k_dense_replace = 3;        // layers [0, k) use the dense FFN
  int moe_layer_freq = 1;
  int num_attention_heads = 128;
  int q_lora_rank = 1536;
  int kv_lora_rank = 512;
  int qk_nope_head_dim = 128;
  int qk_rope_head_dim = 64;
  int v_head_dim = 128;
  int n_routed_experts = 256;
  int n_shared_experts = 1;
  int num_experts_per_tok = 8;
  int n_group = 8;
  int topk_group = 4;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 2.5f;
  std::string scoring_func = "sigmoid";
  std::string topk_method = "noaux_tc";
  float rms_norm_eps = 1e-6f;
  int64_t max_position_embeddings = 163840;
  int64_t bos_token_id = 0;
  int64_t eos_token_id = 1;
  bool tie_word_embeddings = false;
  // rope / YaRN (rope_theta + rope_scaling{type, factor,
  // original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim})
  kernels::YarnParams rope;             // rope.dim == qk_rope_head_dim
  float rope_mscale = 1.0f;
  float rope_mscale_all_dim = 1.0f;
  // indexer
  int index_n_heads = 64;
  int index_head_dim = 128;
  int index_topk = 2048;
  // quantization_config: fp8 e4m3 with [128, 128] blocks, ue8m0 scales
  bool fp8_weights = true;
  int weight_block_size = 128;
  bool scale_ue8m0 = true;              // "scale_fmt": "ue8m0"

  // --- MISA (names as in the released patch) ---
  int misa_topk_heads = 8;              // h
  int misa_k_block_size = 1024;         // B
  int misa_stage1_topk = 8192;          // C (MISA-dagger)
  // HISA (comparison / composition)
  int hisa_block_size = 128;
  int hisa_topk_blocks = 64;
  // The sparse-selection mode: dense (DSA), misa, misa_dagger, hisa.
  kernels::SelectionMode selection_mode = kernels::SelectionMode::kMisa;

  // --- derived ---
  int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool IsMoeLayer(int layer) const {
    return layer >= first_k_dense_replace && (layer % moe_layer_freq) == 0;
  }
  float SoftmaxScale() const;  // qk_head_dim^-0.5 * mscale^2 (YaRN)
  kernels::KvLayout Layout() const;
  kernels::SelectionConfig Selection() const;
};

// Parses a Hugging Face config.json (text). Fields absent from the JSON keep
// the v32 defaults above; misa_* / selection_mode / hisa_* may appear in the
// JSON too. InvalidArgument with the field name for a wrong type or value.
absl::StatusOr<ModelConfig> ParseConfigJson(absl::string_view json);
absl::StatusOr<ModelConfig> LoadConfig(const std::string& path);  // path to config.json
// Serialises every field above as a Hugging Face style config.json.
std::string ConfigToJson(const ModelConfig& c);
// Checks internal consistency (divisibility, power-of-two Hadamard dims, rope
// dims, h <= H, group counts...). InvalidArgument naming the offending field.
absl::Status ValidateConfig(const ModelConfig& c);

// Presets: "tiny" (the CPU demo/test model) and "v32" (DeepSeek-V3.2 671B).
absl::StatusOr<ModelConfig> PresetConfig(absl::string_view name);

}  // namespace pd::model

#endif  // PD_MODEL_CONFIG_H_
