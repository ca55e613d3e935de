#include "model/sampler.h"

#include <algorithm>
#include <array>
#include <cstring>
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

namespace {

// Bucket of a probability in (0, 1] by its binary exponent (biased, 0..2047);
// subnormals and 0 share bucket 0. A higher bucket holds only larger values.
inline int ExponentBucket(double p) {
  uint64_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  return int((bits >> 52) & 0x7FF);
}

}  // namespace

absl::StatusOr<int32_t> Sampler::Sample(std::span<const float> logits) {
  const size_t n = logits.size();
  if (n == 0) return absl::InvalidArgumentError("sampling: empty logits");
  if (n > size_t(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError("sampling: more logits than int32 ids");
  }
  constexpr float kInf = std::numeric_limits<float>::infinity();
  size_t best = 0;
  float best_logit = logits[0];
  bool bad = false;
  for (size_t i = 0; i < n; ++i) {
    const float l = logits[i];
    bad |= !(l < kInf);  // NaN or +inf
    if (l > best_logit) best_logit = l, best = i;  // strict: ties keep the lower id
  }
  if (bad) {
    for (size_t i = 0; i < n; ++i) {
      if (std::isnan(logits[i])) {
        return absl::InvalidArgumentError(absl::StrCat("sampling: logits[", i, "] is NaN"));
      }
      if (logits[i] == kInf) {
        return absl::InvalidArgumentError(absl::StrCat("sampling: logits[", i, "] is +inf"));
      }
    }
  }
  if (params_.temperature == 0.0f) return int32_t(best);

  const double max_logit = best_logit;
  if (std::isinf(max_logit)) {
    return absl::InvalidArgumentError("sampling: every logit is -inf");
  }
  const double temperature = params_.temperature;
  probs_.resize(n);
  for (size_t i = 0; i < n; ++i) probs_[i] = std::exp((double(logits[i]) - max_logit) / temperature);
  const std::vector<double>& p = probs_;

  const bool use_k = params_.top_k > 0 && size_t(params_.top_k) < n;
  const bool use_p = params_.top_p < 1.0f;
  const double u = NextUniform();  // one draw per call, whatever is kept

  if (!use_k && !use_p) {
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) total += p[i];
    const double target = u * total;
    double cum = 0.0;
    size_t last = best;
    for (size_t i = 0; i < n; ++i) {
      if (p[i] <= 0.0) continue;
      cum += p[i];
      last = i;
      if (target < cum) return int32_t(i);
    }
    return int32_t(last);  // rounding: u * total landed on the total
  }

  // The kept set without sorting the vocabulary: a histogram of the
  // probabilities' binary exponents. Every token of a higher bucket is more
  // probable than every token of a lower one, so whole buckets from the top are
  // kept and only the boundary bucket is ordered (p descending, ties -> lower id).
  std::array<double, 2048> bucket_mass{};
  std::array<int64_t, 2048> bucket_count{};
  double mass_all = 0.0;
  for (size_t i = 0; i < n; ++i) {
    const int b = ExponentBucket(p[i]);
    bucket_mass[b] += p[i];
    ++bucket_count[b];
    mass_all += p[i];
  }
  auto before = [&p](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
  // order_ <- the tokens of buckets > b (in id order); boundary_ <- those of bucket b.
  auto gather = [&](int b) {
    order_.clear();
    boundary_.clear();
    for (size_t i = 0; i < n; ++i) {
      const int e = ExponentBucket(p[i]);
      if (e > b) {
        order_.push_back(int32_t(i));
      } else if (e == b) {
        boundary_.push_back(int32_t(i));
      }
    }
  };

  size_t keep = 0;
  if (use_k) {
    // Top-k: whole buckets while they fit, then the best of the boundary bucket.
    const int64_t k = params_.top_k;
    int64_t above = 0;
    int b = 2047;
    while (above + bucket_count[b] < k) above += bucket_count[b--];
    gather(b);
    const size_t need = size_t(k - above);
    std::nth_element(boundary_.begin(), boundary_.begin() + need, boundary_.end(), before);
    order_.insert(order_.end(), boundary_.begin(), boundary_.begin() + need);
    keep = order_.size();
    if (use_p) {
      // Nucleus of the renormalised top-k set: walk it in probability order.
      std::sort(order_.begin(), order_.end(), before);
      double mass = 0.0;
      for (int32_t id : order_) mass += p[id];
      const double target = double(params_.top_p) * mass * (1.0 - 1e-12);
      double cum = 0.0;
      for (size_t j = 0; j < order_.size(); ++j) {
        cum += p[order_[j]];
        if (cum >= target) {
          keep = j + 1;
          break;
        }
      }
    }
  } else {
    // Top-p: whole buckets while the mass stays below the target, then the
    // boundary bucket in order (and the next ones, should rounding require).
    const double target = double(params_.top_p) * mass_all * (1.0 - 1e-12);
    double approx = 0.0;
    int b = 2047;
    while (b > 0 && approx + bucket_mass[b] < target) approx += bucket_mass[b--];
    gather(b);
    double cum = 0.0;
    for (int32_t id : order_) cum += p[id];
    if (cum >= target) {
      // Rounding put the boundary inside the whole buckets: order them instead.
      std::sort(order_.begin(), order_.end(), before);
      cum = 0.0;
      keep = order_.size();
      for (size_t j = 0; j < order_.size(); ++j) {
        cum += p[order_[j]];
        if (cum >= target) {
          keep = j + 1;
          break;
        }
      }
    } else {
      bool reached = false;
      while (true) {
        std::sort(boundary_.begin(), boundary_.end(), before);
        for (int32_t id : boundary_) {
          order_.push_back(id);
          cum += p[id];
          if (cum >= target) {
            reached = true;
            break;
          }
        }
        if (reached || b == 0) break;
        // Next bucket down (order_ keeps what it has; gather only bucket b - 1).
        --b;
        boundary_.clear();
        for (size_t i = 0; i < n; ++i) {
          if (ExponentBucket(p[i]) == b) boundary_.push_back(int32_t(i));
        }
      }
      keep = order_.size();
    }
  }

  // Inverse CDF over the kept tokens in ascending id order (a mask avoids
  // sorting large kept sets).
  kept_.assign(n, 0);
  for (size_t j = 0; j < keep; ++j) kept_[order_[j]] = 1;
  double total = 0.0;
  for (size_t i = 0; i < n; ++i) {
    if (kept_[i]) total += p[i];
  }
  const double target = u * total;
  double cum = 0.0;
  int32_t last = order_[0];
  for (size_t i = 0; i < n; ++i) {
    if (!kept_[i] || p[i] <= 0.0) continue;
    cum += p[i];
    last = int32_t(i);
    if (target < cum) return last;
  }
  return last;
}

}  // namespace pd::model
