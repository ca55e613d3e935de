#include "model/sampler.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_cat.h"

namespace pd::model {
namespace {

using ::testing::HasSubstr;

Sampler MustCreate(const SamplingParams& p) {
  auto s = Sampler::Create(p);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(*s);
}

// Reference softmax(logits / t) in double, written out plainly.
std::vector<double> Softmax(const std::vector<float>& logits, double t) {
  double m = -std::numeric_limits<double>::infinity();
  for (float l : logits) m = std::max(m, double(l) / t);
  std::vector<double> p;
  double z = 0;
  for (float l : logits) z += std::exp(double(l) / t - m);
  for (float l : logits) p.push_back(std::exp(double(l) / t - m) / z);
  return p;
}

// Draws `n` samples and returns the count per id.
std::vector<int64_t> Histogram(Sampler& s, const std::vector<float>& logits, int n) {
  std::vector<int64_t> counts(logits.size(), 0);
  for (int i = 0; i < n; ++i) {
    auto id = s.Sample(logits);
    EXPECT_TRUE(id.ok()) << id.status();
    if (!id.ok()) break;
    ++counts[*id];
  }
  return counts;
}

// Pearson chi-square statistic over the ids with expected probability > 0;
// an id with expected probability 0 must never be drawn.
double ChiSquare(const std::vector<int64_t>& counts, const std::vector<double>& expected, int n) {
  double chi2 = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (expected[i] == 0) {
      EXPECT_EQ(counts[i], 0) << "id " << i << " has probability 0 but was drawn";
      continue;
    }
    double e = expected[i] * n;
    chi2 += (counts[i] - e) * (counts[i] - e) / e;
  }
  return chi2;
}

// Upper 1e-4 critical values of chi-square for 1..4 degrees of freedom. With
// fixed seeds the tests are deterministic; these bounds say the frequencies are
// what the distribution predicts, not tuned to one seed.
double Chi2Critical(int dof) {
  static const double kCrit[] = {0, 15.14, 18.42, 21.11, 23.51};
  return kCrit[dof];
}

constexpr int kDraws = 200000;

TEST(SamplerTest, UniformIsTopBitsOfMt19937_64) {
  Sampler s = MustCreate({.temperature = 1.0f, .seed = 1234});
  std::mt19937_64 ref(1234);
  for (int i = 0; i < 100; ++i) {
    double u = s.NextUniform();
    EXPECT_EQ(u, double(ref() >> 11) / 9007199254740992.0);  // 2^53
    EXPECT_GE(u, 0.0);
    EXPECT_LT(u, 1.0);
  }
}

TEST(SamplerTest, GreedyPicksArgmaxLowestIdOnTies) {
  Sampler s = MustCreate({.temperature = 0.0f});
  EXPECT_EQ(*s.Sample(std::vector<float>{0.5f, 3.0f, -1.0f, 2.0f}), 1);
  EXPECT_EQ(*s.Sample(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}), 1);  // tie -> lower id
  EXPECT_EQ(*s.Sample(std::vector<float>{7.0f, 7.0f, 7.0f}), 0);
  const float ninf = -std::numeric_limits<float>::infinity();
  EXPECT_EQ(*s.Sample(std::vector<float>{ninf, -1e30f, ninf}), 1);
  // top-k / top-p do not change greedy.
  Sampler t = MustCreate({.temperature = 0.0f, .top_p = 0.1f, .top_k = 1});
  EXPECT_EQ(*t.Sample(std::vector<float>{1.0f, 2.0f, 4.0f, 4.0f}), 2);
}

TEST(SamplerTest, TemperatureFrequenciesMatchSoftmax) {
  const std::vector<float> logits = {1.0f, 2.0f, 0.5f, -1.0f, 1.5f};
  for (float t : {0.7f, 1.0f, 2.5f}) {
    SCOPED_TRACE(absl::StrCat("temperature ", t));
    Sampler s = MustCreate({.temperature = t, .seed = 99});
    std::vector<int64_t> counts = Histogram(s, logits, kDraws);
    std::vector<double> p = Softmax(logits, t);
    EXPECT_LT(ChiSquare(counts, p, kDraws), Chi2Critical(4));
    // And each frequency within 5 standard deviations.
    for (size_t i = 0; i < p.size(); ++i) {
      double sd = std::sqrt(p[i] * (1 - p[i]) / kDraws);
      EXPECT_NEAR(double(counts[i]) / kDraws, p[i], 5 * sd) << "id " << i;
    }
  }
}

TEST(SamplerTest, NegativeInfinityIsNeverDrawn) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const std::vector<float> logits = {0.0f, ninf, 1.0f, ninf, 0.5f};
  Sampler s = MustCreate({.temperature = 1.0f, .seed = 5});
  std::vector<int64_t> counts = Histogram(s, logits, kDraws);
  std::vector<double> p = Softmax(logits, 1.0);
  EXPECT_EQ(p[1], 0.0);
  EXPECT_LT(ChiSquare(counts, p, kDraws), Chi2Critical(2));
}

TEST(SamplerTest, TopKKeepsTheKMostLikely) {
  // Probabilities 0.1 0.4 0.2 0.25 0.05 (logits are their logs): top-2 = {1, 3},
  // renormalised to 0.4/0.65 and 0.25/0.65.
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f),
                                     std::log(0.25f), std::log(0.05f)};
  Sampler s = MustCreate({.temperature = 1.0f, .top_k = 2, .seed = 3});
  std::vector<int64_t> counts = Histogram(s, logits, kDraws);
  std::vector<double> p = Softmax(logits, 1.0);
  std::vector<double> expected = {0, p[1] / (p[1] + p[3]), 0, p[3] / (p[1] + p[3]), 0};
  EXPECT_LT(ChiSquare(counts, expected, kDraws), Chi2Critical(1));
  // top_k >= vocab is the same as off.
  Sampler all = MustCreate({.temperature = 1.0f, .top_k = 5, .seed = 3});
  EXPECT_LT(ChiSquare(Histogram(all, logits, kDraws), p, kDraws), Chi2Critical(4));
}

TEST(SamplerTest, TopKTiesPreferLowerIds) {
  // Logits 2, 1, 1, 0 with k = 2: the tie between ids 1 and 2 goes to id 1.
  const std::vector<float> logits = {2.0f, 1.0f, 1.0f, 0.0f};
  Sampler s = MustCreate({.temperature = 1.0f, .top_k = 2, .seed = 11});
  std::vector<int64_t> counts = Histogram(s, logits, 20000);
  EXPECT_GT(counts[0], 0);
  EXPECT_GT(counts[1], 0);
  EXPECT_EQ(counts[2], 0);
  EXPECT_EQ(counts[3], 0);
}

TEST(SamplerTest, TopPKeepsTheSmallestNucleus) {
  // Sorted: id1 0.4, id3 0.25, id2 0.2, id0 0.1, id4 0.05.
  //   top_p 0.6: 0.4 + 0.25 = 0.65 >= 0.6 -> {1, 3}.
  //   top_p 0.7: 0.65 < 0.7, + 0.2 = 0.85 -> {1, 3, 2}.
  //   top_p 0.3: 0.4 alone -> {1} (deterministic).
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f),
                                     std::log(0.25f), std::log(0.05f)};
  std::vector<double> p = Softmax(logits, 1.0);
  {
    Sampler s = MustCreate({.temperature = 1.0f, .top_p = 0.6f, .seed = 21});
    std::vector<int64_t> counts = Histogram(s, logits, kDraws);
    double z = p[1] + p[3];
    EXPECT_LT(ChiSquare(counts, {0, p[1] / z, 0, p[3] / z, 0}, kDraws), Chi2Critical(1));
  }
  {
    Sampler s = MustCreate({.temperature = 1.0f, .top_p = 0.7f, .seed = 22});
    std::vector<int64_t> counts = Histogram(s, logits, kDraws);
    double z = p[1] + p[2] + p[3];
    EXPECT_LT(ChiSquare(counts, {0, p[1] / z, p[2] / z, p[3] / z, 0}, kDraws), Chi2Critical(2));
  }
  {
    Sampler s = MustCreate({.temperature = 1.0f, .top_p = 0.3f, .seed = 23});
    std::vector<int64_t> counts = Histogram(s, logits, 1000);
    EXPECT_EQ(counts[1], 1000);
  }
}

TEST(SamplerTest, TopPTiesPreferLowerIds) {
  // 0.3, 0.3, 0.4 with top_p 0.5: id2 (0.4) then the tie goes to id0 -> {2, 0}.
  const std::vector<float> logits = {std::log(0.3f), std::log(0.3f), std::log(0.4f)};
  Sampler s = MustCreate({.temperature = 1.0f, .top_p = 0.5f, .seed = 31});
  std::vector<int64_t> counts = Histogram(s, logits, 20000);
  EXPECT_GT(counts[0], 0);
  EXPECT_EQ(counts[1], 0);
  EXPECT_GT(counts[2], 0);
}

TEST(SamplerTest, TopKThenTopPOnRenormalisedMass) {
  // Probabilities 0.1 0.4 0.2 0.25 0.05, top_k 3 -> {1, 3, 2} with mass 0.85;
  // renormalised 0.47, 0.29, 0.24. top_p 0.7: 0.47 + 0.29 = 0.76 >= 0.7 -> {1, 3}.
  // (Without top-k first, 0.65 < 0.7 would have kept id 2 too.)
  const std::vector<float> logits = {std::log(0.1f), std::log(0.4f), std::log(0.2f),
                                     std::log(0.25f), std::log(0.05f)};
  Sampler s = MustCreate({.temperature = 1.0f, .top_p = 0.7f, .top_k = 3, .seed = 41});
  std::vector<int64_t> counts = Histogram(s, logits, 50000);
  EXPECT_EQ(counts[0], 0);
  EXPECT_EQ(counts[2], 0);
  EXPECT_EQ(counts[4], 0);
  EXPECT_GT(counts[1], counts[3]);
  EXPECT_GT(counts[3], 0);
}

// The full algorithm written naively (full stable sort, no partial selection),
// for the documented contract. Returns the kept ids in ascending order.
std::vector<int32_t> ReferenceKept(const std::vector<double>& p, const SamplingParams& sp) {
  const size_t n = p.size();
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  size_t keep = n;
  if (sp.top_k > 0 && size_t(sp.top_k) < n) keep = size_t(sp.top_k);
  if (sp.top_p < 1.0f) {
    double mass = 0;
    for (size_t j = 0; j < keep; ++j) mass += p[order[j]];
    double cum = 0;
    for (size_t j = 0; j < keep; ++j) {
      cum += p[order[j]];
      if (cum >= sp.top_p * mass * (1 - 1e-12)) {
        keep = j + 1;
        break;
      }
    }
  }
  std::vector<int32_t> kept(order.begin(), order.begin() + keep);
  std::sort(kept.begin(), kept.end());
  return kept;
}

// Inverse CDF over the kept ids in ascending order with uniform `u`.
int32_t ReferencePick(const std::vector<double>& p, const std::vector<int32_t>& kept, double u) {
  double total = 0;
  for (int32_t id : kept) total += p[id];
  double cum = 0;
  for (int32_t id : kept) {
    cum += p[id];
    if (u * total < cum) return id;
  }
  return kept.back();
}

TEST(SamplerTest, MatchesNaiveReferenceOnLargeVocab) {
  // A DeepSeek-sized vocabulary with a long-tailed distribution whose nucleus
  // spans hundreds of tokens (exercises the growing partial sort).
  const size_t vocab = 129280;
  std::mt19937_64 gen(2024);
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::vector<float> logits(vocab);
  for (float& l : logits) l = normal(gen);
  logits[17] = logits[18] = 9.0f;  // an exact tie among the top
  struct Case {
    SamplingParams params;
    size_t min_kept;  // the nucleus is large enough to need several sort rounds
  } cases[] = {
      {{.temperature = 1.0f, .top_p = 0.9f, .seed = 1}, 1000},
      {{.temperature = 0.6f, .top_p = 0.5f, .seed = 2}, 10},
      {{.temperature = 1.3f, .top_k = 50, .seed = 3}, 50},
      {{.temperature = 0.8f, .top_p = 0.95f, .top_k = 1000, .seed = 4}, 500},
      {{.temperature = 1.0f, .seed = 5}, 129280},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(absl::StrCat("T=", c.params.temperature, " top_p=", c.params.top_p,
                              " top_k=", c.params.top_k));
    const std::vector<double> p = Softmax(logits, c.params.temperature);
    const std::vector<int32_t> kept = ReferenceKept(p, c.params);
    EXPECT_GE(kept.size(), c.min_kept);
    Sampler s = MustCreate(c.params);
    std::mt19937_64 rng(c.params.seed);
    for (int i = 0; i < 200; ++i) {
      double u = double(rng() >> 11) / 9007199254740992.0;
      auto id = s.Sample(logits);
      ASSERT_TRUE(id.ok()) << id.status();
      ASSERT_EQ(*id, ReferencePick(p, kept, u)) << "draw " << i;
    }
  }
}

TEST(SamplerTest, SeededDeterminism) {
  const std::vector<float> logits = {0.3f, 1.2f, -0.4f, 0.9f, 0.0f, 1.1f};
  SamplingParams p{.temperature = 0.9f, .top_p = 0.95f, .top_k = 5, .seed = 777};
  Sampler a = MustCreate(p), b = MustCreate(p);
  std::vector<int32_t> sa, sb;
  for (int i = 0; i < 1000; ++i) {
    sa.push_back(*a.Sample(logits));
    sb.push_back(*b.Sample(logits));
  }
  EXPECT_EQ(sa, sb);
  p.seed = 778;
  Sampler c = MustCreate(p);
  std::vector<int32_t> sc;
  for (int i = 0; i < 1000; ++i) sc.push_back(*c.Sample(logits));
  EXPECT_NE(sa, sc);
  // A rejected call consumes no randomness: the stream continues as before.
  Sampler d = MustCreate(p), e = MustCreate(p);
  EXPECT_FALSE(d.Sample(std::vector<float>{std::nanf("")}).ok());
  for (int i = 0; i < 100; ++i) EXPECT_EQ(*d.Sample(logits), *e.Sample(logits));
}

TEST(SamplerTest, RejectsInvalidParams) {
  struct Case {
    SamplingParams params;
    const char* field;
  } cases[] = {
      {{.temperature = -0.1f}, "temperature"},
      {{.temperature = std::nanf("")}, "temperature"},
      {{.temperature = std::numeric_limits<float>::infinity()}, "temperature"},
      {{.top_p = 0.0f}, "top_p"},
      {{.top_p = -0.5f}, "top_p"},
      {{.top_p = 1.01f}, "top_p"},
      {{.top_p = std::nanf("")}, "top_p"},
      {{.top_k = -1}, "top_k"},
  };
  for (const Case& c : cases) {
    auto s = Sampler::Create(c.params);
    ASSERT_FALSE(s.ok()) << c.field;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.status().message()), HasSubstr(c.field));
    EXPECT_FALSE(ValidateSamplingParams(c.params).ok());
  }
  EXPECT_TRUE(ValidateSamplingParams({.temperature = 0.0f, .top_p = 1.0f, .top_k = 0}).ok());
}

TEST(SamplerTest, RejectsInvalidLogits) {
  Sampler s = MustCreate({.temperature = 1.0f});
  Sampler g = MustCreate({.temperature = 0.0f});
  const float nan = std::nanf("");
  const float inf = std::numeric_limits<float>::infinity();
  for (Sampler* x : {&s, &g}) {
    auto r = x->Sample(std::vector<float>{0.0f, nan, 1.0f});
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("logits[1] is NaN"));
    r = x->Sample(std::vector<float>{0.0f, 1.0f, inf});
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("logits[2] is +inf"));
    EXPECT_FALSE(x->Sample(std::vector<float>{}).ok());
  }
  auto r = s.Sample(std::vector<float>{-inf, -inf});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("-inf"));
}

}  // namespace
}  // namespace pd::model
