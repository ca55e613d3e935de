// Random checkpoints in the Hugging Face DeepSeek-V3.2 layout, for tests, demos
// and benchmarks without downloading weights.
#ifndef PD_MODEL_CHECKPOINT_WRITER_H_
#define PD_MODEL_CHECKPOINT_WRITER_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "model/config.h"

namespace pd::model {

struct RandomCheckpointOptions {
  // Upper bound on each shard's tensor bytes (SafetensorsWriterOptions).
  uint64_t max_shard_bytes = uint64_t{4} << 30;
  // When > 0, replace config.num_hidden_layers / config.n_routed_experts (for
  // small test checkpoints of a big preset). The written config.json carries
  // the replaced values (first_k_dense_replace is clamped to the new layer
  // count); the result must still pass ValidateConfig.
  int num_hidden_layers = 0;
  int n_routed_experts = 0;
};

// Writes `dir`/config.json (ConfigToJson), model.safetensors.index.json and
// model-0000i-of-0000n.safetensors holding every tensor LoadWeights needs, with
// the Hugging Face names, shapes and dtypes of DeepSeek-V3.2:
//   - with config.fp8_weights, the projections (q_a_proj, q_b_proj,
//     kv_a_proj_with_mqa, kv_b_proj, o_proj, indexer.wq_b, indexer.wk and every
//     gate_proj/up_proj/down_proj of dense layers, experts and shared experts)
//     are F8_E4M3 with an F32 "<name>_scale_inv" of
//     [ceil(R/block), ceil(C/block)] block scales: per block,
//     scale = kernels::Fp8Scale(amax, config.scale_ue8m0) (2^ceil(log2(amax/448))
//     under ue8m0) and q = e4m3(w / scale); without fp8_weights they are BF16;
//   - embed_tokens, lm_head (absent when tie_word_embeddings), the norms,
//     mlp.gate.weight, indexer.weights_proj and indexer.k_norm.{weight,bias}
//     are BF16; mlp.gate.e_score_correction_bias is F32.
// Initialisation (N(mean, variance)): Linear weights N(0, 1/in_features);
// o_proj and every down_proj additionally scaled by 1/sqrt(2 * num_layers);
// embed_tokens N(0, 1); norm weights 1, k_norm bias 0; router weights
// N(0, 1/hidden); e_score_correction_bias N(0, 0.01) (std 0.1).
// Deterministic for a seed: tensor T draws from a std::mt19937_64 seeded with
// XXH3-64(T's name, seed) through a Box-Muller transform computed in double, so
// a tensor's values do not depend on the other tensors (changing the layer or
// expert count leaves the common tensors' values unchanged; the FP8 scales of
// o_proj / down_proj change with the layer count as their std does).
// Streams tensor by tensor: memory stays at one 128-row block of the widest
// matrix (plus 4 Mi elements for BF16 chunks), whatever the model size.
// Every tensor's byte size must be a multiple of 4 (true for any config with
// even dimensions) so that all tensors stay aligned; InvalidArgument otherwise.
// The tokenizer is not written.
absl::Status WriteRandomCheckpoint(const std::string& dir, const ModelConfig& config,
                                   uint64_t seed, const RandomCheckpointOptions& options = {});

}  // namespace pd::model

#endif  // PD_MODEL_CHECKPOINT_WRITER_H_
