// GPU tests of the sparse MLA kernels against the CPU reference
// (cpu::WriteMlaCache, cpu::SparseMlaAttention, cpu::ReadMlaToken) on random
// inputs: paged caches in shuffled pages, two sequences, -1 holes and
// out-of-range indices, a token with no valid index, top-k larger than the
// context and not a multiple of the 64-token block, 64 / 128 / 192 / 256 heads,
// every implementation (kWgmma with each of its schedules, kWgmmaPair, kMmaSync), and single-token
// attention that must reproduce the dequantised cache bit for bit (scales from
// 2^-20 to 2^18). Label "gpu".
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/mla_cuda.h"
#include "kernels/kv_layout.h"
#include "kernels/mla.h"
#include "kernels/numeric.h"
#include "kernels/cuda/testing/gpu_test_util.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels::cuda {
namespace {

constexpr int kR = 512, kRope = 64, kW = kR + kRope;


cpu::ThreadPool& CpuPool() {
  static cpu::ThreadPool pool;  // the CPU reference on every core
  return pool;
}

struct HostMla {
  KvLayout layout;
  std::vector<int64_t> lens;
  int64_t stride = 0;
  std::vector<uint8_t> pool;
  std::vector<int32_t> page_table;  // [S, stride]
};

// Sequences of the given lengths in one pool (shuffled pages, garbage in unused
// bytes), every token written by the CPU reference.
// c_kv values come from `ckv_gen(rng, token, dim)` when given, else N(0, 1).
HostMla MakeMla(std::mt19937& rng, const std::vector<int64_t>& lens,
                const std::function<float(std::mt19937&, int64_t, int)>& ckv_gen = nullptr) {
  HostMla m;
  m.lens = lens;
  int64_t pages = 2;
  for (int64_t n : lens) {
    pages += NumPages(n);
    m.stride = std::max(m.stride, NumPages(n));
  }
  m.pool.resize(size_t(pages) * m.layout.MlaPageBytes());
  for (auto& b : m.pool) b = uint8_t(rng());
  std::vector<int32_t> ids(static_cast<size_t>(pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  m.page_table.assign(lens.size() * size_t(m.stride), -1);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  size_t next = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    for (int64_t p = 0; p < NumPages(lens[s]); ++p) m.page_table[s * m.stride + p] = ids[next++];
    std::vector<float> ckv(size_t(lens[s]) * kR), kpe(size_t(lens[s]) * kRope);
    for (size_t i = 0; i < ckv.size(); ++i) {
      ckv[i] = ckv_gen ? ckv_gen(rng, int64_t(i / kR), int(i % kR)) : nd(rng);
    }
    for (auto& x : kpe) x = nd(rng);
    std::vector<int64_t> pos(static_cast<size_t>(lens[s]));
    std::iota(pos.begin(), pos.end(), 0);
    MlaCacheRef ref;
    ref.pool = m.pool.data();
    ref.page_table = m.page_table.data() + s * m.stride;
    ref.layout = m.layout;
    cpu::WriteMlaCache(ref, ckv.data(), kpe.data(), pos.data(), lens[s]);
  }
  return m;
}

TEST(CudaMla, CacheWriteIsBitExact) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(1);
  KvLayout layout;
  const int64_t n = 3000, T = 333;
  const int64_t pages = NumPages(n) + 1;
  std::vector<uint8_t> pool(size_t(pages) * layout.MlaPageBytes());
  for (auto& b : pool) b = uint8_t(rng());
  std::vector<int32_t> pt(static_cast<size_t>(pages));
  std::iota(pt.begin(), pt.end(), 0);
  std::shuffle(pt.begin(), pt.end(), rng);
  std::vector<int64_t> all(static_cast<size_t>(n));
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  std::vector<int64_t> pos(all.begin(), all.begin() + T);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> mag(-4.0f, 2.0f);
  std::vector<float> ckv(size_t(T) * kR), kpe(size_t(T) * kRope);
  for (int64_t t = 0; t < T; ++t) {
    for (int g = 0; g < 4; ++g) {
      const float m = std::pow(10.0f, mag(rng));
      for (int i = 0; i < 128; ++i) ckv[size_t(t * kR + g * 128 + i)] = nd(rng) * m;
    }
  }
  for (auto& x : kpe) x = nd(rng) * 3.0f;
  ckv[5] = 0.0f;
  for (int i = 128; i < 256; ++i) ckv[size_t(kR + i)] = 0.0f;  // an all-zero group
  std::vector<uint8_t> cpu_pool = pool;
  MlaCacheRef ref;
  ref.pool = cpu_pool.data();
  ref.page_table = pt.data();
  ref.layout = layout;
  cpu::WriteMlaCache(ref, ckv.data(), kpe.data(), pos.data(), T);
  DeviceBuffer<uint8_t> d_pool(pool);
  DeviceBuffer<int32_t> d_pt(pt);
  DeviceBuffer<float> d_ckv(ckv), d_kpe(kpe);
  DeviceBuffer<int64_t> d_pos(pos);
  MlaWriteParams p;
  p.pool = d_pool.get();
  p.page_table = d_pt.get();
  p.page_table_stride = pages;
  p.layout = layout;
  p.c_kv = d_ckv.get();
  p.k_pe = d_kpe.get();
  p.positions = d_pos.get();
  p.num_tokens = T;
  ASSERT_CUDA(LaunchWriteMlaCache(p, 0));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto g = d_pool.Download();
  size_t bad = 0;
  for (size_t i = 0; i < g.size(); ++i) bad += g[i] != cpu_pool[i];
  EXPECT_EQ(bad, 0u) << "bytes differing from cpu::WriteMlaCache (untouched bytes included)";
}

struct AttnCase {
  int heads = 128;
  int topk = 2048;
  std::vector<int64_t> lens = {5000, 200};
  std::vector<int> qcount = {5, 2};
  SparseMlaImpl impl = SparseMlaImpl::kAuto;
  bool out_of_range = false;  // some holes become indices >= the sequence length
  int experiment = 0;         // SparseMlaParams::experiment (3..8: kWgmma schedules)
  bool bf16_rows = false;     // up-convert the cache (LaunchUpconvertMlaCache) and use the rows
};

const char* ImplName(SparseMlaImpl impl) {
  return impl == SparseMlaImpl::kMmaSync     ? "mma.sync"
         : impl == SparseMlaImpl::kWgmmaPair ? "wgmma-pair"
         : impl == SparseMlaImpl::kAuto      ? "auto"
                                             : "wgmma";
}

// Up-converts every sequence of `hm` (device copies d_pool, d_pt, d_lens) to
// bf16 rows, sequence s from row row_start[s]; returns the rows and starts.
struct DeviceRows {
  DeviceBuffer<uint16_t> rows;
  DeviceBuffer<int64_t> start;
};
DeviceRows Upconvert(const HostMla& hm, const uint8_t* d_pool, const int32_t* d_pt,
                     const int64_t* d_lens) {
  std::vector<int64_t> start(hm.lens.size());
  int64_t total = 0, longest = 0;
  for (size_t s = 0; s < hm.lens.size(); ++s) {
    start[s] = total;
    total += hm.lens[s];
    longest = std::max(longest, hm.lens[s]);
  }
  DeviceRows r{DeviceBuffer<uint16_t>(size_t(total) * kW), DeviceBuffer<int64_t>(start)};
  cudaMemset(r.rows.get(), 0xff, r.rows.bytes());  // NaN poison
  MlaUpconvertParams u;
  u.cache.pool = d_pool;
  u.cache.page_table = d_pt;
  u.cache.page_table_stride = hm.stride;
  u.cache.num_tokens = d_lens;
  u.cache.layout = hm.layout;
  u.num_seqs = int(hm.lens.size());
  u.row_start = r.start.get();
  u.max_tokens = longest;
  u.rows = r.rows.get();
  const char* why = "";
  const cudaError_t e = LaunchUpconvertMlaCache(u, 0, &why);
  if (e != cudaSuccess) std::printf("  LaunchUpconvertMlaCache: %s: %s\n", cudaGetErrorString(e), why);
  return r;
}

void RunAttention(const AttnCase& ac, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::vector<int64_t>& lens = ac.lens;
  const HostMla hm = MakeMla(rng, lens);
  const int H = ac.heads, topk = ac.topk;
  const std::vector<int>& qcount = ac.qcount;
  const float scale = 1.0f / std::sqrt(192.0f);
  std::normal_distribution<float> nd(0.0f, 1.5f);
  int64_t T = 0;
  for (int c : qcount) T += c;
  std::vector<float> q_abs(size_t(T) * H * kR), q_pe(size_t(T) * H * kRope);
  for (auto& x : q_abs) x = nd(rng);
  for (auto& x : q_pe) x = nd(rng);
  // idx: what the GPU gets; cpu_idx: the same with out-of-range entries as -1
  // (the CPU reference rejects them; the GPU contract skips them).
  std::vector<int32_t> idx(size_t(T) * topk, -1), qseq(static_cast<size_t>(T));
  int64_t t = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    for (int c = 0; c < qcount[s]; ++c, ++t) {
      qseq[size_t(t)] = int32_t(s);
      std::vector<int32_t> perm(static_cast<size_t>(lens[s]));
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng);
      const int n = int(std::min<int64_t>(topk, lens[s]));
      for (int i = 0; i < n; ++i) idx[size_t(t * topk + i)] = perm[size_t(i)];
      for (int i = 0; i < topk; ++i) {
        if (rng() % 10 == 0) {  // holes
          idx[size_t(t * topk + i)] = ac.out_of_range && rng() % 2 ? int32_t(lens[s] + rng() % 1000)
                                                                  : -1;
        }
      }
      std::shuffle(idx.begin() + t * topk, idx.begin() + (t + 1) * topk, rng);
      if (s == 0 && c == 3) std::fill(idx.begin() + t * topk, idx.begin() + (t + 1) * topk, -1);
    }
  }
  std::vector<int32_t> cpu_idx = idx;
  for (int64_t r = 0; r < T; ++r) {
    for (int i = 0; i < topk; ++i) {
      int32_t& v = cpu_idx[size_t(r * topk + i)];
      if (v >= lens[size_t(qseq[size_t(r)])]) v = -1;
    }
  }
  // CPU reference per sequence.
  std::vector<float> out(size_t(T) * H * kR), lse(size_t(T) * H);
  t = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    MlaCacheView v;
    v.pool = hm.pool.data();
    v.page_table = hm.page_table.data() + s * hm.stride;
    v.num_tokens = lens[s];
    v.layout = hm.layout;
    cpu::SparseMlaAttention(v, q_abs.data() + t * H * kR, q_pe.data() + t * H * kRope, qcount[s],
                            H, cpu_idx.data() + t * topk, topk, scale, out.data() + t * H * kR,
                            lse.data() + t * H, &CpuPool());
    t += qcount[s];
  }
  DeviceBuffer<uint8_t> d_pool(hm.pool);
  DeviceBuffer<int32_t> d_pt(hm.page_table), d_idx(idx), d_qseq(qseq);
  DeviceBuffer<int64_t> d_lens(lens);
  DeviceBuffer<float> d_qa(q_abs), d_qp(q_pe), d_out(out.size()), d_lse(lse.size());
  cudaMemset(d_out.get(), 0xff, d_out.bytes());  // NaN poison
  cudaMemset(d_lse.get(), 0xff, d_lse.bytes());
  SparseMlaParams p;
  p.cache.pool = d_pool.get();
  p.cache.page_table = d_pt.get();
  p.cache.page_table_stride = hm.stride;
  p.cache.num_tokens = d_lens.get();
  p.cache.layout = hm.layout;
  p.q_abs = d_qa.get();
  p.q_pe = d_qp.get();
  p.query_seq = d_qseq.get();
  p.indices = d_idx.get();
  p.num_queries = T;
  p.heads = H;
  p.topk = topk;
  p.softmax_scale = scale;
  p.out = d_out.get();
  p.lse = d_lse.get();
  p.impl = ac.impl;
  p.experiment = ac.experiment;
  DeviceRows rows;
  if (ac.bf16_rows) {
    rows = Upconvert(hm, d_pool.get(), d_pt.get(), d_lens.get());
    p.bf16_rows = rows.rows.get();
    p.bf16_row_start = rows.start.get();
  }
  std::printf("  launching %s%s experiment %d H=%d topk %d\n", ImplName(ac.impl),
              ac.bf16_rows ? " bf16 rows" : "", ac.experiment, H, topk);
  std::fflush(stdout);
  const char* why = "";
  const cudaError_t launched = LaunchSparseMla(p, 0, &why);
  ASSERT_EQ(launched, cudaSuccess) << cudaGetErrorString(launched) << ": " << why;
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto g_out = d_out.Download();
  const auto g_lse = d_lse.Download();
  double num = 0.0, den = 0.0, worst = 0.0, worst_lse = 0.0;
  for (int64_t r = 0; r < T * H; ++r) {
    double rn = 0.0, rd = 0.0;
    for (int d = 0; d < kR; ++d) {
      const double a = g_out[size_t(r * kR + d)], b = out[size_t(r * kR + d)];
      ASSERT_FALSE(std::isnan(a)) << "row " << r << " dim " << d << " not written";
      rn += (a - b) * (a - b);
      rd += b * b;
    }
    num += rn;
    den += rd;
    if (rd > 0.0) worst = std::max(worst, std::sqrt(rn / rd));
    if (std::isinf(lse[size_t(r)])) {
      EXPECT_TRUE(std::isinf(g_lse[size_t(r)]) && g_lse[size_t(r)] < 0) << "row " << r;
      EXPECT_EQ(rn, 0.0) << "row " << r << " with no valid index must be zero";
    } else {
      ASSERT_FALSE(std::isnan(g_lse[size_t(r)])) << "lse of row " << r << " not written";
      worst_lse = std::max(worst_lse, std::fabs(double(g_lse[size_t(r)]) - lse[size_t(r)]));
    }
  }
  const double rel = std::sqrt(num / den);
  std::printf("  %s%s (experiment %d) H=%d topk %d T=%lld%s: relative L2 error %.3g overall, "
              "%.3g worst row, lse %.3g\n",
              ImplName(ac.impl), ac.bf16_rows ? " bf16 rows" : "", ac.experiment, H, topk,
              static_cast<long long>(T), ac.out_of_range ? " (out-of-range holes)" : "", rel,
              worst, worst_lse);
  std::fflush(stdout);  // a hang in a later case still shows this one
  // bf16 q and p (8-bit mantissas), fp32 accumulation.
  EXPECT_LT(rel, 1e-2);
  EXPECT_LT(worst, 3e-2);
  EXPECT_LT(worst_lse, 3e-2);
}

TEST(CudaMla, SparseAttentionMatchesCpu) {
  SKIP_WITHOUT_GPU();
  for (SparseMlaImpl impl :
       {SparseMlaImpl::kWgmma, SparseMlaImpl::kWgmmaPair, SparseMlaImpl::kMmaSync}) {
    AttnCase ac;
    ac.impl = impl;
    for (int topk : {2048, 300, 37}) {
      ac.topk = topk;
      RunAttention(ac, uint32_t(topk));
    }
  }
}

// The Hopper kernel's own edges: 64 and 192 heads (one and three CTAs per
// token), top-k 1 / 65 / 129 (a lone token, partial last blocks), out-of-range
// indices, many tokens over several sequences.
TEST(CudaMla, WgmmaHeadsAndEdges) {
  SKIP_WITHOUT_GPU();
  AttnCase ac;
  ac.impl = SparseMlaImpl::kWgmma;
  ac.out_of_range = true;
  ac.heads = 64;
  for (int topk : {1, 65, 2048}) {
    ac.topk = topk;
    RunAttention(ac, 100u + uint32_t(topk));
  }
  ac.heads = 192;
  ac.topk = 129;
  ac.lens = {3000, 90, 700};
  ac.qcount = {9, 4, 6};
  RunAttention(ac, 7u);
  ac.heads = 128;
  ac.topk = 512;
  ac.lens = {1000, 2000, 64, 1};
  ac.qcount = {40, 30, 20, 3};
  RunAttention(ac, 8u);
}

// The cluster-of-2 kernel's edges: 128 heads (one pair per token) and 256 (two
// pairs), top-k 1 (only rank 0 gathers a valid token) / 33 (rank 1's half
// partly filled) / 65 / 2048, out-of-range holes, a token with no valid index,
// many tokens over several sequences, odd token counts; its default schedule,
// the early gather start (experiment 3), the L2 prefetch ahead of the loads
// (4), both (5), the st.async hand-over (6), with early + prefetch (7), persistent
// (9), CTA-scope buffer waits (11) and persistent (13) (many items per
// cluster in the last cases), the seesaw consumers over 5 (14) and 11 (15)
// (top-k 1 / 33 / 65: one or two blocks, 129: an odd count), the split
// producer (17: one producer group per buffer; top-k 1 leaves group 1 idle),
// the next loads after the publish (19, persistent 21), the overlapped WG0
// over 19 (22, persistent 24) and over 17 (25); kAuto (which picks it at 128 heads).
TEST(CudaMla, WgmmaPairHeadsAndEdges) {
  SKIP_WITHOUT_GPU();
  for (int e : {0, 3, 4, 5, 6, 7, 9, 11, 13, 14, 15, 17, 19, 21, 22, 24, 25}) {
    AttnCase ac;
    ac.impl = SparseMlaImpl::kWgmmaPair;
    ac.experiment = e;
    ac.out_of_range = true;
    for (int topk : {1, 33, 65, 2048}) {
      ac.topk = topk;
      RunAttention(ac, 200u + uint32_t(topk) + uint32_t(e));
    }
    ac.heads = 256;
    ac.topk = 129;
    ac.lens = {3000, 90, 700};
    ac.qcount = {9, 4, 6};
    RunAttention(ac, 207u + uint32_t(e));
    ac.heads = 128;
    ac.topk = 512;
    ac.lens = {1000, 2000, 64, 1};
    ac.qcount = {40, 30, 21, 3};
    RunAttention(ac, 208u + uint32_t(e));
    // More pairs (188) than clusters at once: the persistent kernels loop over
    // items, with an odd block count (3) so buffer parities alternate.
    ac.heads = 256;
    ac.topk = 129;
    RunAttention(ac, 209u + uint32_t(e));
  }
  AttnCase ac;
  ac.impl = SparseMlaImpl::kAuto;
  ac.out_of_range = true;
  ac.topk = 700;
  RunAttention(ac, 210u);
}

// The alternative schedules of the wgmma kernel compute the same function.
TEST(CudaMla, WgmmaSchedules) {
  SKIP_WITHOUT_GPU();
  AttnCase ac;
  ac.impl = SparseMlaImpl::kWgmma;
  ac.out_of_range = true;
  ac.topk = 700;
  ac.lens = {3000, 500};
  ac.qcount = {6, 5};
  for (int e = 3; e <= 8; ++e) {
    ac.experiment = e;
    RunAttention(ac, 20u + uint32_t(e));
  }
}

// The prefill path over up-converted bf16 rows (three sequences, their rows
// back to back): the same function as the FP8 path.
TEST(CudaMla, Bf16RowsMatchCpu) {
  SKIP_WITHOUT_GPU();
  AttnCase ac;
  ac.impl = SparseMlaImpl::kWgmma;
  ac.out_of_range = true;
  ac.bf16_rows = true;
  ac.lens = {3000, 500, 70};
  ac.qcount = {6, 5, 3};
  for (int topk : {2048, 129, 1}) {
    ac.topk = topk;
    RunAttention(ac, 40u + uint32_t(topk));
  }
  ac.heads = 64;
  ac.topk = 300;
  RunAttention(ac, 45u);
  // The pair kernel over bf16 rows (each CTA copies half of every block into
  // both CTAs' buffers), with and without the L2 prefetch (experiment 4):
  // top-k 1 (only rank 0's half holds a token), 33, 257, 2048, 256 heads (two
  // pairs per token), many tokens; kAuto, which ignores the rows at 128 heads
  // (the FP8 pair kernel: same tiles, faster).
  ac.heads = 128;
  ac.impl = SparseMlaImpl::kWgmmaPair;
  for (int e : {0, 4, 7, 9}) {
    ac.experiment = e;
    ac.heads = 128;
    ac.lens = {3000, 500, 70};
    ac.qcount = {6, 5, 3};
    for (int topk : {1, 33, 257, 2048}) {
      ac.topk = topk;
      RunAttention(ac, 46u + uint32_t(topk) + uint32_t(e));
    }
    ac.heads = 256;
    ac.topk = 129;
    RunAttention(ac, 47u + uint32_t(e));
    ac.heads = 128;
    ac.topk = 512;
    ac.lens = {1000, 2000, 64, 1};
    ac.qcount = {40, 30, 21, 3};
    RunAttention(ac, 48u + uint32_t(e));
    ac.heads = 256;  // 188 pairs: the persistent default loops, odd block count
    ac.topk = 129;
    RunAttention(ac, 50u + uint32_t(e));
  }
  ac.impl = SparseMlaImpl::kAuto;
  ac.experiment = 0;
  ac.topk = 700;
  RunAttention(ac, 49u);
}

// LaunchUpconvertMlaCache writes cpu::ReadMlaToken's values, rounded to bf16
// (exact: e4m3 times a power of two), for every token of every sequence, and
// touches nothing past the last row.
TEST(CudaMla, UpconvertIsExact) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(31);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const std::vector<int64_t> lens = {700, 1, 130};
  const HostMla hm = MakeMla(rng, lens, [&](std::mt19937& g, int64_t tok, int d) {
    return nd(g) * std::pow(10.0f, float((tok * 7 + d / 128) % 12) - 3.0f);  // 1e-3 .. 1e8
  });
  DeviceBuffer<uint8_t> d_pool(hm.pool);
  DeviceBuffer<int32_t> d_pt(hm.page_table);
  DeviceBuffer<int64_t> d_lens(hm.lens);
  const DeviceRows r = Upconvert(hm, d_pool.get(), d_pt.get(), d_lens.get());
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<uint16_t> rows = r.rows.Download();
  std::vector<float> ckv(kR), kpe(kRope);
  size_t bad = 0;
  int64_t row = 0;
  for (size_t s = 0; s < lens.size(); ++s) {
    MlaCacheView v;
    v.pool = hm.pool.data();
    v.page_table = hm.page_table.data() + s * hm.stride;
    v.num_tokens = lens[s];
    v.layout = hm.layout;
    for (int64_t tk = 0; tk < lens[s]; ++tk, ++row) {
      cpu::ReadMlaToken(v, tk, ckv.data(), kpe.data());
      for (int d = 0; d < kW; ++d) {
        const float want = d < kR ? ckv[size_t(d)] : kpe[size_t(d - kR)];
        const uint16_t got = rows[size_t(row * kW + d)];
        if (got != FloatToBf16(want) && !(want == 0.0f && (got & 0x7fffu) == 0)) {
          if (bad++ < 5) {
            std::printf("  seq %zu token %lld dim %d: %a vs %a\n", s, static_cast<long long>(tk), d,
                        Bf16ToFloat(got), want);
          }
        }
      }
    }
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_EQ(size_t(row * kW), rows.size());
}

// One valid index per token (the others -1 or out of range): softmax weight 1,
// so out must equal the dequantised c_kv of that token exactly (bf16 holds an
// e4m3 value times a power of two exactly), for every head; lse must equal the
// scaled logit. The cache spans scales 2^-20..2^18 (both dequantisation paths),
// all-zero groups and e4m3 subnormals.
void SingleToken(bool bf16_rows, SparseMlaImpl impl, int H, int experiment = 0) {
  std::mt19937 rng(11);
  const int64_t n = 700;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> group_mag(size_t(n) * 4);
  for (auto& m : group_mag) {
    const int r = int(rng() % 8);
    m = r == 0 ? 0.0f : std::pow(10.0f, -3.5f + float(rng() % 1150) / 100.0f);  // 3e-4 .. 1e8
  }
  const HostMla hm = MakeMla(rng, {n}, [&](std::mt19937& g, int64_t tok, int d) {
    const float m = group_mag[size_t(tok * 4 + d / 128)];
    // A wide spread inside the group puts small values on e4m3 subnormals.
    return m * nd(g) * (d % 5 == 0 ? 1e-3f : 1.0f);
  });
  const int topk = 130;
  const int64_t T = n;
  std::vector<int32_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), rng);
  std::vector<int32_t> idx(size_t(T) * topk, -1);
  for (int64_t t = 0; t < T; ++t) {
    for (int i = 0; i < topk; ++i) {
      if (rng() % 4 == 0) idx[size_t(t * topk + i)] = int32_t(n + rng() % 100);  // skipped
    }
    idx[size_t(t * topk + (t * 37) % topk)] = perm[size_t(t)];
  }
  std::vector<float> q_abs(size_t(T) * H * kR), q_pe(size_t(T) * H * kRope);
  for (auto& x : q_abs) x = nd(rng) * 1e-3f;
  for (auto& x : q_pe) x = nd(rng);
  const float scale = 0.1f;
  DeviceBuffer<uint8_t> d_pool(hm.pool);
  DeviceBuffer<int32_t> d_pt(hm.page_table), d_idx(idx);
  DeviceBuffer<int64_t> d_lens(hm.lens);
  DeviceBuffer<float> d_qa(q_abs), d_qp(q_pe), d_out(size_t(T) * H * kR), d_lse(size_t(T) * H);
  cudaMemset(d_out.get(), 0xff, d_out.bytes());
  SparseMlaParams p;
  p.cache.pool = d_pool.get();
  p.cache.page_table = d_pt.get();
  p.cache.page_table_stride = hm.stride;
  p.cache.num_tokens = d_lens.get();
  p.cache.layout = hm.layout;
  p.q_abs = d_qa.get();
  p.q_pe = d_qp.get();
  p.indices = d_idx.get();
  p.num_queries = T;
  p.heads = H;
  p.topk = topk;
  p.softmax_scale = scale;
  p.out = d_out.get();
  p.lse = d_lse.get();
  p.impl = impl;
  p.experiment = experiment;
  DeviceRows rows;
  if (bf16_rows) {
    rows = Upconvert(hm, d_pool.get(), d_pt.get(), d_lens.get());
    p.bf16_rows = rows.rows.get();
    p.bf16_row_start = rows.start.get();
  }
  const char* why = "";
  const cudaError_t launched = LaunchSparseMla(p, 0, &why);
  ASSERT_EQ(launched, cudaSuccess) << cudaGetErrorString(launched) << ": " << why;
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto g_out = d_out.Download();
  const auto g_lse = d_lse.Download();
  MlaCacheView v;
  v.pool = hm.pool.data();
  v.page_table = hm.page_table.data();
  v.num_tokens = n;
  v.layout = hm.layout;
  std::vector<float> ckv(kR), kpe(kRope);
  size_t mismatches = 0, big_scale_tokens = 0;
  double worst_lse = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    cpu::ReadMlaToken(v, perm[size_t(t)], ckv.data(), kpe.data());
    for (int g = 0; g < 4; ++g) big_scale_tokens += group_mag[size_t(perm[size_t(t)]) * 4 + g] > 2e7f;
    for (int h = 0; h < H; ++h) {
      const float* o = g_out.data() + (t * H + h) * kR;
      for (int d = 0; d < kR; ++d) {
        if (std::memcmp(&o[d], &ckv[size_t(d)], 4) != 0 && !(o[d] == 0.0f && ckv[size_t(d)] == 0.0f)) {
          if (mismatches++ < 5) {
            std::printf("  token %lld head %d dim %d: gpu %.9g cpu %.9g\n", static_cast<long long>(t),
                        h, d, o[d], ckv[size_t(d)]);
          }
        }
      }
      // Logit from the bf16-rounded query, in double; the error is measured
      // against the sum of |terms| (fp32 accumulation of up to 576 products).
      double logit = 0.0, mag = 0.0;
      const int64_t qh = t * H + h;
      for (int d = 0; d < kW; ++d) {
        const double a = d < kR ? double(RoundToBf16(q_abs[size_t(qh * kR + d)])) * ckv[size_t(d)]
                                : double(RoundToBf16(q_pe[size_t(qh * kRope + d - kR)])) *
                                      kpe[size_t(d - kR)];
        logit += a;
        mag += std::fabs(a);
      }
      logit *= scale;
      mag *= scale;
      worst_lse = std::max(worst_lse, std::fabs(g_lse[size_t(qh)] - logit) / (1.0 + mag));
    }
  }
  std::printf("  single-token %s (experiment %d) H=%d%s: %zu mismatching values, %zu groups "
              "with scale > 2^15 read, lse relative error %.3g\n", ImplName(impl), experiment, H,
              bf16_rows ? " (bf16 rows)" : "", mismatches, big_scale_tokens, worst_lse);
  std::fflush(stdout);
  EXPECT_EQ(mismatches, 0u);
  EXPECT_GT(big_scale_tokens, 0u);
  EXPECT_LT(worst_lse, 1e-4);
}

TEST(CudaMla, SingleTokenReproducesDequantisedCache) {
  SKIP_WITHOUT_GPU();
  SingleToken(false, SparseMlaImpl::kWgmma, 64);
  SingleToken(true, SparseMlaImpl::kWgmma, 64);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 3);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 4);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 256, 6);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 7);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 9);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 11);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 256, 13);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 14);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 256, 15);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 17);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 256, 17);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 19);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 256, 21);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 22);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 256, 24);
  SingleToken(false, SparseMlaImpl::kWgmmaPair, 128, 25);
  SingleToken(true, SparseMlaImpl::kWgmmaPair, 128, 7);
  SingleToken(true, SparseMlaImpl::kWgmmaPair, 256, 9);
  SingleToken(false, SparseMlaImpl::kAuto, 128);
  SingleToken(true, SparseMlaImpl::kWgmmaPair, 128);
  SingleToken(true, SparseMlaImpl::kWgmmaPair, 256, 4);
}

TEST(CudaMla, RejectsBadParameters) {
  SKIP_WITHOUT_GPU();
  SparseMlaParams p;
  p.heads = 96;
  p.num_queries = 1;
  const char* why = nullptr;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  ASSERT_TRUE(why != nullptr);
  EXPECT_TRUE(std::string(why).find("multiple of 64") != std::string::npos) << why;
  p.heads = 128;
  p.cache.layout.kv_lora_rank = 256;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("512") != std::string::npos) << why;
  p.cache.layout = KvLayout();
  p.experiment = 11;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("experiment") != std::string::npos) << why;
  p.experiment = 0;
  p.impl = static_cast<SparseMlaImpl>(9);
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("impl") != std::string::npos) << why;
  p.impl = SparseMlaImpl::kWgmmaPair;
  p.heads = 192;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("multiple of 128") != std::string::npos) << why;
  p.heads = 128;
  p.experiment = 26;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("experiment") != std::string::npos) << why;
  // bf16 rows: only experiments 0, 2, 4, 7 and 9 of the pair kernel, 0 of kWgmma.
  p.bf16_rows = reinterpret_cast<const uint16_t*>(uintptr_t(256));
  p.experiment = 3;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("bf16_rows") != std::string::npos) << why;
  p.impl = SparseMlaImpl::kWgmma;
  p.experiment = 4;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("bf16_rows") != std::string::npos) << why;
  p.bf16_rows = nullptr;
  p.impl = SparseMlaImpl::kWgmmaPair;
  p.experiment = 0;
  p.impl = SparseMlaImpl::kMmaSync;
  p.num_queries = 70000;
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("65535") != std::string::npos) << why;
  // Misaligned q_abs (the pointer is never dereferenced: the check comes first).
  DeviceBuffer<float> buf(1024);
  DeviceBuffer<int32_t> ibuf(64);
  DeviceBuffer<int64_t> lbuf(1);
  p.impl = SparseMlaImpl::kWgmma;
  p.num_queries = 1;
  p.topk = 1;
  p.q_abs = buf.get() + 1;
  p.q_pe = p.out = buf.get();
  p.indices = p.cache.page_table = ibuf.get();
  p.cache.pool = reinterpret_cast<const uint8_t*>(buf.get());
  p.cache.num_tokens = lbuf.get();
  EXPECT_EQ(LaunchSparseMla(p, 0, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("16-byte") != std::string::npos) << why;
}

}  // namespace
}  // namespace pd::kernels::cuda
