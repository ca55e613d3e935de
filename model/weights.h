// The model's weights, viewed zero-copy in memory-mapped safetensors shards
// (Hugging Face DeepSeek-V3.2 layout: config.json, model.safetensors.index.json,
// model-0000i-of-0000n.safetensors). Large matrices stay in their checkpoint
// dtype (FP8 e4m3 with 128x128 `weight_scale_inv` block scales, bf16, f16 or
// f32) and are read through kernels::WeightView; small vectors (norm weights,
// biases) are converted to fp32 at load.
#ifndef PD_MODEL_WEIGHTS_H_
#define PD_MODEL_WEIGHTS_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/tensor.h"
#include "model/config.h"

namespace pd::model {

class SafetensorsCheckpoint;  // model/safetensors.h

struct FfnWeights {
  kernels::WeightView gate;  // [inter, hidden]  gate_proj
  kernels::WeightView up;    // [inter, hidden]  up_proj
  kernels::WeightView down;  // [hidden, inter]  down_proj
};

struct LayerWeights {
  std::vector<float> attn_norm;      // input_layernorm.weight [hidden]
  kernels::WeightView q_a;           // self_attn.q_a_proj [q_lora, hidden]
  std::vector<float> q_a_norm;       // self_attn.q_a_layernorm [q_lora]
  kernels::WeightView q_b;           // self_attn.q_b_proj [H*(nope+rope), q_lora]
  kernels::WeightView kv_a;          // self_attn.kv_a_proj_with_mqa [kv_lora+rope, hidden]
  std::vector<float> kv_a_norm;      // self_attn.kv_a_layernorm [kv_lora]
  kernels::WeightView kv_b;          // self_attn.kv_b_proj [H*(nope+v), kv_lora]
  kernels::WeightView o;             // self_attn.o_proj [hidden, H*v]
  // DSA indexer (self_attn.indexer.*)
  kernels::WeightView idx_wq_b;      // wq_b [IH*ID, q_lora]
  kernels::WeightView idx_wk;        // wk [ID, hidden]
  std::vector<float> idx_k_norm_w;   // k_norm.weight [ID]
  std::vector<float> idx_k_norm_b;   // k_norm.bias [ID]
  kernels::WeightView idx_weights_proj;  // weights_proj [IH, hidden]
  // FFN
  std::vector<float> ffn_norm;       // post_attention_layernorm.weight [hidden]
  bool moe = false;
  FfnWeights dense;                  // mlp.{gate,up,down}_proj (dense layers)
  kernels::WeightView router;        // mlp.gate.weight [E, hidden]
  std::vector<float> router_bias;    // mlp.gate.e_score_correction_bias [E]
  std::vector<FfnWeights> experts;   // mlp.experts.E.* [moe_inter, hidden]...
  FfnWeights shared;                 // mlp.shared_experts.* [n_shared*moe_inter, hidden]...
};

// Owns the mapped shards; every WeightView points into them.
struct ModelWeights {
  ModelConfig config;
  kernels::WeightView embed;         // model.embed_tokens.weight [vocab, hidden]
  std::vector<float> final_norm;     // model.norm.weight [hidden]
  kernels::WeightView lm_head;       // lm_head.weight [vocab, hidden] (or embed when tied)
  std::vector<LayerWeights> layers;  // num_hidden_layers (extra MTP layers are ignored)
  std::shared_ptr<SafetensorsCheckpoint> checkpoint;
  std::string fingerprint;           // hex XXH3-128 of config + tensor names, dtypes, shapes, data
                                     // (ConfigToJson + every checkpoint tensor in name order; above
                                     // 4 GiB of tensors, tensors > 6 MiB hash only their first/last
                                     // 1 MiB and 64 spaced 64 KiB windows: see
                                     // SafetensorsCheckpoint::Fingerprint)

  ModelWeights();
  ~ModelWeights();
};

// Loads a checkpoint directory with `config` (usually LoadConfig(dir +
// "/config.json")). Errors name the file and tensor: NotFound for a missing
// tensor or shard, InvalidArgument for a wrong dtype or shape, DataLoss for a
// truncated or corrupt file.
absl::StatusOr<std::unique_ptr<ModelWeights>> LoadWeights(const std::string& dir,
                                                          const ModelConfig& config);

}  // namespace pd::model

#endif  // PD_MODEL_WEIGHTS_H_
