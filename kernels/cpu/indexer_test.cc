// Tests of the CPU indexer (kernels/indexer.h) against independent, plainly
// written references: a double-precision scorer, router and HISA selector that
// read the key cache at the byte offsets documented in kernels/kv_layout.h.
#include "kernels/indexer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cpu/internal/indexer_internal.h"
#include "kernels/numeric.h"
#include "kernels/ops.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels {
namespace {

// ---------------------------------------------------------------------------
// A key cache in plain vectors, with a shuffled page table. Offsets are written
// out from the documented layout (not through KvLayout's helpers).
struct TestCache {
  KvLayout layout;
  int d = 0;
  std::vector<uint8_t> pool;
  std::vector<int32_t> pages;
  std::vector<float> sums;

  TestCache(int head_dim, int summary_block, int64_t capacity, uint32_t seed) : d(head_dim) {
    layout.index_head_dim = head_dim;
    layout.summary_block = summary_block;
    const int64_t np = (capacity + 63) / 64;
    pages.resize(np);
    std::iota(pages.begin(), pages.end(), 0);
    for (auto& p : pages) p = p * 2 + 1;  // leave holes: pool holds 2*np+1 pages
    std::shuffle(pages.begin(), pages.end(), std::mt19937(seed));
    pool.assign(size_t(2 * np + 1) * 64 * size_t(head_dim + 4), 0xee);
    sums.assign(size_t((capacity + summary_block - 1) / summary_block) * head_dim, 0.0f);
  }

  size_t PageBase(int64_t s) const { return size_t(pages[size_t(s / 64)]) * 64 * size_t(d + 4); }
  const uint8_t* Codes(int64_t s) const { return pool.data() + PageBase(s) + size_t(s % 64) * d; }
  uint8_t* MutableCodes(int64_t s) { return pool.data() + PageBase(s) + size_t(s % 64) * d; }
  float Scale(int64_t s) const {
    float f;
    std::memcpy(&f, pool.data() + PageBase(s) + 64 * size_t(d) + 4 * size_t(s % 64), 4);
    return f;
  }
  void SetScale(int64_t s, float f) {
    std::memcpy(pool.data() + PageBase(s) + 64 * size_t(d) + 4 * size_t(s % 64), &f, 4);
  }
  double Value(int64_t s, int i) const { return double(Fp8E4M3ToFloat(Codes(s)[i])); }

  IndexKeyCacheRef Ref() {
    IndexKeyCacheRef r;
    r.pool = pool.data();
    r.page_table = pages.data();
    r.summary_sums = sums.data();
    r.layout = layout;
    return r;
  }
  IndexKeyCacheView View(int64_t n) const {
    IndexKeyCacheView v;
    v.pool = pool.data();
    v.page_table = pages.data();
    v.num_tokens = n;
    v.summary_sums = sums.data();
    v.layout = layout;
    return v;
  }
};

// Random projections run through IndexerPrep for tokens 0..L-1 (keys in the
// cache, queries and weights for every token), then the summaries.
struct Fixture {
  int heads, d;
  int64_t len;
  TestCache cache;
  std::vector<uint8_t> q8;
  std::vector<float> w;
  std::vector<int64_t> positions;

  Fixture(int h, int head_dim, int block, int64_t l, uint32_t seed)
      : heads(h), d(head_dim), len(l), cache(head_dim, block, l, seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n01(0.f, 1.f);
    std::vector<float> qp(size_t(l) * h * head_dim), kp(size_t(l) * head_dim), wp(size_t(l) * h);
    std::vector<float> gamma(head_dim), beta(head_dim), inv_freq(size_t(head_dim / 4));
    for (auto& x : qp) x = n01(rng);
    for (auto& x : kp) x = n01(rng);
    for (auto& x : wp) x = n01(rng);
    for (auto& x : gamma) x = 1.0f + 0.2f * n01(rng);
    for (auto& x : beta) x = 0.2f * n01(rng);
    for (size_t i = 0; i < inv_freq.size(); ++i) {
      inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / double(head_dim / 2)));
    }
    positions.resize(l);
    std::iota(positions.begin(), positions.end(), 0);
    IndexerPrepInputs in;
    in.q_proj = qp.data();
    in.k_proj = kp.data();
    in.w_proj = wp.data();
    in.ln_gamma = gamma.data();
    in.ln_beta = beta.data();
    in.positions = positions.data();
    in.inv_freq = inv_freq.data();
    in.rope_dim = head_dim / 2;
    in.num_tokens = l;
    q8.resize(size_t(l) * h * head_dim);
    w.resize(size_t(l) * h);
    cpu::IndexerPrep(in, h, cache.Ref(), q8.data(), w.data());
    cpu::UpdateSummaries(cache.Ref(), 0, l);
  }

  const uint8_t* Q(int64_t t) const { return q8.data() + size_t(t) * heads * d; }
  const float* W(int64_t t) const { return w.data() + size_t(t) * heads; }
  IndexerQueries Queries(int64_t p0, int64_t p1) const {
    IndexerQueries q;
    q.q8 = Q(p0);
    q.weights = W(p0);
    q.positions = positions.data() + p0;
    q.num_queries = p1 - p0;
    return q;
  }
};

SelectionConfig SmallConfig(SelectionMode mode, int heads, int d) {
  SelectionConfig c;
  c.mode = mode;
  c.heads = heads;
  c.head_dim = d;
  c.topk = 32;
  c.misa_heads = 2;
  c.misa_block = 64;
  c.dagger_candidates = 96;
  c.hisa_block = 32;
  c.hisa_topk_blocks = 4;
  return c;
}

std::vector<int32_t> Select(const SelectionConfig& cfg, const IndexKeyCacheView& v,
                            const IndexerQueries& q, cpu::ThreadPool* pool) {
  std::vector<int32_t> out(size_t(q.num_queries) * cfg.topk, -7);
  cpu::SelectTokens(cfg, v, q, out.data(), pool);
  return out;
}

// ---------------------------------------------------------------------------
// Naive double-precision references.

double Dot(const TestCache& c, const uint8_t* qv, int64_t s) {
  double acc = 0;
  for (int i = 0; i < c.d; ++i) acc += double(Fp8E4M3ToFloat(qv[i])) * c.Value(s, i);
  return acc;
}

double AbsDot(const TestCache& c, const uint8_t* qv, int64_t s) {
  double acc = 0;
  for (int i = 0; i < c.d; ++i) acc += std::fabs(double(Fp8E4M3ToFloat(qv[i])) * c.Value(s, i));
  return acc;
}

// score and an error bound for fp32 evaluation (64-term dot: ~D*2^-24 relative).
struct RefScore {
  double score = 0, bound = 0;
};

RefScore NaiveScore(const TestCache& c, const uint8_t* q8, const float* w,
                    const std::vector<int>& heads, int64_t s) {
  RefScore r;
  const double ks = c.Scale(s);
  for (int j : heads) {
    const uint8_t* qv = q8 + size_t(j) * c.d;
    r.score += double(w[j]) * std::max(0.0, Dot(c, qv, s));
    r.bound += std::fabs(double(w[j])) * AbsDot(c, qv, s);
  }
  r.score *= ks;
  r.bound = r.bound * ks * 4e-6 * (c.d / 64.0 + 1) + 1e-30;
  return r;
}

std::vector<int> AllHeads(int h) {
  std::vector<int> v(h);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

// Checks `sel` (one output row) against reference scores ref[0..n): the count is
// min(topk, n), indices are distinct and < n, and rank by rank the selected
// score equals the reference order's score up to `tol` (so any difference from
// the exact reference order is a near-tie). Returns the number of problems.
int CheckAgainstReference(const int32_t* sel, int topk, const std::vector<double>& ref,
                          const std::vector<int64_t>& cand, double tol, const char* what) {
  // cand: the candidate key indices (ref[i] is the score of cand[i]).
  std::vector<size_t> order(cand.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return ref[a] != ref[b] ? ref[a] > ref[b] : cand[a] < cand[b];
  });
  const int valid = int(std::min<size_t>(size_t(topk), cand.size()));
  std::vector<double> by_index;
  int problems = 0;
  std::set<int32_t> seen;
  for (int r = 0; r < topk; ++r) {
    if (r >= valid) {
      if (sel[r] != -1) {
        ++problems;
        std::fprintf(stderr, "%s: slot %d should be -1, got %d\n", what, r, sel[r]);
      }
      continue;
    }
    const auto it = std::find(cand.begin(), cand.end(), int64_t(sel[r]));
    if (it == cand.end() || !seen.insert(sel[r]).second) {
      ++problems;
      std::fprintf(stderr, "%s: slot %d holds %d (not a candidate or repeated)\n", what, r, sel[r]);
      continue;
    }
    const double got = ref[size_t(it - cand.begin())];
    const double want = ref[order[size_t(r)]];
    if (std::fabs(got - want) > tol) {
      ++problems;
      std::fprintf(stderr, "%s: rank %d: key %d score %.9g, reference rank score %.9g (key %lld)\n",
                   what, r, sel[r], got, want, (long long)cand[order[size_t(r)]]);
    }
  }
  return problems;
}

// ---------------------------------------------------------------------------

TEST(IndexerMode, NamesRoundTrip) {
  for (SelectionMode m : {SelectionMode::kDense, SelectionMode::kMisa, SelectionMode::kMisaDagger,
                          SelectionMode::kHisa}) {
    SelectionMode back = SelectionMode::kDense;
    EXPECT_TRUE(ParseSelectionMode(SelectionModeName(m), &back)) << SelectionModeName(m);
    EXPECT_EQ(int(back), int(m));
  }
  EXPECT_EQ(std::string(SelectionModeName(SelectionMode::kMisaDagger)), "misa_dagger");
  SelectionMode m = SelectionMode::kHisa;
  EXPECT_FALSE(ParseSelectionMode("MISA", &m));
  EXPECT_FALSE(ParseSelectionMode("", &m));
  EXPECT_EQ(int(m), int(SelectionMode::kHisa));  // untouched on failure
}

// --- IndexerPrep -------------------------------------------------------------

// e4m3 rounding bound for a value v (half a step, plus a hair for midpoints).
double HalfStep(double v) {
  const double a = std::fabs(v);
  if (a < 0.015625) return 0.0009765625 * 1.001;
  return std::ldexp(1.0, int(std::floor(std::log2(a))) - 4) * 1.001 + 1e-6 * a;
}

// Plain reference of one vector's RoPE / Hadamard; returns the pre-quant values.
std::vector<double> RefRopeHadamard(std::vector<double> x, int64_t pos, const float* inv_freq,
                                    int rope_dim) {
  const int d = int(x.size());
  const int half = rope_dim / 2;
  for (int i = 0; i < half; ++i) {
    const double ang = double(float(pos) * inv_freq[i]);  // angle formed in fp32
    const double a = x[size_t(i)], b = x[size_t(i + half)];
    x[size_t(i)] = a * std::cos(ang) - b * std::sin(ang);
    x[size_t(i + half)] = a * std::sin(ang) + b * std::cos(ang);
  }
  std::vector<double> y(size_t(d), 0.0);
  for (int i = 0; i < d; ++i) {
    for (int j = 0; j < d; ++j) {
      const double sign = (__builtin_popcount(unsigned(i & j)) & 1) ? -1.0 : 1.0;  // Sylvester
      y[size_t(i)] += sign * x[size_t(j)];
    }
    y[size_t(i)] /= std::sqrt(double(d));
  }
  return y;
}

// Compares a quantised vector (codes, scale) with the reference values y.
// Returns false (with a message) on a mismatch; *near_boundary tells when the
// scale could legitimately differ (amax/448 within 1e-5 of a power of two).
bool CheckQuantised(const std::vector<double>& y, const uint8_t* codes, float scale,
                    const std::string& what) {
  double amax = 0;
  for (double v : y) amax = std::max(amax, std::fabs(v));
  const float want_scale = Fp8Scale(float(amax), true);
  const double ratio = std::max(amax, 1e-4) / 448.0;
  const double l2 = std::log2(ratio);
  const bool near_boundary = std::fabs(l2 - std::round(l2)) < 1e-5;
  bool ok = true;
  if (!IsPowerOfTwo(scale)) {
    std::fprintf(stderr, "%s: scale %g is not a power of two\n", what.c_str(), double(scale));
    ok = false;
  }
  if (scale != want_scale && !near_boundary) {
    std::fprintf(stderr, "%s: scale %g, reference %g (amax %.9g)\n", what.c_str(), double(scale),
                 double(want_scale), amax);
    return false;
  }
  for (size_t i = 0; i < y.size(); ++i) {
    const double v = y[i] / double(scale);
    const double got = double(Fp8E4M3ToFloat(codes[i]));
    if (std::fabs(got - v) > HalfStep(v)) {
      std::fprintf(stderr, "%s[%zu]: e4m3 %g vs reference %.9g\n", what.c_str(), i, got, v);
      ok = false;
    }
  }
  return ok;
}

void RunPrepReference(int heads, int d, int rope_dim, uint32_t seed) {
  const int64_t t_count = 9;
  TestCache cache(d, 64, 1024, seed);
  std::vector<float> sentinel_sums = cache.sums;
  for (auto& s : cache.sums) s = 12345.0f;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.f, 1.f);
  std::vector<float> qp(size_t(t_count) * heads * d), kp(size_t(t_count) * d), wp(size_t(t_count) * heads);
  std::vector<float> gamma(d), beta(d), inv_freq(size_t(rope_dim / 2));
  for (auto& x : qp) x = 3.0f * n01(rng);
  for (size_t i = 0; i < kp.size(); ++i) kp[i] = 5.0f + 2.0f * n01(rng) * float(1 + i % 3);
  for (auto& x : wp) x = n01(rng);
  for (auto& x : gamma) x = 1.0f + 0.3f * n01(rng);
  for (auto& x : beta) x = 0.3f * n01(rng);
  for (size_t i = 0; i < inv_freq.size(); ++i) {
    inv_freq[i] = float(std::pow(10000.0, -2.0 * double(i) / double(rope_dim)));
  }
  // Non-contiguous positions across pages (slots 0, 63, ...), one per token.
  std::vector<int64_t> pos = {0, 1, 63, 64, 100, 511, 512, 777, 1023};
  IndexerPrepInputs in;
  in.q_proj = qp.data();
  in.k_proj = kp.data();
  in.w_proj = wp.data();
  in.ln_gamma = gamma.data();
  in.ln_beta = beta.data();
  in.ln_eps = 1e-5f;
  in.positions = pos.data();
  in.inv_freq = inv_freq.data();
  in.rope_dim = rope_dim;
  in.num_tokens = t_count;
  ASSERT_EQ(ValidateIndexerPrep(in, heads, cache.Ref()), std::string());
  std::vector<uint8_t> q8(size_t(t_count) * heads * d);
  std::vector<float> w(size_t(t_count) * heads);
  const std::vector<uint8_t> pool_before = cache.pool;
  cpu::IndexerPrep(in, heads, cache.Ref(), q8.data(), w.data());

  for (int64_t t = 0; t < t_count; ++t) {
    // Key: LayerNorm with biased variance, then RoPE / Hadamard / FP8.
    double mean = 0, var = 0;
    for (int i = 0; i < d; ++i) mean += kp[size_t(t * d + i)];
    mean /= d;
    for (int i = 0; i < d; ++i) var += (kp[size_t(t * d + i)] - mean) * (kp[size_t(t * d + i)] - mean);
    var /= d;
    std::vector<double> k(d);
    for (int i = 0; i < d; ++i) {
      k[size_t(i)] = (kp[size_t(t * d + i)] - mean) / std::sqrt(var + 1e-5) * gamma[size_t(i)] + beta[size_t(i)];
    }
    const std::vector<double> ky = RefRopeHadamard(k, pos[size_t(t)], inv_freq.data(), rope_dim);
    EXPECT_TRUE(CheckQuantised(ky, cache.Codes(pos[size_t(t)]), cache.Scale(pos[size_t(t)]),
                               "key t=" + std::to_string(t)));
    // Queries and weights.
    for (int j = 0; j < heads; ++j) {
      std::vector<double> qv(d);
      for (int i = 0; i < d; ++i) qv[size_t(i)] = qp[size_t((t * heads + j) * d + i)];
      const std::vector<double> qy = RefRopeHadamard(qv, pos[size_t(t)], inv_freq.data(), rope_dim);
      double amax = 0;
      for (double v : qy) amax = std::max(amax, std::fabs(v));
      const float qs = Fp8Scale(float(amax), true);
      const uint8_t* codes = q8.data() + size_t((t * heads + j) * d);
      EXPECT_TRUE(CheckQuantised(qy, codes, qs, "query t=" + std::to_string(t) + " j=" + std::to_string(j)));
      const float want = float(wp[size_t(t * heads + j)] * float(1.0 / std::sqrt(double(heads)))) * qs *
                         float(1.0 / std::sqrt(double(d)));
      EXPECT_EQ(w[size_t(t * heads + j)], want) << "weight t=" << t << " j=" << j;
    }
  }
  // Only the written slots changed: the other bytes of the pool are untouched.
  std::vector<uint8_t> touched(cache.pool.size(), 0);
  for (int64_t p : pos) {
    const size_t base = cache.PageBase(p);
    for (int i = 0; i < d; ++i) touched[base + size_t(p % 64) * d + size_t(i)] = 1;
    for (int i = 0; i < 4; ++i) touched[base + 64 * size_t(d) + 4 * size_t(p % 64) + size_t(i)] = 1;
  }
  size_t stray = 0;
  for (size_t i = 0; i < cache.pool.size(); ++i) stray += !touched[i] && cache.pool[i] != pool_before[i];
  EXPECT_EQ(stray, size_t(0));
  // Summaries untouched.
  for (float s : cache.sums) ASSERT_EQ(s, 12345.0f);
}

TEST(IndexerPrep, MatchesNaiveReferenceD64) { RunPrepReference(8, 64, 32, 1); }
TEST(IndexerPrep, MatchesNaiveReferenceD128) { RunPrepReference(4, 128, 64, 2); }
TEST(IndexerPrep, MatchesNaiveReferenceNoRope) { RunPrepReference(3, 32, 0, 3); }

TEST(IndexerPrep, ValidateNamesTheBadArgument) {
  TestCache cache(64, 64, 64, 1);
  std::vector<float> buf(64 * 8, 1.0f);
  std::vector<int64_t> pos = {3};
  IndexerPrepInputs in;
  in.q_proj = in.k_proj = in.w_proj = in.ln_gamma = in.ln_beta = in.inv_freq = buf.data();
  in.positions = pos.data();
  in.rope_dim = 32;
  in.num_tokens = 1;
  EXPECT_EQ(ValidateIndexerPrep(in, 8, cache.Ref()), std::string());
  IndexerPrepInputs bad = in;
  bad.rope_dim = 33;
  EXPECT_TRUE(ValidateIndexerPrep(bad, 8, cache.Ref()).find("rope_dim") != std::string::npos);
  bad = in;
  bad.k_proj = nullptr;
  EXPECT_TRUE(ValidateIndexerPrep(bad, 8, cache.Ref()).find("k_proj") != std::string::npos);
  EXPECT_TRUE(ValidateIndexerPrep(in, 0, cache.Ref()).find("heads") != std::string::npos);
  pos[0] = -2;
  EXPECT_TRUE(ValidateIndexerPrep(in, 8, cache.Ref()).find("positions[0]") != std::string::npos);
  pos[0] = 3;
  IndexKeyCacheRef r = cache.Ref();
  r.layout.index_head_dim = 48;
  EXPECT_TRUE(ValidateIndexerPrep(in, 8, r).find("power of two") != std::string::npos);
}

// --- UpdateSummaries ---------------------------------------------------------

void FillRandomKeys(TestCache* c, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> code(0, 255);
  std::uniform_int_distribution<int> ex(-12, -2);
  for (int64_t s = 0; s < n; ++s) {
    uint8_t* v = c->MutableCodes(s);
    for (int i = 0; i < c->d; ++i) {
      int x = code(rng);
      if ((x & 0x7f) == 0x7f) x = 0x3c;  // no NaN codes
      v[i] = uint8_t(x);
    }
    c->SetScale(s, std::ldexp(1.0f, ex(rng)));
  }
}

TEST(UpdateSummaries, IncrementalEqualsRangeEqualsNaive) {
  const int d = 64, block = 32;
  const int64_t n = 100;  // 3 full blocks and a partial one of 4 tokens
  TestCache a(d, block, n, 5);
  FillRandomKeys(&a, n, 9);
  TestCache b = a;
  for (auto& s : a.sums) s = -777.0f;  // garbage: blocks must be zeroed on first touch
  for (auto& s : b.sums) s = 555.0f;
  cpu::UpdateSummaries(a.Ref(), 0, n);
  for (int64_t s = 0; s < n; ++s) cpu::UpdateSummaries(b.Ref(), s, s + 1);
  // Uneven ranges too.
  TestCache c = a;
  for (auto& s : c.sums) s = 1e30f;
  cpu::UpdateSummaries(c.Ref(), 0, 7);
  cpu::UpdateSummaries(c.Ref(), 7, 64);
  cpu::UpdateSummaries(c.Ref(), 64, 65);
  cpu::UpdateSummaries(c.Ref(), 65, n);
  for (size_t i = 0; i < a.sums.size(); ++i) {
    ASSERT_EQ(FloatBits(a.sums[i]), FloatBits(b.sums[i])) << "i=" << i;
    ASSERT_EQ(FloatBits(a.sums[i]), FloatBits(c.sums[i])) << "i=" << i;
  }
  for (int64_t blk = 0; blk < 4; ++blk) {
    for (int i = 0; i < d; ++i) {
      float f = 0.0f;  // fp32 in token order
      double ref = 0.0, mag = 0.0;
      for (int64_t s = blk * block; s < std::min<int64_t>(n, (blk + 1) * block); ++s) {
        const float v = Fp8E4M3ToFloat(a.Codes(s)[i]) * a.Scale(s);
        f = f + v;
        ref += a.Value(s, i) * double(a.Scale(s));
        mag += std::fabs(a.Value(s, i) * double(a.Scale(s)));
      }
      const float got = a.sums[size_t(blk * d + i)];
      EXPECT_EQ(FloatBits(got), FloatBits(f)) << "block " << blk << " d " << i;
      EXPECT_NEAR(got, ref, mag * 1e-6 + 1e-30) << "block " << blk << " d " << i;
    }
  }
}

TEST(UpdateSummaries, ZeroesABlockWhenItIsReused) {
  const int d = 32, block = 16;
  TestCache c(d, block, 64, 3);
  FillRandomKeys(&c, 40, 4);
  cpu::UpdateSummaries(c.Ref(), 0, 40);
  // The sequence is released and the memory reused: new keys from token 0.
  FillRandomKeys(&c, 20, 99);
  cpu::UpdateSummaries(c.Ref(), 0, 20);
  TestCache fresh = c;
  for (auto& s : fresh.sums) s = 0.0f;
  cpu::UpdateSummaries(fresh.Ref(), 0, 20);
  for (size_t i = 0; i < size_t(2 * d); ++i) ASSERT_EQ(c.sums[i], fresh.sums[i]) << i;
  // Block 2 (tokens 32..39 of the old sequence) is stale, as documented: not touched.
  double stale = 0;
  for (int i = 0; i < d; ++i) stale += std::fabs(c.sums[size_t(2 * d + i)]);
  EXPECT_GT(stale, 0.0);
}

// --- DenseScores / RoutedScores ---------------------------------------------

TEST(DenseScores, MatchesDoubleReference) {
  for (int64_t n : {1, 15, 16, 17, 200, 333}) {
    Fixture f(8, 64, 64, 400, uint32_t(n));
    const int64_t t = n - 1;
    std::vector<float> out(n);
    cpu::DenseScores(f.cache.View(f.len), f.Q(t), f.W(t), f.heads, n, out.data());
    for (int64_t s = 0; s < n; ++s) {
      const RefScore r = NaiveScore(f.cache, f.Q(t), f.W(t), AllHeads(f.heads), s);
      ASSERT_NEAR(out[size_t(s)], r.score, r.bound) << "n=" << n << " s=" << s;
    }
  }
}

TEST(DenseScores, RandomCodesMatchDoubleReference) {
  // Full-range e4m3 codes (subnormals, 448, negative values) and scales.
  const int d = 64, h = 5;
  TestCache c(d, 64, 256, 8);
  FillRandomKeys(&c, 256, 17);
  std::mt19937 rng(3);
  std::vector<uint8_t> q(size_t(h) * d);
  for (auto& x : q) {
    x = uint8_t(rng() & 0xff);
    if ((x & 0x7f) == 0x7f) x = 0x41;
  }
  std::vector<float> w = {0.5f, -1.25f, 2.0f, 1e-3f, -0.75f};
  std::vector<float> out(256);
  cpu::DenseScores(c.View(256), q.data(), w.data(), h, 256, out.data());
  for (int64_t s = 0; s < 256; ++s) {
    const RefScore r = NaiveScore(c, q.data(), w.data(), AllHeads(h), s);
    ASSERT_NEAR(out[size_t(s)], r.score, r.bound) << "s=" << s;
  }
}

TEST(RoutedScores, AllHeadsAndKeyListsAreBitExactWithDense) {
  Fixture f(8, 64, 64, 300, 21);
  const int64_t t = 250, n = 251;
  std::vector<float> dense(n), routed(n);
  cpu::DenseScores(f.cache.View(f.len), f.Q(t), f.W(t), 8, n, dense.data());
  std::vector<int32_t> all = {0, 1, 2, 3, 4, 5, 6, 7};
  cpu::RoutedScores(f.cache.View(f.len), f.Q(t), f.W(t), all.data(), 8, nullptr, n, routed.data());
  for (int64_t s = 0; s < n; ++s) ASSERT_EQ(FloatBits(routed[size_t(s)]), FloatBits(dense[size_t(s)])) << s;
  // A shuffled key list goes through the gathered-row kernel: same bits.
  std::vector<int32_t> keys(n);
  std::iota(keys.begin(), keys.end(), 0);
  std::shuffle(keys.begin(), keys.end(), std::mt19937(4));
  keys.resize(77);
  std::vector<float> listed(keys.size());
  cpu::RoutedScores(f.cache.View(f.len), f.Q(t), f.W(t), all.data(), 8, keys.data(),
                    int64_t(keys.size()), listed.data());
  for (size_t c = 0; c < keys.size(); ++c) {
    ASSERT_EQ(FloatBits(listed[c]), FloatBits(dense[size_t(keys[c])])) << "key " << keys[c];
  }
  // A head subset: against the reference, and list == contiguous bitwise.
  std::vector<int32_t> sub = {1, 4, 6};
  std::vector<float> part(n), part_listed(keys.size());
  cpu::RoutedScores(f.cache.View(f.len), f.Q(t), f.W(t), sub.data(), 3, nullptr, n, part.data());
  cpu::RoutedScores(f.cache.View(f.len), f.Q(t), f.W(t), sub.data(), 3, keys.data(),
                    int64_t(keys.size()), part_listed.data());
  for (int64_t s = 0; s < n; ++s) {
    const RefScore r = NaiveScore(f.cache, f.Q(t), f.W(t), {1, 4, 6}, s);
    ASSERT_NEAR(part[size_t(s)], r.score, r.bound) << s;
  }
  for (size_t c = 0; c < keys.size(); ++c) {
    ASSERT_EQ(FloatBits(part_listed[c]), FloatBits(part[size_t(keys[c])])) << keys[c];
  }
}

// --- MISA router -------------------------------------------------------------

struct RefRouter {
  std::vector<double> r, bound;
};

RefRouter NaiveRouter(const TestCache& c, int64_t num_tokens, const uint8_t* q8, const float* w,
                      int heads, int64_t pos) {
  const int block = c.layout.summary_block;
  const int64_t nb = std::min<int64_t>((num_tokens + block - 1) / block, pos / block + 1);
  RefRouter out;
  out.r.assign(size_t(heads), 0.0);
  out.bound.assign(size_t(heads), 0.0);
  for (int j = 0; j < heads; ++j) {
    for (int64_t b = 0; b < nb; ++b) {
      const double count = double(std::min<int64_t>(block, num_tokens - b * block));
      double dot = 0, mag = 0;
      for (int i = 0; i < c.d; ++i) {
        const double k = double(c.sums[size_t(b * c.d + i)]) / count;
        dot += double(Fp8E4M3ToFloat(q8[size_t(j * c.d + i)])) * k;
        mag += std::fabs(double(Fp8E4M3ToFloat(q8[size_t(j * c.d + i)])) * k);
      }
      out.r[size_t(j)] += std::max(0.0, dot);
      out.bound[size_t(j)] += mag;
    }
    out.r[size_t(j)] *= std::fabs(double(w[j]));
    out.bound[size_t(j)] *= std::fabs(double(w[j])) * 2e-6;
  }
  return out;
}

TEST(MisaRouter, MatchesNaiveAndIgnoresLaterBlocks) {
  const int64_t len = 300;  // blocks of 64: 4 full + a partial block of 44
  Fixture f(8, 64, 64, len, 31);
  for (int64_t num_tokens : {int64_t(300), int64_t(290), int64_t(150)}) {
    // Recompute the summaries for this many tokens (as a prefill would).
    cpu::UpdateSummaries(f.cache.Ref(), 0, num_tokens);
    for (int64_t pos : {int64_t(0), int64_t(63), int64_t(64), int64_t(149), num_tokens - 1}) {
      std::vector<float> r(8);
      cpu::MisaRouterScores(f.cache.View(num_tokens), f.Q(pos), f.W(pos), 8, pos, r.data());
      const RefRouter ref = NaiveRouter(f.cache, num_tokens, f.Q(pos), f.W(pos), 8, pos);
      for (int j = 0; j < 8; ++j) {
        ASSERT_NEAR(r[size_t(j)], ref.r[size_t(j)], ref.bound[size_t(j)] + 1e-30)
            << "tokens " << num_tokens << " pos " << pos << " head " << j;
      }
    }
  }
  // Blocks beyond pos / B do not count: poison them and nothing changes.
  cpu::UpdateSummaries(f.cache.Ref(), 0, len);
  std::vector<float> before(8), after(8);
  cpu::MisaRouterScores(f.cache.View(len), f.Q(100), f.W(100), 8, 100, before.data());
  for (size_t i = 2 * 64; i < f.cache.sums.size(); ++i) f.cache.sums[i] = 1e6f;
  cpu::MisaRouterScores(f.cache.View(len), f.Q(100), f.W(100), 8, 100, after.data());
  for (int j = 0; j < 8; ++j) EXPECT_EQ(before[size_t(j)], after[size_t(j)]) << j;
}

TEST(MisaActiveHeads, TopHTiesToLowerIndexAscendingOutput) {
  const float r[] = {1.0f, 3.0f, 3.0f, 2.0f, 3.0f, 0.5f};
  int32_t a[6];
  cpu::MisaActiveHeads(r, 6, 2, a);
  EXPECT_EQ(a[0], 1);
  EXPECT_EQ(a[1], 2);
  cpu::MisaActiveHeads(r, 6, 3, a);
  EXPECT_EQ(a[0], 1);
  EXPECT_EQ(a[1], 2);
  EXPECT_EQ(a[2], 4);
  cpu::MisaActiveHeads(r, 6, 4, a);  // 3 then the 2.0 of head 3; output ascending
  EXPECT_EQ(a[0], 1);
  EXPECT_EQ(a[1], 2);
  EXPECT_EQ(a[2], 3);
  EXPECT_EQ(a[3], 4);
  const float z[] = {0.0f, -0.0f, 0.0f, 0.0f};  // all tied: the lowest indices
  cpu::MisaActiveHeads(z, 4, 2, a);
  EXPECT_EQ(a[0], 0);
  EXPECT_EQ(a[1], 1);
  const float nan_first[] = {std::nanf(""), 1.0f, 0.0f};
  cpu::MisaActiveHeads(nan_first, 3, 2, a);
  EXPECT_EQ(a[0], 1);
  EXPECT_EQ(a[1], 2);
  cpu::MisaActiveHeads(r, 6, 6, a);
  for (int j = 0; j < 6; ++j) EXPECT_EQ(a[j], j);
}

// --- Top-k ---------------------------------------------------------------------

TEST(FastTopK, MatchesTopKIncludingTiesAndNaN) {
  std::mt19937 rng(77);
  for (int trial = 0; trial < 300; ++trial) {
    const int64_t n = int64_t(rng() % 5000);
    const int k = 1 + int(rng() % 400);
    std::vector<float> s(n);
    const int kind = trial % 5;
    for (auto& x : s) {
      switch (kind) {
        case 0: x = std::normal_distribution<float>(0, 1)(rng); break;
        case 1: x = float(int(rng() % 7)); break;  // heavy ties
        case 2: x = (rng() % 2) ? 0.0f : -0.0f; break;
        case 3: x = (rng() % 50 == 0) ? std::nanf("") : float(int(rng() % 1000)); break;
        default: x = (rng() % 3 == 0) ? -INFINITY : float(rng() % 100000) * 1e-3f; break;
      }
    }
    if (kind == 3 && n > 0 && trial % 2) {
      for (auto& x : s) x = (rng() % 4) ? std::nanf("") : 1.0f;  // mostly NaN
    }
    std::vector<int32_t> want(k), got(k), set(k);
    const int vw = cpu::TopK(s.data(), n, k, want.data());
    const int vg = cpu::internal::FastTopK(s.data(), n, k, got.data());
    ASSERT_EQ(vg, vw) << "trial " << trial;
    for (int i = 0; i < k; ++i) ASSERT_EQ(got[size_t(i)], want[size_t(i)]) << "trial " << trial << " i " << i;
    const int vs = cpu::internal::FastTopK(s.data(), n, k, set.data(), cpu::internal::TopKOrder::kByIndex);
    ASSERT_EQ(vs, vw);
    std::sort(want.begin(), want.begin() + vw);
    for (int i = 0; i < k; ++i) ASSERT_EQ(set[size_t(i)], want[size_t(i)]) << "by index, trial " << trial;
  }
}

// --- SelectTokens ----------------------------------------------------------------

// Chunks and sizes used by the exactness tests: (len, first query, last query + 1).
struct Shape {
  int64_t len, p0, p1;
};
const Shape kShapes[] = {{20, 0, 20},      // L < topk
                         {100, 99, 100},   // decode, L not a multiple of 64 or B
                         {333, 200, 333},  // a chunk at an offset
                         {700, 0, 40},     // first chunk of a longer cache
                         {1000, 937, 1000}};

void ExpectSameSelection(SelectionConfig a, SelectionConfig b, const char* what) {
  cpu::ThreadPool pool(2);
  for (const Shape& sh : kShapes) {
    Fixture f(8, 64, 64, sh.len, uint32_t(sh.len));
    for (cpu::ThreadPool* p : {static_cast<cpu::ThreadPool*>(nullptr), &pool}) {
      const auto q = f.Queries(sh.p0, sh.p1);
      const auto x = Select(a, f.cache.View(sh.p1), q, p);
      const auto y = Select(b, f.cache.View(sh.p1), q, p);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_EQ(x[i], y[i]) << what << " len " << sh.len << " row " << i / size_t(a.topk)
                              << " slot " << i % size_t(a.topk);
      }
    }
  }
}

TEST(SelectTokens, MisaWithAllHeadsIsDense) {
  SelectionConfig dense = SmallConfig(SelectionMode::kDense, 8, 64);
  SelectionConfig misa = SmallConfig(SelectionMode::kMisa, 8, 64);
  misa.misa_heads = 8;
  ExpectSameSelection(dense, misa, "misa h=H");
}

TEST(SelectTokens, DaggerWithAllCandidatesIsDense) {
  SelectionConfig dense = SmallConfig(SelectionMode::kDense, 8, 64);
  SelectionConfig dagger = SmallConfig(SelectionMode::kMisaDagger, 8, 64);
  dagger.misa_heads = 2;
  dagger.dagger_candidates = 1000;  // >= every pos + 1 of the shapes
  ExpectSameSelection(dense, dagger, "dagger C>=L");
}

TEST(SelectTokens, HisaWithAllBlocksIsDense) {
  SelectionConfig dense = SmallConfig(SelectionMode::kDense, 8, 64);
  SelectionConfig hisa = SmallConfig(SelectionMode::kHisa, 8, 64);
  hisa.hisa_block = 24;  // not a multiple of the 16-key tiles
  hisa.hisa_topk_blocks = 1000 / 24 + 1;
  ExpectSameSelection(dense, hisa, "hisa all blocks");
  hisa.hisa_block = 64;
  hisa.hisa_topk_blocks = 16;
  ExpectSameSelection(dense, hisa, "hisa all blocks (64)");
}

TEST(SelectTokens, DenseMatchesNaiveReference) {
  cpu::ThreadPool pool(2);
  for (const Shape& sh : kShapes) {
    Fixture f(8, 64, 64, sh.len, uint32_t(sh.len) + 5);
    const SelectionConfig cfg = SmallConfig(SelectionMode::kDense, 8, 64);
    const auto out = Select(cfg, f.cache.View(sh.p1), f.Queries(sh.p0, sh.p1), &pool);
    for (int64_t t = sh.p0; t < sh.p1; ++t) {
      std::vector<double> ref;
      std::vector<int64_t> cand;
      double tol = 0;
      for (int64_t s = 0; s <= t; ++s) {
        const RefScore r = NaiveScore(f.cache, f.Q(t), f.W(t), AllHeads(8), s);
        ref.push_back(r.score);
        cand.push_back(s);
        tol = std::max(tol, 2 * r.bound);
      }
      ASSERT_EQ(CheckAgainstReference(out.data() + (t - sh.p0) * cfg.topk, cfg.topk, ref, cand, tol,
                                      "dense"),
                0)
          << "len " << sh.len << " t " << t;
    }
  }
}

TEST(SelectTokens, EveryModeReturnsValidSortedRows) {
  cpu::ThreadPool pool(2);
  for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kMisa, SelectionMode::kMisaDagger,
                             SelectionMode::kHisa}) {
    for (const Shape& sh : kShapes) {
      Fixture f(8, 64, 64, sh.len, uint32_t(sh.len) + 11);
      SelectionConfig cfg = SmallConfig(mode, 8, 64);
      if (mode == SelectionMode::kHisa) cfg.hisa_topk_blocks = 3;
      const auto out = Select(cfg, f.cache.View(sh.p1), f.Queries(sh.p0, sh.p1), &pool);
      for (int64_t t = sh.p0; t < sh.p1; ++t) {
        const int32_t* row = out.data() + (t - sh.p0) * cfg.topk;
        // Kept tokens bound HISA's count: min(topk, tokens <= t in kept blocks).
        int64_t avail = t + 1;
        if (mode == SelectionMode::kHisa) {
          const int64_t nvis = t / cfg.hisa_block + 1;
          // All visible blocks, or K-1 full blocks plus the partial last one.
          if (nvis > cfg.hisa_topk_blocks) {
            avail = int64_t(cfg.hisa_topk_blocks - 1) * cfg.hisa_block + (t + 1 - (nvis - 1) * cfg.hisa_block);
          }
        }
        const int expect = int(std::min<int64_t>(cfg.topk, avail));
        std::set<int32_t> seen;
        std::vector<float> score(size_t(t + 1));
        cpu::DenseScores(f.cache.View(sh.p1), f.Q(t), f.W(t), 8, t + 1, score.data());
        int valid = 0;
        for (int r = 0; r < cfg.topk; ++r) {
          if (row[r] < 0) {
            ASSERT_EQ(row[r], -1);
            continue;
          }
          ASSERT_EQ(valid, r) << "-1 before a valid slot";
          ++valid;
          ASSERT_LE(row[r], t) << SelectionModeName(mode);
          ASSERT_TRUE(seen.insert(row[r]).second) << "repeated " << row[r];
        }
        ASSERT_EQ(valid, expect) << SelectionModeName(mode) << " len " << sh.len << " t " << t;
        if (mode != SelectionMode::kMisa) {
          // dense, dagger stage 2 and HISA order rows by the exact DSA score.
          for (int r = 1; r < valid; ++r) {
            const float a = score[size_t(row[r - 1])], b = score[size_t(row[r])];
            ASSERT_TRUE(a > b || (a == b && row[r - 1] < row[r])) << SelectionModeName(mode) << " rank " << r;
          }
        }
      }
    }
  }
}

TEST(SelectTokens, ChunkEqualsQueryByQuery) {
  cpu::ThreadPool pool(2);
  Fixture f(8, 64, 64, 600, 123);
  for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kMisa, SelectionMode::kMisaDagger,
                             SelectionMode::kHisa}) {
    const SelectionConfig cfg = SmallConfig(mode, 8, 64);
    const int64_t p0 = 503, p1 = 600;  // 97 queries: 7 query tiles
    const auto chunk = Select(cfg, f.cache.View(p1), f.Queries(p0, p1), &pool);
    const auto serial = Select(cfg, f.cache.View(p1), f.Queries(p0, p1), nullptr);
    for (int64_t t = p0; t < p1; ++t) {
      const auto one = Select(cfg, f.cache.View(p1), f.Queries(t, t + 1), &pool);
      for (int r = 0; r < cfg.topk; ++r) {
        ASSERT_EQ(chunk[size_t((t - p0) * cfg.topk + r)], one[size_t(r)]) << SelectionModeName(mode) << " t " << t;
        ASSERT_EQ(serial[size_t((t - p0) * cfg.topk + r)], one[size_t(r)]) << SelectionModeName(mode) << " t " << t;
      }
    }
  }
}

TEST(SelectTokens, UnorderedPositionsEqualQueryByQuery) {
  // Queries need not be contiguous or sorted (e.g. several requests' tokens).
  cpu::ThreadPool pool(2);
  Fixture f(8, 64, 64, 600, 321);
  std::vector<int64_t> pos(600);
  std::iota(pos.begin(), pos.end(), 0);
  std::shuffle(pos.begin(), pos.end(), std::mt19937(9));
  pos.resize(70);
  std::vector<uint8_t> q8;
  std::vector<float> w;
  for (int64_t p : pos) {
    q8.insert(q8.end(), f.Q(p), f.Q(p) + 8 * 64);
    w.insert(w.end(), f.W(p), f.W(p) + 8);
  }
  IndexerQueries q;
  q.q8 = q8.data();
  q.weights = w.data();
  q.positions = pos.data();
  q.num_queries = int64_t(pos.size());
  for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kMisa, SelectionMode::kMisaDagger,
                             SelectionMode::kHisa}) {
    const SelectionConfig cfg = SmallConfig(mode, 8, 64);
    const auto all = Select(cfg, f.cache.View(600), q, &pool);
    for (size_t i = 0; i < pos.size(); ++i) {
      const auto one = Select(cfg, f.cache.View(600), f.Queries(pos[i], pos[i] + 1), nullptr);
      for (int r = 0; r < cfg.topk; ++r) {
        ASSERT_EQ(all[i * size_t(cfg.topk) + size_t(r)], one[size_t(r)]) << SelectionModeName(mode) << " pos " << pos[i];
      }
    }
  }
}

TEST(SelectTokens, ModesAreTheCompositionOfThePublicSteps) {
  // dense = DenseScores -> top-k; misa = router -> top-h heads -> routed scores -> top-k;
  // misa_dagger = the same routed scores -> top-C -> dense re-score -> top-k.
  cpu::ThreadPool pool(2);
  Fixture f(8, 64, 64, 500, 55);
  SelectionConfig misa = SmallConfig(SelectionMode::kMisa, 8, 64);
  SelectionConfig dagger = SmallConfig(SelectionMode::kMisaDagger, 8, 64);
  const int64_t p0 = 400, p1 = 500;
  SelectionConfig dense = SmallConfig(SelectionMode::kDense, 8, 64);
  const auto a = Select(misa, f.cache.View(p1), f.Queries(p0, p1), &pool);
  const auto b = Select(dagger, f.cache.View(p1), f.Queries(p0, p1), &pool);
  const auto c = Select(dense, f.cache.View(p1), f.Queries(p0, p1), &pool);
  for (int64_t t = p0; t < p1; ++t) {
    std::vector<float> all(size_t(t + 1));
    std::vector<int32_t> top(size_t(dense.topk));
    cpu::DenseScores(f.cache.View(p1), f.Q(t), f.W(t), 8, t + 1, all.data());
    cpu::TopK(all.data(), t + 1, dense.topk, top.data());
    for (int i = 0; i < dense.topk; ++i) ASSERT_EQ(c[size_t((t - p0) * dense.topk + i)], top[size_t(i)]) << t;
    std::vector<float> r(8), routed(size_t(t + 1)), dense(size_t(t + 1));
    std::vector<int32_t> act(2), want(size_t(misa.topk)), cand(size_t(dagger.dagger_candidates));
    cpu::MisaRouterScores(f.cache.View(p1), f.Q(t), f.W(t), 8, t, r.data());
    cpu::MisaActiveHeads(r.data(), 8, 2, act.data());
    cpu::RoutedScores(f.cache.View(p1), f.Q(t), f.W(t), act.data(), 2, nullptr, t + 1, routed.data());
    cpu::TopK(routed.data(), t + 1, misa.topk, want.data());
    for (int i = 0; i < misa.topk; ++i) ASSERT_EQ(a[size_t((t - p0) * misa.topk + i)], want[size_t(i)]) << t;
    const int nc = cpu::TopK(routed.data(), t + 1, dagger.dagger_candidates, cand.data());
    cand.resize(nc);
    std::vector<float> rescore(cand.size());
    cpu::RoutedScores(f.cache.View(p1), f.Q(t), f.W(t), std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}.data(),
                      8, cand.data(), nc, rescore.data());
    // Order candidates by (score desc, key asc) via TopK on key-sorted candidates.
    std::vector<size_t> perm(cand.size());
    std::iota(perm.begin(), perm.end(), 0);
    std::sort(perm.begin(), perm.end(), [&](size_t x, size_t y) { return cand[x] < cand[y]; });
    std::vector<float> sorted_scores(cand.size());
    for (size_t i = 0; i < perm.size(); ++i) sorted_scores[i] = rescore[perm[i]];
    std::vector<int32_t> pick(size_t(dagger.topk));
    const int valid = cpu::TopK(sorted_scores.data(), nc, dagger.topk, pick.data());
    for (int i = 0; i < dagger.topk; ++i) {
      const int32_t w = i < valid ? cand[perm[size_t(pick[size_t(i)])]] : -1;
      ASSERT_EQ(b[size_t((t - p0) * dagger.topk + i)], w) << "dagger t " << t << " i " << i;
    }
  }
}

TEST(SelectTokens, MisaWithFewHeadsFollowsNaiveRouterAndLosesSomeRecall) {
  cpu::ThreadPool pool(2);
  Fixture f(8, 64, 64, 800, 808);
  SelectionConfig misa = SmallConfig(SelectionMode::kMisa, 8, 64);
  SelectionConfig dense = SmallConfig(SelectionMode::kDense, 8, 64);
  const int64_t p0 = 700, p1 = 800;
  const auto a = Select(misa, f.cache.View(p1), f.Queries(p0, p1), &pool);
  const auto d = Select(dense, f.cache.View(p1), f.Queries(p0, p1), &pool);
  double recall_sum = 0, recall_min = 1;
  int checked = 0;
  for (int64_t t = p0; t < p1; ++t) {
    // Naive router in double; skip queries whose h-th and (h+1)-th heads nearly tie.
    const RefRouter rr = NaiveRouter(f.cache, p1, f.Q(t), f.W(t), 8, t);
    std::vector<int> order = AllHeads(8);
    std::sort(order.begin(), order.end(), [&](int x, int y) {
      return rr.r[size_t(x)] != rr.r[size_t(y)] ? rr.r[size_t(x)] > rr.r[size_t(y)] : x < y;
    });
    const double gap = rr.r[size_t(order[1])] - rr.r[size_t(order[2])];
    const int32_t* row = a.data() + (t - p0) * misa.topk;
    const int32_t* drow = d.data() + (t - p0) * dense.topk;
    std::set<int32_t> ds(drow, drow + dense.topk);
    int hit = 0;
    for (int i = 0; i < misa.topk; ++i) hit += ds.count(row[i]) ? 1 : 0;
    const double recall = double(hit) / double(misa.topk);
    recall_sum += recall;
    recall_min = std::min(recall_min, recall);
    if (gap <= 4 * (rr.bound[size_t(order[1])] + rr.bound[size_t(order[2])])) continue;
    std::vector<int> active = {std::min(order[0], order[1]), std::max(order[0], order[1])};
    std::vector<double> ref;
    std::vector<int64_t> cand;
    double tol = 0;
    for (int64_t s = 0; s <= t; ++s) {
      const RefScore r = NaiveScore(f.cache, f.Q(t), f.W(t), active, s);
      ref.push_back(r.score);
      cand.push_back(s);
      tol = std::max(tol, 2 * r.bound);
    }
    ASSERT_EQ(CheckAgainstReference(row, misa.topk, ref, cand, tol, "misa"), 0) << "t " << t;
    ++checked;
  }
  EXPECT_GT(checked, 50);
  EXPECT_LT(recall_min, 1.0);  // 2 of 8 heads: some dense picks are lost
  EXPECT_GT(recall_sum / double(p1 - p0), 0.1);
  std::printf("  misa h=2/8 recall vs dense: mean %.3f, min %.3f (%d queries checked)\n",
              recall_sum / double(p1 - p0), recall_min, checked);
}

// Naive HISA in double: block means, block scores, kept rule, exact scores.
void RunHisaNaive(int hb, int keep) {
  cpu::ThreadPool pool(2);
  Fixture f(8, 64, 64, 640, 640);
  SelectionConfig cfg = SmallConfig(SelectionMode::kHisa, 8, 64);
  cfg.hisa_block = hb;
  cfg.hisa_topk_blocks = keep;
  const int64_t p0 = 560, p1 = 640;
  const int64_t num_tokens = p1;
  const auto out = Select(cfg, f.cache.View(num_tokens), f.Queries(p0, p1), &pool);
  const int64_t nblocks = (num_tokens + hb - 1) / hb;
  std::vector<double> means(size_t(nblocks) * 64, 0.0);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t e = std::min<int64_t>((b + 1) * hb, num_tokens);
    for (int64_t s = b * hb; s < e; ++s) {
      for (int i = 0; i < 64; ++i) means[size_t(b * 64 + i)] += f.cache.Value(s, i) * f.cache.Scale(s);
    }
    for (int i = 0; i < 64; ++i) means[size_t(b * 64 + i)] /= double(e - b * hb);
  }
  int checked = 0;
  for (int64_t t = p0; t < p1; ++t) {
    const int64_t nvis = t / hb + 1;
    std::vector<double> bs(size_t(nvis), 0.0);
    double bound = 0;
    for (int64_t b = 0; b < nvis; ++b) {
      for (int j = 0; j < 8; ++j) {
        double dot = 0, mag = 0;
        for (int i = 0; i < 64; ++i) {
          const double q = Fp8E4M3ToFloat(f.Q(t)[j * 64 + i]);
          dot += q * means[size_t(b * 64 + i)];
          mag += std::fabs(q * means[size_t(b * 64 + i)]);
        }
        bs[size_t(b)] += double(f.W(t)[j]) * std::max(0.0, dot);
        bound = std::max(bound, std::fabs(double(f.W(t)[j])) * mag * 8 * 4e-6);
      }
    }
    std::vector<int64_t> others;
    for (int64_t b = 1; b + 1 < nvis; ++b) others.push_back(b);
    std::sort(others.begin(), others.end(), [&](int64_t x, int64_t y) {
      return bs[size_t(x)] != bs[size_t(y)] ? bs[size_t(x)] > bs[size_t(y)] : x < y;
    });
    const size_t extra = size_t(cfg.hisa_topk_blocks - 2);
    if (others.size() > extra && bs[size_t(others[extra - 1])] - bs[size_t(others[extra])] <= 2 * bound) {
      continue;  // near-tie at the cut
    }
    std::vector<int64_t> kept = {0, nvis - 1};
    for (size_t e = 0; e < std::min(extra, others.size()); ++e) kept.push_back(others[e]);
    std::vector<double> ref;
    std::vector<int64_t> cand;
    double tol = 0;
    for (int64_t b : kept) {
      for (int64_t s = b * hb; s < std::min<int64_t>((b + 1) * hb, t + 1); ++s) {
        const RefScore r = NaiveScore(f.cache, f.Q(t), f.W(t), AllHeads(8), s);
        ref.push_back(r.score);
        cand.push_back(s);
        tol = std::max(tol, 2 * r.bound);
      }
    }
    ASSERT_EQ(CheckAgainstReference(out.data() + (t - p0) * cfg.topk, cfg.topk, ref, cand, tol, "hisa"), 0)
        << "hisa_block " << hb << " t " << t;
    ++checked;
  }
  EXPECT_GT(checked, 40);
}

TEST(SelectTokens, HisaMatchesNaiveReference) {
  RunHisaNaive(32, 5);
  RunHisaNaive(24, 4);  // blocks straddle the 16-key tiles
  RunHisaNaive(40, 3);
}

// Crafted keys: block b's tokens all hold value c_b in component 0, so block and
// token scores are proportional to c_b and the kept-block rule is visible.
TEST(SelectTokens, HisaKeepsFirstAndLastBlockAndBestOthers) {
  const int d = 64, hb = 16;
  TestCache c(d, 64, 128, 7);
  const float cb[8] = {0.5f, 2.0f, 8.0f, 4.0f, 8.0f, 1.0f, 3.0f, 0.25f};
  for (int64_t s = 0; s < 128; ++s) {
    uint8_t* v = c.MutableCodes(s);
    std::fill(v, v + d, uint8_t(0));
    v[0] = FloatToFp8E4M3(cb[s / hb]);
    c.SetScale(s, 1.0f);
  }
  std::vector<uint8_t> q(size_t(2) * d, 0);
  q[0] = q[size_t(d)] = FloatToFp8E4M3(1.0f);
  std::vector<float> w(2 * 3, 1.0f);
  std::vector<uint8_t> q8;
  for (int t = 0; t < 3; ++t) q8.insert(q8.end(), q.begin(), q.end());
  std::vector<int64_t> pos = {127, 100, 5};
  IndexerQueries qs;
  qs.q8 = q8.data();
  qs.weights = w.data();
  qs.positions = pos.data();
  qs.num_queries = 3;
  SelectionConfig cfg = SmallConfig(SelectionMode::kHisa, 2, d);
  cfg.topk = 64;
  cfg.hisa_block = hb;
  cfg.hisa_topk_blocks = 3;
  auto range = [](int a, int b) {
    std::vector<int32_t> v;
    for (int i = a; i < b; ++i) v.push_back(i);
    return v;
  };
  auto expect_row = [&](const std::vector<int32_t>& out, int row, std::vector<int32_t> want) {
    want.resize(64, -1);
    for (int i = 0; i < 64; ++i) EXPECT_EQ(out[size_t(row * 64 + i)], want[size_t(i)]) << "row " << row << " slot " << i;
  };
  cpu::ThreadPool pool(2);
  {
    const auto out = Select(cfg, c.View(128), qs, &pool);
    // pos 127: blocks 0 and 7 always; best other: 2 and 4 tie at 8 -> block 2.
    std::vector<int32_t> want = range(32, 48);
    for (int32_t x : range(0, 16)) want.push_back(x);
    for (int32_t x : range(112, 128)) want.push_back(x);
    expect_row(out, 0, want);
    // pos 100: visible blocks 0..6; keep 0, 6 and 2; block 6 cut at 100.
    want = range(32, 48);
    for (int32_t x : range(96, 101)) want.push_back(x);
    for (int32_t x : range(0, 16)) want.push_back(x);
    expect_row(out, 1, want);
    expect_row(out, 2, range(0, 6));  // one visible block
  }
  cfg.hisa_topk_blocks = 4;  // both tied blocks now fit
  {
    const auto out = Select(cfg, c.View(128), qs, &pool);
    std::vector<int32_t> want = range(32, 48);
    for (int32_t x : range(64, 80)) want.push_back(x);
    for (int32_t x : range(0, 16)) want.push_back(x);
    std::vector<int32_t> tail = range(112, 128);
    want.insert(want.end(), tail.begin(), tail.begin() + 16);
    expect_row(out, 0, want);
  }
  cfg.hisa_topk_blocks = 1;  // first and last are kept regardless
  {
    const auto out = Select(cfg, c.View(128), qs, nullptr);
    std::vector<int32_t> want = range(0, 16);
    for (int32_t x : range(112, 128)) want.push_back(x);
    expect_row(out, 0, want);
  }
}

TEST(SelectTokens, ValidateNamesTheBadArgument) {
  Fixture f(8, 64, 64, 100, 1);
  const SelectionConfig ok = SmallConfig(SelectionMode::kMisaDagger, 8, 64);
  const auto q = f.Queries(90, 100);
  EXPECT_EQ(ValidateSelectTokens(ok, f.cache.View(100), q), std::string());
  auto has = [](const std::string& msg, const char* what) {
    return msg.find(what) != std::string::npos;
  };
  SelectionConfig c = ok;
  c.misa_heads = 9;
  EXPECT_TRUE(has(ValidateSelectTokens(c, f.cache.View(100), q), "misa_heads"));
  c = ok;
  c.misa_block = 128;
  EXPECT_TRUE(has(ValidateSelectTokens(c, f.cache.View(100), q), "misa_block"));
  c = ok;
  c.head_dim = 128;
  EXPECT_TRUE(has(ValidateSelectTokens(c, f.cache.View(100), q), "head_dim"));
  c = ok;
  c.dagger_candidates = 8;
  EXPECT_TRUE(has(ValidateSelectTokens(c, f.cache.View(100), q), "dagger_candidates"));
  c = ok;
  c.topk = 0;
  EXPECT_TRUE(has(ValidateSelectTokens(c, f.cache.View(100), q), "topk"));
  c = ok;
  c.mode = SelectionMode::kHisa;
  c.hisa_block = 0;
  EXPECT_TRUE(has(ValidateSelectTokens(c, f.cache.View(100), q), "hisa_block"));
  // A query beyond the keys present.
  EXPECT_TRUE(has(ValidateSelectTokens(ok, f.cache.View(95), q), "positions[5]"));
  IndexKeyCacheView v = f.cache.View(100);
  v.summary_sums = nullptr;
  EXPECT_TRUE(has(ValidateSelectTokens(ok, v, q), "summary_sums"));
  EXPECT_EQ(ValidateSelectTokens(SmallConfig(SelectionMode::kDense, 8, 64), v, q), std::string());
}

// --- Timing (run with PD_INDEXER_BENCH=1) ---------------------------------------

TEST(IndexerBench, WholePrompt32K) {
  if (std::getenv("PD_INDEXER_BENCH") == nullptr) {
    MINITEST_SKIP() << "set PD_INDEXER_BENCH=1 (and optionally PD_INDEXER_BENCH_MODE=<mode>)";
  }
  const int64_t len = 32768, chunk = 2048;
  const int threads = 2;
  Fixture f(8, 64, 256, len, 2024);
  {
    // IndexerPrep + UpdateSummaries of the whole prompt (single-threaded functions).
    TestCache c(64, 256, len, 1);
    std::vector<float> qp(size_t(len) * 8 * 64, 0.5f), kp(size_t(len) * 64), wp(size_t(len) * 8, 1.0f);
    std::vector<float> g(64, 1.0f), b(64, 0.0f), inv(16, 0.01f);
    for (size_t i = 0; i < kp.size(); ++i) kp[i] = float(i % 97) * 0.01f;
    IndexerPrepInputs in;
    in.q_proj = qp.data();
    in.k_proj = kp.data();
    in.w_proj = wp.data();
    in.ln_gamma = g.data();
    in.ln_beta = b.data();
    in.positions = f.positions.data();
    in.inv_freq = inv.data();
    in.rope_dim = 32;
    in.num_tokens = len;
    std::vector<uint8_t> q8(size_t(len) * 8 * 64);
    std::vector<float> w(size_t(len) * 8);
    const auto p0 = std::chrono::steady_clock::now();
    cpu::IndexerPrep(in, 8, c.Ref(), q8.data(), w.data());
    const auto p1 = std::chrono::steady_clock::now();
    cpu::UpdateSummaries(c.Ref(), 0, len);
    const auto p2 = std::chrono::steady_clock::now();
    std::printf("  IndexerPrep 32K tokens: %.3f s; UpdateSummaries 32K tokens: %.3f ms\n",
                std::chrono::duration<double>(p1 - p0).count(),
                std::chrono::duration<double, std::milli>(p2 - p1).count());
  }
  cpu::ThreadPool pool(threads);
  std::printf("  tiny indexer shapes: H=8 D=64 topk=256 B=256 h=2, %d threads\n", threads);
  for (SelectionMode mode : {SelectionMode::kDense, SelectionMode::kMisa, SelectionMode::kMisaDagger,
                             SelectionMode::kHisa}) {
    const char* only = std::getenv("PD_INDEXER_BENCH_MODE");
    if (only != nullptr && std::string(only) != SelectionModeName(mode)) continue;
    SelectionConfig cfg;
    cfg.mode = mode;
    cfg.heads = 8;
    cfg.head_dim = 64;
    cfg.topk = 256;
    cfg.misa_heads = 2;
    cfg.misa_block = 256;
    cfg.dagger_candidates = 1024;
    cfg.hisa_block = 128;
    cfg.hisa_topk_blocks = 64;
    std::vector<int32_t> out(size_t(chunk) * cfg.topk);
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    for (int64_t p0 = 0; p0 < len; p0 += chunk) {
      cpu::SelectTokens(cfg, f.cache.View(p0 + chunk), f.Queries(p0, p0 + chunk), out.data(), &pool);
    }
    const double prefill = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double cpu_s = double(std::clock() - c0) / CLOCKS_PER_SEC;
    std::vector<int32_t> one(size_t(cfg.topk));
    std::vector<double> ms;
    for (int rep = 0; rep < 21; ++rep) {
      const auto d0 = std::chrono::steady_clock::now();
      cpu::SelectTokens(cfg, f.cache.View(len), f.Queries(len - 1, len), one.data(), &pool);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - d0).count());
    }
    std::sort(ms.begin(), ms.end());
    std::printf("  %-12s prefill 32K (16 chunks x 2048): %6.3f s wall, %6.3f s cpu   "
                "decode @32767: median %.3f ms (min %.3f)\n",
                SelectionModeName(mode), prefill, cpu_s, ms[ms.size() / 2], ms[0]);
  }
}

}  // namespace
}  // namespace pd::kernels
