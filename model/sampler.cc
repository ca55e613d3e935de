#include "model/sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace pd::model {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling: temperature must be a finite value >= 0 (0 = greedy), got ", p.temperature));
  }
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling: top_p must be in (0, 1] (1 = off), got ", p.top_p));
  }
  if (p.top_k < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("sampling: top_k must be >= 0 (0 = off), got ", p.top_k));
  }
  return absl::OkStatus();
}

absl::StatusOr<Sampler> Sampler::Create(const SamplingParams& params) {
  absl::Status s = ValidateSamplingParams(params);
  if (!s.ok()) return s;
  return Sampler(params);
}

double Sampler::NextUniform() { return double(rng_() >> 11) * 0x1.0p-53; }

absl::StatusOr<int32_t> Sampler::Sample(std::span<const float> logits) {
  const size_t n = logits.size();
  if (n == 0) return absl::InvalidArgumentError("sampling: empty logits");
  if (n > size_t(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("sampling: more logits than int32 ids");
  }
  size_t best = 0;
  for (size_t i = 0; i < n; ++i) {
    const float l = logits[i];
    if (std::isnan(l)) return absl::InvalidArgumentError(absl::StrCat("sampling: logits[", i, "] is NaN"));
    if (l == std::numeric_limits<float>::infinity()) {
      return absl::InvalidArgumentError(absl::StrCat("sampling: logits[", i, "] is +inf"));
    }
    if (l > logits[best]) best = i;  // strict: ties keep the lower id
  }
  if (params_.temperature == 0.0f) return int32_t(best);

  const double max_logit = logits[best];
  if (std::isinf(max_logit)) {
    return absl::InvalidArgumentError("sampling: every logit is -inf");
  }
  const double temperature = params_.temperature;
  probs_.resize(n);
  for (size_t i = 0; i < n; ++i) probs_[i] = std::exp((double(logits[i]) - max_logit) / temperature);

  const bool use_k = params_.top_k > 0 && size_t(params_.top_k) < n;
  const bool use_p = params_.top_p < 1.0f;
  const double u = NextUniform();  // one draw per call, whatever is kept

  if (!use_k && !use_p) {
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += probs_[i];
    const double target = u * total;
    double cum = 0.0;
    size_t last = best;
    for (size_t i = 0; i < n; ++i) {
      if (probs_[i] <= 0.0) continue;
      cum += probs_[i];
      last = i;
      if (target < cum) return int32_t(i);
    }
    return int32_t(last);  // rounding: u * total landed on the total
  }

  // Candidates ordered by probability descending, ties -> lower id.
  const std::vector<double>& p = probs_;
  auto before = [&p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
  order_.resize(n);
  for (size_t i = 0; i < n; ++i) order_[i] = int32_t(i);

  const size_t limit = use_k ? size_t(params_.top_k) : n;  // tokens top-k leaves
  double mass = 0.0;                                       // of the top-k set
  if (use_k) {
    std::nth_element(order_.begin(), order_.begin() + limit, order_.end(), before);
    std::sort(order_.begin(), order_.begin() + limit, before);
    for (size_t j = 0; j < limit; ++j) mass += p[order_[j]];
  } else {
    for (size_t i = 0; i < n; ++i) mass += p[i];
  }

  size_t keep = limit;
  if (use_p) {
    const double target = double(params_.top_p) * mass * (1.0 - 1e-12);
    // Sort a growing prefix until it holds the nucleus (usually a few tokens).
    size_t sorted = use_k ? limit : 0;
    size_t m = use_k ? limit : std::min<size_t>(n, 64);
    while (true) {
      if (m > sorted) {
        if (m < n) std::nth_element(order_.begin(), order_.begin() + m, order_.end(), before);
        std::sort(order_.begin(), order_.begin() + m, before);
        sorted = m;
      }
      double cum = 0.0;
      size_t j = 0;
      for (; j < m; ++j) {
        cum += p[order_[j]];
        if (cum >= target) break;
      }
      if (j < m) {
        keep = j + 1;
        break;
      }
      if (m >= limit) {
        keep = limit;
        break;
      }
      m = std::min(limit, m * 4);
    }
  }

  // Inverse CDF over the kept tokens in ascending id order.
  std::sort(order_.begin(), order_.begin() + keep);
  double total = 0.0;
  for (size_t j = 0; j < keep; ++j) total += p[order_[j]];
  const double target = u * total;
  double cum = 0.0;
  int32_t last = order_[0];
  for (size_t j = 0; j < keep; ++j) {
    const int32_t id = order_[j];
    if (p[id] <= 0.0) continue;
    cum += p[id];
    last = id;
    if (target < cum) return id;
  }
  return last;
}

}  // namespace pd::model
