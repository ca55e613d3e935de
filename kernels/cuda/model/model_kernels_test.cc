// GPU tests of the model engine's pieces against the CPU reference backend
// (kernels/ops.h, indexer.h, mla.h) on random inputs of odd sizes:
//   - cuBLASLt GEMMs: FP8 block-scaled (the self-test, then V3.2-like shapes and
//     per-expert row segments) and bf16 (plain and head-batched), against a
//     float64 host reference over the same (quantised) operands; the fallback
//     kernel likewise;
//   - activation quantisation bit-exact against the host formula;
//   - the generic indexer kernels (prep, summaries, MISA router, scoring +
//     top-k) against cpu::IndexerPrep / UpdateSummaries / MisaRouterScores /
//     SelectTokens: exact where the CPU's arithmetic order is reproduced;
//   - the generic MLA cache write (bit-exact) and sparse attention;
//   - RMSNorm, RoPE, SwiGLU and the MoE router against their CPU versions.
// Needs a Hopper GPU (CTest label "gpu").
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/model/gemm.h"
#include "kernels/cuda/model/model_kernels.h"
#include "kernels/indexer.h"
#include "kernels/kv_layout.h"
#include "kernels/mla.h"
#include "kernels/numeric.h"
#include "kernels/ops.h"
#include "kernels/cuda/testing/gpu_test_util.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels::cuda::internal {
namespace {


std::vector<float> Normal(std::mt19937& rng, size_t n, float std = 1.0f) {
  std::normal_distribution<float> nd(0.0f, std);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

double RelL2(const std::vector<float>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - ref[i]) * (double(a[i]) - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

double MaxRelErr(const std::vector<float>& a, const std::vector<double>& ref) {
  double err = 0, mx = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(double(a[i]) - ref[i]));
    mx = std::max(mx, std::fabs(ref[i]));
  }
  return err / std::max(mx, 1e-300);
}

// A random FP8 weight [rows, cols] with distinct power-of-two block scales.
struct Fp8Weight {
  std::vector<uint8_t> q;
  std::vector<float> scales;  // [ceil(rows/128), cols/128]
  int64_t rows, cols;
  double At(int64_t r, int64_t c) const {
    return double(Fp8E4M3ToFloat(q[size_t(r * cols + c)])) *
           scales[size_t((r / 128) * (cols / 128) + c / 128)];
  }
};

Fp8Weight MakeFp8Weight(std::mt19937& rng, int64_t rows, int64_t cols) {
  Fp8Weight w{{}, {}, rows, cols};
  const int64_t rb = (rows + 127) / 128, kb = cols / 128;
  w.scales.resize(size_t(rb * kb));
  for (int64_t i = 0; i < rb * kb; ++i) w.scales[size_t(i)] = std::ldexp(1.0f, -4 - int(rng() % 6));
  w.q.resize(size_t(rows * cols));
  std::normal_distribution<float> nd(0.0f, 40.0f);
  for (auto& q : w.q) q = FloatToFp8E4M3(nd(rng));
  return w;
}

// Host quantisation of activations (the engine's formula): codes, M-major
// scales [k/128, m], dequantised values.
void QuantizeHost(const std::vector<float>& x, int64_t m, int64_t k, std::vector<uint8_t>* q,
                  std::vector<float>* s_mmajor, std::vector<float>* xd) {
  q->resize(size_t(m * k));
  s_mmajor->resize(size_t(m * (k / 128)));
  xd->resize(size_t(m * k));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t g = 0; g < k / 128; ++g) {
      float amax = 0.0f;
      for (int64_t c = g * 128; c < (g + 1) * 128; ++c) amax = std::max(amax, std::fabs(x[size_t(r * k + c)]));
      const float s = Fp8Scale(amax, true);
      (*s_mmajor)[size_t(g * m + r)] = s;
      for (int64_t c = g * 128; c < (g + 1) * 128; ++c) {
        const uint8_t code = FloatToFp8E4M3(x[size_t(r * k + c)] / s);
        (*q)[size_t(r * k + c)] = code;
        (*xd)[size_t(r * k + c)] = Fp8E4M3ToFloat(code) * s;
      }
    }
  }
}

TEST(ModelGemm, Fp8BlockScaledMatchesReference) {
  SKIP_WITHOUT_GPU();
  Gemm gemm;
  std::string err, report;
  ASSERT_TRUE(gemm.Init(&err)) << err;
  ASSERT_TRUE(gemm.SelfTest(nullptr, &report, &err)) << err;
  std::printf("  %s\n", report.c_str());
  ASSERT_TRUE(gemm.fp8_ok()) << report;
  std::mt19937 rng(7);
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {37, 576, 1024}, {1, 384, 512}, {300, 256, 2048}};
  for (auto [m, n, k] : shapes) {
    const Fp8Weight w = MakeFp8Weight(rng, n, k);
    std::vector<float> x = Normal(rng, size_t(m * k));
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < k; ++c) x[size_t(r * k + c)] *= std::ldexp(1.0f, int((r + c / 128) % 7) - 3);
    }
    std::vector<uint8_t> xq_host;
    std::vector<float> xs_host, xd;
    QuantizeHost(x, m, k, &xq_host, &xs_host, &xd);
    DeviceBuffer<uint8_t> dq(w.q), dxq(size_t(m * k));
    DeviceBuffer<float> ds(w.scales), dx(x), dxs(size_t(m * (k / 128))), dy(size_t(m * n));
    QuantizeParams qp;
    qp.x = dx.get();
    qp.m = m;
    qp.k = k;
    qp.x_stride = k;
    qp.q = dxq.get();
    qp.scales = dxs.get();
    qp.m_major = gemm.act_scales_m_major();
    ASSERT_CUDA(QuantizeFp8Rows(qp, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    // The device quantiser is the host formula, bit for bit.
    EXPECT_TRUE(dxq.Download() == xq_host) << "FP8 codes differ";
    if (gemm.act_scales_m_major()) {
      EXPECT_TRUE(dxs.Download() == xs_host) << "scales differ";
    }
    DeviceMatrix dm;
    dm.kind = DeviceMatrix::Kind::kFp8;
    dm.data = dq.get();
    dm.rows = n;
    dm.cols = k;
    dm.ld = k;
    dm.scales = ds.get();
    dm.scale_ld = k / 128;
    GemmInput in;
    in.f32 = dx.get();
    in.m = m;
    in.k = k;
    in.f32_ld = k;
    in.fp8 = dxq.get();
    in.fp8_scales = dxs.get();
    const int64_t fallbacks = gemm.fallback_calls();
    ASSERT_TRUE(gemm.Linear(dm, in, dy.get(), n, nullptr, &err)) << err;
    ASSERT_CUDA(cudaDeviceSynchronize());
    EXPECT_EQ(gemm.fallback_calls(), fallbacks) << gemm.last_fallback_reason();
    std::vector<double> ref(size_t(m * n));
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t c = 0; c < k; ++c) acc += double(xd[size_t(r * k + c)]) * w.At(j, c);
        ref[size_t(r * n + j)] = acc;
      }
    }
    const double rel = RelL2(dy.Download(), ref);
    // Bound: FP8 tensor cores accumulate each 128-deep block at reduced
    // precision before the fp32 scale-and-add; a wrong scale layout or operand
    // order gives errors of order 1.
    std::printf("  FP8 GEMM m=%lld n=%lld k=%lld: rel L2 %.2e vs float64 over the same FP8 operands\n",
                (long long)m, (long long)n, (long long)k, rel);
    EXPECT_LT(rel, 1e-3);
  }
}

// Per-expert row segments: one quantiser launch for all experts, one GEMM per
// expert on its slice (the MoE path).
TEST(ModelGemm, Fp8SegmentedExperts) {
  SKIP_WITHOUT_GPU();
  Gemm gemm;
  std::string err, report;
  ASSERT_TRUE(gemm.Init(&err)) << err;
  ASSERT_TRUE(gemm.SelfTest(nullptr, &report, &err)) << err;
  ASSERT_TRUE(gemm.fp8_ok()) << report;
  std::mt19937 rng(8);
  const int64_t k = 512, n = 256;
  const std::vector<int64_t> counts = {3, 0, 17, 1, 40};
  std::vector<int64_t> off(counts.size() + 1, 0), soff(counts.size(), 0);
  int64_t tot = 0;
  for (size_t e = 0; e < counts.size(); ++e) {
    off[e + 1] = off[e] + counts[e];
    soff[e] = tot;
    tot += (counts[e] * (k / 128) + 63) / 64 * 64;
  }
  const int64_t m = off.back();
  std::vector<int32_t> seg_start(static_cast<size_t>(m)), seg_rows(static_cast<size_t>(m));
  std::vector<int64_t> seg_off(static_cast<size_t>(m));
  for (size_t e = 0; e < counts.size(); ++e) {
    for (int64_t r = off[e]; r < off[e + 1]; ++r) {
      seg_start[size_t(r)] = int32_t(off[e]);
      seg_rows[size_t(r)] = int32_t(counts[e]);
      seg_off[size_t(r)] = soff[e];
    }
  }
  std::vector<Fp8Weight> ws;
  for (size_t e = 0; e < counts.size(); ++e) ws.push_back(MakeFp8Weight(rng, n, k));
  const std::vector<float> x = Normal(rng, size_t(m * k));
  DeviceBuffer<float> dx(x), dxs(static_cast<size_t>(tot)), dy(size_t(m * n));
  DeviceBuffer<uint8_t> dxq(size_t(m * k));
  DeviceBuffer<int32_t> dss(seg_start), dsr(seg_rows);
  DeviceBuffer<int64_t> dso(seg_off);
  QuantizeParams qp;
  qp.x = dx.get();
  qp.m = m;
  qp.k = k;
  qp.x_stride = k;
  qp.q = dxq.get();
  qp.scales = dxs.get();
  qp.m_major = gemm.act_scales_m_major();
  qp.segment_start = dss.get();
  qp.segment_rows = dsr.get();
  qp.segment_scale_offset = dso.get();
  ASSERT_CUDA(QuantizeFp8Rows(qp, nullptr));
  std::vector<DeviceBuffer<uint8_t>> dq;
  std::vector<DeviceBuffer<float>> ds;
  for (const auto& w : ws) {
    dq.emplace_back(w.q);
    ds.emplace_back(w.scales);
  }
  for (size_t e = 0; e < counts.size(); ++e) {
    if (counts[e] == 0) continue;
    DeviceMatrix dm;
    dm.kind = DeviceMatrix::Kind::kFp8;
    dm.data = dq[e].get();
    dm.rows = n;
    dm.cols = k;
    dm.ld = k;
    dm.scales = ds[e].get();
    dm.scale_ld = k / 128;
    GemmInput in;
    in.f32 = dx.get() + off[e] * k;
    in.m = counts[e];
    in.k = k;
    in.f32_ld = k;
    in.fp8 = dxq.get() + off[e] * k;
    in.fp8_scales = dxs.get() + soff[e];
    ASSERT_TRUE(gemm.Linear(dm, in, dy.get() + off[e] * n, n, nullptr, &err)) << err;
  }
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<uint8_t> xq;
  std::vector<float> xs, xd;
  QuantizeHost(x, m, k, &xq, &xs, &xd);  // per-row values do not depend on the segments
  std::vector<double> ref(size_t(m * n));
  for (size_t e = 0; e < counts.size(); ++e) {
    for (int64_t r = off[e]; r < off[e + 1]; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (int64_t c = 0; c < k; ++c) acc += double(xd[size_t(r * k + c)]) * ws[e].At(j, c);
        ref[size_t(r * n + j)] = acc;
      }
    }
  }
  const double rel = RelL2(dy.Download(), ref);
  std::printf("  segmented FP8 experts (rows 3/0/17/1/40): rel L2 %.2e, %lld fallbacks\n", rel,
              (long long)gemm.fallback_calls());
  EXPECT_LT(rel, 1e-3);
  EXPECT_EQ(gemm.fallback_calls(), 0) << gemm.last_fallback_reason();
}

TEST(ModelGemm, Bf16LinearBatchedAndFallback) {
  SKIP_WITHOUT_GPU();
  Gemm gemm;
  std::string err;
  ASSERT_TRUE(gemm.Init(&err)) << err;
  std::mt19937 rng(9);
  const int64_t m = 29, n = 258, k = 256;  // vocab-like odd output width
  std::vector<float> x = Normal(rng, size_t(m * k)), wf = Normal(rng, size_t(n * k), 0.1f);
  std::vector<uint16_t> xb(x.size()), wb(wf.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = FloatToBf16(x[i]);
  for (size_t i = 0; i < wf.size(); ++i) wb[i] = FloatToBf16(wf[i]);
  DeviceBuffer<float> dx(x), dy(size_t(m * n)), dy2(size_t(m * n));
  DeviceBuffer<uint16_t> dxb(xb), dwb(wb);
  DeviceMatrix dm;
  dm.data = dwb.get();
  dm.rows = n;
  dm.cols = k;
  dm.ld = k;
  GemmInput in;
  in.f32 = dx.get();
  in.m = m;
  in.k = k;
  in.f32_ld = k;
  in.bf16 = dxb.get();
  ASSERT_TRUE(gemm.Linear(dm, in, dy.get(), n, nullptr, &err)) << err;
  // cuBLASLt may have no algorithm for an odd width; then Linear ran the
  // fallback kernel, which reads the fp32 activations.
  const bool lt_ran = gemm.fallback_calls() == 0;
  // The fallback kernel (fp32 activations) on the same weight.
  RefGemmParams rp;
  rp.x = dx.get();
  rp.m = m;
  rp.n = n;
  rp.k = k;
  rp.x_ld = k;
  rp.y_ld = n;
  rp.w = dwb.get();
  rp.w_ld = k;
  rp.y = dy2.get();
  ASSERT_CUDA(RefGemm(rp, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<double> ref_b(size_t(m * n)), ref_f(size_t(m * n));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      double a = 0, b = 0;
      for (int64_t c = 0; c < k; ++c) {
        const double wv = Bf16ToFloat(wb[size_t(j * k + c)]);
        a += double(Bf16ToFloat(xb[size_t(r * k + c)])) * wv;
        b += double(x[size_t(r * k + c)]) * wv;
      }
      ref_b[size_t(r * n + j)] = a;
      ref_f[size_t(r * n + j)] = b;
    }
  }
  const double rel_lt = RelL2(dy.Download(), lt_ran ? ref_b : ref_f),
               rel_ref = RelL2(dy2.Download(), ref_f);
  std::printf("  bf16 GEMM %lldx%lldx%lld: rel L2 %.2e (%s), fallback kernel %.2e\n", (long long)m,
              (long long)n, (long long)k, rel_lt,
              lt_ran ? "cuBLASLt" : ("fallback: " + gemm.last_fallback_reason()).c_str(), rel_ref);
  EXPECT_LT(rel_lt, 1e-5);
  EXPECT_LT(rel_ref, 1e-6);

  // Head-batched absorption: D_h[c, t] = sum_i A_h[c, i] * B_h[i, t] with A_h
  // column-major r x nope (rows of the kv_b slice), B_h column-major (q_nope).
  const int heads = 3, r = 128, nope = 32, vdim = 32, tokens = 5, qk = 64;
  std::vector<float> kvb = Normal(rng, size_t(heads * (nope + vdim) * r), 0.2f);
  std::vector<float> q = Normal(rng, size_t(tokens * heads * qk));
  std::vector<uint16_t> kvb16(kvb.size()), q16(q.size());
  for (size_t i = 0; i < kvb.size(); ++i) kvb16[i] = FloatToBf16(kvb[i]);
  for (size_t i = 0; i < q.size(); ++i) q16[i] = FloatToBf16(q[i]);
  DeviceBuffer<uint16_t> dkvb(kvb16), dq16(q16);
  DeviceBuffer<float> dqf(q), dabs(size_t(tokens * heads * r));
  ASSERT_TRUE(gemm.BatchedBf16(false, r, tokens, nope, dkvb.get(), r, (nope + vdim) * r, dq16.get(),
                               dqf.get(), heads * qk, qk, dabs.get(), heads * r, r, heads, nullptr, &err))
      << err;
  ASSERT_CUDA(cudaDeviceSynchronize());
  std::vector<double> ref(size_t(tokens * heads * r));
  for (int t = 0; t < tokens; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int c = 0; c < r; ++c) {
        double a = 0;
        for (int i = 0; i < nope; ++i) {
          a += double(Bf16ToFloat(q16[size_t((t * heads + h) * qk + i)])) *
               Bf16ToFloat(kvb16[size_t((h * (nope + vdim) + i) * r + c)]);
        }
        ref[size_t((t * heads + h) * r + c)] = a;
      }
    }
  }
  const double rel_b = RelL2(dabs.Download(), ref);
  std::printf("  batched bf16 absorption (3 heads): rel L2 %.2e\n", rel_b);
  EXPECT_LT(rel_b, 1e-5);
}

// ---------------------------------------------------------------------------
// Generic indexer kernels.

constexpr int kH = 8, kD = 64, kB = 64;

struct KeyCache {
  KvLayout layout;
  std::vector<uint8_t> pool;
  std::vector<int32_t> pages;  // [S, stride]
  int64_t stride = 0, sum_stride = 0;
  std::vector<int64_t> lens;
  std::vector<float> sums;     // [S, sum_stride, D]
  IndexKeyCacheView View(int s) const {
    IndexKeyCacheView v;
    v.pool = pool.data();
    v.page_table = pages.data() + s * stride;
    v.num_tokens = lens[size_t(s)];
    v.summary_sums = sums.data() + s * sum_stride * kD;
    v.layout = layout;
    return v;
  }
};

KeyCache MakeKeys(std::mt19937& rng, const std::vector<int64_t>& lens) {
  KeyCache kc;
  kc.layout.index_head_dim = kD;
  kc.layout.summary_block = kB;
  kc.layout.kv_lora_rank = 128;
  kc.layout.rope_dim = 32;
  kc.lens = lens;
  int64_t pages = 2;
  for (int64_t n : lens) {
    pages += NumPages(n);
    kc.stride = std::max(kc.stride, NumPages(n));
    kc.sum_stride = std::max(kc.sum_stride, CeilDiv(n, kB));
  }
  kc.pool.resize(size_t(pages) * kc.layout.IndexPageBytes());
  for (auto& b : kc.pool) b = uint8_t(rng() & 0x77);  // finite codes in unused slots
  std::vector<int32_t> ids(static_cast<size_t>(pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  kc.pages.assign(lens.size() * size_t(kc.stride), 0);
  kc.sums.assign(lens.size() * size_t(kc.sum_stride) * kD, 0.0f);
  size_t next = 0;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (size_t s = 0; s < lens.size(); ++s) {
    for (int64_t p = 0; p < NumPages(lens[s]); ++p) kc.pages[s * kc.stride + p] = ids[next++];
    std::vector<float> drift(kD);
    for (auto& d : drift) d = 0.5f * nd(rng);
    for (int64_t t = 0; t < lens[s]; ++t) {
      if (t % 96 == 0) for (auto& d : drift) d = 0.6f * d + 0.4f * nd(rng);
      float amax = 0;
      std::vector<float> x(kD);
      for (int i = 0; i < kD; ++i) {
        x[size_t(i)] = nd(rng) + drift[size_t(i)];
        amax = std::max(amax, std::fabs(x[size_t(i)]));
      }
      const float sc = Fp8Scale(amax, true);
      uint8_t* page = kc.pool.data() + size_t(kc.pages[s * kc.stride + t / kPageTokens]) * kc.layout.IndexPageBytes();
      for (int i = 0; i < kD; ++i) page[kc.layout.IndexValueOffset(int(t % kPageTokens)) + i] = FloatToFp8E4M3(x[size_t(i)] / sc);
      std::memcpy(page + kc.layout.IndexScaleOffset(int(t % kPageTokens)), &sc, 4);
    }
    IndexKeyCacheRef ref;
    ref.pool = kc.pool.data();
    ref.page_table = kc.pages.data() + s * kc.stride;
    ref.summary_sums = kc.sums.data() + s * kc.sum_stride * kD;
    ref.layout = kc.layout;
    cpu::UpdateSummaries(ref, 0, lens[s]);
  }
  return kc;
}

TEST(ModelGeneric, RouterAndSelectionMatchCpuExactly) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(21);
  const std::vector<int64_t> lens = {40, 333, 1000};
  const KeyCache kc = MakeKeys(rng, lens);
  // Queries: sequence 0 all positions of a short prefix, 1 a tail, 2 a few.
  std::vector<int64_t> pos;
  std::vector<int32_t> seq;
  for (int64_t p : {0, 5, 39}) { pos.push_back(p); seq.push_back(0); }
  for (int64_t p = 300; p < 333; ++p) { pos.push_back(p); seq.push_back(1); }
  for (int64_t p : {63, 64, 127, 500, 999}) { pos.push_back(p); seq.push_back(2); }
  const int64_t T = int64_t(pos.size());
  std::vector<uint8_t> q8(size_t(T * kH * kD));
  std::vector<float> w(size_t(T * kH));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& b : q8) b = FloatToFp8E4M3(nd(rng) * 100.0f);
  for (auto& x : w) x = nd(rng) * 0.01f;
  DeviceBuffer<uint8_t> dpool(kc.pool), dq8(q8);
  DeviceBuffer<int32_t> dpages(kc.pages), dseq(seq);
  DeviceBuffer<float> dsums(kc.sums), dw(w);
  DeviceBuffer<int64_t> dlens(kc.lens), dpos(pos);
  for (int topk : {100, 256}) {
    for (bool misa : {false, true}) {
      const int h = 3;
      DeviceBuffer<int32_t> dactive(size_t(T * h));
      if (misa) {
        RouterGenericParams rp;
        rp.q8 = dq8.get();
        rp.weights = dw.get();
        rp.positions = dpos.get();
        rp.token_seq = dseq.get();
        rp.num_tokens = dlens.get();
        rp.summary_sums = dsums.get();
        rp.summary_stride = kc.sum_stride;
        rp.num_queries = T;
        rp.heads = kH;
        rp.head_dim = kD;
        rp.active_heads = h;
        rp.summary_block = kB;
        rp.active = dactive.get();
        ASSERT_CUDA(MisaRouterGeneric(rp, nullptr));
      }
      DeviceBuffer<float> dlog(size_t(T * 1000));
      DeviceBuffer<int32_t> dout(size_t(T * topk));
      SelectGenericParams p;
      p.q8 = dq8.get();
      p.weights = dw.get();
      p.positions = dpos.get();
      p.token_seq = dseq.get();
      p.pool = dpool.get();
      p.page_table = dpages.get();
      p.page_table_stride = kc.stride;
      p.layout = kc.layout;
      p.num_queries = T;
      p.heads = kH;
      p.head_dim = kD;
      p.head_list = misa ? dactive.get() : nullptr;
      p.num_listed = misa ? h : 0;
      p.max_position = 999;
      p.logits = dlog.get();
      p.logits_stride = 1000;
      p.topk = topk;
      p.out = dout.get();
      ASSERT_CUDA(SelectGeneric(p, nullptr));
      ASSERT_CUDA(cudaDeviceSynchronize());
      const auto gpu = dout.Download();
      const auto active = dactive.Download();
      SelectionConfig cfg;
      cfg.mode = misa ? SelectionMode::kMisa : SelectionMode::kDense;
      cfg.heads = kH;
      cfg.head_dim = kD;
      cfg.topk = topk;
      cfg.misa_heads = h;
      cfg.misa_block = kB;
      int64_t mismatches = 0, head_mismatches = 0;
      for (int64_t t = 0; t < T; ++t) {
        const int s = seq[size_t(t)];
        IndexerQueries q;
        q.q8 = q8.data() + t * kH * kD;
        q.weights = w.data() + t * kH;
        q.positions = pos.data() + t;
        q.num_queries = 1;
        std::vector<int32_t> cpu_out(static_cast<size_t>(topk));
        cpu::SelectTokens(cfg, kc.View(s), q, cpu_out.data(), nullptr);
        for (int i = 0; i < topk; ++i) mismatches += cpu_out[size_t(i)] != gpu[size_t(t * topk + i)];
        if (misa) {
          std::vector<float> r(kH);
          std::vector<int32_t> act(static_cast<size_t>(h));
          cpu::MisaRouterScores(kc.View(s), q.q8, q.weights, kH, pos[size_t(t)], r.data());
          cpu::MisaActiveHeads(r.data(), kH, h, act.data());
          for (int e = 0; e < h; ++e) head_mismatches += act[size_t(e)] != active[size_t(t * h + e)];
        }
      }
      std::printf("  generic %s selection top-%d: %lld of %lld index slots differ from cpu::SelectTokens, "
                  "%lld routed heads differ\n",
                  misa ? "MISA" : "dense", topk, (long long)mismatches, (long long)(T * topk),
                  (long long)head_mismatches);
      EXPECT_EQ(mismatches, 0);
      EXPECT_EQ(head_mismatches, 0);
    }
  }
}

TEST(ModelGeneric, PrepAndSummariesMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(22);
  const int H = 8, D = 64, rope = 32;
  const int64_t T = 150, start = 37;  // positions [37, 187): a partial first block
  KvLayout l;
  l.index_head_dim = D;
  l.summary_block = kB;
  l.kv_lora_rank = 128;
  l.rope_dim = rope;
  const int64_t pages = NumPages(start + T) + 1;
  std::vector<int32_t> pt(static_cast<size_t>(pages));
  std::iota(pt.rbegin(), pt.rend(), 0);  // reversed page order
  std::vector<uint8_t> pool(size_t(pages) * l.IndexPageBytes(), 0);
  const std::vector<float> qp = Normal(rng, size_t(T * H * D)), kp = Normal(rng, size_t(T * D), 3.0f),
                           wp = Normal(rng, size_t(T * H)), gamma = Normal(rng, size_t(D)),
                           beta = Normal(rng, size_t(D), 0.1f);
  std::vector<int64_t> pos(static_cast<size_t>(T));
  std::iota(pos.begin(), pos.end(), start);
  YarnParams yp;
  yp.dim = rope;
  const std::vector<float> inv = YarnInvFreq(yp);
  // CPU: keys [0, start) first (same random prep inputs for those tokens would
  // need more data, so the summaries test covers [start, start + T) only).
  std::vector<uint8_t> cpu_pool = pool, cpu_q8(size_t(T * H * D));
  std::vector<float> cpu_w(size_t(T * H)), cpu_sums(size_t(CeilDiv(start + T, kB) * D), 0.0f);
  IndexerPrepInputs in;
  in.q_proj = qp.data();
  in.k_proj = kp.data();
  in.w_proj = wp.data();
  in.ln_gamma = gamma.data();
  in.ln_beta = beta.data();
  in.positions = pos.data();
  in.inv_freq = inv.data();
  in.rope_dim = rope;
  in.num_tokens = T;
  IndexKeyCacheRef ref;
  ref.pool = cpu_pool.data();
  ref.page_table = pt.data();
  ref.summary_sums = cpu_sums.data();
  ref.layout = l;
  cpu::IndexerPrep(in, H, ref, cpu_q8.data(), cpu_w.data());
  cpu::UpdateSummaries(ref, start, start + 64);
  cpu::UpdateSummaries(ref, start + 64, start + T);

  DeviceBuffer<float> dqp(qp), dkp(kp), dwp(wp), dg(gamma), db(beta), dinv(inv), dw(size_t(T * H)),
      dsums(std::vector<float>(cpu_sums.size(), 7.0f));  // garbage, zeroed below
  DeviceBuffer<uint8_t> dpool(pool), dq8(size_t(T * H * D));
  DeviceBuffer<int32_t> dpt(pt);
  DeviceBuffer<int64_t> dpos(pos);
  PrepParams p;
  p.q_proj = dqp.get();
  p.k_proj = dkp.get();
  p.w_proj = dwp.get();
  p.ln_gamma = dg.get();
  p.ln_beta = db.get();
  p.positions = dpos.get();
  p.inv_freq = dinv.get();
  p.rope_dim = rope;
  p.num_tokens = T;
  p.heads = H;
  p.head_dim = D;
  p.pool = dpool.get();
  p.page_table = dpt.get();
  p.page_table_stride = pages;
  p.layout = l;
  p.q8 = dq8.get();
  p.weights = dw.get();
  ASSERT_CUDA(IndexerPrepGeneric(p, nullptr));
  // Summaries in two steps, as prefill chunks would. The first block starts
  // mid-way (its sum is read and added to), so it starts from zero as the CPU's.
  ASSERT_CUDA(cudaMemset(dsums.get(), 0, dsums.bytes()));
  const std::vector<std::pair<int64_t, int64_t>> steps = {{start, start + 64}, {start + 64, start + T}};
  for (auto [f, t] : steps) {
    DeviceBuffer<int64_t> dfrom(std::vector<int64_t>{f}), dto(std::vector<int64_t>{t});
    SummaryParams sp;
    sp.pool = dpool.get();
    sp.page_table = dpt.get();
    sp.page_table_stride = pages;
    sp.summary_sums = dsums.get();
    sp.summary_stride = CeilDiv(start + T, kB);
    sp.from = dfrom.get();
    sp.to = dto.get();
    sp.num_seqs = 1;
    sp.max_blocks_touched = (t - 1) / kB - f / kB + 1;
    sp.layout = l;
    ASSERT_CUDA(UpdateSummariesGeneric(sp, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
  }
  const auto g_pool = dpool.Download();
  const auto g_q8 = dq8.Download();
  const auto g_w = dw.Download();
  const auto g_sums = dsums.Download();
  int64_t code_diff = 0, far = 0;
  for (size_t i = 0; i < g_q8.size(); ++i) {
    if (g_q8[i] != cpu_q8[i]) {
      ++code_diff;
      far += std::abs(int(g_q8[i] & 0x7f) - int(cpu_q8[i] & 0x7f)) > 1 || ((g_q8[i] ^ cpu_q8[i]) & 0x80);
    }
  }
  int64_t pool_diff = 0;
  for (size_t i = 0; i < g_pool.size(); ++i) pool_diff += g_pool[i] != cpu_pool[i];
  double wmax = 0;
  for (size_t i = 0; i < g_w.size(); ++i) {
    wmax = std::max(wmax, std::fabs(double(g_w[i]) - cpu_w[i]) / std::max(1e-30, std::fabs(double(cpu_w[i]))));
  }
  std::printf("  generic prep: %lld of %zu query codes differ (%lld by more than one step), %lld key-pool "
              "bytes differ, weights max rel %.2e\n",
              (long long)code_diff, g_q8.size(), (long long)far, (long long)pool_diff, wmax);
  // cos/sin may differ by an ulp between CUDA and glibc: rare one-step code flips only.
  EXPECT_LE(code_diff * 1000, int64_t(g_q8.size()));
  EXPECT_EQ(far, 0);
  EXPECT_LE(pool_diff * 1000, int64_t(g_pool.size()));
  EXPECT_LT(wmax, 1e-6);
  if (pool_diff == 0) {
    EXPECT_TRUE(g_sums == cpu_sums) << "summaries not bit-exact";
  }
}

// ---------------------------------------------------------------------------
// Generic MLA cache write and sparse attention.

TEST(ModelGeneric, MlaWriteAndAttentionMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(23);
  KvLayout l;
  l.kv_lora_rank = 256;
  l.rope_dim = 32;
  const int r = l.kv_lora_rank, rope = l.rope_dim, H = 5, topk = 70;
  const int64_t n = 130;  // tokens written (one sequence), then queried
  const int64_t pages = NumPages(n) + 1;
  std::vector<int32_t> pt(static_cast<size_t>(pages));
  std::iota(pt.begin(), pt.end(), 0);
  std::shuffle(pt.begin(), pt.end(), rng);
  std::vector<uint8_t> pool(size_t(pages) * l.MlaPageBytes(), 0);
  const std::vector<float> ckv = Normal(rng, size_t(n * r), 2.0f), kpe = Normal(rng, size_t(n * rope));
  std::vector<int64_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  MlaCacheRef cref;
  std::vector<uint8_t> cpu_pool = pool;
  cref.pool = cpu_pool.data();
  cref.page_table = pt.data();
  cref.layout = l;
  cpu::WriteMlaCache(cref, ckv.data(), kpe.data(), pos.data(), n);
  DeviceBuffer<uint8_t> dpool(pool);
  DeviceBuffer<int32_t> dpt(pt);
  DeviceBuffer<float> dckv(ckv), dkpe(kpe);
  DeviceBuffer<int64_t> dpos(pos);
  MlaWriteParams wp;
  wp.pool = dpool.get();
  wp.page_table = dpt.get();
  wp.page_table_stride = pages;
  wp.layout = l;
  wp.c_kv = dckv.get();
  wp.k_pe = dkpe.get();
  wp.positions = dpos.get();
  wp.num_tokens = n;
  ASSERT_CUDA(WriteMlaCacheGeneric(wp, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_TRUE(dpool.Download() == cpu_pool) << "MLA records not bit-exact";

  const int64_t T = 9;
  const std::vector<float> qa = Normal(rng, size_t(T * H * r), 0.1f), qpe = Normal(rng, size_t(T * H * rope), 0.1f);
  std::vector<int32_t> idx(size_t(T * topk), -1);
  for (int64_t t = 0; t < T; ++t) {
    if (t == 3) continue;  // a query with no valid index
    for (int i = 0; i < topk; ++i) {
      if (rng() % 10 == 0) continue;  // holes
      idx[size_t(t * topk + i)] = int32_t(rng() % n);
    }
  }
  MlaCacheView view;
  view.pool = cpu_pool.data();
  view.page_table = pt.data();
  view.num_tokens = n;
  view.layout = l;
  std::vector<float> cpu_out(size_t(T * H * r)), cpu_lse(size_t(T * H));
  cpu::SparseMlaAttention(view, qa.data(), qpe.data(), T, H, idx.data(), topk, 0.3f, cpu_out.data(),
                          cpu_lse.data(), nullptr);
  DeviceBuffer<float> dqa(qa), dqpe(qpe), dout(size_t(T * H * r)), dlse(size_t(T * H));
  DeviceBuffer<int32_t> didx(idx);
  DeviceBuffer<int64_t> dn(std::vector<int64_t>{n});
  SparseMlaParams ap;
  ap.cache.pool = dpool.get();
  ap.cache.page_table = dpt.get();
  ap.cache.page_table_stride = pages;
  ap.cache.num_tokens = dn.get();
  ap.cache.layout = l;
  ap.q_abs = dqa.get();
  ap.q_pe = dqpe.get();
  ap.indices = didx.get();
  ap.num_queries = T;
  ap.heads = H;
  ap.topk = topk;
  ap.softmax_scale = 0.3f;
  ap.out = dout.get();
  ap.lse = dlse.get();
  ASSERT_CUDA(SparseMlaGeneric(ap, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto g = dout.Download();
  const auto gl = dlse.Download();
  std::vector<double> ref(cpu_out.begin(), cpu_out.end());
  const double rel = RelL2(g, ref);
  double lse_err = 0;
  for (int64_t i = 0; i < T * H; ++i) {
    if (std::isinf(cpu_lse[size_t(i)])) {
      EXPECT_TRUE(std::isinf(gl[size_t(i)]) && gl[size_t(i)] < 0) << "lse of an empty row";
    } else {
      lse_err = std::max(lse_err, std::fabs(double(gl[size_t(i)]) - cpu_lse[size_t(i)]));
    }
  }
  for (int i = 0; i < H * r; ++i) EXPECT_EQ(g[size_t(3 * H * r + i)], 0.0f);
  std::printf("  generic sparse MLA: rel L2 %.2e, max |lse err| %.2e\n", rel, lse_err);
  EXPECT_LT(rel, 1e-5);
  EXPECT_LT(lse_err, 1e-4);
}

// ---------------------------------------------------------------------------
// Dense ops.

TEST(ModelOps, NormRopeSwigluMoeRouteMatchCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(24);
  const int64_t m = 33, n = 384;
  const std::vector<float> x = Normal(rng, size_t(m * n), 3.0f), gamma = Normal(rng, size_t(n));
  std::vector<float> cpu_y(x.size());
  cpu::RmsNorm(x.data(), m, n, gamma.data(), 1e-6f, cpu_y.data());
  DeviceBuffer<float> dx(x), dg(gamma), dy(x.size());
  ASSERT_CUDA(RmsNorm(dx.get(), m, n, n, dg.get(), 1e-6f, dy.get(), n, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_LT(RelL2(dy.Download(), std::vector<double>(cpu_y.begin(), cpu_y.end())), 1e-7);

  // RoPE (interleaved) on 3 heads of stride 48, 16 rotary dims at offset 32 of each head.
  const int64_t T = 7;
  const int heads = 3, hs = 48, dim = 16;
  std::vector<float> v = Normal(rng, size_t(T * heads * hs));
  std::vector<int64_t> pos = {0, 1, 17, 4095, 4096, 70000, 163839};
  YarnParams yp;
  yp.dim = dim;
  const std::vector<float> inv = YarnInvFreq(yp);
  std::vector<float> cpu_v = v;
  cpu::ApplyRope(cpu_v.data() + 32, T, heads, heads * hs, hs, pos.data(), inv.data(), dim, true);
  DeviceBuffer<float> dv(v), dinv(inv), dcopy(size_t(T * heads * dim));
  DeviceBuffer<int64_t> dpos(pos);
  ASSERT_CUDA(RopeInterleaved(dv.get() + 32, T, heads, heads * hs, hs, dpos.get(), dinv.get(), dim,
                              dcopy.get(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto gv = dv.Download();
  const auto gc = dcopy.Download();
  double rope_err = 0;
  for (size_t i = 0; i < gv.size(); ++i) rope_err = std::max(rope_err, double(std::fabs(gv[i] - cpu_v[i])));
  for (int64_t t = 0; t < T; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int i = 0; i < dim; ++i) {
        EXPECT_EQ(gc[size_t((t * heads + h) * dim + i)], gv[size_t(t * heads * hs + h * hs + 32 + i)]);
      }
    }
  }
  std::printf("  RoPE max abs error %.2e (positions up to 163839)\n", rope_err);
  EXPECT_LT(rope_err, 1e-4);

  // SwiGLU.
  const int64_t inter = 96;
  const std::vector<float> gu = Normal(rng, size_t(m * 2 * inter), 2.0f);
  std::vector<float> cpu_act(size_t(m * inter));
  for (int64_t r = 0; r < m; ++r) {
    cpu::SiluMul(gu.data() + r * 2 * inter, gu.data() + r * 2 * inter + inter, inter,
                 cpu_act.data() + r * inter);
  }
  DeviceBuffer<float> dgu(gu), dact(size_t(m * inter));
  ASSERT_CUDA(SiluMulRows(dgu.get(), m, inter, dact.get(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_LT(RelL2(dact.Download(), std::vector<double>(cpu_act.begin(), cpu_act.end())), 1e-6);

  // MoE router: 64 experts in 8 groups, top-4 groups, top-6 experts.
  const int E = 64, ng = 8, tg = 4, k = 6;
  const std::vector<float> lg = Normal(rng, size_t(m * E)), bias = Normal(rng, size_t(E), 0.1f);
  std::vector<int32_t> cpu_idx(size_t(m * k));
  std::vector<float> cpu_w(size_t(m * k));
  cpu::MoeRoute(lg.data(), bias.data(), m, E, ng, tg, k, true, 2.5f, cpu_idx.data(), cpu_w.data());
  DeviceBuffer<float> dlg(lg), dbias(bias), dw(size_t(m * k));
  DeviceBuffer<int32_t> didx(size_t(m * k));
  ASSERT_CUDA(MoeRoute(dlg.get(), dbias.get(), m, E, ng, tg, k, true, 2.5f, didx.get(), dw.get(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  EXPECT_TRUE(didx.Download() == cpu_idx) << "MoE expert choice differs";
  EXPECT_LT(RelL2(dw.Download(), std::vector<double>(cpu_w.begin(), cpu_w.end())), 1e-6);

  // Argmax with ties (lower index wins).
  std::vector<float> lo = {1, 3, 3, -1, 2, 5, 5, 0};
  DeviceBuffer<float> dlo(lo);
  DeviceBuffer<int32_t> dam(2);
  ASSERT_CUDA(ArgmaxRows(dlo.get(), 2, 4, dam.get(), nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto am = dam.Download();
  EXPECT_EQ(am[0], 1);
  EXPECT_EQ(am[1], 1);
}

}  // namespace
}  // namespace pd::kernels::cuda::internal
