#include "model/generator.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace pd::model {
namespace {
double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

absl::StatusOr<std::vector<float>> Prefill(Model& model, int32_t seq, std::span<const int32_t> tokens,
                                           int64_t chunk, ForwardObserver* observer) {
  if (tokens.empty()) return absl::InvalidArgumentError("empty prompt");
  if (chunk <= 0) return absl::InvalidArgumentError(absl::StrCat("prefill chunk must be positive, got ", chunk));
  std::vector<float> logits;
  int64_t pos = model.cache()->Length(seq);
  for (size_t off = 0; off < tokens.size(); off += size_t(chunk)) {
    size_t n = std::min(tokens.size() - off, size_t(chunk));
    ForwardBatch batch;
    batch.tokens.assign(tokens.begin() + off, tokens.begin() + off + n);
    batch.segments.push_back(Segment{seq, pos, int64_t(n)});
    batch.logits = off + n == tokens.size() ? ForwardBatch::Logits::kLastOfSegment
                                            : ForwardBatch::Logits::kNone;
    PD_ASSIGN_OR_RETURN(logits, model.Forward(batch, observer));
    pos += int64_t(n);
  }
  return logits;
}

absl::StatusOr<GenerateResult> Generate(Model& model, std::span<const int32_t> prompt,
                                        const GenerateOptions& options, const TokenCallback& on_token) {
  if (options.max_new_tokens < 0) return absl::InvalidArgumentError("max_new_tokens must be >= 0");
  PD_ASSIGN_OR_RETURN(Sampler sampler, Sampler::Create(options.sampling));
  kvcache::KvCache* cache = model.cache();
  const int64_t total = int64_t(prompt.size()) + std::max<int64_t>(options.max_new_tokens, 1);
  PD_ASSIGN_OR_RETURN(kvcache::ScopedSequence owned, kvcache::ScopedSequence::Create(cache, total));
  const int32_t seq = owned.id();

  GenerateResult result;
  result.prompt_tokens = int64_t(prompt.size());
  auto t0 = std::chrono::steady_clock::now();
  PD_ASSIGN_OR_RETURN(std::vector<float> logits, Prefill(model, seq, prompt, options.prefill_chunk));
  result.finish_reason = "length";
  const int64_t eos = model.config().eos_token_id;
  for (int64_t step = 0; step < options.max_new_tokens; ++step) {
    PD_ASSIGN_OR_RETURN(int32_t tok, sampler.Sample(logits));
    result.tokens.push_back(tok);
    if (step == 0) {
      result.prefill_seconds = Seconds(t0);
      t0 = std::chrono::steady_clock::now();
    }
    if (on_token && !on_token(tok)) {
      result.finish_reason = "callback";
      break;
    }
    if (options.stop_at_eos && tok == eos) {
      result.finish_reason = "stop";
      break;
    }
    if (step + 1 == options.max_new_tokens) break;
    ForwardBatch batch;
    batch.tokens = {tok};
    batch.segments.push_back(Segment{seq, cache->Length(seq), 1});
    PD_ASSIGN_OR_RETURN(logits, model.Forward(batch));
  }
  if (result.tokens.empty()) result.prefill_seconds = Seconds(t0);
  else if (result.tokens.size() > 1) result.decode_seconds = Seconds(t0);
  return result;
}

}  // namespace pd::model
