// Benchmarks of the CUDA indexer selection kernels (kernels/cuda/indexer_cuda.h):
// prefill selection (dense DSA vs MISA), decode selection (dense, MISA, MISA +
// pooled-summary block filter), each against the anchors of issue #3 measured
// on an H200. Prints a table and writes JSON (--json PATH).
//
// Inputs are random but not trivial: every key is N(0,1) plus a mean that
// drifts every 512 tokens (so block summaries differ), FP8 e4m3 with a ue8m0
// scale per key, written by a GPU kernel into a paged cache; queries likewise
// per head. Times are CUDA-event medians after warm-up, rotating among several
// query sets (prefill) or several copies of the caches (decode) so that the
// inputs of consecutive runs are not L2-resident.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "bench/kernels/bench_util.h"
#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/indexer_cuda.h"
#include "kernels/kv_layout.h"
#include "kernels/numeric.h"

namespace pd::bench {
namespace {

using kernels::KvLayout;
using kernels::cuda::DeviceBuffer;
namespace kc = kernels::cuda;

constexpr int kH = 64, kD = 128, kTopk = 2048;

__device__ __forceinline__ uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ float Normal(uint64_t key) {
  const uint64_t h = Mix(key);
  const float u1 = (float(uint32_t(h)) + 0.5f) * 2.3283064e-10f;
  const float u2 = float(uint32_t(h >> 32)) * 2.3283064e-10f;
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// Warp per (seq, token): 128 values, FP8 with a ue8m0 scale, into the pool.
__global__ void FillKeys(uint8_t* pool, const int32_t* page_table, int64_t pt_stride,
                         int64_t tokens, int num_seqs, uint64_t seed, KvLayout layout) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= tokens * num_seqs) return;
  const int64_t seq = wid / tokens, t = wid % tokens;
  float v[4], amax = 0.0f;
  for (int e = 0; e < 4; ++e) {
    const int d = 4 * lane + e;
    const float drift = Normal(seed ^ (uint64_t(seq) << 40) ^ (uint64_t(t / 512) << 8) ^ d ^ 0xabcdef);
    v[e] = Normal(seed + ((uint64_t(seq) << 44) | (uint64_t(t) << 8) | uint64_t(d))) + 0.5f * drift;
    amax = fmaxf(amax, fabsf(v[e]));
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = kernels::Fp8Scale(amax, true);
  uint32_t packed = 0;
  for (int e = 0; e < 4; ++e) packed |= uint32_t(kernels::FloatToFp8E4M3(v[e] / s)) << (8 * e);
  uint8_t* pg = pool + int64_t(page_table[seq * pt_stride + t / 64]) * layout.IndexPageBytes();
  reinterpret_cast<uint32_t*>(pg + layout.IndexValueOffset(int(t % 64)))[lane] = packed;
  if (lane == 0) *reinterpret_cast<float*>(pg + layout.IndexScaleOffset(int(t % 64))) = s;
}

// Warp per (query, head): q8 and its weight (random sign, scale folded in).
__global__ void FillQueries(uint8_t* q8, float* w, int64_t vectors, uint64_t seed) {
  const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= vectors) return;
  float v[4], amax = 0.0f;
  for (int e = 0; e < 4; ++e) {
    v[e] = Normal(seed + (uint64_t(wid) << 8) + 4 * lane + e);
    amax = fmaxf(amax, fabsf(v[e]));
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = kernels::Fp8Scale(amax, true);
  uint32_t packed = 0;
  for (int e = 0; e < 4; ++e) packed |= uint32_t(kernels::FloatToFp8E4M3(v[e] / s)) << (8 * e);
  reinterpret_cast<uint32_t*>(q8 + wid * 128)[lane] = packed;
  if (lane == 0) w[wid] = Normal(~seed + uint64_t(wid)) * s * 0.125f;
}

// Sequences of equal length in one pool, contiguous pages, with summaries.
struct Caches {
  KvLayout layout;
  int num_seqs = 0;
  int64_t tokens = 0, pt_stride = 0, sum_stride = 0;
  DeviceBuffer<uint8_t> pool;
  DeviceBuffer<int32_t> page_table;
  DeviceBuffer<int64_t> lens;
  DeviceBuffer<float> sums;

  Caches(int seqs, int64_t n, uint64_t seed) : num_seqs(seqs), tokens(n) {
    pt_stride = kernels::NumPages(n);
    sum_stride = kernels::CeilDiv(n, layout.summary_block);
    pool = DeviceBuffer<uint8_t>(size_t(seqs) * pt_stride * layout.IndexPageBytes());
    std::vector<int32_t> pt(size_t(seqs) * pt_stride);
    for (size_t i = 0; i < pt.size(); ++i) pt[i] = int32_t(i);
    page_table = DeviceBuffer<int32_t>(pt);
    lens = DeviceBuffer<int64_t>(std::vector<int64_t>(size_t(seqs), n));
    sums = DeviceBuffer<float>(size_t(seqs) * sum_stride * kD);
    PD_BENCH_CUDA(pool.error());
    PD_BENCH_CUDA(sums.error());
    const int64_t warps = n * seqs;
    FillKeys<<<unsigned((warps * 32 + 255) / 256), 256>>>(pool.get(), page_table.get(), pt_stride,
                                                         n, seqs, seed, layout);
    PD_BENCH_CUDA(cudaGetLastError());
    DeviceBuffer<int64_t> from(std::vector<int64_t>(size_t(seqs), 0));
    kc::SummaryParams sp;
    sp.pool = pool.get();
    sp.page_table = page_table.get();
    sp.page_table_stride = pt_stride;
    sp.summary_sums = sums.get();
    sp.summary_stride = sum_stride;
    sp.from = from.get();
    sp.to = lens.get();
    sp.num_seqs = seqs;
    sp.max_blocks_touched = sum_stride;
    sp.layout = layout;
    PD_BENCH_CUDA(kc::LaunchUpdateSummaries(sp, 0));
    PD_BENCH_CUDA(cudaDeviceSynchronize());
  }

  // Sequences [first, first + count) as an IndexKeyBatch.
  kc::IndexKeyBatch Keys(int first) const {
    kc::IndexKeyBatch k;
    k.pool = pool.get();
    k.page_table = page_table.get() + int64_t(first) * pt_stride;
    k.page_table_stride = pt_stride;
    k.num_tokens = lens.get() + first;
    k.summary_sums = sums.get() + int64_t(first) * sum_stride * kD;
    k.summary_stride = sum_stride;
    k.layout = layout;
    return k;
  }
};

struct QuerySet {
  DeviceBuffer<uint8_t> q8;
  DeviceBuffer<float> w;
  QuerySet(int64_t T, uint64_t seed) : q8(size_t(T) * kH * kD), w(size_t(T) * kH) {
    PD_BENCH_CUDA(q8.error());
    FillQueries<<<unsigned((T * kH * 32 + 255) / 256), 256>>>(q8.get(), w.get(), T * kH, seed);
    PD_BENCH_CUDA(cudaGetLastError());
  }
};

// Mean over queries of |A_t ∩ B_t| / |B_t| (rows of `topk`, -1 padded).
double Recall(const std::vector<int32_t>& a, const std::vector<int32_t>& b, int64_t T, int topk) {
  const int nth = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
  std::vector<double> part(size_t(nth), 0.0);
  std::vector<std::thread> th;
  for (int k = 0; k < nth; ++k) {
    th.emplace_back([&, k] {
      std::vector<int32_t> sb;
      for (int64_t t = k; t < T; t += nth) {
        sb.assign(b.begin() + t * topk, b.begin() + (t + 1) * topk);
        sb.erase(std::remove(sb.begin(), sb.end(), -1), sb.end());
        std::sort(sb.begin(), sb.end());
        if (sb.empty()) {
          part[size_t(k)] += 1.0;
          continue;
        }
        int64_t hit = 0;
        for (int i = 0; i < topk; ++i) {
          const int32_t x = a[size_t(t * topk + i)];
          if (x >= 0 && std::binary_search(sb.begin(), sb.end(), x)) ++hit;
        }
        part[size_t(k)] += double(hit) / double(sb.size());
      }
    });
  }
  for (auto& t : th) t.join();
  double s = 0.0;
  for (double p : part) s += p;
  return s / double(T);
}

struct Options {
  std::string json = "indexer_bench.json";
  bool quick = false;
  bool prefill = true, decode = true;
  bool experiments = false;
};

std::vector<Row> g_rows;
std::map<std::string, std::string> g_meta;

void PrintRow(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void PrintRow(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stdout, fmt, ap);
  va_end(ap);
  std::fflush(stdout);
}

double CopyBandwidthGBs() {
  const size_t bytes = size_t(1) << 30;
  DeviceBuffer<uint8_t> a(bytes), b(bytes);
  PD_BENCH_CUDA(cudaMemset(a.get(), 1, bytes));
  const auto ms = TimeMs([&](int) { cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice); },
                         2, 10);
  return 2.0 * bytes / (Median(ms) * 1e-3) / 1e9;
}

// ---------------------------------------------------------------------------
// Prefill: Q queries at positions [K - Q, K) (or all at K - 1), one sequence.
void Prefill(int64_t K, int64_t Q, bool all_visible, double anchor_ms, const Options& opt,
             bool compare_mma_sync) {
  Caches cache(1, K, 1000 + uint64_t(K));
  const int nsets = 2;
  std::vector<QuerySet> qs;
  for (int i = 0; i < nsets; ++i) qs.emplace_back(Q, 77 + 1000 * uint64_t(i) + uint64_t(K));
  std::vector<int64_t> pos(static_cast<size_t>(Q));
  double pairs = 0.0;
  for (int64_t t = 0; t < Q; ++t) {
    pos[size_t(t)] = all_visible ? K - 1 : K - Q + t;
    pairs += double(pos[size_t(t)] + 1);
  }
  DeviceBuffer<int64_t> d_pos(pos);
  DeviceBuffer<int32_t> d_start(std::vector<int32_t>{0, int32_t(Q)});
  DeviceBuffer<int32_t> out_dense(size_t(Q) * kTopk), out_misa(size_t(Q) * kTopk);
  DeviceBuffer<int32_t> active(size_t(Q) * 8);

  auto queries = [&](int set) {
    kc::IndexQueryBatch q;
    q.q8 = qs[size_t(set)].q8.get();
    q.weights = qs[size_t(set)].w.get();
    q.positions = d_pos.get();
    q.query_start = d_start.get();
    q.num_queries = Q;
    q.num_seqs = 1;
    q.max_queries_per_seq = Q;
    q.max_context = K;
    return q;
  };
  kc::SelectParams dense;
  dense.keys = cache.Keys(0);
  dense.queries = queries(0);
  dense.rows_per_query = kH;
  dense.topk = kTopk;
  dense.kernel_version = 2;  // the v1 rows below time version 1 on the same inputs
  dense.out = out_dense.get();
  kc::SelectPlan dplan;
  const char* why = nullptr;
  if (kc::PlanSelectLaunch(dense, &dplan, &why) != cudaSuccess) {
    std::fprintf(stderr, "plan: %s\n", why);
    std::exit(2);
  }
  kc::SelectParams misa = dense;
  misa.rows_per_query = 8;
  misa.head_list = active.get();
  misa.out = out_misa.get();
  kc::SelectPlan mplan;
  PD_BENCH_CUDA(kc::PlanSelectLaunch(misa, &mplan, &why));
  DeviceBuffer<uint8_t> ws(std::max(dplan.workspace_bytes, mplan.workspace_bytes));
  PD_BENCH_CUDA(ws.error());
  kc::RouterParams router;
  router.keys = cache.Keys(0);
  router.queries = queries(0);
  router.active_heads = 8;
  router.active = active.get();

  const int reps = opt.quick ? 3 : (K >= 65536 ? 7 : 15);
  auto run_dense = [&](int i) {
    dense.queries = queries(i % nsets);
    PD_BENCH_CUDA(kc::LaunchSelect(dense, dplan, ws.get(), 0));
  };
  auto run_router = [&](int i) {
    router.queries = queries(i % nsets);
    PD_BENCH_CUDA(kc::LaunchMisaRouter(router, 0));
  };
  auto run_misa_select = [&](int i) {
    misa.queries = queries(i % nsets);
    PD_BENCH_CUDA(kc::LaunchSelect(misa, mplan, ws.get(), 0));
  };
  const double t_dense = Median(TimeMs(run_dense, 1, reps));
  const double t_router = Median(TimeMs(run_router, 1, reps));
  const double t_mselect = Median(TimeMs(run_misa_select, 1, reps));
  const double t_misa = Median(TimeMs([&](int i) { run_router(i); run_misa_select(i); }, 1, reps));
  // The previous kernel (version 1), same inputs, same run.
  dense.kernel_version = misa.kernel_version = 1;
  kc::SelectPlan dplan1, mplan1;
  PD_BENCH_CUDA(kc::PlanSelectLaunch(dense, &dplan1, nullptr));
  PD_BENCH_CUDA(kc::PlanSelectLaunch(misa, &mplan1, nullptr));
  DeviceBuffer<uint8_t> ws1(std::max(dplan1.workspace_bytes, mplan1.workspace_bytes));
  const double t_dense_v1 = Median(TimeMs([&](int i) {
    dense.queries = queries(i % nsets);
    PD_BENCH_CUDA(kc::LaunchSelect(dense, dplan1, ws1.get(), 0));
  }, 1, reps));
  const double t_mselect_v1 = Median(TimeMs([&](int i) {
    misa.queries = queries(i % nsets);
    PD_BENCH_CUDA(kc::LaunchSelect(misa, mplan1, ws1.get(), 0));
  }, 1, reps));
  dense.kernel_version = misa.kernel_version = 2;
  ws1 = DeviceBuffer<uint8_t>();
  // Outputs of the same query set for the recall.
  run_dense(0);
  run_router(0);
  run_misa_select(0);
  PD_BENCH_CUDA(cudaDeviceSynchronize());
  const std::vector<int32_t> dense_rows = out_dense.Download();
  const double recall = Recall(out_misa.Download(), dense_rows, Q, kTopk);
  // MISA-dagger (router + routed top-8192 + exact re-rank) and HISA (128-token
  // blocks, 64 kept, exact re-rank), both top-2048.
  double t_two[2] = {0, 0}, rec_two[2] = {0, 0};
  for (int m = 0; m < 2; ++m) {
    kc::TwoStageParams tp;
    tp.mode = m == 0 ? kc::TwoStageMode::kMisaDagger : kc::TwoStageMode::kHisa;
    tp.keys = cache.Keys(0);
    tp.queries = queries(0);
    tp.head_list = active.get();
    tp.out = out_misa.get();
    kc::TwoStagePlan tplan;
    const char* twhy = nullptr;
    if (kc::PlanTwoStageLaunch(tp, &tplan, &twhy) != cudaSuccess) {
      std::fprintf(stderr, "two-stage plan: %s\n", twhy);
      std::exit(2);
    }
    DeviceBuffer<uint8_t> tws(tplan.workspace_bytes);
    PD_BENCH_CUDA(tws.error());
    auto run_two = [&](int i) {
      tp.queries = queries(i % nsets);
      if (m == 0) run_router(i);
      PD_BENCH_CUDA(kc::LaunchTwoStage(tp, tplan, tws.get(), 0));
    };
    t_two[m] = Median(TimeMs(run_two, 1, reps));
    run_two(0);
    PD_BENCH_CUDA(cudaDeviceSynchronize());
    rec_two[m] = Recall(out_misa.Download(), dense_rows, Q, kTopk);
  }
  const double dense_tf = 2.0 * kH * kD * pairs / (t_dense * 1e-3) / 1e12;
  const double misa_tf = 2.0 * 8 * kD * pairs / (t_mselect * 1e-3) / 1e12;
  const std::string shape = std::to_string(Q) + "q x " + std::to_string(K / 1024) + "K" +
                            (all_visible ? " all-visible" : " causal");
  PrintRow("%-26s dense(v2) %8.3f ms %6.0f TF | misa(h=8,v2) %7.3f ms = router %6.3f + select %7.3f "
           "(%5.0f TF) | %5.2fx | recall %.4f | anchor %.2f ms\n",
           shape.c_str(), t_dense, dense_tf, t_misa, t_router, t_mselect, misa_tf,
           t_dense / t_misa, recall, anchor_ms);
  PrintRow("%-26s   v1 kernel: dense %8.3f ms, misa select %7.3f ms | misa-dagger %7.3f ms "
           "recall %.4f | hisa %7.3f ms recall %.4f\n",
           shape.c_str(), t_dense_v1, t_mselect_v1, t_two[0], rec_two[0], t_two[1], rec_two[1]);
  g_rows.push_back(Row()
                       .S("bench", "prefill_select")
                       .S("shape", shape)
                       .N("queries", double(Q))
                       .N("keys", double(K))
                       .N("visible_pairs", pairs)
                       .N("dense_ms", t_dense)
                       .N("dense_tflops", dense_tf)
                       .N("misa_ms", t_misa)
                       .N("misa_router_ms", t_router)
                       .N("misa_select_ms", t_mselect)
                       .N("misa_select_tflops", misa_tf)
                       .N("misa_speedup_vs_our_dense", t_dense / t_misa)
                       .N("misa_speedup_vs_anchor", anchor_ms / t_misa)
                       .N("misa_recall_vs_dense", recall)
                       .N("anchor_dense_ms", anchor_ms)
                       .N("splits_dense", dplan.splits)
                       .N("splits_misa", mplan.splits)
                       .N("dense_v1_ms", t_dense_v1)
                       .N("misa_select_v1_ms", t_mselect_v1)
                       .N("dagger_ms", t_two[0])
                       .N("dagger_recall_vs_dense", rec_two[0])
                       .N("hisa_ms", t_two[1])
                       .N("hisa_recall_vs_dense", rec_two[1]));
  if (compare_mma_sync) {
    dense.use_wgmma = false;
    const double t_sync = Median(TimeMs(run_dense, 1, reps));
    dense.use_wgmma = true;
    PrintRow("%-26s dense with mma.sync m16n8k32 instead of wgmma: %8.3f ms (%5.0f TF)\n",
             shape.c_str(), t_sync, 2.0 * kH * kD * pairs / (t_sync * 1e-3) / 1e12);
    g_rows.push_back(Row().S("bench", "prefill_dense_mma_sync").S("shape", shape).N("ms", t_sync));
  }
  // Sorted output cost (the CPU reference's order).
  if (K == 32768 && !all_visible) {
    dense.sorted = true;
    const double t_sorted = Median(TimeMs(run_dense, 1, reps));
    dense.sorted = false;
    PrintRow("%-26s dense with sorted rows: %8.3f ms\n", shape.c_str(), t_sorted);
    g_rows.push_back(Row().S("bench", "prefill_dense_sorted").S("shape", shape).N("ms", t_sorted));
  }
}

// ---------------------------------------------------------------------------
// Decode: B requests, one query each at the end of a K-token context.
void Decode(int B, int64_t K, double anchor_us, const Options& opt) {
  const double bytes_per_copy = double(B) * K * 132.0;
  const int copies = int(std::clamp(std::ceil(400e6 / bytes_per_copy), 1.0, 16.0));
  Caches cache(B * copies, K, 5000 + uint64_t(K) + uint64_t(B));
  std::vector<QuerySet> qs;
  for (int c = 0; c < copies; ++c) qs.emplace_back(B, 9000 + uint64_t(c) * 31 + uint64_t(B));
  std::vector<int64_t> pos(size_t(B), K - 1);
  std::vector<int32_t> start(size_t(B) + 1);
  for (int b = 0; b <= B; ++b) start[size_t(b)] = b;
  DeviceBuffer<int64_t> d_pos(pos);
  DeviceBuffer<int32_t> d_start(start);
  DeviceBuffer<int32_t> out_dense(size_t(B) * kTopk), out_misa(size_t(B) * kTopk),
      out_filt(size_t(B) * kTopk), active(size_t(B) * 8);
  const int keep_blocks = 16;  // of K / 1024 blocks
  const int64_t kl_stride = int64_t(keep_blocks) * 1024;
  DeviceBuffer<int32_t> klist(size_t(B) * kl_stride), klen(static_cast<size_t>(B));
  auto queries = [&](int c) {
    kc::IndexQueryBatch q;
    q.q8 = qs[size_t(c)].q8.get();
    q.weights = qs[size_t(c)].w.get();
    q.positions = d_pos.get();
    q.query_start = d_start.get();
    q.num_queries = B;
    q.num_seqs = B;
    q.max_queries_per_seq = 1;
    q.max_context = K;
    return q;
  };
  // The decode path (kernel_version 0 on these decode-shaped launches:
  // kernels/cuda/decode_select.cu) and the previous one (version 2: the
  // prefill kernel with the key axis split and merged), same inputs, same run.
  kc::SelectParams dense;
  dense.keys = cache.Keys(0);
  dense.queries = queries(0);
  dense.rows_per_query = kH;
  dense.topk = kTopk;
  dense.out = out_dense.get();
  // One query per request cannot fill a tile with its 8 routed rows: MISA runs
  // with the unrouted heads' weights zeroed.
  kc::SelectParams misa = dense;
  misa.head_list = active.get();
  misa.masked_heads = 8;
  misa.out = out_misa.get();
  kc::SelectParams filt = misa;
  filt.key_list = klist.get();
  filt.key_list_len = klen.get();
  filt.key_list_stride = kl_stride;
  filt.max_key_list_len = kl_stride;
  filt.out = out_filt.get();
  struct Path {
    kc::SelectParams* p;
    int version, experiment;
    kc::SelectPlan plan;
  };
  // [dense, misa, filter] x [new, old], then the new dense path's scoring
  // alone (experiment bit 0) and top-k alone (bit 1).
  Path paths[8] = {{&dense, 0, 0, {}}, {&misa, 0, 0, {}}, {&filt, 0, 0, {}},
                   {&dense, 2, 0, {}}, {&misa, 2, 0, {}}, {&filt, 2, 0, {}},
                   {&dense, 3, 1, {}}, {&dense, 3, 2, {}}};
  size_t ws_bytes = 0;
  for (Path& x : paths) {
    kc::SelectParams q = *x.p;
    q.kernel_version = x.version;
    q.experiment = x.experiment;
    const char* why = nullptr;
    if (kc::PlanSelectLaunch(q, &x.plan, &why) != cudaSuccess) {
      std::fprintf(stderr, "decode plan: %s\n", why);
      std::exit(2);
    }
    ws_bytes = std::max(ws_bytes, x.plan.workspace_bytes);
  }
  // Separate workspaces for the two paths (the top-k-alone timing reads the
  // logits the new path's last launch left).
  DeviceBuffer<uint8_t> ws(ws_bytes), ws_old(ws_bytes);
  PD_BENCH_CUDA(ws.error());
  PD_BENCH_CUDA(ws_old.error());
  kc::RouterParams router;
  router.keys = cache.Keys(0);
  router.queries = queries(0);
  router.active_heads = 8;
  router.active = active.get();
  kc::BlockFilterParams bf;
  bf.keys = cache.Keys(0);
  bf.queries = queries(0);
  bf.rows_per_query = 8;
  bf.head_list = active.get();
  bf.keep_blocks = keep_blocks;
  bf.key_list = klist.get();
  bf.key_list_len = klen.get();
  bf.key_list_stride = kl_stride;

  auto set_copy = [&](int i) {
    const int c = i % copies;
    dense.keys = misa.keys = filt.keys = router.keys = bf.keys = cache.Keys(c * B);
    dense.queries = misa.queries = filt.queries = router.queries = bf.queries = queries(c);
  };
  auto launch = [&](const Path& x) {
    kc::SelectParams q = *x.p;
    q.kernel_version = x.version;
    q.experiment = x.experiment;
    PD_BENCH_CUDA(kc::LaunchSelect(q, x.plan, x.version == 2 ? ws_old.get() : ws.get(), 0));
  };
  auto run_path = [&](int which, int i) {
    set_copy(i);
    const Path& x = paths[which];
    if (x.p != &dense) PD_BENCH_CUDA(kc::LaunchMisaRouter(router, 0));
    if (x.p == &filt) PD_BENCH_CUDA(kc::LaunchBlockFilter(bf, 0));
    launch(x);
  };
  const int reps = opt.quick ? 5 : 30;
  double t[8];
  for (int w = 0; w < 8; ++w) {
    if (w == 7) run_path(6, 0);  // the logits and histograms the top-k alone reads
    t[w] = Median(TimeMs([&](int i) { run_path(w, i); }, 2, reps)) * 1e3;
  }
  // Router and block filter alone (the MISA rows include them).
  const double t_router = Median(TimeMs([&](int i) {
    set_copy(i);
    PD_BENCH_CUDA(kc::LaunchMisaRouter(router, 0));
  }, 2, reps)) * 1e3;
  const double t_rfilter = Median(TimeMs([&](int i) {
    set_copy(i);
    PD_BENCH_CUDA(kc::LaunchMisaRouter(router, 0));
    PD_BENCH_CUDA(kc::LaunchBlockFilter(bf, 0));
  }, 2, reps)) * 1e3;
  // Plan sweep (128K, batch 32 and 128): the scoring alone with other key
  // ranges per CTA, the top-k alone with other CTA counts per row (the plan
  // is a plain struct: the launcher takes any tiling of the row).
  std::string sweep;
  if (K == 131072 && B >= 32 && !opt.quick) {
    const kc::DecodeSelectPlan d0 = paths[6].plan.decode;
    for (int64_t rows : {int64_t(1024), int64_t(4096), int64_t(16384)}) {
      Path x = paths[6];
      x.plan.decode.rows_per_cta = rows;
      x.plan.decode.score_ctas = int((d0.row_stride + rows - 1) / rows);
      const double us = Median(TimeMs([&](int i) { set_copy(i); launch(x); }, 2, reps)) * 1e3;
      sweep += " score " + std::to_string(rows) + " rows/CTA (" +
               std::to_string(x.plan.decode.score_ctas) + " CTAs/seq): " + std::to_string(us) + " us;";
      g_rows.push_back(Row().S("bench", "decode_sweep_score").N("batch", B).N("keys", double(K))
                           .N("rows_per_cta", double(rows)).N("us", us));
    }
    {
      Path x = paths[6];
      x.experiment = 1 | 16;  // scoring alone, 8 stages x 2 CTAs per SM
      const double us = Median(TimeMs([&](int i) { set_copy(i); launch(x); }, 2, reps)) * 1e3;
      sweep += " score 8 stages x 2 CTAs/SM: " + std::to_string(us) + " us;";
      g_rows.push_back(Row().S("bench", "decode_sweep_score_deep").N("batch", B).N("keys", double(K))
                           .N("us", us));
    }
    for (int mult : {2, 4}) {
      Path x = paths[7];
      const int64_t c = int64_t(d0.topk_ctas) * mult;
      x.plan.decode.topk_rows_per_cta = ((d0.row_stride + c - 1) / c + 63) / 64 * 64;
      x.plan.decode.topk_ctas =
          int((d0.row_stride + x.plan.decode.topk_rows_per_cta - 1) / x.plan.decode.topk_rows_per_cta);
      run_path(6, 0);
      const double us = Median(TimeMs([&](int i) { set_copy(i); launch(x); }, 2, reps)) * 1e3;
      sweep += " topk " + std::to_string(x.plan.decode.topk_ctas) + " CTAs/seq: " +
               std::to_string(us) + " us;";
      g_rows.push_back(Row().S("bench", "decode_sweep_topk").N("batch", B).N("keys", double(K))
                           .N("topk_ctas", double(x.plan.decode.topk_ctas)).N("us", us));
    }
  }
  if (!sweep.empty()) PrintRow("decode B=%-3d K=%3lldK    sweep:%s\n", B, (long long)(K / 1024), sweep.c_str());
  // Rows of copy 0: new vs old path (agreement), and the recalls vs dense.
  std::vector<int32_t> rows[6];
  for (int w = 0; w < 6; ++w) {
    run_path(w, 0);
    PD_BENCH_CUDA(cudaDeviceSynchronize());
    rows[w] = (w % 3 == 0 ? out_dense : (w % 3 == 1 ? out_misa : out_filt)).Download();
  }
  const double agree[3] = {Recall(rows[0], rows[3], B, kTopk), Recall(rows[1], rows[4], B, kTopk),
                           Recall(rows[2], rows[5], B, kTopk)};
  const double rec_misa = Recall(rows[1], rows[0], B, kTopk);
  const double rec_filt = Recall(rows[2], rows[0], B, kTopk);
  const double key_bytes = double(B) * K * 132.0;
  const int64_t kept = std::min<int64_t>(keep_blocks, kernels::CeilDiv(K, 1024)) * 1024;
  const double filt_bytes = double(B) * (double(kept) * 132.0 + double(kernels::CeilDiv(K, 1024)) * 512.0);
  const double logit_bytes = double(B) * K * 4.0;
  auto gbs = [](double bytes, double us) { return bytes / (us * 1e-6) / 1e9; };
  PrintRow("decode B=%-3d K=%3lldK  dense new %7.1f us (%5.0f GB/s) old %7.1f us | misa new %7.1f old %7.1f us"
           " recall %.4f | misa+filter(16 blk) new %7.1f old %7.1f us %5.1f MB recall %.4f | anchor %s\n",
           B, (long long)(K / 1024), t[0], gbs(key_bytes, t[0]), t[3], t[1], t[4], rec_misa, t[2],
           t[5], filt_bytes / 1e6, rec_filt,
           anchor_us > 0 ? (std::to_string(int(anchor_us)) + " us").c_str() : "-");
  PrintRow("decode B=%-3d K=%3lldK    new dense breakdown: scoring alone %7.1f us (%5.0f GB/s of keys), "
           "top-k alone %6.1f us (%5.0f GB/s of logits) | router %5.1f us, router+filter %5.1f us | "
           "new vs old same keys: dense %.4f misa %.4f filter %.4f | score CTAs %d x %lld rows, "
           "top-k CTAs %d\n",
           B, (long long)(K / 1024), t[6], gbs(key_bytes, t[6]), t[7], gbs(logit_bytes, t[7]),
           t_router, t_rfilter, agree[0], agree[1], agree[2], paths[0].plan.decode.score_ctas,
           (long long)paths[0].plan.decode.rows_per_cta, paths[0].plan.decode.topk_ctas);
  g_rows.push_back(Row()
                       .S("bench", "decode_select")
                       .N("batch", B)
                       .N("keys", double(K))
                       .N("dense_us", t[0])
                       .N("dense_key_bytes", key_bytes)
                       .N("dense_gbps", gbs(key_bytes, t[0]))
                       .N("dense_old_us", t[3])
                       .N("dense_score_only_us", t[6])
                       .N("dense_score_only_gbps", gbs(key_bytes, t[6]))
                       .N("dense_topk_only_us", t[7])
                       .N("misa_us", t[1])
                       .N("misa_old_us", t[4])
                       .N("misa_recall_vs_dense", rec_misa)
                       .N("filter_us", t[2])
                       .N("filter_old_us", t[5])
                       .N("router_us", t_router)
                       .N("router_filter_us", t_rfilter)
                       .N("filter_keep_blocks", keep_blocks)
                       .N("filter_bytes", filt_bytes)
                       .N("filter_recall_vs_dense", rec_filt)
                       .N("new_vs_old_dense", agree[0])
                       .N("new_vs_old_misa", agree[1])
                       .N("new_vs_old_filter", agree[2])
                       .N("anchor_us", anchor_us)
                       .N("splits_old_dense", paths[3].plan.splits)
                       .N("score_ctas_per_seq", paths[0].plan.decode.score_ctas)
                       .N("topk_ctas_per_seq", paths[0].plan.decode.topk_ctas)
                       .N("copies_rotated", copies));
}

// Kernel variants on two prefill shapes (dense 32K, MISA 64K; Q = 8192): the
// version-1 kernel, version 2, and version 2 with its benchmark-only knobs
// (SelectParams::experiment): no threshold seeding, every seeded query
// rescanned, no epilogue, no insertion, double-buffered accumulators. Times
// the selection launch alone (MISA: routed heads from one router run).
void Experiments(const Options& opt) {
  for (const std::string mode : {"dense", "misa"}) {
    const int64_t K = mode == "dense" ? 32768 : 65536, Q = 8192;
    Caches cache(1, K, 4242 + uint64_t(K));
    std::vector<QuerySet> qs;
    for (int i = 0; i < 2; ++i) qs.emplace_back(Q, 99 + uint64_t(i) * 7);
    std::vector<int64_t> pos(static_cast<size_t>(Q));
    for (int64_t t = 0; t < Q; ++t) pos[size_t(t)] = K - Q + t;
    DeviceBuffer<int64_t> d_pos(pos);
    DeviceBuffer<int32_t> d_start(std::vector<int32_t>{0, int32_t(Q)});
    DeviceBuffer<int32_t> out(size_t(Q) * kTopk), active(size_t(Q) * 8);
    auto queries = [&](int i) {
      kc::IndexQueryBatch q;
      q.q8 = qs[size_t(i % 2)].q8.get();
      q.weights = qs[size_t(i % 2)].w.get();
      q.positions = d_pos.get();
      q.query_start = d_start.get();
      q.num_queries = Q;
      q.max_queries_per_seq = Q;
      q.max_context = K;
      return q;
    };
    kc::RouterParams router;
    router.keys = cache.Keys(0);
    router.queries = queries(0);
    router.active = active.get();
    PD_BENCH_CUDA(kc::LaunchMisaRouter(router, 0));
    struct Variant {
      const char* name;
      int version, experiment;
    };
    // v2 = the default (seeded thresholds; dense too since round 5); "no
    // seeding": the running threshold alone (bit 4); "all rescanned": every
    // seeded query takes the exact fallback (bit 5: the worst case of the
    // seeding); "slot branch": round 4's branch around a score slot's store
    // code (bit 6); "CTA-wide final": round 4's final selection, one query at
    // a time by the whole CTA (bit 7; dense always selects so); "CTA barrier
    // each stage": round 4's barrier schedule (bit 8; the default synchronises
    // each warpgroup with itself and the CTA every 4 stages); "TMA stages":
    // the key stages loaded by TMA from one producer lane per warpgroup (bit
    // 9; the default copies them with cp.async in every thread); "half
    // tiles": bit 10, TMA stages and two N = 64 MMAs per stage, the epilogue
    // starting on the first half while the second is in flight. "r7 final
    // restart": bit 11, the per-warp final selection's first pass wasted (a
    // bound no key reaches), then from the range: round 6's pass count with
    // round 7's loads; "ascending CTAs": bit 12, round 6's launch order. "no
    // insertion" leaves every seeded query short of k keys, so with seeding it
    // also rescans them.
    const Variant vs[] = {{"v1", 1, 0},
                          {"v2", 2, 0},
                          {"v2 no seeding", 2, 16},
                          {"v2 all rescanned", 2, 32},
                          {"v2 slot branch", 2, 64},
                          {"v2 CTA-wide final", 2, 128},
                          {"v2 CTA barrier each stage", 2, 256},
                          {"v2 TMA stages", 2, 512},
                          {"v2 half tiles", 2, 1024},
                          {"v2 r7 final restart", 2, 2048},
                          {"v2 ascending CTAs", 2, 4096},
                          {"v2 no epilogue", 2, 1},
                          {"v2 no insertion", 2, 2},
                          {"v2 double-buf", 2, 8}};
    std::vector<int32_t> ref_rows;
    for (const Variant& v : vs) {
      kc::SelectParams p;
      p.keys = cache.Keys(0);
      p.queries = queries(0);
      p.rows_per_query = mode == "misa" ? 8 : kH;
      p.head_list = mode == "misa" ? active.get() : nullptr;
      p.kernel_version = v.version;
      p.experiment = v.experiment;
      p.out = out.get();
      kc::SelectPlan plan;
      PD_BENCH_CUDA(kc::PlanSelectLaunch(p, &plan, nullptr));
      DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
      const double t = Median(TimeMs([&](int i) {
        p.queries = queries(i);
        PD_BENCH_CUDA(kc::LaunchSelect(p, plan, ws.get(), 0));
      }, 1, opt.quick ? 3 : 7));
      // Exact variants must select what version 1 selects (query set 0; the
      // random scores have no ties at the boundary, up to rounding swaps).
      double agree = -1.0;
      if ((v.experiment & 11) == 0) {
        p.queries = queries(0);
        PD_BENCH_CUDA(kc::LaunchSelect(p, plan, ws.get(), 0));
        PD_BENCH_CUDA(cudaDeviceSynchronize());
        std::vector<int32_t> rows = out.Download();
        if (v.version == 1) {
          ref_rows = std::move(rows);
        } else if (!ref_rows.empty()) {
          agree = Recall(rows, ref_rows, Q, kTopk);
        }
      }
      PrintRow("experiment %-5s %3lldK x 8192q  %-16s %8.3f ms%s\n", mode.c_str(),
               (long long)(K / 1024), v.name, t,
               agree >= 0 ? (" | same keys as v1: " + std::to_string(agree)).c_str() : "");
      g_rows.push_back(Row()
                           .S("bench", "experiment")
                           .S("mode", mode)
                           .S("variant", v.name)
                           .N("keys", double(K))
                           .N("queries", double(Q))
                           .N("ms", t)
                           .N("agreement_with_v1", agree));
    }
  }
}

// One prefill selection (dense or MISA), launched twice (for ncu: skip one).
void ProfileCase(const std::string& mode, int64_t K, int64_t Q, int version, int experiment) {
  Caches cache(1, K, 4242);
  QuerySet qs(Q, 99);
  std::vector<int64_t> pos(static_cast<size_t>(Q));
  for (int64_t t = 0; t < Q; ++t) pos[size_t(t)] = K - Q + t;
  DeviceBuffer<int64_t> d_pos(pos);
  DeviceBuffer<int32_t> d_start(std::vector<int32_t>{0, int32_t(Q)});
  DeviceBuffer<int32_t> out(size_t(Q) * kTopk), active(size_t(Q) * 8);
  kc::IndexQueryBatch q;
  q.q8 = qs.q8.get();
  q.weights = qs.w.get();
  q.positions = d_pos.get();
  q.query_start = d_start.get();
  q.num_queries = Q;
  q.max_queries_per_seq = Q;
  q.max_context = K;
  kc::RouterParams router;
  router.keys = cache.Keys(0);
  router.queries = q;
  router.active = active.get();
  kc::SelectParams p;
  p.keys = cache.Keys(0);
  p.queries = q;
  p.rows_per_query = mode == "misa" ? 8 : kH;
  p.head_list = mode == "misa" ? active.get() : nullptr;
  p.kernel_version = version;
  p.experiment = experiment;
  p.out = out.get();
  kc::SelectPlan plan;
  PD_BENCH_CUDA(kc::PlanSelectLaunch(p, &plan, nullptr));
  DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
  for (int i = 0; i < 2; ++i) {
    if (mode == "misa") PD_BENCH_CUDA(kc::LaunchMisaRouter(router, 0));
    PD_BENCH_CUDA(kc::LaunchSelect(p, plan, ws.get(), 0));
  }
  PD_BENCH_CUDA(cudaDeviceSynchronize());
  std::printf("profile case %s K=%lld Q=%lld done\n", mode.c_str(), (long long)K, (long long)Q);
}

// One decode selection (new path, dense), B requests at K keys, launched
// twice (for ncu: skip one).
void ProfileDecode(int B, int64_t K) {
  Caches cache(B, K, 4243);
  QuerySet qs(B, 98);
  std::vector<int32_t> start(size_t(B) + 1);
  for (int b = 0; b <= B; ++b) start[size_t(b)] = b;
  DeviceBuffer<int64_t> d_pos(std::vector<int64_t>(size_t(B), K - 1));
  DeviceBuffer<int32_t> d_start(start), out(size_t(B) * kTopk);
  kc::SelectParams p;
  p.keys = cache.Keys(0);
  p.queries.q8 = qs.q8.get();
  p.queries.weights = qs.w.get();
  p.queries.positions = d_pos.get();
  p.queries.query_start = d_start.get();
  p.queries.num_queries = B;
  p.queries.num_seqs = B;
  p.queries.max_queries_per_seq = 1;
  p.queries.max_context = K;
  p.out = out.get();
  kc::SelectPlan plan;
  PD_BENCH_CUDA(kc::PlanSelectLaunch(p, &plan, nullptr));
  DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
  for (int i = 0; i < 2; ++i) PD_BENCH_CUDA(kc::LaunchSelect(p, plan, ws.get(), 0));
  PD_BENCH_CUDA(cudaDeviceSynchronize());
  std::printf("profile decode B=%d K=%lld done (decode path %d)\n", B, (long long)K,
              int(plan.decode.enabled));
}

}  // namespace
}  // namespace pd::bench

int main(int argc, char** argv) {
  using namespace pd::bench;
  Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) {
      opt.json = argv[++i];
    } else if (a == "--quick") {
      opt.quick = true;
    } else if (a == "--prefill-only") {
      opt.decode = false;
    } else if (a == "--decode-only") {
      opt.prefill = false;
    } else if (a == "--case" && i + 3 < argc) {
      const std::string mode = argv[i + 1];
      const int version = i + 4 < argc ? std::atoi(argv[i + 4]) : 2;
      const int experiment = i + 5 < argc ? std::atoi(argv[i + 5]) : 0;
      ProfileCase(mode, std::atoll(argv[i + 2]), std::atoll(argv[i + 3]), version, experiment);
      return 0;
    } else if (a == "--decode-case" && i + 2 < argc) {
      ProfileDecode(std::atoi(argv[i + 1]), std::atoll(argv[i + 2]));
      return 0;
    } else if (a == "--experiments") {
      opt.experiments = true;
    } else {
      std::fprintf(stderr, "usage: %s [--json PATH] [--quick] [--prefill-only|--decode-only]\n"
                   "       %s --case dense|misa KEYS QUERIES [VERSION [EXPERIMENT]]   (one selection, twice: for ncu)\n"
                   "       %s --decode-case BATCH KEYS   (one decode selection, twice: for ncu)\n"
                   "       --experiments: also time the kernel variants (SelectParams::experiment)\n",
                   argv[0], argv[0], argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop{};
  PD_BENCH_CUDA(cudaGetDeviceProperties(&prop, 0));
  g_meta["device"] = prop.name;
  g_meta["sms"] = std::to_string(prop.multiProcessorCount);
  g_meta["l2_bytes"] = std::to_string(prop.l2CacheSize);
  g_meta["command"] = argv[0];
  const double bw = CopyBandwidthGBs();
  g_meta["copy_gbps"] = std::to_string(bw);
  std::printf("device %s, %d SMs, L2 %d MB, d2d copy %.0f GB/s (read + write)\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, bw);
  if (opt.experiments) {
    std::printf("\n== kernel variants (selection launch alone) ==\n");
    Experiments(opt);
  }
  if (opt.prefill) {
    std::printf("\n== prefill selection, H=64 D=128 top-2048 (anchor: DeepGEMM FP8 indexer + radix top-k, H200) ==\n");
    const int64_t Ks[] = {8192, 32768, 65536, 131072};
    const double anchors[] = {0.90, 4.90, 10.08, 20.44};
    for (int i = 0; i < 4; ++i) {
      if (opt.quick && i == 3) break;
      Prefill(Ks[i], 8192, false, anchors[i], opt, i == 1);
    }
    Prefill(65536, 1024, true, 1.34, opt, false);
  }
  if (opt.decode) {
    std::printf("\n== decode selection, one query per request, top-2048 (anchor: H200, 128K) ==\n");
    for (int64_t K : {int64_t(32768), int64_t(131072)}) {
      for (int B : {1, 32, 128}) {
        double anchor = -1;
        if (K == 131072) anchor = B == 1 ? 69 : (B == 32 ? 216 : 659);
        Decode(B, K, anchor, opt);
      }
    }
  }
  if (!WriteJson(opt.json, g_meta, g_rows)) {
    std::fprintf(stderr, "cannot write %s\n", opt.json.c_str());
    return 1;
  }
  std::printf("wrote %s\n", opt.json.c_str());
  return 0;
}
