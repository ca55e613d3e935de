// Monolithic generation (prefill + decode on one model), for the CLI, the demo
// and tests; the daemons split the same steps across nodes.
#ifndef PD_MODEL_GENERATOR_H_
#define PD_MODEL_GENERATOR_H_

#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/forward.h"
#include "model/sampler.h"

namespace pd::model {

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  int64_t prefill_chunk = 2048;  // tokens per prefill forward call
  bool stop_at_eos = true;       // stop after sampling config.eos_token_id
  SamplingParams sampling;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (the EOS too, when it stopped there)
  int64_t prompt_tokens = 0;
  double prefill_seconds = 0;   // prompt prefill, to the first sampled token
  double decode_seconds = 0;    // every later step
  std::string finish_reason;    // "stop" (EOS), "length", or "callback"
};

// Called with each sampled token; returning false stops generation.
using TokenCallback = std::function<bool(int32_t)>;

// Prefills `tokens` into sequence `seq` (whose cached length is the start
// position) in chunks of `chunk`, returning the logits of the last token.
absl::StatusOr<std::vector<float>> Prefill(Model& model, int32_t seq, std::span<const int32_t> tokens,
                                           int64_t chunk, ForwardObserver* observer = nullptr);

// Generates from `prompt` on a fresh KV sequence (released at the end).
absl::StatusOr<GenerateResult> Generate(Model& model, std::span<const int32_t> prompt,
                                        const GenerateOptions& options,
                                        const TokenCallback& on_token = nullptr);

}  // namespace pd::model

#endif  // PD_MODEL_GENERATOR_H_
