// Tests of the MLA cache write/read and the sparse absorbed-form attention
// (kernels/mla.h) against independent double-precision references. Set
// PD_BENCH=1 to run the Bench.* timings.
#include "kernels/mla.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/internal/test_util.h"
#include "kernels/kv_layout.h"
#include "kernels/numeric.h"
#include "kernels/ops.h"
#include "kernels/tensor.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels::cpu {
namespace {

using testing::DiesWithMessage;
using testing::MakeWeight;
using testing::RandomVector;
using testing::TestWeight;

constexpr double kU = 1.0 / 16777216.0;  // fp32 unit roundoff 2^-24
constexpr uint8_t kSentinel = 0xab;

KvLayout Layout(int r, int rope) {
  KvLayout l;
  l.kv_lora_rank = r;
  l.rope_dim = rope;
  return l;
}

// One sequence's MLA cache: a pool with spare pages, a shuffled page table, and
// the fp32 inputs that were written.
struct TestCache {
  KvLayout layout;
  int64_t tokens = 0;
  std::vector<uint8_t> pool;
  std::vector<int32_t> page_table;
  std::vector<float> c_kv;  // [tokens, r] as written
  std::vector<float> k_pe;  // [tokens, rope] as written

  MlaCacheRef Ref() {
    MlaCacheRef c;
    c.pool = pool.data();
    c.page_table = page_table.data();
    c.layout = layout;
    return c;
  }
  MlaCacheView View() const {
    MlaCacheView v;
    v.pool = pool.data();
    v.page_table = page_table.data();
    v.num_tokens = tokens;
    v.layout = layout;
    return v;
  }
};

// Fills a cache with `tokens` random tokens, written in a shuffled order over two
// WriteMlaCache calls. Group magnitudes vary by orders of magnitude; token 3 has
// an all-zero first group.
TestCache MakeCache(const KvLayout& l, int64_t tokens, std::mt19937& rng) {
  TestCache c;
  c.layout = l;
  c.tokens = tokens;
  const int64_t pages = NumPages(tokens);
  const int64_t pool_pages = pages + 2;
  c.pool.assign(size_t(pool_pages) * l.MlaPageBytes(), kSentinel);
  std::vector<int32_t> ids(static_cast<size_t>(pool_pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  c.page_table.assign(ids.begin(), ids.begin() + pages);
  const int r = l.kv_lora_rank, rope = l.rope_dim;
  c.c_kv = RandomVector(rng, size_t(tokens * r));
  for (int64_t t = 0; t < tokens; ++t)
    for (int i = 0; i < r; ++i)
      c.c_kv[size_t(t * r + i)] *= float(std::pow(10.0, double((i / 128 + t) % 4) - 2.0));
  if (tokens > 3)
    for (int i = 0; i < 128; ++i) c.c_kv[size_t(3 * r + i)] = 0.0f;
  c.k_pe = RandomVector(rng, size_t(tokens * rope), -4.0f, 4.0f);
  std::vector<int64_t> pos(static_cast<size_t>(tokens));
  std::iota(pos.begin(), pos.end(), 0);
  std::shuffle(pos.begin(), pos.end(), rng);
  std::vector<float> ckv(c.c_kv.size()), kpe(c.k_pe.size());
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(&ckv[size_t(t * r)], &c.c_kv[size_t(pos[size_t(t)] * r)], size_t(r) * 4);
    std::memcpy(&kpe[size_t(t * rope)], &c.k_pe[size_t(pos[size_t(t)] * rope)], size_t(rope) * 4);
  }
  const int64_t half = tokens / 2;
  WriteMlaCache(c.Ref(), ckv.data(), kpe.data(), pos.data(), half);
  WriteMlaCache(c.Ref(), ckv.data() + half * r, kpe.data() + half * rope, pos.data() + half,
                tokens - half);
  return c;
}

// Token s dequantised through ReadMlaToken: [r + rope] doubles.
std::vector<double> ReadToken(const TestCache& c, int64_t s) {
  const int r = c.layout.kv_lora_rank, rope = c.layout.rope_dim;
  std::vector<float> ckv(static_cast<size_t>(r)), kpe(static_cast<size_t>(rope));
  ReadMlaToken(c.View(), s, ckv.data(), kpe.data());
  std::vector<double> v(ckv.begin(), ckv.end());
  v.insert(v.end(), kpe.begin(), kpe.end());
  return v;
}

// ---------------------------------------------------------------------------
// Cache write / read.
// ---------------------------------------------------------------------------
void CheckRoundTrip(int r, int rope, size_t token_bytes, size_t scale_off, size_t rope_off) {
  std::mt19937 rng(uint32_t(r + rope));
  const KvLayout l = Layout(r, rope);
  // The byte layout of kv_layout.h, spelled out: e4m3 c_kv, fp32 scales, bf16 k_pe.
  ASSERT_EQ(l.MlaTokenBytes(), token_bytes);
  ASSERT_EQ(l.MlaScaleOffset(), scale_off);
  ASSERT_EQ(l.MlaRopeOffset(), rope_off);
  const int64_t tokens = 150;  // pages 0, 1 and a partial page 2
  TestCache c = MakeCache(l, tokens, rng);
  std::vector<bool> written(c.pool.size(), false);
  const int groups = r / 128;
  for (int64_t s = 0; s < tokens; ++s) {
    const size_t base = size_t(c.page_table[size_t(s / 64)]) * 64 * token_bytes +
                        size_t(s % 64) * token_bytes;
    for (size_t b = 0; b < token_bytes; ++b) written[base + b] = true;
    const uint8_t* rec = c.pool.data() + base;
    std::vector<double> got = ReadToken(c, s);
    for (int g = 0; g < groups; ++g) {
      float amax = 0;
      for (int i = 0; i < 128; ++i) amax = std::max(amax, std::fabs(c.c_kv[size_t(s * r + g * 128 + i)]));
      float scale;
      std::memcpy(&scale, rec + scale_off + 4 * size_t(g), 4);
      ASSERT_EQ(scale, Fp8Scale(amax, true)) << "token " << s << " group " << g;
      ASSERT_TRUE(IsPowerOfTwo(scale));
      for (int i = 0; i < 128; ++i) {
        const int d = g * 128 + i;
        const double x = c.c_kv[size_t(s * r + d)];
        ASSERT_NE(rec[d] & 0x7f, 0x7f) << "NaN code";
        // The e4m3 byte at offset d decodes (times the group scale) to what
        // ReadMlaToken returns; error <= max(|x| 2^-4, scale 2^-10) (e4m3 rounding
        // of x / scale, exact division by a power of two; see ops_test Quantize).
        ASSERT_EQ(got[size_t(d)], double(Fp8E4M3ToFloat(rec[d])) * scale);
        ASSERT_LE(std::fabs(got[size_t(d)] - x), std::max(std::fabs(x) / 16, scale / 1024.0))
            << "token " << s << " dim " << d;
      }
    }
    for (int i = 0; i < rope; ++i) {
      const float x = c.k_pe[size_t(s * rope + i)];
      const uint16_t want = FloatToBf16(x);
      const uint16_t bytes = uint16_t(rec[rope_off + 2 * size_t(i)] |
                                      (rec[rope_off + 2 * size_t(i) + 1] << 8));  // little-endian
      ASSERT_EQ(bytes, want) << "token " << s << " rope " << i;
      // bf16 keeps 8 significant bits: round-to-nearest error <= |x| 2^-8.
      ASSERT_LE(std::fabs(got[size_t(r + i)] - x), std::fabs(x) / 256) << "token " << s;
    }
  }
  // Nothing outside the written records changed (unused slots, spare pages).
  for (size_t b = 0; b < c.pool.size(); ++b) {
    if (!written[b]) {
      ASSERT_EQ(int(c.pool[b]), int(kSentinel)) << "byte " << b;
    }
  }
}

TEST(MlaCache, RoundTripAndByteOffsetsV32) { CheckRoundTrip(512, 64, 656, 512, 528); }
TEST(MlaCache, RoundTripAndByteOffsetsSmall) { CheckRoundTrip(128, 32, 196, 128, 132); }

TEST(MlaCache, ZeroGroupAndRewrite) {
  std::mt19937 rng(3);
  TestCache c = MakeCache(Layout(128, 32), 70, rng);
  // Token 3's first group is all zero: scale = 2^ceil(log2(1e-4 / 448)), values 0.
  std::vector<double> t3 = ReadToken(c, 3);
  for (int i = 0; i < 128; ++i) ASSERT_EQ(t3[size_t(i)], 0.0);
  // Rewriting a position replaces its record.
  std::vector<float> ckv(128, 0.5f), kpe(32, -1.0f);
  const int64_t pos = 65;
  WriteMlaCache(c.Ref(), ckv.data(), kpe.data(), &pos, 1);
  std::vector<double> got = ReadToken(c, 65);
  for (int i = 0; i < 128; ++i) ASSERT_EQ(got[size_t(i)], 0.5);
  for (int i = 0; i < 32; ++i) ASSERT_EQ(got[size_t(128 + i)], -1.0);
}

// ---------------------------------------------------------------------------
// Sparse attention.
// ---------------------------------------------------------------------------
struct RefResult {
  std::vector<double> out;    // [T, H, r]
  std::vector<double> lse;    // [T, H]
  std::vector<double> delta;  // [T, H]: bound on the fp32 logit error
};

// Double reference over the dequantised cache. The logit error bound uses the
// probabilistic rule sqrt(n) u sum |terms| (fp32 dot products of n = r + rope
// terms with partial sums), times 8 for margin, times the softmax scale.
RefResult ReferenceAttention(const TestCache& c, const std::vector<float>& q_abs,
                             const std::vector<float>& q_pe, int64_t T, int H,
                             const std::vector<int32_t>& indices, int topk, float scale) {
  const int r = c.layout.kv_lora_rank, rope = c.layout.rope_dim;
  RefResult res;
  res.out.assign(size_t(T * H * r), 0.0);
  res.lse.assign(size_t(T * H), -std::numeric_limits<double>::infinity());
  res.delta.assign(size_t(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> valid;
    for (int i = 0; i < topk; ++i)
      if (indices[size_t(t * topk + i)] >= 0) valid.push_back(indices[size_t(t * topk + i)]);
    if (valid.empty()) continue;
    std::vector<std::vector<double>> kv;
    for (int32_t s : valid) kv.push_back(ReadToken(c, s));
    for (int h = 0; h < H; ++h) {
      const float* qa = &q_abs[size_t((t * H + h) * r)];
      const float* qp = &q_pe[size_t((t * H + h) * rope)];
      std::vector<double> logit(valid.size());
      double mx = -1e300, delta = 0;
      for (size_t i = 0; i < valid.size(); ++i) {
        double dot = 0, mag = 0;
        for (int d = 0; d < r; ++d) {
          dot += qa[d] * kv[i][size_t(d)];
          mag += std::fabs(qa[d] * kv[i][size_t(d)]);
        }
        for (int d = 0; d < rope; ++d) {
          dot += qp[d] * kv[i][size_t(r + d)];
          mag += std::fabs(qp[d] * kv[i][size_t(r + d)]);
        }
        logit[i] = dot * scale;
        mx = std::max(mx, logit[i]);
        delta = std::max(delta, 8 * std::sqrt(double(r + rope)) * kU * mag * scale +
                                    4 * kU * std::fabs(logit[i]));
      }
      double sum = 0;
      for (size_t i = 0; i < valid.size(); ++i) sum += std::exp(logit[i] - mx);
      for (size_t i = 0; i < valid.size(); ++i) {
        const double p = std::exp(logit[i] - mx) / sum;
        for (int d = 0; d < r; ++d) res.out[size_t((t * H + h) * r + d)] += p * kv[i][size_t(d)];
      }
      res.lse[size_t(t * H + h)] = mx + std::log(sum);
      res.delta[size_t(t * H + h)] = delta;
    }
  }
  return res;
}

// Distinct random tokens in [0, L) with about `pad_frac` of the slots -1.
std::vector<int32_t> RandomIndices(std::mt19937& rng, int64_t T, int topk, int64_t L,
                                   double pad_frac) {
  std::vector<int32_t> idx(size_t(T * topk));
  std::vector<int32_t> all(static_cast<size_t>(L));
  std::iota(all.begin(), all.end(), 0);
  std::bernoulli_distribution pad(pad_frac);
  for (int64_t t = 0; t < T; ++t) {
    std::shuffle(all.begin(), all.end(), rng);
    for (int i = 0; i < topk; ++i) idx[size_t(t * topk + i)] = pad(rng) ? -1 : all[size_t(i)];
  }
  return idx;
}

void CheckAgainstReference(const TestCache& c, const std::vector<float>& q_abs,
                           const std::vector<float>& q_pe, int64_t T, int H,
                           const std::vector<int32_t>& idx, int topk, float scale,
                           const std::vector<float>& out, const std::vector<float>& lse,
                           const char* what) {
  const int r = c.layout.kv_lora_rank;
  RefResult ref = ReferenceAttention(c, q_abs, q_pe, T, H, idx, topk, scale);
  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < H; ++h) {
      const size_t th = size_t(t * H + h);
      const double want_lse = ref.lse[th];
      if (std::isinf(want_lse)) {  // no valid index: out = 0, lse = -inf
        ASSERT_TRUE(std::isinf(lse[th]) && lse[th] < 0) << what << " t " << t << " h " << h;
        for (int d = 0; d < r; ++d) ASSERT_EQ(out[th * size_t(r) + size_t(d)], 0.0f);
        continue;
      }
      // A logit error of at most delta moves each probability by a factor within
      // e^(+-2 delta): |out - ref| <= (e^(2 delta) - 1) max|c_kv| (+ fp32 rounding
      // of the weighted sum, relative 64 u); lse moves by at most delta.
      double vmax = 0;
      for (int d = 0; d < r; ++d) vmax = std::max(vmax, std::fabs(ref.out[th * size_t(r) + size_t(d)]));
      const double delta = ref.delta[th];
      double cmax = 0;
      for (int32_t i = 0; i < topk; ++i) {
        const int32_t s = idx[size_t(t * topk + i)];
        if (s < 0) continue;
        for (int d = 0; d < r; ++d) cmax = std::max(cmax, double(std::fabs(c.c_kv[size_t(s * r + d)])) * 1.07);
      }
      const double tol = (std::exp(2 * delta) - 1) * cmax + 64 * kU * cmax + 1e-12;
      for (int d = 0; d < r; ++d) {
        ASSERT_NEAR(out[th * size_t(r) + size_t(d)], ref.out[th * size_t(r) + size_t(d)], tol)
            << what << " t " << t << " h " << h << " d " << d << " (max |out| " << vmax << ")";
      }
      ASSERT_NEAR(lse[th], want_lse, delta + 4 * kU * std::fabs(want_lse)) << what << " t " << t;
    }
  }
}

struct AttnCase {
  int r, rope, heads, topk;
  int64_t L, T;
  float q_mag, scale;
};

void RunAttentionCase(const AttnCase& k, uint32_t seed) {
  std::mt19937 rng(seed);
  TestCache c = MakeCache(Layout(k.r, k.rope), k.L, rng);
  const int64_t T = k.T;
  std::vector<float> q_abs = RandomVector(rng, size_t(T * k.heads * k.r), -k.q_mag, k.q_mag);
  std::vector<float> q_pe = RandomVector(rng, size_t(T * k.heads * k.rope), -k.q_mag, k.q_mag);
  std::vector<int32_t> idx = RandomIndices(rng, T, k.topk, k.L, 0.2);
  for (int i = 0; i < k.topk; ++i) idx[size_t(1 * k.topk + i)] = -1;  // query 1: nothing valid
  // Query 2: a single valid index at the end of the list.
  for (int i = 0; i < k.topk; ++i) idx[size_t(2 * k.topk + i)] = -1;
  idx[size_t(2 * k.topk + k.topk - 1)] = int32_t(k.L - 1);
  std::vector<float> out(size_t(T * k.heads * k.r), std::nanf(""));
  std::vector<float> lse(size_t(T * k.heads), std::nanf(""));
  SparseMlaAttention(c.View(), q_abs.data(), q_pe.data(), T, k.heads, idx.data(), k.topk, k.scale,
                     out.data(), lse.data(), nullptr);
  CheckAgainstReference(c, q_abs, q_pe, T, k.heads, idx, k.topk, k.scale, out, lse, "inline");
  // The same with a pool (and without lse): bit-identical outputs.
  ThreadPool pool(2);
  std::vector<float> out2(out.size(), std::nanf(""));
  SparseMlaAttention(c.View(), q_abs.data(), q_pe.data(), T, k.heads, idx.data(), k.topk, k.scale,
                     out2.data(), nullptr, &pool);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(FloatBits(out2[i]), FloatBits(out[i])) << i;
  // One query alone (the pool splits its heads into groups): also identical.
  std::vector<float> one(size_t(k.heads * k.r)), one_lse(size_t(k.heads));
  SparseMlaAttention(c.View(), q_abs.data(), q_pe.data(), 1, k.heads, idx.data(), k.topk, k.scale,
                     one.data(), one_lse.data(), &pool);
  for (size_t i = 0; i < one.size(); ++i) ASSERT_EQ(FloatBits(one[i]), FloatBits(out[i])) << i;
  for (int h = 0; h < k.heads; ++h) ASSERT_EQ(FloatBits(one_lse[size_t(h)]), FloatBits(lse[size_t(h)]));
}

TEST(SparseMla, MatchesDoubleReferenceV32Shapes) {
  // 16 heads, r = 512, rope = 64, 100 slots (> the 32-token chunk: the running
  // max is rescaled several times), logits spanning about +-40.
  RunAttentionCase({512, 64, 16, 100, 300, 5, 2.0f, 0.1352f}, 21);
}

TEST(SparseMla, MatchesDoubleReferenceTinyShapes) {
  RunAttentionCase({128, 32, 4, 70, 200, 9, 1.0f, 0.18f}, 22);
  // Large logits (hundreds): needs the max-subtracted softmax.
  RunAttentionCase({128, 32, 3, 40, 100, 4, 30.0f, 1.0f}, 23);
}

TEST(SparseMla, RejectsOutOfRangeIndex) {
  std::mt19937 rng(24);
  TestCache c = MakeCache(Layout(128, 32), 10, rng);
  std::vector<float> q(160, 0.1f), out(128), lse(1);
  const int32_t idx[2] = {3, 10};  // 10 is past the 10 tokens
  std::string text;
  EXPECT_TRUE(DiesWithMessage(
      [&] {
        SparseMlaAttention(c.View(), q.data(), q.data(), 1, 1, idx, 2, 1.0f, out.data(),
                           lse.data(), nullptr);
      },
      "outside the cache", &text))
      << text;
}

// ---------------------------------------------------------------------------
// Absorbed MLA equals the naive form.
// ---------------------------------------------------------------------------
void CheckAbsorbedEqualsNaive(int Hm, int nope, int v, int r, int rope, DType wdtype,
                              uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t L = 200, T = 6;
  const int topk = 64;
  TestCache c = MakeCache(Layout(r, rope), L, rng);
  // W_kvb [Hm * (nope + v), r]: per head nope rows of W_K then v rows of W_V.
  const int64_t rows = int64_t(Hm) * (nope + v);
  std::vector<float> wv = RandomVector(rng, size_t(rows * r), -0.2f, 0.2f);
  const TestWeight tw = MakeWeight(wv, rows, r, wdtype);
  const WeightView W = tw.View();
  std::vector<float> q_nope = RandomVector(rng, size_t(T * Hm * nope));
  std::vector<float> q_pe = RandomVector(rng, size_t(T * Hm * rope));
  std::vector<int32_t> idx = RandomIndices(rng, T, topk, L, 0.25);
  const float scale = YarnSoftmaxScale(nope + rope, YarnParams{});

  // Naive, in double: per head k_nope = W_K c_kv, v = W_V c_kv from the cache.
  std::vector<double> naive(size_t(T * Hm * v), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> valid;
    for (int i = 0; i < topk; ++i)
      if (idx[size_t(t * topk + i)] >= 0) valid.push_back(idx[size_t(t * topk + i)]);
    for (int h = 0; h < Hm; ++h) {
      const int64_t wk0 = int64_t(h) * (nope + v), wv0 = wk0 + nope;
      std::vector<double> logit, mx_list;
      std::vector<std::vector<double>> vals;
      for (int32_t s : valid) {
        std::vector<double> kv = ReadToken(c, s);
        double l = 0;
        for (int j = 0; j < nope; ++j) {
          double k = 0;
          for (int d = 0; d < r; ++d) k += tw.At(wk0 + j, d) * kv[size_t(d)];
          l += q_nope[size_t((t * Hm + h) * nope + j)] * k;
        }
        for (int j = 0; j < rope; ++j) l += q_pe[size_t((t * Hm + h) * rope + j)] * kv[size_t(r + j)];
        logit.push_back(l * scale);
        std::vector<double> vv(static_cast<size_t>(v), 0.0);
        for (int j = 0; j < v; ++j)
          for (int d = 0; d < r; ++d) vv[size_t(j)] += tw.At(wv0 + j, d) * kv[size_t(d)];
        vals.push_back(vv);
      }
      const double mx = *std::max_element(logit.begin(), logit.end());
      double sum = 0;
      for (double l : logit) sum += std::exp(l - mx);
      for (size_t i = 0; i < valid.size(); ++i)
        for (int j = 0; j < v; ++j)
          naive[size_t((t * Hm + h) * v + j)] += std::exp(logit[i] - mx) / sum * vals[i][size_t(j)];
    }
  }

  // Absorbed: q_abs = W_K^T q_nope (MatMulXW on the head's row slice), sparse
  // attention over the latent, then W_V latent (Linear on the head's V rows).
  ThreadPool pool(2);
  std::vector<float> q_abs(size_t(T * Hm * r));
  std::vector<float> qn_h(size_t(T * nope)), qa_h(size_t(T * r));
  for (int h = 0; h < Hm; ++h) {
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(&qn_h[size_t(t * nope)], &q_nope[size_t((t * Hm + h) * nope)], size_t(nope) * 4);
    MatMulXW(qn_h.data(), T, W.Rows(int64_t(h) * (nope + v), nope), qa_h.data(), &pool);
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(&q_abs[size_t((t * Hm + h) * r)], &qa_h[size_t(t * r)], size_t(r) * 4);
  }
  std::vector<float> latent(size_t(T * Hm * r));
  SparseMlaAttention(c.View(), q_abs.data(), q_pe.data(), T, Hm, idx.data(), topk, scale,
                     latent.data(), nullptr, &pool);
  std::vector<float> absorbed(size_t(T * Hm * v));
  std::vector<float> lat_h(size_t(T * r)), out_h(size_t(T * v));
  for (int h = 0; h < Hm; ++h) {
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(&lat_h[size_t(t * r)], &latent[size_t((t * Hm + h) * r)], size_t(r) * 4);
    Linear(lat_h.data(), T, W.Rows(int64_t(h) * (nope + v) + nope, v), out_h.data(), &pool);
    for (int64_t t = 0; t < T; ++t)
      std::memcpy(&absorbed[size_t((t * Hm + h) * v)], &out_h[size_t(t * v)], size_t(v) * 4);
  }

  double diff2 = 0, norm2 = 0, max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < naive.size(); ++i) {
    diff2 += std::pow(absorbed[i] - naive[i], 2);
    norm2 += naive[i] * naive[i];
    max_diff = std::max(max_diff, std::fabs(absorbed[i] - naive[i]));
    max_abs = std::max(max_abs, std::fabs(naive[i]));
  }
  EXPECT_LT(std::sqrt(diff2 / norm2), 1e-4) << DTypeName(wdtype) << " r " << r;
  EXPECT_LT(max_diff / max_abs, 1e-4) << DTypeName(wdtype) << " r " << r;
}

TEST(SparseMla, AbsorbedEqualsNaiveTiny) {
  CheckAbsorbedEqualsNaive(4, 32, 32, 128, 32, DType::kF32, 31);
  CheckAbsorbedEqualsNaive(4, 32, 32, 128, 32, DType::kFP8E4M3, 32);  // slices start mid-block
}

TEST(SparseMla, AbsorbedEqualsNaiveV32Dims) {
  CheckAbsorbedEqualsNaive(2, 128, 128, 512, 64, DType::kBF16, 33);
}

// ---------------------------------------------------------------------------
// Sparse MLA with top-k >= L equals dense causal MLA.
// ---------------------------------------------------------------------------
TEST(SparseMla, TopKCoveringAllTokensEqualsDenseCausal) {
  std::mt19937 rng(41);
  const int r = 128, rope = 32, H = 3, topk = 128;
  const int64_t L = 90;
  TestCache c = MakeCache(Layout(r, rope), L, rng);
  std::vector<float> q_abs = RandomVector(rng, size_t(L * H * r), -2.0f, 2.0f);
  std::vector<float> q_pe = RandomVector(rng, size_t(L * H * rope), -2.0f, 2.0f);
  const float scale = 0.15f;
  // Query t: every s <= t, shuffled among -1 padding.
  std::vector<int32_t> idx(size_t(L * topk));
  for (int64_t t = 0; t < L; ++t) {
    std::vector<int32_t> row(static_cast<size_t>(topk), -1);
    for (int64_t s = 0; s <= t; ++s) row[size_t(s)] = int32_t(s);
    std::shuffle(row.begin(), row.end(), rng);
    std::copy(row.begin(), row.end(), idx.begin() + t * topk);
  }
  std::vector<float> out(size_t(L * H * r)), lse(size_t(L * H));
  ThreadPool pool(2);
  SparseMlaAttention(c.View(), q_abs.data(), q_pe.data(), L, H, idx.data(), topk, scale,
                     out.data(), lse.data(), &pool);
  // Dense causal attention, computed directly over s = 0..t.
  std::vector<std::vector<double>> kv;
  for (int64_t s = 0; s < L; ++s) kv.push_back(ReadToken(c, s));
  for (int64_t t = 0; t < L; ++t) {
    for (int h = 0; h < H; ++h) {
      const float* qa = &q_abs[size_t((t * H + h) * r)];
      const float* qp = &q_pe[size_t((t * H + h) * rope)];
      std::vector<double> logit;
      double mag = 0;
      for (int64_t s = 0; s <= t; ++s) {
        double l = 0, m = 0;
        for (int d = 0; d < r; ++d) {
          l += qa[d] * kv[size_t(s)][size_t(d)];
          m += std::fabs(qa[d] * kv[size_t(s)][size_t(d)]);
        }
        for (int d = 0; d < rope; ++d) {
          l += qp[d] * kv[size_t(s)][size_t(r + d)];
          m += std::fabs(qp[d] * kv[size_t(s)][size_t(r + d)]);
        }
        logit.push_back(l * scale);
        mag = std::max(mag, m);
      }
      const double mx = *std::max_element(logit.begin(), logit.end());
      double sum = 0;
      for (double l : logit) sum += std::exp(l - mx);
      // Same error model as ReferenceAttention.
      const double delta = 8 * std::sqrt(double(r + rope)) * kU * mag * scale + 4 * kU * std::fabs(mx);
      double cmax = 0;
      for (int64_t s = 0; s <= t; ++s)
        for (int d = 0; d < r; ++d) cmax = std::max(cmax, std::fabs(kv[size_t(s)][size_t(d)]));
      const double tol = (std::exp(2 * delta) - 1) * cmax + 64 * kU * cmax + 1e-12;
      for (int d = 0; d < r; ++d) {
        double want = 0;
        for (int64_t s = 0; s <= t; ++s)
          want += std::exp(logit[size_t(s)] - mx) / sum * kv[size_t(s)][size_t(d)];
        ASSERT_NEAR(out[size_t((t * H + h) * r + d)], want, tol) << "t " << t << " h " << h;
      }
      ASSERT_NEAR(lse[size_t(t * H + h)], mx + std::log(sum), delta + 1e-6) << "t " << t;
    }
  }
}

// ---------------------------------------------------------------------------
// Timings (PD_BENCH=1).
// ---------------------------------------------------------------------------
TEST(Bench, SparseMlaAttention) {
  if (std::getenv("PD_BENCH") == nullptr) MINITEST_SKIP() << "set PD_BENCH=1";
  std::mt19937 rng(51);
  const int r = 128, rope = 32, H = 4, topk = 256;
  const int64_t L = 32768, T = 4096;
  TestCache c = MakeCache(Layout(r, rope), L, rng);
  std::vector<float> q_abs = RandomVector(rng, size_t(T * H * r));
  std::vector<float> q_pe = RandomVector(rng, size_t(T * H * rope));
  std::vector<int32_t> idx(size_t(T * topk));
  std::uniform_int_distribution<int32_t> tok(0, int32_t(L - 1));
  for (int64_t t = 0; t < T; ++t) {  // distinct random tokens (rejection on collisions)
    std::vector<int32_t> row;
    while (int(row.size()) < topk) {
      int32_t s = tok(rng);
      if (std::find(row.begin(), row.end(), s) == row.end()) row.push_back(s);
    }
    std::copy(row.begin(), row.end(), idx.begin() + t * topk);
  }
  std::vector<float> out(size_t(T * H * r)), lse(size_t(T * H));
  ThreadPool pool2(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool2}) {
    double best = 1e30;
    for (int trial = 0; trial < 5; ++trial) {
      auto t0 = std::chrono::steady_clock::now();
      SparseMlaAttention(c.View(), q_abs.data(), q_pe.data(), T, H, idx.data(), topk, 0.18f,
                         out.data(), lse.data(), p);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    const double flops = double(T) * H * topk * (2.0 * (r + rope) + 2.0 * r);
    std::printf("  SparseMlaAttention T=%lld H=%d r=%d rope=%d topk=%d threads=%d: %.2f ms "
                "(%.1f GFLOP/s, %.1f ns per (query, token))\n",
                static_cast<long long>(T), H, r, rope, topk, p ? p->num_threads() : 1, best * 1e3,
                flops / best * 1e-9, best * 1e9 / (double(T) * topk));
  }
  // Decode-like: one query, 128 heads, V3.2 latent sizes, topk 2048.
  TestCache big = MakeCache(Layout(512, 64), 8192, rng);
  std::vector<float> qa = RandomVector(rng, size_t(128 * 512)), qp = RandomVector(rng, size_t(128 * 64));
  std::vector<int32_t> di(2048);
  std::iota(di.begin(), di.end(), 0);
  std::shuffle(di.begin(), di.end(), rng);
  std::vector<float> o(size_t(128 * 512)), ls(128);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool2}) {
    double best = 1e30;
    for (int trial = 0; trial < 5; ++trial) {
      auto t0 = std::chrono::steady_clock::now();
      SparseMlaAttention(big.View(), qa.data(), qp.data(), 1, 128, di.data(), 2048, 0.1f, o.data(),
                         ls.data(), p);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::printf("  SparseMlaAttention decode T=1 H=128 r=512 rope=64 topk=2048 threads=%d: %.2f ms\n",
                p ? p->num_threads() : 1, best * 1e3);
  }
}

}  // namespace
}  // namespace pd::kernels::cpu
