// Benchmark of the sparse MLA kernels (kernels/cuda/mla_cuda.h): decode (batch
// 128, 2 query tokens, 128 heads, top-2048, FP8 cache) and prefill (4096 tokens
// of one 64K-token sequence), against FlashMLA's published H800 figures (410 /
// 640 TFLOPS), plus the cache write. Prints a table, writes JSON (--json PATH).
// --cases picks decode and/or prefill, --topk another top-k (the per-block vs
// per-CTA cost split comes from a sweep of it).
// FLOPs count 2 * H * topk * (576 + 512) per query token (FlashMLA's convention).
// Variants per case: the wgmma kernel (default schedule, then each schedule
// explicitly: plain, late P hand-over, L2 prefetch, named barriers and their
// combinations), the first (mma.sync) kernel, and timing-only wgmma variants
// that leave one side out (no producer: the consumers' time on zeroed buffers;
// no consumer: the gather + dequantisation alone), with the default and the
// named + prefetch schedule; the cluster-of-2 kernel (kWgmmaPair: the two CTAs of
// a token share each block's gather and dequantisation) and its timing-only
// variants; the wgmma, wgmma-pair and mma.sync outputs of the same inputs are
// compared (relative L2) so a fast but wrong kernel shows up here too.
// Prefill also runs over bf16 rows up-converted from the cache (the issue's
// prefill path; kWgmma and the pair kernel), timing the up-conversion of the
// whole context separately.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "bench/kernels/bench_util.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/mla_cuda.h"
#include "kernels/kv_layout.h"

namespace pd::bench {
namespace {

using kernels::KvLayout;
using kernels::cuda::DeviceBuffer;
namespace kc = kernels::cuda;

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ float Uniform(uint64_t key) {  // [-1, 1)
  return float(int32_t(uint32_t(Mix(key)))) * 4.656613e-10f;
}

__global__ void FillFloat(float* x, int64_t n, uint64_t seed, float scale) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = Uniform(seed + uint64_t(i)) * scale;
}

// indices[t, i] = hash % (limit_t), limit_t = base + t * step (causal prefill) or base.
__global__ void FillIndices(int32_t* idx, int64_t T, int topk, int64_t base, int64_t step,
                            uint64_t seed) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * topk) return;
  const int64_t t = i / topk;
  const int64_t lim = base + t * step;
  idx[i] = int32_t(Mix(seed + uint64_t(i)) % uint64_t(lim));
}

std::vector<Row> g_rows;
std::string g_variants;  // --variants: comma-separated kernel names; empty = all
std::string g_cases = "decode,prefill";  // --cases
int g_topk = 2048;                       // --topk

bool InList(const std::string& list_csv, const std::string& name) {
  return ("," + list_csv + ",").find("," + name + ",") != std::string::npos;
}

bool Selected(const std::string& name) {
  if (g_variants.empty()) return true;
  const std::string list = "," + g_variants + ",";
  return list.find("," + name + ",") != std::string::npos;
}

// sums[0] += (a - b)^2, sums[1] += b^2 over n values.
__global__ void DiffSums(const float* a, const float* b, int64_t n, double* sums) {
  double d = 0.0, r = 0.0;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const double x = a[i], y = b[i];
    d += (x - y) * (x - y);
    r += y * y;
  }
  for (int sh = 16; sh > 0; sh >>= 1) {
    d += __shfl_xor_sync(0xffffffffu, d, sh);
    r += __shfl_xor_sync(0xffffffffu, r, sh);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&sums[0], d);
    atomicAdd(&sums[1], r);
  }
}

struct Variant {
  const char* name;
  kc::SparseMlaImpl impl;
  int experiment;
  bool timing_only;
};
const Variant kVariants[] = {
    {"wgmma", kc::SparseMlaImpl::kWgmma, 0, false},
    {"wgmma-pair", kc::SparseMlaImpl::kWgmmaPair, 0, false},
    {"wgmma-pair-early", kc::SparseMlaImpl::kWgmmaPair, 3, false},
    {"wgmma-pair-prefetch", kc::SparseMlaImpl::kWgmmaPair, 4, false},
    {"wgmma-pair-early-pf", kc::SparseMlaImpl::kWgmmaPair, 5, false},
    {"wgmma-pair-async", kc::SparseMlaImpl::kWgmmaPair, 6, false},
    {"wgmma-pair-async-e-pf", kc::SparseMlaImpl::kWgmmaPair, 7, false},
    {"wgmma-pair-persist", kc::SparseMlaImpl::kWgmmaPair, 9, false},
    {"wgmma-pair-light", kc::SparseMlaImpl::kWgmmaPair, 11, false},
    {"wgmma-pair-light-persist", kc::SparseMlaImpl::kWgmmaPair, 13, false},
    {"wgmma-pair-seesaw", kc::SparseMlaImpl::kWgmmaPair, 14, false},
    {"wgmma-pair-seesaw-light", kc::SparseMlaImpl::kWgmmaPair, 15, false},
    {"wgmma-pair-split", kc::SparseMlaImpl::kWgmmaPair, 17, false},
    {"wgmma-pair-after", kc::SparseMlaImpl::kWgmmaPair, 19, false},
    {"wgmma-pair-after-persist", kc::SparseMlaImpl::kWgmmaPair, 21, false},
    {"wgmma-pair-overlap", kc::SparseMlaImpl::kWgmmaPair, 22, false},
    {"wgmma-pair-overlap-persist", kc::SparseMlaImpl::kWgmmaPair, 24, false},
    {"wgmma-pair-split-overlap", kc::SparseMlaImpl::kWgmmaPair, 25, false},
    {"auto", kc::SparseMlaImpl::kAuto, 0, false},
    {"wgmma-plain", kc::SparseMlaImpl::kWgmma, 3, false},
    {"wgmma-late", kc::SparseMlaImpl::kWgmma, 4, false},
    {"wgmma-prefetch", kc::SparseMlaImpl::kWgmma, 5, false},
    {"wgmma-named", kc::SparseMlaImpl::kWgmma, 6, false},
    {"wgmma-named-prefetch", kc::SparseMlaImpl::kWgmma, 7, false},
    {"wgmma-named-pf-late", kc::SparseMlaImpl::kWgmma, 8, false},
    {"mma.sync", kc::SparseMlaImpl::kMmaSync, 0, false},
    {"wgmma-no-producer", kc::SparseMlaImpl::kWgmma, 1, true},
    {"wgmma-no-consumer", kc::SparseMlaImpl::kWgmma, 2, true},
    {"named-pf-no-producer", kc::SparseMlaImpl::kWgmma, 9, true},
    {"named-pf-no-consumer", kc::SparseMlaImpl::kWgmma, 10, true},
    {"pair-no-producer", kc::SparseMlaImpl::kWgmmaPair, 1, true},
    {"pair-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 2, true},
    {"pair-e-pf-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 8, true},
    {"pair-async-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 10, true},
    {"pair-light-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 12, true},
    {"pair-seesaw-no-producer", kc::SparseMlaImpl::kWgmmaPair, 16, true},
    {"pair-split-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 18, true},
    {"pair-after-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 20, true},
    {"pair-overlap-no-producer", kc::SparseMlaImpl::kWgmmaPair, 23, true},
};

struct Cache {
  KvLayout layout;
  int64_t tokens, stride;
  int seqs;
  DeviceBuffer<uint8_t> pool;
  DeviceBuffer<int32_t> page_table;
  DeviceBuffer<int64_t> lens;
  Cache(int s, int64_t n) : tokens(n), stride(kernels::NumPages(n)), seqs(s) {
    pool = DeviceBuffer<uint8_t>(size_t(s) * stride * layout.MlaPageBytes());
    PD_BENCH_CUDA(pool.error());
    std::vector<int32_t> pt(size_t(s) * stride);
    for (size_t i = 0; i < pt.size(); ++i) pt[i] = int32_t(i);
    page_table = DeviceBuffer<int32_t>(pt);
    lens = DeviceBuffer<int64_t>(std::vector<int64_t>(size_t(s), n));
    // Write every token through the cache-write kernel, a chunk at a time.
    const int64_t chunk = 1 << 16;
    DeviceBuffer<float> ckv(size_t(chunk) * 512), kpe(size_t(chunk) * 64);
    DeviceBuffer<int64_t> pos(static_cast<size_t>(chunk));
    DeviceBuffer<int32_t> tseq(static_cast<size_t>(chunk));
    std::vector<int64_t> hpos(static_cast<size_t>(chunk));
    std::vector<int32_t> hseq(static_cast<size_t>(chunk));
    for (int64_t done = 0; done < int64_t(s) * n; done += chunk) {
      const int64_t m = std::min<int64_t>(chunk, int64_t(s) * n - done);
      for (int64_t i = 0; i < m; ++i) {
        hpos[size_t(i)] = (done + i) % n;
        hseq[size_t(i)] = int32_t((done + i) / n);
      }
      PD_BENCH_CUDA(pos.Upload(hpos));
      PD_BENCH_CUDA(tseq.Upload(hseq));
      FillFloat<<<unsigned((m * 512 + 255) / 256), 256>>>(ckv.get(), m * 512, 11 + uint64_t(done) * 512, 2.0f);
      FillFloat<<<unsigned((m * 64 + 255) / 256), 256>>>(kpe.get(), m * 64, 77 + uint64_t(done) * 64, 2.0f);
      kc::MlaWriteParams w;
      w.pool = pool.get();
      w.page_table = page_table.get();
      w.page_table_stride = stride;
      w.layout = layout;
      w.c_kv = ckv.get();
      w.k_pe = kpe.get();
      w.positions = pos.get();
      w.token_seq = tseq.get();
      w.num_tokens = m;
      PD_BENCH_CUDA(kc::LaunchWriteMlaCache(w, 0));
    }
    PD_BENCH_CUDA(cudaDeviceSynchronize());
  }
};

void Attention(const char* name, int seqs, int64_t ctx, int tokens_per_seq, bool causal,
               double anchor_tflops, int reps) {
  const int H = 128, topk = g_topk;
  Cache cache(seqs, ctx);
  const int64_t T = int64_t(seqs) * tokens_per_seq;
  DeviceBuffer<float> qa(size_t(T) * H * 512), qp(size_t(T) * H * 64), out(size_t(T) * H * 512),
      lse(size_t(T) * H);
  FillFloat<<<unsigned((T * H * 512 + 255) / 256), 256>>>(qa.get(), T * H * 512, 5, 1.0f);
  FillFloat<<<unsigned((T * H * 64 + 255) / 256), 256>>>(qp.get(), T * H * 64, 6, 1.0f);
  std::vector<int32_t> hseq(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) hseq[size_t(t)] = int32_t(t / tokens_per_seq);
  DeviceBuffer<int32_t> qseq(hseq);
  std::vector<DeviceBuffer<int32_t>> idx;
  for (int k = 0; k < 2; ++k) {
    idx.emplace_back(size_t(T) * topk);
    const int64_t base = causal ? ctx - T + 1 : ctx;
    FillIndices<<<unsigned((T * topk + 255) / 256), 256>>>(idx.back().get(), T, topk, base,
                                                          causal ? 1 : 0, 1000 + uint64_t(k));
  }
  PD_BENCH_CUDA(cudaDeviceSynchronize());
  kc::SparseMlaParams p;
  p.cache.pool = cache.pool.get();
  p.cache.page_table = cache.page_table.get();
  p.cache.page_table_stride = cache.stride;
  p.cache.num_tokens = cache.lens.get();
  p.q_abs = qa.get();
  p.q_pe = qp.get();
  p.query_seq = qseq.get();
  p.num_queries = T;
  p.heads = H;
  p.topk = topk;
  p.softmax_scale = 0.0722f;
  p.out = out.get();
  p.lse = lse.get();
  const double flops = double(T) * H * topk * (576.0 + 512.0) * 2.0;
  const double bytes = double(T) * topk * 656.0;
  for (const Variant& v : kVariants) {
    if (!Selected(v.name)) continue;
    p.impl = v.impl;
    p.experiment = v.experiment;
    const int n = v.impl == kc::SparseMlaImpl::kMmaSync ? std::max(3, reps / 4) : reps;
    const std::vector<double> all = TimeMs(
        [&](int i) {
          p.indices = idx[size_t(i % 2)].get();
          PD_BENCH_CUDA(kc::LaunchSparseMla(p, 0));
        },
        2, n);
    const double ms = Median(all);
    const double tf = flops / (ms * 1e-3) / 1e12;
    std::printf("%-8s %-20s T=%-6lld H=%d topk=%d ctx=%lldK  %8.3f ms (min %.3f, max %.3f)  %6.1f "
                "TFLOPS%s (anchor %3.0f, 75%% = %3.0f)  %6.0f GB/s of records\n",
                name, v.name, (long long)T, H, topk, (long long)(ctx / 1024), ms, all.front(),
                all.back(), tf, v.timing_only ? " [timing only]" : "", anchor_tflops,
                0.75 * anchor_tflops, bytes / (ms * 1e-3) / 1e9);
    g_rows.push_back(Row()
                         .S("bench", std::string("sparse_mla_") + name)
                         .S("kernel", v.name)
                         .N("timing_only", v.timing_only ? 1 : 0)
                         .N("query_tokens", double(T))
                         .N("heads", H)
                         .N("topk", topk)
                         .N("context", double(ctx))
                         .N("ms", ms)
                         .N("ms_min", all.front())
                         .N("ms_max", all.back())
                         .N("runs", double(n))
                         .N("tflops", tf)
                         .N("anchor_flashmla_h800_tflops", anchor_tflops)
                         .N("record_bytes", bytes));
  }
  // Agreement of the real kernels on the same inputs (each against kWgmma).
  DeviceBuffer<float> out2(size_t(T) * H * 512);
  DeviceBuffer<double> sums(2);
  for (const Variant& v : kVariants) {
    if (v.timing_only || v.impl == kc::SparseMlaImpl::kWgmma || !Selected("wgmma") ||
        !Selected(v.name)) {
      continue;
    }
    const bool is_pair = v.impl == kc::SparseMlaImpl::kWgmmaPair;
    p.indices = idx[0].get();
    p.impl = kc::SparseMlaImpl::kWgmma;
    p.experiment = 0;
    p.out = out.get();
    PD_BENCH_CUDA(kc::LaunchSparseMla(p, 0));
    p.impl = v.impl;
    p.experiment = v.experiment;
    p.out = out2.get();
    PD_BENCH_CUDA(kc::LaunchSparseMla(p, 0));
    PD_BENCH_CUDA(cudaMemset(sums.get(), 0, sums.bytes()));
    DiffSums<<<528, 256>>>(out.get(), out2.get(), T * H * 512, sums.get());
    PD_BENCH_CUDA(cudaDeviceSynchronize());
    const std::vector<double> hs = sums.Download();
    const double rel = std::sqrt(hs[0] / std::max(hs[1], 1e-300));
    std::printf("%-8s wgmma vs %s: relative L2 difference %.3g%s\n", name, v.name, rel,
                !is_pair              ? " (both bf16 q/p)"
                : v.experiment == 14 || v.experiment == 15 ? " (seesaw: O rescaled in another order, small expected)"
                                     : " (same arithmetic: 0 expected)");
    g_rows.push_back(Row()
                         .S("bench", std::string("sparse_mla_") + name + "_agreement")
                         .S("kernel", v.name)
                         .N("rel_l2_vs_wgmma", rel));
  }
  p.experiment = 0;
  p.out = out.get();
  // Prefill over up-converted bf16 rows: the up-conversion of the whole
  // context, then the attention over the rows (kWgmma; the pair kernel, with
  // and without the L2 prefetch, and its producer alone); each real variant is
  // compared with the FP8 path (0 expected: the up-conversion is exact).
  struct Bf16Variant {
    const char* name;
    kc::SparseMlaImpl impl;
    int experiment;
    bool timing_only;
  };
  const Bf16Variant bf16_variants[] = {
      {"wgmma-bf16-rows", kc::SparseMlaImpl::kWgmma, 0, false},
      {"pair-bf16-rows", kc::SparseMlaImpl::kWgmmaPair, 0, false},
      {"pair-bf16-rows-r1pf", kc::SparseMlaImpl::kWgmmaPair, 4, false},
      {"pair-bf16-rows-persist", kc::SparseMlaImpl::kWgmmaPair, 9, false},
      {"pair-bf16-no-consumer", kc::SparseMlaImpl::kWgmmaPair, 2, true},
  };
  bool any = false;
  for (const Bf16Variant& v : bf16_variants) any = any || Selected(v.name);
  if (!causal || !any) return;
  DeviceBuffer<uint16_t> rows(size_t(seqs) * size_t(ctx) * 576);
  PD_BENCH_CUDA(rows.error());
  std::vector<int64_t> hstart(static_cast<size_t>(seqs));
  for (int s = 0; s < seqs; ++s) hstart[size_t(s)] = int64_t(s) * ctx;
  DeviceBuffer<int64_t> start(hstart);
  kc::MlaUpconvertParams u;
  u.cache = p.cache;
  u.num_seqs = seqs;
  u.row_start = start.get();
  u.max_tokens = ctx;
  u.rows = rows.get();
  const std::vector<double> up_all =
      TimeMs([&](int) { PD_BENCH_CUDA(kc::LaunchUpconvertMlaCache(u, 0)); }, 2, reps);
  const double up_ms = Median(up_all);
  const double up_bytes = double(seqs) * double(ctx) * (656.0 + 1152.0);
  std::printf("%-8s up-conversion of %lld tokens %.3f ms (%.0f GB/s)\n", name,
              (long long)(int64_t(seqs) * ctx), up_ms, up_bytes / (up_ms * 1e-3) / 1e9);
  for (const Bf16Variant& v : bf16_variants) {
    if (!Selected(v.name)) continue;
    p.impl = v.impl;
    p.experiment = v.experiment;
    p.out = out2.get();
    p.bf16_rows = rows.get();
    p.bf16_row_start = start.get();
    const std::vector<double> all = TimeMs(
        [&](int i) {
          p.indices = idx[size_t(i % 2)].get();
          PD_BENCH_CUDA(kc::LaunchSparseMla(p, 0));
        },
        2, reps);
    const double ms = Median(all);
    double rel2 = -1.0;
    if (!v.timing_only) {
      p.indices = idx[0].get();
      PD_BENCH_CUDA(kc::LaunchSparseMla(p, 0));
      PD_BENCH_CUDA(cudaMemset(sums.get(), 0, sums.bytes()));
      p.impl = kc::SparseMlaImpl::kWgmma;
      p.experiment = 0;
      p.out = out.get();
      p.bf16_rows = nullptr;
      p.bf16_row_start = nullptr;
      PD_BENCH_CUDA(kc::LaunchSparseMla(p, 0));
      DiffSums<<<528, 256>>>(out2.get(), out.get(), T * H * 512, sums.get());
      PD_BENCH_CUDA(cudaDeviceSynchronize());
      const std::vector<double> hs2 = sums.Download();
      rel2 = std::sqrt(hs2[0] / std::max(hs2[1], 1e-300));
    }
    p.bf16_rows = nullptr;
    p.bf16_row_start = nullptr;
    p.out = out.get();
    std::printf("%-8s %-20s T=%-6lld H=%d topk=%d ctx=%lldK  %8.3f ms (min %.3f, max %.3f)  %6.1f "
                "TFLOPS%s (anchor %3.0f, 75%% = %3.0f); + up-conversion %.3f ms = %.1f TFLOPS; vs "
                "the FP8 path: relative L2 difference %.3g\n",
                name, v.name, (long long)T, H, topk, (long long)(ctx / 1024), ms, all.front(),
                all.back(), flops / (ms * 1e-3) / 1e12, v.timing_only ? " [timing only]" : "",
                anchor_tflops, 0.75 * anchor_tflops, up_ms,
                flops / ((ms + up_ms) * 1e-3) / 1e12, rel2);
    g_rows.push_back(Row()
                         .S("bench", std::string("sparse_mla_") + name)
                         .S("kernel", v.name)
                         .N("timing_only", v.timing_only ? 1 : 0)
                         .N("query_tokens", double(T))
                         .N("heads", H)
                         .N("topk", topk)
                         .N("context", double(ctx))
                         .N("ms", ms)
                         .N("ms_min", all.front())
                         .N("ms_max", all.back())
                         .N("runs", double(reps))
                         .N("tflops", flops / (ms * 1e-3) / 1e12)
                         .N("upconvert_ms", up_ms)
                         .N("tflops_with_upconvert", flops / ((ms + up_ms) * 1e-3) / 1e12)
                         .N("rel_l2_vs_fp8_path", rel2)
                         .N("anchor_flashmla_h800_tflops", anchor_tflops));
  }
}

void CacheWrite(int64_t T, int reps) {
  KvLayout layout;
  const int64_t pages = kernels::NumPages(T);
  DeviceBuffer<uint8_t> pool(size_t(pages) * layout.MlaPageBytes());
  std::vector<int32_t> pt(static_cast<size_t>(pages));
  for (size_t i = 0; i < pt.size(); ++i) pt[i] = int32_t(i);
  DeviceBuffer<int32_t> d_pt(pt);
  std::vector<int64_t> pos(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) pos[size_t(t)] = t;
  DeviceBuffer<int64_t> d_pos(pos);
  DeviceBuffer<float> ckv(size_t(T) * 512), kpe(size_t(T) * 64);
  FillFloat<<<unsigned((T * 512 + 255) / 256), 256>>>(ckv.get(), T * 512, 3, 1.0f);
  FillFloat<<<unsigned((T * 64 + 255) / 256), 256>>>(kpe.get(), T * 64, 4, 1.0f);
  kc::MlaWriteParams w;
  w.pool = pool.get();
  w.page_table = d_pt.get();
  w.page_table_stride = pages;
  w.layout = layout;
  w.c_kv = ckv.get();
  w.k_pe = kpe.get();
  w.positions = d_pos.get();
  w.num_tokens = T;
  const double ms = Median(TimeMs([&](int) { PD_BENCH_CUDA(kc::LaunchWriteMlaCache(w, 0)); }, 2, reps));
  const double bytes = double(T) * (576.0 * 4 + 656.0);
  std::printf("cache write T=%lld: %.3f ms, %.0f GB/s (fp32 in + 656 B records out)\n", (long long)T,
              ms, bytes / (ms * 1e-3) / 1e9);
  g_rows.push_back(Row().S("bench", "mla_cache_write").N("tokens", double(T)).N("ms", ms).N(
      "gbps", bytes / (ms * 1e-3) / 1e9));
}

}  // namespace
}  // namespace pd::bench

int main(int argc, char** argv) {
  using namespace pd::bench;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines survive a timeout kill
  std::string json = "mla_bench.json";
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--json" && i + 1 < argc) {
      json = argv[++i];
    } else if (std::string(argv[i]) == "--variants" && i + 1 < argc) {
      g_variants = argv[++i];
    } else if (std::string(argv[i]) == "--cases" && i + 1 < argc) {
      g_cases = argv[++i];
    } else if (std::string(argv[i]) == "--topk" && i + 1 < argc) {
      g_topk = std::atoi(argv[++i]);
      if (g_topk < 1) {
        std::fprintf(stderr, "--topk must be a positive integer\n");
        return 2;
      }
    } else {
      std::fprintf(stderr,
                   "usage: %s [--json PATH] [--variants NAME,NAME,...] [--cases decode,prefill] "
                   "[--topk N (default 2048)]\n",
                   argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  PD_BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("device %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  if (InList(g_cases, "decode")) Attention("decode", 128, 32768, 2, false, 410.0, 20);
  if (InList(g_cases, "prefill")) Attention("prefill", 1, 65536, 4096, true, 640.0, 10);
  if (Selected("cache-write")) CacheWrite(65536, 20);
  std::map<std::string, std::string> meta = {{"device", prop.name}, {"command", argv[0]}};
  if (!WriteJson(json, meta, g_rows)) return 1;
  std::printf("wrote %s\n", json.c_str());
  return 0;
}
