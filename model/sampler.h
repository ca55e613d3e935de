// Token sampling from fp32 logits: greedy, temperature, top-k and top-p
// (nucleus), with a seeded, library-independent RNG.
#ifndef PD_MODEL_SAMPLER_H_
#define PD_MODEL_SAMPLER_H_

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace pd::model {

struct SamplingParams {
  float temperature = 1.0f;  // >= 0; 0 = greedy (argmax, ties -> lower id)
  float top_p = 1.0f;        // (0, 1]; 1 = off
  int32_t top_k = 0;         // >= 0; 0 = off
  uint64_t seed = 0;         // seeds the sampler's std::mt19937_64
};

// InvalidArgument naming the field: temperature < 0 or not finite, top_p outside
// (0, 1] (or NaN), top_k < 0.
absl::Status ValidateSamplingParams(const SamplingParams& params);

// Samples one token id per call from logits over the vocabulary. Owns its RNG,
// so a sequence of calls with the same params (seed included) and the same
// logits gives the same ids on every platform: uniform doubles are built from
// the raw 64-bit mt19937_64 output (top 53 bits), not std::uniform_real_distribution.
//
// Sample():
//   greedy (temperature == 0): argmax, ties -> lower id; draws no random number.
//   otherwise: p = softmax(logits / temperature) in double; keep the top_k most
//   probable tokens (if top_k > 0; ties -> lower id first); then, renormalised,
//   the smallest prefix of the tokens sorted by probability (descending, ties ->
//   lower id first) whose mass reaches top_p (if top_p < 1; the comparison
//   allows a relative 1e-12 of rounding); renormalise and draw by inverse CDF
//   over the kept tokens in ascending id order. Exactly one uniform draw per call.
// Not thread-safe (one sampler per request).
class Sampler {
 public:
  // InvalidArgument from ValidateSamplingParams.
  static absl::StatusOr<Sampler> Create(const SamplingParams& params);

  // InvalidArgument for empty logits, a NaN or +inf logit (names the index), or
  // (when sampling) logits that are all -inf.
  absl::StatusOr<int32_t> Sample(std::span<const float> logits);

  const SamplingParams& params() const { return params_; }

  // The next uniform double in [0, 1): (rng() >> 11) * 2^-53. Exposed for tests.
  double NextUniform();

 private:
  explicit Sampler(const SamplingParams& params) : params_(params), rng_(params.seed) {}

  SamplingParams params_;
  std::mt19937_64 rng_;
  std::vector<double> probs_;      // scratch, [vocab]
  std::vector<int32_t> order_;     // scratch, kept ids
  std::vector<int32_t> boundary_;  // scratch, ids of one probability bucket
  std::vector<uint8_t> kept_;      // scratch, [vocab] kept mask
};

}  // namespace pd::model

#endif  // PD_MODEL_SAMPLER_H_
