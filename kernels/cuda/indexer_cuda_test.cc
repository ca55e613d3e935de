// GPU tests of the CUDA indexer kernels against the CPU reference backend
// (kernels/indexer.h) on random inputs of odd sizes: partial pages and blocks,
// contexts shorter than top-k, batches of sequences, forced key splits, both
// MMA paths. Needs a Hopper GPU (CTest label "gpu").
//
// Selections are compared as sets with the CPU scores as the judge: the GPU's
// FP8 tensor cores sum in another order than the CPU's fma chain, so two keys
// whose scores differ by less than the rounding can trade places at the top-k
// boundary. Every key in the symmetric difference must score within `tol` of the
// CPU's k-th score, and such keys must be rare; everything else is exact.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/cuda/device_buffer.h"
#include "kernels/cuda/indexer_cuda.h"
#include "kernels/indexer.h"
#include "kernels/kv_layout.h"
#include "kernels/numeric.h"
#include "kernels/ops.h"
#include "kernels/cuda/testing/gpu_test_util.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels::cuda {
namespace {

constexpr int kH = 64;
constexpr int kD = 128;


cpu::ThreadPool* Pool() {
  static cpu::ThreadPool pool(0);
  return &pool;
}

// FP8 quantisation of one vector with a ue8m0 scale (the indexer's format).
float Quantize(const float* x, int n, uint8_t* q) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = Fp8Scale(amax, true);
  for (int i = 0; i < n; ++i) q[i] = FloatToFp8E4M3(x[i] / s);
  return s;
}

// A batch of sequences sharing one key pool (pages in random order, unused
// slots filled with random bytes, NaN codes included).
struct HostBatch {
  KvLayout layout;
  std::vector<int64_t> lens;
  std::vector<uint8_t> pool;
  int64_t pt_stride = 0, sum_stride = 0;
  std::vector<int32_t> page_table;  // [S, pt_stride]
  std::vector<float> sums;          // [S, sum_stride, D]

  IndexKeyCacheView View(int s) const {
    IndexKeyCacheView v;
    v.pool = pool.data();
    v.page_table = page_table.data() + s * pt_stride;
    v.num_tokens = lens[size_t(s)];
    v.summary_sums = sums.data() + s * sum_stride * kD;
    v.layout = layout;
    return v;
  }
};

HostBatch MakeBatch(std::mt19937& rng, const std::vector<int64_t>& lens, int summary_block) {
  HostBatch b;
  b.layout.summary_block = summary_block;
  b.lens = lens;
  int64_t pages = 3;  // spare pages nobody uses
  for (int64_t n : lens) {
    pages += NumPages(n);
    b.pt_stride = std::max(b.pt_stride, NumPages(n));
    b.sum_stride = std::max(b.sum_stride, CeilDiv(n, summary_block));
  }
  b.pt_stride = std::max<int64_t>(b.pt_stride, 1);
  b.sum_stride = std::max<int64_t>(b.sum_stride, 1);
  b.pool.resize(size_t(pages) * b.layout.IndexPageBytes());
  for (auto& x : b.pool) x = uint8_t(rng());
  std::vector<int32_t> ids(static_cast<size_t>(pages));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), rng);
  b.page_table.assign(lens.size() * size_t(b.pt_stride), -1);
  b.sums.assign(lens.size() * size_t(b.sum_stride) * kD, 0.0f);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  size_t next = 0;
  std::vector<float> x(kD);
  std::vector<uint8_t> q(kD);
  for (size_t s = 0; s < lens.size(); ++s) {
    for (int64_t p = 0; p < NumPages(lens[s]); ++p) b.page_table[s * b.pt_stride + p] = ids[next++];
    // Keys with a slowly drifting mean so that block summaries differ.
    std::vector<float> drift(kD);
    for (auto& d : drift) d = 0.3f * nd(rng);
    for (int64_t t = 0; t < lens[s]; ++t) {
      if (t % 512 == 0) for (auto& d : drift) d = 0.7f * d + 0.3f * nd(rng);
      for (int i = 0; i < kD; ++i) x[i] = nd(rng) + drift[size_t(i)];
      const float scale = Quantize(x.data(), kD, q.data());
      uint8_t* page = b.pool.data() +
                      size_t(b.page_table[s * b.pt_stride + t / kPageTokens]) * b.layout.IndexPageBytes();
      std::memcpy(page + b.layout.IndexValueOffset(int(t % kPageTokens)), q.data(), kD);
      std::memcpy(page + b.layout.IndexScaleOffset(int(t % kPageTokens)), &scale, 4);
    }
    IndexKeyCacheRef ref;
    ref.pool = b.pool.data();
    ref.page_table = b.page_table.data() + s * b.pt_stride;
    ref.summary_sums = b.sums.data() + s * b.sum_stride * kD;
    ref.layout = b.layout;
    cpu::UpdateSummaries(ref, 0, lens[s]);
  }
  return b;
}

struct HostQueries {
  std::vector<uint8_t> q8;        // [T, H, D]
  std::vector<float> w;           // [T, H]
  std::vector<int64_t> pos;       // [T]
  std::vector<int32_t> start;     // [S + 1]
};

// Queries of sequence s at the given positions.
HostQueries MakeQueries(std::mt19937& rng, const std::vector<std::vector<int64_t>>& positions) {
  HostQueries hq;
  std::normal_distribution<float> nd(0.0f, 1.0f);
  hq.start.push_back(0);
  std::vector<float> x(kD);
  for (const auto& ps : positions) {
    for (int64_t p : ps) {
      hq.pos.push_back(p);
      for (int j = 0; j < kH; ++j) {
        for (auto& v : x) v = nd(rng);
        hq.q8.resize(hq.q8.size() + kD);
        const float s = Quantize(x.data(), kD, hq.q8.data() + hq.q8.size() - kD);
        hq.w.push_back(nd(rng) * s * 0.125f);
      }
    }
    hq.start.push_back(int32_t(hq.pos.size()));
  }
  return hq;
}

// Device copies of a batch and its queries.
struct DeviceBatch {
  DeviceBuffer<uint8_t> pool;
  DeviceBuffer<int32_t> page_table;
  DeviceBuffer<int64_t> lens;
  DeviceBuffer<float> sums;
  DeviceBuffer<uint8_t> q8;
  DeviceBuffer<float> w;
  DeviceBuffer<int64_t> pos;
  DeviceBuffer<int32_t> start;
  IndexKeyBatch keys;
  IndexQueryBatch queries;

  DeviceBatch(const HostBatch& b, const HostQueries& q)
      : pool(b.pool), page_table(b.page_table), lens(b.lens), sums(b.sums), q8(q.q8), w(q.w),
        pos(q.pos), start(q.start) {
    keys.pool = pool.get();
    keys.page_table = page_table.get();
    keys.page_table_stride = b.pt_stride;
    keys.num_tokens = lens.get();
    keys.summary_sums = sums.get();
    keys.summary_stride = b.sum_stride;
    keys.layout = b.layout;
    queries.q8 = q8.get();
    queries.weights = w.get();
    queries.positions = pos.get();
    queries.query_start = start.get();
    queries.num_queries = int64_t(q.pos.size());
    queries.num_seqs = int(b.lens.size());
    for (size_t s = 0; s + 1 < q.start.size(); ++s) {
      queries.max_queries_per_seq =
          std::max<int64_t>(queries.max_queries_per_seq, q.start[s + 1] - q.start[s]);
    }
    queries.max_context = *std::max_element(b.lens.begin(), b.lens.end());
  }
};

// Checks one GPU row against the CPU row; scores[s] are the CPU scores of keys
// 0..pos. Returns the number of boundary swaps.
int CheckRow(const int32_t* gpu, const int32_t* cpu_row, const std::vector<float>& scores,
             int64_t pos, int topk, bool sorted, const std::string& what, int valid = -1) {
  if (valid < 0) valid = int(std::min<int64_t>(topk, pos + 1));
  if (valid == 0) {
    for (int i = 0; i < topk; ++i) EXPECT_EQ(gpu[i], -1) << what << " slot " << i;
    return 0;
  }
  float smax = 0.0f;
  for (float s : scores) {
    if (!std::isnan(s)) smax = std::max(smax, std::fabs(s));
  }
  const float tol = 2e-3f * smax + 1e-30f;
  std::set<int32_t> g, c;
  for (int i = 0; i < topk; ++i) {
    if (i < valid) {
      EXPECT_GE(gpu[i], 0) << what << " slot " << i;
      EXPECT_LE(int64_t(gpu[i]), pos) << what << " slot " << i;
      if (gpu[i] < 0 || gpu[i] > pos) return valid;
      EXPECT_TRUE(g.insert(gpu[i]).second) << what << " duplicate index " << gpu[i];
      c.insert(cpu_row[i]);
    } else {
      EXPECT_EQ(gpu[i], -1) << what << " slot " << i << " past the " << valid << " valid";
    }
  }
  const float boundary = scores[size_t(cpu_row[valid - 1])];
  int swaps = 0;
  for (int32_t x : g) {
    if (c.count(x) == 0) {
      ++swaps;
      EXPECT_LE(std::fabs(scores[size_t(x)] - boundary), tol)
          << what << ": GPU picked " << x << " score " << scores[size_t(x)] << " boundary "
          << boundary;
    }
  }
  for (int32_t x : c) {
    if (g.count(x) == 0) {
      EXPECT_LE(std::fabs(scores[size_t(x)] - boundary), tol)
          << what << ": GPU missed " << x << " score " << scores[size_t(x)] << " boundary "
          << boundary;
    }
  }
  if (sorted) {
    for (int i = 0; i + 1 < valid; ++i) {
      EXPECT_GE(scores[size_t(gpu[i])], scores[size_t(gpu[i + 1])] - tol)
          << what << " order at slot " << i;
    }
  }
  return swaps;
}

struct SelectCase {
  std::vector<int64_t> lens;
  std::vector<std::vector<int64_t>> positions;
  int topk = 2048;
  bool misa = false;
  int h = 8;
  bool sorted = true;
  bool wgmma = true;
  int splits = 0;
  int summary_block = 1024;
  bool masked = false;  // MISA through the dense tile with unrouted weights zeroed
  int kernel_version = 2;
  int experiment = 0;   // SelectParams::experiment (8: double-buffered accumulators)
  // The case is meant to exercise threshold seeding: its key ranges per CTA
  // must be long enough (checked on the plan; auto-split ranges of a few
  // queries are too short to be seeded).
  bool expect_seeded = false;
  // Every head weight made negative: routed scores <= 0, the keys whose routed
  // dot products are all <= 0 tie at exactly 0 (ties broken by index).
  bool negative_weights = false;
  // Most boundary swaps allowed (-1: 0.5% of the selected keys); 0 where the
  // boundary is a tie of exact zeros, broken by lower index on both sides.
  int max_swaps = -1;
};

// Runs one selection case on the GPU (dense or MISA with the CPU's routed
// heads) and checks every row against cpu::SelectTokens; the GPU rows go to
// *rows when given.
void RunSelectCase(const SelectCase& sc, uint32_t seed, std::vector<int32_t>* rows = nullptr) {
  std::mt19937 rng(seed);
  const HostBatch hb = MakeBatch(rng, sc.lens, sc.summary_block);
  HostQueries hq = MakeQueries(rng, sc.positions);
  if (sc.negative_weights) {
    for (float& w : hq.w) w = -std::fabs(w);
  }
  DeviceBatch db(hb, hq);
  ASSERT_TRUE(db.pool.ok() && db.q8.ok());
  const int64_t T = int64_t(hq.pos.size());
  const int G = sc.misa ? sc.h : kH;

  SelectionConfig cfg;
  cfg.mode = sc.misa ? SelectionMode::kMisa : SelectionMode::kDense;
  cfg.topk = sc.topk;
  cfg.misa_heads = sc.h;
  cfg.misa_block = sc.summary_block;
  std::vector<int32_t> cpu_out(size_t(T) * sc.topk);
  std::vector<int32_t> heads(size_t(T) * G);
  for (size_t s = 0; s < sc.lens.size(); ++s) {
    const IndexKeyCacheView view = hb.View(int(s));
    IndexerQueries q;
    const int64_t t0 = hq.start[s];
    q.q8 = hq.q8.data() + t0 * kH * kD;
    q.weights = hq.w.data() + t0 * kH;
    q.positions = hq.pos.data() + t0;
    q.num_queries = hq.start[s + 1] - t0;
    cpu::SelectTokens(cfg, view, q, cpu_out.data() + t0 * sc.topk, Pool());
    for (int64_t t = t0; t < hq.start[s + 1]; ++t) {
      if (sc.misa) {
        std::vector<float> r(kH);
        cpu::MisaRouterScores(view, hq.q8.data() + t * kH * kD, hq.w.data() + t * kH, kH,
                              hq.pos[size_t(t)], r.data());
        cpu::MisaActiveHeads(r.data(), kH, sc.h, heads.data() + t * G);
      } else {
        std::iota(heads.begin() + t * G, heads.begin() + (t + 1) * G, 0);
      }
    }
  }

  DeviceBuffer<int32_t> d_heads(heads);
  DeviceBuffer<int32_t> d_out(size_t(T) * sc.topk);
  cudaMemset(d_out.get(), 0x5a, d_out.bytes());  // poison
  SelectParams p;
  p.keys = db.keys;
  p.queries = db.queries;
  p.heads = kH;
  p.rows_per_query = sc.masked ? kH : G;
  p.head_list = sc.misa ? d_heads.get() : nullptr;
  p.masked_heads = sc.masked ? G : 0;
  p.topk = sc.topk;
  p.sorted = sc.sorted;
  p.num_splits = sc.splits;
  p.use_wgmma = sc.wgmma;
  p.kernel_version = sc.kernel_version;
  p.experiment = sc.experiment;
  p.out = d_out.get();
  SelectPlan plan;
  const char* why = nullptr;
  ASSERT_CUDA(PlanSelectLaunch(p, &plan, &why));
  if (sc.expect_seeded) {
    // The conditions under which LaunchSelect seeds (select.cu), and a range
    // per CTA of at least SelectSeedMinKeys(k) keys.
    ASSERT_TRUE((p.rows_per_query < 64 || plan.rows_per_cta == kSelectRows) &&
                p.key_list == nullptr && p.topk <= kSelectMaxTopk &&
                (p.experiment & (4 | 8 | 16)) == 0 && p.kernel_version != 1);
    ASSERT_GE(std::min<int64_t>(plan.keys_per_split, db.queries.max_context),
              SelectSeedMinKeys(p.topk));
  }
  ASSERT_TRUE(plan.decode.enabled == (sc.kernel_version == 3));  // 3: the decode path
  DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
  ASSERT_TRUE(ws.ok());
  ASSERT_CUDA(LaunchSelect(p, plan, ws.get(), 0, &why));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<int32_t> gpu = d_out.Download();

  int swaps = 0, total = 0;
  for (size_t s = 0; s < sc.lens.size(); ++s) {
    const IndexKeyCacheView view = hb.View(int(s));
    for (int64_t t = hq.start[s]; t < hq.start[s + 1]; ++t) {
      const int64_t pos = hq.pos[size_t(t)];
      std::vector<float> scores(size_t(pos + 1));
      cpu::RoutedScores(view, hq.q8.data() + t * kH * kD, hq.w.data() + t * kH,
                        heads.data() + t * G, G, nullptr, pos + 1, scores.data());
      const std::string what = "seq " + std::to_string(s) + " query " + std::to_string(t) +
                               " pos " + std::to_string(pos) + " splits " +
                               std::to_string(plan.splits);
      swaps += CheckRow(gpu.data() + t * sc.topk, cpu_out.data() + t * sc.topk, scores, pos,
                        sc.topk, sc.sorted, what);
      total += int(std::min<int64_t>(sc.topk, pos + 1));
    }
  }
  // Boundary swaps are rounding ties: at most 0.5% of the selected keys.
  EXPECT_LE(swaps * 200, std::max(total, 200)) << swaps << " swaps of " << total;
  if (sc.max_swaps >= 0) {
    EXPECT_LE(swaps, sc.max_swaps) << "ties must break by lower index";
  }
  if (rows != nullptr) *rows = gpu;
  std::printf("  %lld queries, %d selected, %d boundary swaps, splits %d\n", (long long)T, total,
              swaps, plan.splits);
}

std::vector<int64_t> Tail(int64_t n, int count) {
  std::vector<int64_t> v;
  for (int i = count; i >= 1; --i) {
    if (n - i >= 0) v.push_back(n - i);
  }
  return v;
}

TEST(CudaSelect, DensePrefillOddSizesSorted) {
  SKIP_WITHOUT_GPU();
  SelectCase c;
  c.lens = {5003};
  auto pos = Tail(5003, 37);
  for (int64_t p : {0, 1, 63, 64, 127, 128, 1000, 2047, 2048, 2049, 3333}) pos.push_back(p);
  c.positions = {pos};
  RunSelectCase(c, 1);
}

TEST(CudaSelect, DensePrefillSmallTopkManyCompactions) {
  SKIP_WITHOUT_GPU();
  SelectCase c;
  c.lens = {12345};
  c.positions = {Tail(12345, 21)};
  c.topk = 300;
  c.sorted = false;
  RunSelectCase(c, 2);
}

TEST(CudaSelect, DenseMmaSyncFallbackMatches) {
  SKIP_WITHOUT_GPU();
  SelectCase c;
  c.lens = {4100};
  c.positions = {Tail(4100, 9)};
  c.wgmma = false;
  RunSelectCase(c, 3);
}

TEST(CudaSelect, DenseForcedSplitsMerge) {
  SKIP_WITHOUT_GPU();
  // 40 forced splits become 36 of 256 keys: the two-level merge (groups of 32).
  for (int splits : {2, 7, 40}) {
    SelectCase c;
    c.lens = {9001};
    c.positions = {Tail(9001, 5)};
    c.splits = splits;
    c.sorted = splits != 2;
    RunSelectCase(c, 4 + uint32_t(splits));
  }
}

TEST(CudaSelect, DenseDecodeBatchAutoSplits) {
  SKIP_WITHOUT_GPU();
  SelectCase c;
  c.lens = {1, 63, 64, 2049, 5000, 12345};
  c.positions = {{0}, {61, 62}, {63}, {2047, 2048}, {4999}, {12343, 12344}};
  RunSelectCase(c, 5);
}

TEST(CudaSelect, MisaRoutedHeadsPrefill) {
  SKIP_WITHOUT_GPU();
  for (int h : {8, 16}) {
    SelectCase c;
    c.misa = true;
    c.h = h;
    c.lens = {7777};
    auto pos = Tail(7777, 40);
    for (int64_t p : {5, 700, 2100, 5000}) pos.push_back(p);
    c.positions = {pos};
    c.summary_block = 1024;
    RunSelectCase(c, 10 + uint32_t(h));
  }
}

TEST(CudaSelect, MisaMaskedDenseTileDecode) {
  SKIP_WITHOUT_GPU();
  SelectCase c;
  c.misa = true;
  c.masked = true;
  c.lens = {300, 3000, 10001, 40000};
  c.positions = {{299}, {2999}, {10000}, {39999}};  // one query each: the 64-row tile
  RunSelectCase(c, 21);
  c.positions = {{299}, {2998, 2999}, {10000}, {39999}};  // 128-row tile
  RunSelectCase(c, 22);
}

TEST(CudaSelect, DenseSingleQueryDecodeBothMmaPaths) {
  SKIP_WITHOUT_GPU();
  for (bool wgmma : {true, false}) {
    SelectCase c;
    c.lens = {1, 100, 2048, 5000, 20000, 3000};
    c.positions = {{0}, {99}, {2047}, {4999}, {19999}, {1500}};
    c.wgmma = wgmma;
    c.sorted = wgmma;
    RunSelectCase(c, 23 + uint32_t(wgmma));
  }
}

TEST(CudaSelect, MisaDecodeBatchSmallBlocks) {
  SKIP_WITHOUT_GPU();
  SelectCase c;
  c.misa = true;
  c.lens = {300, 3000, 10001};
  c.positions = {{299}, {2998, 2999}, {10000}};
  c.summary_block = 256;
  c.sorted = false;
  RunSelectCase(c, 20);
}

TEST(CudaSelect, KernelV1WgmmaStillMatches) {
  SKIP_WITHOUT_GPU();
  for (bool misa : {false, true}) {
    SelectCase c;
    c.misa = misa;
    c.lens = {6001};
    c.positions = {Tail(6001, 19)};
    c.kernel_version = 1;
    c.sorted = misa;
    RunSelectCase(c, 31 + uint32_t(misa));
  }
}

TEST(CudaSelect, KernelV2DoubleBufferedVariantMatches) {
  SKIP_WITHOUT_GPU();
  for (bool misa : {false, true}) {
    SelectCase c;
    c.misa = misa;
    c.lens = {7001};
    auto pos = Tail(7001, 21);
    for (int64_t p : {0, 2047, 5000}) pos.push_back(p);
    c.positions = {pos};
    c.experiment = 8;
    c.sorted = !misa;
    c.topk = misa ? 700 : 2048;
    RunSelectCase(c, 35 + uint32_t(misa));
  }
}

// Threshold seeding (version 2, contiguous keys, fewer than 64 rows per
// query, or 64 in the 128-row tile: dense prefill, since round 5): CTAs whose
// key range holds at least SelectSeedMinKeys(k) keys first score every
// kSelectSampleStride-th key and start from a seeded threshold. Long contexts
// (seeded CTAs) and early queries (unseeded ones) in one launch, MISA and
// dense (sample tops of one and of two lanes per query), with and without a
// forced split (seeded split ranges, then the merge), against
// cpu::SelectTokens.
TEST(CudaSelect, SeededThresholdsLongContext) {
  SKIP_WITHOUT_GPU();
  for (bool misa : {false, true}) {
    SelectCase c;
    c.misa = misa;
    c.lens = {20011};
    auto pos = Tail(20011, misa ? 37 : 9);
    for (int64_t p : {100, 2047, 8190, 8191, 8192, 12000, 16385}) pos.push_back(p);
    c.positions = {pos};
    c.sorted = !misa;
    c.splits = 1;  // one range (auto would split 20K keys 32 ways for these few queries)
    c.expect_seeded = true;
    RunSelectCase(c, 41 + uint32_t(misa));
    c.splits = 2;  // two ranges of 10,112 keys (>= 8192: both seeded)
    c.sorted = misa;
    RunSelectCase(c, 43 + uint32_t(misa));
  }
}

// Experiment bit 5 seeds from a rank that too few keys beat (k / 64 of the
// sample, about k / 4 keys of the range), so every seeded query must take the
// exact rescan; bit 4 turns seeding off. Both must give the exact selection,
// as must a small top-k (k = 300: seeded from rank 41 of the sample, whose
// margin still leaves some queries to the rescan). MISA and dense (two lanes
// per query) alike.
TEST(CudaSelect, SeededFallbackRescanAndNoSeeding) {
  SKIP_WITHOUT_GPU();
  for (int experiment : {32, 16}) {
    for (bool misa : {false, true}) {
      SelectCase c;
      c.misa = misa;
      c.lens = {17003};
      auto pos = Tail(17003, misa ? 21 : 5);
      for (int64_t p : {9000, 13001}) pos.push_back(p);
      c.positions = {pos};
      c.experiment = experiment;
      c.sorted = false;
      c.splits = 1;
      c.expect_seeded = experiment == 32;
      RunSelectCase(c, 50 + uint32_t(experiment) + uint32_t(misa));
    }
  }
  SelectCase c;
  c.misa = true;
  c.lens = {30000};
  c.positions = {Tail(30000, 48)};
  c.topk = 300;
  c.sorted = false;
  c.splits = 1;
  c.expect_seeded = true;
  RunSelectCase(c, 47);
}

// A small seeded MISA case (also the sanitizers' case for the seeded paths):
// k = 256 over 9000 keys, seeded and with every seeded query rescanned.
TEST(CudaSelect, SeededSmallTopkMisa) {
  SKIP_WITHOUT_GPU();
  for (int experiment : {0, 32}) {
    SelectCase c;
    c.misa = true;
    c.lens = {9000};
    auto pos = Tail(9000, 17);
    for (int64_t p : {1500, 4000, 6000}) pos.push_back(p);
    c.positions = {pos};
    c.topk = 256;
    c.sorted = experiment == 0;
    c.experiment = experiment;
    c.splits = 1;
    c.expect_seeded = true;
    RunSelectCase(c, 60 + uint32_t(experiment));
  }
}

// Seeding with 16 and 32 routed heads: 2 and 1 queries per lane, so the
// sample tops and the union of a query's lanes are laid out differently than
// with 8 (select_kernel_v2.cuh); 8 and 4 queries per CTA.
TEST(CudaSelect, SeededRoutedHeads16And32) {
  SKIP_WITHOUT_GPU();
  for (int h : {16, 32}) {
    SelectCase c;
    c.misa = true;
    c.h = h;
    c.lens = {19001};
    auto pos = Tail(19001, h == 16 ? 13 : 7);
    for (int64_t p : {4000, 9000, 18000}) pos.push_back(p);
    c.positions = {pos};
    c.sorted = h == 16;
    c.splits = 1;
    c.expect_seeded = true;
    RunSelectCase(c, 70 + uint32_t(h));
  }
}

// Negative routed scores (every weight < 0): the seeds are negative scores
// (ordered score bits below the sign bit's), and the keys whose routed dot
// products are all <= 0 tie at 0 at the top. Seeded, then every seeded query
// rescanned (bit 5).
TEST(CudaSelect, SeededNegativeScores) {
  SKIP_WITHOUT_GPU();
  for (int experiment : {0, 32}) {
    SelectCase c;
    c.misa = true;
    c.lens = {16007};
    auto pos = Tail(16007, 19);
    pos.push_back(9500);
    c.positions = {pos};
    c.negative_weights = true;
    c.experiment = experiment;
    c.sorted = experiment == 0;
    c.splits = 1;
    c.expect_seeded = true;
    RunSelectCase(c, 80 + uint32_t(experiment));
  }
}

// Experiment bit 6: round 4's branch around a score slot's store code (the
// default since round 5 is branch-free), seeded MISA and seeded dense; and
// kernel_version 0 (the default: version 2 with wgmma) on the dense prefill
// tile.
TEST(CudaSelect, SlotLoopVariantAndDefaultVersion) {
  SKIP_WITHOUT_GPU();
  for (bool misa : {true, false}) {
    SelectCase c;
    c.misa = misa;
    c.lens = {12007};
    auto pos = Tail(12007, misa ? 29 : 5);
    for (int64_t p : {3000, 9000}) pos.push_back(p);
    c.positions = {pos};
    c.experiment = 64;
    c.sorted = false;
    c.splits = 1;
    c.expect_seeded = true;
    RunSelectCase(c, 90 + uint32_t(misa));
  }
  SelectCase c;
  c.lens = {6007};
  c.positions = {Tail(6007, 11)};
  c.kernel_version = 0;
  RunSelectCase(c, 92);
}

// The final selection of each query: one warp per query (the default with
// fewer than 64 rows per query, round 5) and the whole CTA one query at a
// time (experiment bit 7, round 4's), each on unsorted rows, sorted rows and
// split lists (then the merge), seeded and with every seeded query rescanned
// (bit 5: the seed-bound check of both paths), with 8, 16 and 32 routed heads
// (2, 1 and 1/2 queries per warp). Short queries (fewer visible keys than k)
// take all of their keys. Bit 11: the per-warp selection's first window from a
// bound no key reaches (round 7: every query restarts from its list's range).
TEST(CudaSelect, FinalSelectionPerWarpAndCtaWide) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 100;
  for (int experiment : {0, 32, 128, 128 | 32, 2048, 2048 | 32}) {
    for (int h : {8, 16, 32}) {
      SelectCase c;
      c.misa = true;
      c.h = h;
      c.lens = {18013};
      auto pos = Tail(18013, h == 8 ? 35 : 11);
      for (int64_t p : {700, 2047, 2048, 9001}) pos.push_back(p);
      c.positions = {pos};
      c.experiment = experiment;
      c.topk = h == 16 ? 1000 : 2048;
      c.sorted = h == 16;
      c.splits = h == 32 ? 2 : 1;  // two ranges of 9,088 keys (both seeded), then the merge
      c.expect_seeded = true;
      RunSelectCase(c, seed++);
    }
  }
}

// The barrier schedules of the single-accumulator kernel: the default since
// round 5 (each warpgroup synchronises with itself, the CTA every 4 stages;
// compactions then, partitions flagged 64 keys early) and experiment bit 8 (a
// CTA-wide barrier at every stage): dense with a small top-k over one long
// range (seeded; and unseeded, bit 4: many compactions), seeded MISA, and
// MISA with every seeded query rescanned (bit 5).
TEST(CudaSelect, BarrierSchedules) {
  SKIP_WITHOUT_GPU();
  for (int experiment : {0, 16, 256, 256 | 16}) {
    SelectCase c;
    c.lens = {12345};
    c.positions = {Tail(12345, 5)};
    c.topk = 300;
    c.sorted = false;
    c.splits = 1;
    c.experiment = experiment;
    c.expect_seeded = (experiment & 16) == 0;
    RunSelectCase(c, 120 + uint32_t(experiment));
  }
  for (int experiment : {0, 32, 256, 256 | 32}) {
    SelectCase c;
    c.misa = true;
    c.lens = {15011};
    auto pos = Tail(15011, 27);
    for (int64_t p : {333, 5000, 12000}) pos.push_back(p);
    c.positions = {pos};
    c.experiment = experiment;
    c.sorted = (experiment & 32) == 0;
    c.splits = 1;
    c.expect_seeded = true;
    RunSelectCase(c, 130 + uint32_t(experiment));
  }
}

// Round 6: the full pass over contiguous keys copies its stages with cp.async
// in every thread (the default), or loads them by TMA (experiment bit 512:
// one producer lane per warpgroup, full / empty mbarriers), or by TMA with the
// half-tile schedule (bit 1024: two N = 64 MMAs, the epilogue starts on the
// first half). All must select exactly the same keys (the scores are the same
// bits): dense (two queries
// per CTA, seeded; one 64-head query per CTA; small top-k with many
// compactions), MISA with 8 / 16 / 32 routed heads, forced splits (ranges
// ending inside a page, the last stage with one live page), every seeded query
// rescanned (bit 5: a second TMA pass after the final selection reused the
// stages), the CTA barrier at every stage (bit 8), no seeding (bit 4).
TEST(CudaSelect, TmaStagesMatchCpAsyncStages) {
  SKIP_WITHOUT_GPU();
  struct V {
    bool misa;
    int h, topk, splits, experiment;
    int64_t len;
    int tail;
    bool sorted;
  };
  const V vs[] = {{false, 8, 2048, 1, 0, 13001, 6, true},
                  {false, 8, 300, 1, 16, 9037, 3, true},
                  {false, 8, 2048, 3, 0, 7001, 1, true},
                  {true, 8, 2048, 1, 0, 15011, 21, true},
                  {true, 8, 2048, 1, 32, 15011, 21, true},
                  {true, 8, 2048, 1, 256, 10001, 17, true},
                  {true, 16, 1000, 2, 0, 12345, 13, true},
                  {true, 32, 2048, 3, 32, 17077, 9, true},
                  {true, 8, 512, 5, 0, 4099, 40, true}};
  uint32_t seed = 200;
  for (const V& v : vs) {
    std::vector<int32_t> rows[3];
    for (int variant = 0; variant < 3; ++variant) {
      SelectCase c;
      c.misa = v.misa;
      c.h = v.h;
      c.lens = {v.len};
      auto pos = Tail(v.len, v.tail);
      for (int64_t p : {int64_t(63), int64_t(64), int64_t(1500), v.len / 2 + 1}) pos.push_back(p);
      c.positions = {pos};
      c.topk = v.topk;
      c.sorted = v.sorted;
      c.splits = v.splits;
      c.experiment = v.experiment | (variant == 1 ? 512 : (variant == 2 ? 1024 : 0));
      RunSelectCase(c, seed, &rows[variant]);
    }
    for (int variant = 1; variant < 3; ++variant) {
      ASSERT_EQ(rows[0].size(), rows[variant].size());
      int diff = 0;
      for (size_t i = 0; i < rows[0].size(); ++i) diff += rows[0][i] != rows[variant][i] ? 1 : 0;
      EXPECT_EQ(diff, 0) << "cp.async stages vs " << (variant == 1 ? "TMA" : "TMA half tiles")
                         << ", case " << (seed - 200);
    }
    ++seed;
  }
  // One 64-head query per sequence (the 64-row tile), sequences of odd sizes.
  for (int experiment : {0, 512, 1024}) {
    SelectCase c;
    c.lens = {5001, 130, 9999};
    c.positions = {{5000}, {129}, {9998}};
    c.sorted = true;
    c.experiment = experiment;
    RunSelectCase(c, 250 + uint32_t(experiment));
  }
}

TEST(CudaSelect, MisaLargeTopkBigLists) {
  SKIP_WITHOUT_GPU();
  // topk > 2048: the version-2 kernel with 16384-entry lists (MISA-dagger's
  // stage 1), unsorted, one split; contexts shorter and longer than topk.
  SelectCase c;
  c.misa = true;
  c.lens = {21000};
  auto pos = Tail(21000, 23);
  for (int64_t p : {3, 4000, 8191, 8192, 12000}) pos.push_back(p);
  c.positions = {pos};
  c.topk = 8192;
  c.sorted = false;
  RunSelectCase(c, 33);
  c.topk = 3001;
  c.h = 16;
  RunSelectCase(c, 34);
}

// Dense (all-head) scores of keys 0..pos and the routed scores of `heads`.
std::vector<float> Scores(const HostBatch& hb, int s, const HostQueries& hq, int64_t t,
                          const int32_t* heads, int G) {
  const int64_t pos = hq.pos[size_t(t)];
  std::vector<float> out(size_t(pos + 1));
  cpu::RoutedScores(hb.View(s), hq.q8.data() + t * kH * kD, hq.w.data() + t * kH, heads, G,
                    nullptr, pos + 1, out.data());
  return out;
}

float MaxAbs(const std::vector<float>& v) {
  float m = 0.0f;
  for (float x : v) {
    if (!std::isnan(x)) m = std::max(m, std::fabs(x));
  }
  return m;
}

// Checks a two-stage GPU row against the CPU row. f: exact DSA scores of keys
// 0..pos; f_tol: the rounding tolerance. stage1_edge(x): key x sits on the
// first stage's boundary (its stage-1 score is within rounding of the cut), so
// the GPU may have kept or dropped it. Accepted differences: keys within f_tol
// of the k-th score; stage-1 edge keys; CPU keys displaced by a stage-1 edge key
// the GPU kept that scores no lower. Returns the number of differences.
template <class Edge>
int CheckTwoStageRow(const int32_t* gpu, const int32_t* cpu_row, const std::vector<float>& f,
                     float f_tol, int64_t pos, int topk, bool sorted, Edge&& stage1_edge,
                     const std::string& what) {
  int valid = 0;
  while (valid < topk && cpu_row[valid] >= 0) ++valid;
  std::set<int32_t> g, c(cpu_row, cpu_row + valid);
  for (int i = 0; i < topk; ++i) {
    if (gpu[i] < 0) {
      EXPECT_EQ(gpu[i], -1) << what << " slot " << i;
      for (int j = i; j < topk; ++j) EXPECT_EQ(gpu[j], -1) << what << " slot " << j;
      break;
    }
    EXPECT_LE(int64_t(gpu[i]), pos) << what;
    if (int64_t(gpu[i]) > pos) return 1;
    EXPECT_TRUE(g.insert(gpu[i]).second) << what << " duplicate " << gpu[i];
  }
  EXPECT_EQ(g.size(), c.size()) << what << " count";
  if (valid == 0) return 0;
  const float fb = f[size_t(cpu_row[valid - 1])];
  float best_edge_kept = -INFINITY;
  int diffs = 0;
  for (int32_t x : g) {
    if (c.count(x)) continue;
    ++diffs;
    const bool edge = stage1_edge(x);
    if (edge) best_edge_kept = std::max(best_edge_kept, f[size_t(x)]);
    EXPECT_TRUE(edge || std::fabs(f[size_t(x)] - fb) <= f_tol)
        << what << ": GPU picked " << x << " score " << f[size_t(x)] << " boundary " << fb;
  }
  for (int32_t y : c) {
    if (g.count(y)) continue;
    const bool ok = std::fabs(f[size_t(y)] - fb) <= f_tol || stage1_edge(y) ||
                    f[size_t(y)] <= best_edge_kept + f_tol;
    EXPECT_TRUE(ok) << what << ": GPU missed " << y << " score " << f[size_t(y)] << " boundary "
                    << fb;
  }
  if (sorted) {
    for (size_t i = 0; i + 1 < g.size(); ++i) {
      EXPECT_GE(f[size_t(gpu[i])], f[size_t(gpu[i + 1])] - f_tol) << what << " order at " << i;
    }
  }
  return diffs;
}

struct TwoStageCase {
  TwoStageMode mode = TwoStageMode::kMisaDagger;
  std::vector<int64_t> lens;
  std::vector<std::vector<int64_t>> positions;
  int topk = 2048;
  bool sorted = false;
  int h = 8;
  int candidates = 8192;
  int hisa_block = 128;
  int hisa_keep = 64;
};

void RunTwoStageCase(const TwoStageCase& tc, uint32_t seed) {
  std::mt19937 rng(seed);
  const HostBatch hb = MakeBatch(rng, tc.lens, 1024);
  const HostQueries hq = MakeQueries(rng, tc.positions);
  DeviceBatch db(hb, hq);
  ASSERT_TRUE(db.pool.ok() && db.q8.ok());
  const int64_t T = int64_t(hq.pos.size());
  const bool dagger = tc.mode == TwoStageMode::kMisaDagger;
  SelectionConfig cfg;
  cfg.mode = dagger ? SelectionMode::kMisaDagger : SelectionMode::kHisa;
  cfg.topk = tc.topk;
  cfg.misa_heads = tc.h;
  cfg.dagger_candidates = tc.candidates;
  cfg.hisa_block = tc.hisa_block;
  cfg.hisa_topk_blocks = tc.hisa_keep;
  std::vector<int32_t> cpu_out(size_t(T) * tc.topk);
  std::vector<int32_t> routed(size_t(T) * tc.h);
  for (size_t s = 0; s < tc.lens.size(); ++s) {
    const IndexKeyCacheView view = hb.View(int(s));
    IndexerQueries q;
    const int64_t t0 = hq.start[s];
    q.q8 = hq.q8.data() + t0 * kH * kD;
    q.weights = hq.w.data() + t0 * kH;
    q.positions = hq.pos.data() + t0;
    q.num_queries = hq.start[s + 1] - t0;
    cpu::SelectTokens(cfg, view, q, cpu_out.data() + t0 * tc.topk, Pool());
    for (int64_t t = t0; t < hq.start[s + 1]; ++t) {
      std::vector<float> r(kH);
      cpu::MisaRouterScores(view, hq.q8.data() + t * kH * kD, hq.w.data() + t * kH, kH,
                            hq.pos[size_t(t)], r.data());
      cpu::MisaActiveHeads(r.data(), kH, tc.h, routed.data() + t * tc.h);
    }
  }
  DeviceBuffer<int32_t> d_routed(routed);
  DeviceBuffer<int32_t> d_out(size_t(T) * tc.topk);
  cudaMemset(d_out.get(), 0x5a, d_out.bytes());
  TwoStageParams p;
  p.mode = tc.mode;
  p.keys = db.keys;
  p.queries = db.queries;
  p.topk = tc.topk;
  p.sorted = tc.sorted;
  p.misa_heads = tc.h;
  p.head_list = d_routed.get();
  p.dagger_candidates = tc.candidates;
  p.hisa_block = tc.hisa_block;
  p.hisa_topk_blocks = tc.hisa_keep;
  p.out = d_out.get();
  TwoStagePlan plan;
  const char* why = nullptr;
  ASSERT_CUDA(PlanTwoStageLaunch(p, &plan, &why));
  DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
  ASSERT_TRUE(ws.ok());
  ASSERT_CUDA(LaunchTwoStage(p, plan, ws.get(), 0, &why));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const std::vector<int32_t> gpu = d_out.Download();

  std::vector<int32_t> all(kH);
  std::iota(all.begin(), all.end(), 0);
  int diffs = 0, total = 0;
  for (size_t s = 0; s < tc.lens.size(); ++s) {
    // HISA block scores in double (the judge of the block boundary).
    KvLayout bl = hb.layout;
    bl.summary_block = tc.hisa_block;
    std::vector<float> bsums(size_t(CeilDiv(hb.lens[s], tc.hisa_block)) * kD);
    if (!dagger) {
      IndexKeyCacheRef ref;
      ref.pool = const_cast<uint8_t*>(hb.pool.data());
      ref.page_table = hb.page_table.data() + s * hb.pt_stride;
      ref.summary_sums = bsums.data();
      ref.layout = bl;
      cpu::UpdateSummaries(ref, 0, hb.lens[s]);
    }
    for (int64_t t = hq.start[s]; t < hq.start[s + 1]; ++t) {
      const int64_t pos = hq.pos[size_t(t)];
      const std::vector<float> f = Scores(hb, int(s), hq, t, all.data(), kH);
      const float f_tol = 2e-3f * MaxAbs(f) + 1e-30f;
      const std::string what = std::string(dagger ? "dagger" : "hisa") + " seq " +
                               std::to_string(s) + " query " + std::to_string(t) + " pos " +
                               std::to_string(pos);
      int d = 0;
      if (dagger) {
        const std::vector<float> r = Scores(hb, int(s), hq, t, routed.data() + t * tc.h, tc.h);
        std::vector<float> sr = r;
        std::sort(sr.begin(), sr.end(), std::greater<float>());
        const bool cut = int64_t(sr.size()) > tc.candidates;
        const float r_cut = cut ? sr[size_t(tc.candidates - 1)] : -INFINITY;
        const float r_tol = 2e-3f * MaxAbs(r) + 1e-30f;
        d = CheckTwoStageRow(gpu.data() + t * tc.topk, cpu_out.data() + t * tc.topk, f, f_tol, pos,
                             tc.topk, tc.sorted,
                             [&](int32_t x) { return cut && std::fabs(r[size_t(x)] - r_cut) <= r_tol; },
                             what);
      } else {
        const int64_t nvis = pos / tc.hisa_block + 1;
        std::vector<double> bs(static_cast<size_t>(nvis));
        double bmax = 0.0;
        for (int64_t b = 0; b < nvis; ++b) {
          const double cnt = double(BlockCount(hb.lens[s], b, tc.hisa_block));
          double acc = 0.0;
          for (int j = 0; j < kH; ++j) {
            double dot = 0.0;
            for (int e = 0; e < kD; ++e) {
              dot += double(Fp8E4M3ToFloat(hq.q8[size_t((t * kH + j) * kD + e)])) *
                     (double(bsums[size_t(b * kD + e)]) / cnt);
            }
            acc += double(hq.w[size_t(t * kH + j)]) * std::max(dot, 0.0);
          }
          bs[size_t(b)] = acc;
          bmax = std::max(bmax, std::fabs(acc));
        }
        std::vector<double> mid(bs.begin() + std::min<int64_t>(1, nvis),
                                bs.begin() + std::max<int64_t>(nvis - 1, std::min<int64_t>(1, nvis)));
        std::sort(mid.begin(), mid.end(), std::greater<double>());
        const int64_t extra = std::min<int64_t>(std::max(tc.hisa_keep - 2, 0), int64_t(mid.size()));
        const bool cut = extra < int64_t(mid.size());
        const double b_cut = cut && extra > 0 ? mid[size_t(extra - 1)] : (cut ? 1e300 : -1e300);
        const double b_next = cut ? mid[size_t(extra)] : -1e300;
        const double b_tol = 1e-4 * bmax;
        d = CheckTwoStageRow(gpu.data() + t * tc.topk, cpu_out.data() + t * tc.topk, f, f_tol, pos,
                             tc.topk, tc.sorted,
                             [&](int32_t x) {
                               const int64_t b = x / tc.hisa_block;
                               if (!cut || b == 0 || b == nvis - 1) return false;
                               return std::fabs(bs[size_t(b)] - b_cut) <= b_tol ||
                                      std::fabs(bs[size_t(b)] - b_next) <= b_tol;
                             },
                             what);
      }
      diffs += d;
      total += int(std::min<int64_t>(tc.topk, pos + 1));
    }
  }
  EXPECT_LE(diffs * 100, std::max(total, 100)) << diffs << " differences of " << total;
  std::printf("  %lld queries, %d selected, %d differences (rounding at a stage boundary)\n",
              (long long)T, total, diffs);
}

TEST(CudaTwoStage, MisaDaggerMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TwoStageCase c;
  c.lens = {25000, 3000};
  auto pos = Tail(25000, 13);
  for (int64_t p : {0, 100, 2047, 8191, 9000, 17000}) pos.push_back(p);
  c.positions = {pos, {2999, 1234}};
  RunTwoStageCase(c, 80);  // C = 8192: the big-list stage 1
  c.candidates = 1500;
  c.topk = 300;
  c.sorted = true;
  RunTwoStageCase(c, 81);  // C <= 2048: the regular stage 1
}

TEST(CudaTwoStage, HisaMatchesCpu) {
  SKIP_WITHOUT_GPU();
  TwoStageCase c;
  c.mode = TwoStageMode::kHisa;
  c.lens = {30000, 700};
  auto pos = Tail(30000, 11);
  for (int64_t p : {0, 127, 128, 500, 8191, 8300, 20000}) pos.push_back(p);
  c.positions = {pos, {699, 300}};
  RunTwoStageCase(c, 90);
  c.hisa_block = 100;
  c.hisa_keep = 7;
  c.topk = 333;
  c.sorted = true;
  RunTwoStageCase(c, 91);
  c.hisa_keep = 1;  // first and last blocks only
  RunTwoStageCase(c, 92);
}

// The HISA block filter gives the same key lists from precomputed bf16 means
// (LaunchBlockMeansBf16) as from the block sums.
TEST(CudaTwoStage, HisaBlocksPrecomputedMeansSameLists) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(95);
  const std::vector<int64_t> lens = {20000, 999};
  const int hb = 128, keep = 9;
  HostBatch b = MakeBatch(rng, lens, hb);  // summaries over 128-token blocks
  const HostQueries hq = MakeQueries(rng, {{19999, 12345, 0, 700}, {998, 500, 3}});
  DeviceBatch db(b, hq);
  const int64_t T = int64_t(hq.pos.size());
  const int64_t stride = int64_t(keep) * hb;
  DeviceBuffer<uint16_t> hi(size_t(lens.size() * b.sum_stride * kD)), lo(hi.size());
  ASSERT_CUDA(LaunchBlockMeansBf16(db.sums.get(), b.sum_stride, db.lens.get(), int(lens.size()), hb,
                                   hi.get(), lo.get(), 0));
  std::vector<std::vector<int32_t>> lists, lens_out;
  for (bool pre : {false, true}) {
    DeviceBuffer<int32_t> kl(size_t(T * stride)), kn(static_cast<size_t>(T));
    cudaMemset(kl.get(), 0xff, kl.bytes());
    HisaBlockParams p;
    p.queries = db.queries;
    p.num_tokens = db.lens.get();
    p.block_sums = db.sums.get();
    p.block_stride = b.sum_stride;
    p.means_hi = pre ? hi.get() : nullptr;
    p.means_lo = pre ? lo.get() : nullptr;
    p.hisa_block = hb;
    p.keep_blocks = keep;
    p.key_list = kl.get();
    p.key_list_len = kn.get();
    p.key_list_stride = stride;
    ASSERT_CUDA(LaunchHisaBlocks(p, 0));
    ASSERT_CUDA(cudaDeviceSynchronize());
    lists.push_back(kl.Download());
    lens_out.push_back(kn.Download());
  }
  EXPECT_TRUE(lens_out[0] == lens_out[1]);
  for (int64_t t = 0; t < T; ++t) {
    const int n = lens_out[0][size_t(t)];
    EXPECT_GT(n, 0);
    EXPECT_TRUE(std::equal(lists[0].begin() + t * stride, lists[0].begin() + t * stride + n,
                           lists[1].begin() + t * stride))
        << "query " << t;
    EXPECT_EQ(lists[0][size_t(t * stride)], 0) << "first block kept";  // block 0 starts at key 0
  }
}

// Per-query key lists (the second stage of MISA-dagger and HISA): each query
// has its own candidate keys (any order, some past its position).
TEST(CudaSelect, PerQueryKeyLists) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(75);
  const std::vector<int64_t> lens = {9000, 2500};
  const HostBatch hb = MakeBatch(rng, lens, 1024);
  const HostQueries hq = MakeQueries(rng, {{8999, 8000, 4000, 100}, {2499, 7}});
  DeviceBatch db(hb, hq);
  const int64_t T = int64_t(hq.pos.size());
  const int64_t stride = 5000;
  std::vector<int32_t> klist(size_t(T * stride), -3), klen(static_cast<size_t>(T));
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = hb.lens[t < 4 ? 0 : 1];
    std::vector<int32_t> keys(static_cast<size_t>(n));
    std::iota(keys.begin(), keys.end(), 0);
    std::shuffle(keys.begin(), keys.end(), rng);
    keys.resize(size_t(std::min<int64_t>(n, 1000 + int64_t(rng() % 4000))));
    klen[size_t(t)] = int32_t(keys.size());
    std::copy(keys.begin(), keys.end(), klist.begin() + t * stride);
  }
  DeviceBuffer<int32_t> d_klist(klist), d_klen(klen);
  for (int topk : {2048, 77}) {
    DeviceBuffer<int32_t> d_out(size_t(T) * topk);
    SelectParams p;
    p.keys = db.keys;
    p.queries = db.queries;
    p.key_list = d_klist.get();
    p.key_list_len = d_klen.get();
    p.key_list_stride = stride;
    p.max_key_list_len = stride;
    p.key_list_per_query = true;
    p.topk = topk;
    p.sorted = topk == 77;
    p.out = d_out.get();
    SelectPlan plan;
    ASSERT_CUDA(PlanSelectLaunch(p, &plan, nullptr));
    DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
    ASSERT_CUDA(LaunchSelect(p, plan, ws.get(), 0));
    ASSERT_CUDA(cudaDeviceSynchronize());
    const auto gpu = d_out.Download();
    std::vector<int32_t> all(kH);
    std::iota(all.begin(), all.end(), 0);
    for (int64_t t = 0; t < T; ++t) {
      const int s = t < 4 ? 0 : 1;
      const int64_t pos = hq.pos[size_t(t)];
      std::vector<int32_t> vis;
      for (int32_t i = 0; i < klen[size_t(t)]; ++i) {
        const int32_t k = klist[size_t(t * stride + i)];
        if (k <= pos) vis.push_back(k);
      }
      std::vector<float> ls(vis.size());
      cpu::RoutedScores(hb.View(s), hq.q8.data() + t * kH * kD, hq.w.data() + t * kH, all.data(),
                        kH, vis.data(), int64_t(vis.size()), ls.data());
      std::vector<int32_t> top(static_cast<size_t>(topk));
      const int valid = cpu::TopK(ls.data(), int64_t(vis.size()), topk, top.data());
      std::vector<int32_t> cpu_row(size_t(topk), -1);
      for (int i = 0; i < valid; ++i) cpu_row[size_t(i)] = vis[size_t(top[size_t(i)])];
      std::vector<float> scores(size_t(pos + 1), std::nanf(""));
      for (size_t i = 0; i < vis.size(); ++i) scores[size_t(vis[i])] = ls[i];
      CheckRow(gpu.data() + t * topk, cpu_row.data(), scores, pos, topk, p.sorted,
               "per-query list t=" + std::to_string(t), valid);
    }
  }
}

// Selection restricted to per-sequence key lists (the block-filter path):
// the CPU reference scores the listed keys (RoutedScores with keys) and takes
// their top-k (TopK); keys past the query position are masked out first.
TEST(CudaSelect, OverKeyLists) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(70);
  const std::vector<int64_t> lens = {3000, 9000, 200, 7001};
  const HostBatch hb = MakeBatch(rng, lens, 1024);
  const HostQueries hq = MakeQueries(rng, {{2999}, {8998, 8999}, {199}, {7000}});
  DeviceBatch db(hb, hq);
  const int64_t T = int64_t(hq.pos.size());
  const int64_t stride = 6000;
  std::vector<int32_t> klist(lens.size() * size_t(stride), -7), klen(lens.size());
  for (size_t s = 0; s < lens.size(); ++s) {
    // Random blocks of 128 keys (as the filter emits) plus a few odd ranges.
    std::vector<int32_t> keys;
    for (int64_t b = 0; b * 128 < lens[s]; ++b) {
      if (rng() % 3 != 0) continue;
      const int64_t end = std::min<int64_t>((b + 1) * 128 - int64_t(rng() % 7), lens[s]);
      for (int64_t k = b * 128; k < end; ++k) keys.push_back(int32_t(k));
    }
    if (int64_t(keys.size()) > stride) keys.resize(size_t(stride));
    klen[s] = int32_t(keys.size());
    std::copy(keys.begin(), keys.end(), klist.begin() + int64_t(s) * stride);
  }
  DeviceBuffer<int32_t> d_klist(klist), d_klen(klen);
  for (int G : {64, 8}) {
    std::vector<int32_t> heads(size_t(T) * G);
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < G; ++e) heads[size_t(t * G + e)] = G == kH ? e : 7 * e + int(t % 7);
    }
    DeviceBuffer<int32_t> d_heads(heads);
    for (int topk : {2048, 500}) {
      DeviceBuffer<int32_t> d_out(size_t(T) * topk);
      SelectParams p;
      p.keys = db.keys;
      p.queries = db.queries;
      p.rows_per_query = G;
      p.head_list = G == kH ? nullptr : d_heads.get();
      p.key_list = d_klist.get();
      p.key_list_len = d_klen.get();
      p.key_list_stride = stride;
      p.max_key_list_len = *std::max_element(klen.begin(), klen.end());
      p.topk = topk;
      p.sorted = topk == 500;
      p.out = d_out.get();
      SelectPlan plan;
      ASSERT_CUDA(PlanSelectLaunch(p, &plan, nullptr));
      DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
      ASSERT_CUDA(LaunchSelect(p, plan, ws.get(), 0));
      ASSERT_CUDA(cudaDeviceSynchronize());
      const auto gpu = d_out.Download();
      for (size_t s = 0; s < lens.size(); ++s) {
        for (int64_t t = hq.start[s]; t < hq.start[s + 1]; ++t) {
          const int64_t pos = hq.pos[size_t(t)];
          std::vector<int32_t> vis;
          for (int32_t i = 0; i < klen[s]; ++i) {
            const int32_t k = klist[s * size_t(stride) + size_t(i)];
            if (k <= pos) vis.push_back(k);
          }
          std::vector<float> ls(vis.size());
          cpu::RoutedScores(hb.View(int(s)), hq.q8.data() + t * kH * kD, hq.w.data() + t * kH,
                            heads.data() + t * G, G, vis.data(), int64_t(vis.size()), ls.data());
          std::vector<int32_t> top(static_cast<size_t>(topk));
          const int valid = cpu::TopK(ls.data(), int64_t(vis.size()), topk, top.data());
          std::vector<int32_t> cpu_row(size_t(topk), -1);
          for (int i = 0; i < valid; ++i) cpu_row[size_t(i)] = vis[size_t(top[size_t(i)])];
          std::vector<float> scores(size_t(pos + 1), std::nanf(""));
          for (size_t i = 0; i < vis.size(); ++i) scores[size_t(vis[i])] = ls[i];
          CheckRow(gpu.data() + t * topk, cpu_row.data(), scores, pos, topk, p.sorted,
                   "key list G=" + std::to_string(G) + " seq " + std::to_string(s), valid);
        }
      }
    }
  }
}

TEST(CudaSelect, RejectsBadParameters) {
  SKIP_WITHOUT_GPU();
  SelectParams p;
  p.queries.num_seqs = 1;
  int32_t dummy = 0;
  p.queries.query_start = &dummy;
  p.rows_per_query = 12;
  p.heads = 64;
  p.head_list = reinterpret_cast<const int32_t*>(&dummy);
  SelectPlan plan;
  const char* why = nullptr;
  EXPECT_EQ(PlanSelectLaunch(p, &plan, &why), cudaErrorInvalidValue);
  ASSERT_TRUE(why != nullptr);
  EXPECT_TRUE(std::string(why).find("8, 16, 32 or 64") != std::string::npos) << why;
  p.rows_per_query = 8;
  p.topk = 9000;
  EXPECT_EQ(PlanSelectLaunch(p, &plan, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("topk") != std::string::npos) << why;
  p.topk = 5000;  // > 2048: only unsorted, without a key list, kernel version 2
  p.sorted = true;
  EXPECT_EQ(PlanSelectLaunch(p, &plan, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("topk") != std::string::npos) << why;
  p.sorted = false;
  p.kernel_version = 1;
  EXPECT_EQ(PlanSelectLaunch(p, &plan, &why), cudaErrorInvalidValue);
  p.kernel_version = 3;
  p.topk = 64;
  EXPECT_EQ(PlanSelectLaunch(p, &plan, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("kernel_version") != std::string::npos) << why;
  p.kernel_version = 2;
  p.topk = 64;
  p.head_dim = 96;
  EXPECT_EQ(PlanSelectLaunch(p, &plan, &why), cudaErrorInvalidValue);
  EXPECT_TRUE(std::string(why).find("128") != std::string::npos) << why;
}

TEST(CudaRouter, MatchesCpuRouterAndHeads) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(30);
  const std::vector<int64_t> lens = {700, 5000, 40000};
  for (int block : {1024, 128}) {
    const HostBatch hb = MakeBatch(rng, lens, block);
    const HostQueries hq = MakeQueries(rng, {{0, 699, 350}, {4999, 1023, 1024, 3000}, {39999, 777, 20000}});
    DeviceBatch db(hb, hq);
    const int64_t T = int64_t(hq.pos.size());
    const int h = 8;
    DeviceBuffer<int32_t> active(size_t(T) * h);
    DeviceBuffer<float> scores(size_t(T) * kH);
    RouterParams p;
    p.keys = db.keys;
    p.queries = db.queries;
    p.active_heads = h;
    p.active = active.get();
    p.scores = scores.get();
    ASSERT_CUDA(LaunchMisaRouter(p, 0));
    ASSERT_CUDA(cudaDeviceSynchronize());
    const auto g_active = active.Download();
    const auto g_scores = scores.Download();
    for (size_t s = 0; s < lens.size(); ++s) {
      for (int64_t t = hq.start[s]; t < hq.start[s + 1]; ++t) {
        std::vector<float> r(kH);
        cpu::MisaRouterScores(hb.View(int(s)), hq.q8.data() + t * kH * kD, hq.w.data() + t * kH,
                              kH, hq.pos[size_t(t)], r.data());
        float rmax = 0.0f;
        for (float x : r) rmax = std::max(rmax, x);
        for (int j = 0; j < kH; ++j) {
          EXPECT_NEAR(g_scores[size_t(t * kH + j)], r[size_t(j)], 1e-4 * rmax + 1e-30)
              << "query " << t << " head " << j;
        }
        std::vector<float> sorted_r = r;
        std::sort(sorted_r.begin(), sorted_r.end(), std::greater<float>());
        const float hth = sorted_r[size_t(h - 1)];
        for (int e = 0; e < h; ++e) {
          const int32_t j = g_active[size_t(t * h + e)];
          ASSERT_GE(j, 0);
          ASSERT_LT(j, kH);
          if (e > 0) {
            EXPECT_GT(j, g_active[size_t(t * h + e - 1)]) << "ascending order";
          }
          EXPECT_GE(r[size_t(j)], hth - 2e-4f * rmax) << "query " << t << " head " << j;
        }
      }
    }
  }
}

// Router CTAs take 8 groups of queries (16 per CTA with 64 heads, 32 with
// 32, 64 with 16) and stage the block means in chunks of 64: many queries per
// sequence (full and partial CTAs, every group), contexts of several chunks,
// every supported head count (the first H heads of each query), against
// cpu::MisaRouterScores and cpu::MisaActiveHeads' criterion.
TEST(CudaRouter, ManyQueriesPerCtaEveryHeadCount) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(31);
  const std::vector<int64_t> lens = {50000, 3000};
  const HostBatch hb = MakeBatch(rng, lens, 256);  // 196 blocks: 4 chunks
  std::vector<int64_t> p0 = {0, 255, 256, 16383, 16384, 49999};
  std::uniform_int_distribution<int64_t> any0(0, lens[0] - 1);
  while (p0.size() < 75) p0.push_back(any0(rng));
  const HostQueries hq = MakeQueries(rng, {p0, {2999, 100, 1500}});
  const int64_t T = int64_t(hq.pos.size());
  for (int H : {64, 32, 16}) {
    std::vector<uint8_t> q8(size_t(T) * H * kD);
    std::vector<float> w(size_t(T) * H);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(q8.data() + t * H * kD, hq.q8.data() + t * kH * kD, size_t(H) * kD);
      std::memcpy(w.data() + t * H, hq.w.data() + t * kH, size_t(H) * sizeof(float));
    }
    HostQueries hqh = hq;
    hqh.q8 = q8;
    hqh.w = w;
    DeviceBatch db(hb, hqh);
    const int h = 8;
    DeviceBuffer<int32_t> active(size_t(T) * h);
    DeviceBuffer<float> scores(size_t(T) * H);
    RouterParams p;
    p.keys = db.keys;
    p.queries = db.queries;
    p.heads = H;
    p.active_heads = h;
    p.active = active.get();
    p.scores = scores.get();
    ASSERT_CUDA(LaunchMisaRouter(p, 0));
    ASSERT_CUDA(cudaDeviceSynchronize());
    const auto g_active = active.Download();
    const auto g_scores = scores.Download();
    for (size_t s = 0; s < lens.size(); ++s) {
      for (int64_t t = hq.start[s]; t < hq.start[s + 1]; ++t) {
        std::vector<float> r(static_cast<size_t>(H));
        cpu::MisaRouterScores(hb.View(int(s)), q8.data() + t * H * kD, w.data() + t * H, H,
                              hq.pos[size_t(t)], r.data());
        float rmax = 0.0f;
        for (float x : r) rmax = std::max(rmax, x);
        for (int j = 0; j < H; ++j) {
          EXPECT_NEAR(g_scores[size_t(t * H + j)], r[size_t(j)], 1e-4 * rmax + 1e-30)
              << "H " << H << " query " << t << " head " << j;
        }
        std::vector<float> sorted_r = r;
        std::sort(sorted_r.begin(), sorted_r.end(), std::greater<float>());
        const float hth = sorted_r[size_t(h - 1)];
        for (int e = 0; e < h; ++e) {
          const int32_t j = g_active[size_t(t * h + e)];
          ASSERT_GE(j, 0);
          ASSERT_LT(j, H);
          if (e > 0) {
            EXPECT_GT(j, g_active[size_t(t * h + e - 1)]) << "ascending order";
          }
          EXPECT_GE(r[size_t(j)], hth - 2e-4f * rmax)
              << "H " << H << " query " << t << " head " << j;
        }
      }
    }
  }
}

TEST(CudaSummaries, PrefillThenDecodeIsBitExact) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(40);
  const std::vector<int64_t> lens = {1500, 2100};
  for (int block : {1024, 100}) {
    HostBatch hb = MakeBatch(rng, lens, block);
    DeviceBatch db(hb, MakeQueries(rng, {{0}, {0}}));
    std::vector<float> zero(hb.sums.size(), 12345.0f);  // garbage the kernel must overwrite
    ASSERT_CUDA(db.sums.Upload(zero));
    // Prefill the first 1001 / 1333 tokens, then append one token at a time.
    std::vector<int64_t> from = {0, 0}, to = {1001, 1333};
    DeviceBuffer<int64_t> d_from(from), d_to(to);
    SummaryParams p;
    p.pool = db.pool.get();
    p.page_table = db.page_table.get();
    p.page_table_stride = hb.pt_stride;
    p.summary_sums = db.sums.get();
    p.summary_stride = hb.sum_stride;
    p.from = d_from.get();
    p.to = d_to.get();
    p.num_seqs = 2;
    p.max_blocks_touched = CeilDiv(1333, block) + 1;
    p.layout = hb.layout;
    ASSERT_CUDA(LaunchUpdateSummaries(p, 0));
    while (to[0] < lens[0] || to[1] < lens[1]) {
      for (int s = 0; s < 2; ++s) {
        from[size_t(s)] = to[size_t(s)];
        to[size_t(s)] = std::min(to[size_t(s)] + 1, lens[size_t(s)]);
      }
      ASSERT_CUDA(d_from.Upload(from));
      ASSERT_CUDA(d_to.Upload(to));
      p.max_blocks_touched = 1;
      ASSERT_CUDA(LaunchUpdateSummaries(p, 0));
    }
    ASSERT_CUDA(cudaDeviceSynchronize());
    const auto g = db.sums.Download();
    int bad = 0;
    for (size_t s = 0; s < lens.size(); ++s) {
      for (int64_t b = 0; b < CeilDiv(lens[s], block); ++b) {
        for (int d = 0; d < kD; ++d) {
          const size_t i = (s * hb.sum_stride + b) * kD + d;
          if (g[i] != hb.sums[i] && ++bad < 5) {
            EXPECT_EQ(g[i], hb.sums[i]) << "seq " << s << " block " << b << " dim " << d;
          }
        }
      }
    }
    EXPECT_EQ(bad, 0);
  }
}

TEST(CudaPrep, MatchesCpuIndexerPrep) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(50);
  const int64_t T = 77;
  KvLayout layout;
  const int64_t pages = NumPages(3000) + 2;
  std::vector<uint8_t> pool(size_t(pages) * layout.IndexPageBytes(), 0);
  std::vector<int32_t> pt(static_cast<size_t>(pages));
  std::iota(pt.begin(), pt.end(), 0);
  std::shuffle(pt.begin(), pt.end(), rng);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> qp(size_t(T) * kH * kD), kp(size_t(T) * kD), wp(size_t(T) * kH), g(kD), bta(kD);
  for (auto& x : qp) x = nd(rng);
  for (auto& x : kp) x = 3.0f * nd(rng) + 0.5f;
  for (auto& x : wp) x = nd(rng);
  for (auto& x : g) x = 1.0f + 0.1f * nd(rng);
  for (auto& x : bta) x = 0.1f * nd(rng);
  // Distinct positions: two tokens never write one cache slot (the kernel's
  // CTAs would race, the reference keeps the last).
  std::vector<int64_t> pos(static_cast<size_t>(T));
  std::set<int64_t> used;
  for (int64_t t = 0; t < T; ++t) {
    int64_t p = t < 40 ? 2900 + t : int64_t(rng() % 3000);
    while (!used.insert(p).second) p = int64_t(rng() % 2900);
    pos[size_t(t)] = p;
  }
  YarnParams yp;
  const std::vector<float> inv_freq = YarnInvFreq(yp);
  IndexerPrepInputs in;
  in.q_proj = qp.data();
  in.k_proj = kp.data();
  in.w_proj = wp.data();
  in.ln_gamma = g.data();
  in.ln_beta = bta.data();
  in.positions = pos.data();
  in.inv_freq = inv_freq.data();
  in.num_tokens = T;
  IndexKeyCacheRef ref;
  std::vector<uint8_t> cpu_pool = pool;
  ref.pool = cpu_pool.data();
  ref.page_table = pt.data();
  ref.layout = layout;
  std::vector<uint8_t> cpu_q8(size_t(T) * kH * kD);
  std::vector<float> cpu_w(size_t(T) * kH);
  cpu::IndexerPrep(in, kH, ref, cpu_q8.data(), cpu_w.data());

  DeviceBuffer<float> d_qp(qp), d_kp(kp), d_wp(wp), d_g(g), d_b(bta), d_if(inv_freq);
  DeviceBuffer<int64_t> d_pos(pos);
  DeviceBuffer<uint8_t> d_pool(pool);
  DeviceBuffer<int32_t> d_pt(pt);
  DeviceBuffer<uint8_t> d_q8(cpu_q8.size());
  DeviceBuffer<float> d_w(cpu_w.size());
  PrepParams p;
  p.q_proj = d_qp.get();
  p.k_proj = d_kp.get();
  p.w_proj = d_wp.get();
  p.ln_gamma = d_g.get();
  p.ln_beta = d_b.get();
  p.positions = d_pos.get();
  p.inv_freq = d_if.get();
  p.num_tokens = T;
  p.pool = d_pool.get();
  p.page_table = d_pt.get();
  p.page_table_stride = pages;
  p.layout = layout;
  p.q8 = d_q8.get();
  p.weights = d_w.get();
  ASSERT_CUDA(LaunchIndexerPrep(p, 0));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto g_pool = d_pool.Download();
  const auto g_q8 = d_q8.Download();
  const auto g_w = d_w.Download();
  // Vectors: same scale, codes equal or one step apart (a value on a rounding
  // edge after cos/sin or LayerNorm rounding), and few of those.
  int vec_scale_diff = 0, code_diff = 0, code_far = 0;
  auto compare = [&](const uint8_t* a, const uint8_t* b, float sa, float sb) {
    if (sa != sb) {
      ++vec_scale_diff;
      return;
    }
    for (int d = 0; d < kD; ++d) {
      if (a[d] == b[d]) continue;
      ++code_diff;
      if (std::fabs(Fp8E4M3ToFloat(a[d]) - Fp8E4M3ToFloat(b[d])) >
          0.126f * std::fabs(Fp8E4M3ToFloat(b[d])) + 0.002f) {
        ++code_far;
      }
    }
  };
  for (int64_t t = 0; t < T; ++t) {
    const size_t off = size_t(pt[size_t(pos[size_t(t)] / kPageTokens)]) * layout.IndexPageBytes();
    const int slot = int(pos[size_t(t)] % kPageTokens);
    float sa, sb;
    std::memcpy(&sa, g_pool.data() + off + layout.IndexScaleOffset(slot), 4);
    std::memcpy(&sb, cpu_pool.data() + off + layout.IndexScaleOffset(slot), 4);
    EXPECT_TRUE(IsPowerOfTwo(sa)) << "key scale " << sa;
    compare(g_pool.data() + off + layout.IndexValueOffset(slot),
            cpu_pool.data() + off + layout.IndexValueOffset(slot), sa, sb);
    for (int j = 0; j < kH; ++j) {
      const size_t o = size_t(t * kH + j);
      // Weights carry q_scale: equal scales <=> weights within rounding.
      const float qs_ratio = g_w[o] / cpu_w[o];
      const bool same_scale = std::fabs(qs_ratio - 1.0f) < 1e-5f;
      compare(g_q8.data() + o * kD, cpu_q8.data() + o * kD, same_scale ? 1.0f : 0.0f, 1.0f);
    }
  }
  const int vectors = int(T * (kH + 1));
  EXPECT_LE(vec_scale_diff * 100, vectors) << vec_scale_diff << " of " << vectors;
  EXPECT_LE(code_diff * 500, vectors * kD) << code_diff;
  EXPECT_EQ(code_far, 0);
  std::printf("  prep: %d vectors, %d scale mismatches, %d code mismatches (1 step)\n", vectors,
              vec_scale_diff, code_diff);
}

TEST(CudaBlockFilter, KeepsFirstLastAndBestBlocks) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(60);
  const std::vector<int64_t> lens = {5000, 20000, 300};
  const int block = 512, keep = 6, G = 8;
  const HostBatch hb = MakeBatch(rng, lens, block);
  const HostQueries hq = MakeQueries(rng, {{4999}, {19998, 19999}, {299}});
  DeviceBatch db(hb, hq);
  std::vector<int32_t> heads;
  for (size_t t = 0; t < hq.pos.size(); ++t) {
    for (int e = 0; e < G; ++e) heads.push_back(3 * e + int(t % 3));
  }
  DeviceBuffer<int32_t> d_heads(heads);
  const int64_t stride = keep * block;
  DeviceBuffer<int32_t> klist(lens.size() * size_t(stride)), klen(lens.size());
  BlockFilterParams p;
  p.keys = db.keys;
  p.queries = db.queries;
  p.rows_per_query = G;
  p.head_list = d_heads.get();
  p.keep_blocks = keep;
  p.key_list = klist.get();
  p.key_list_len = klen.get();
  p.key_list_stride = stride;
  ASSERT_CUDA(LaunchBlockFilter(p, 0));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto g_list = klist.Download();
  const auto g_len = klen.Download();
  for (size_t s = 0; s < lens.size(); ++s) {
    const int64_t nb = CeilDiv(lens[s], block);
    // Reference block scores in double: max over the sequence's queries.
    std::vector<double> bs(size_t(nb), -1e300);
    for (int64_t t = hq.start[s]; t < hq.start[s + 1]; ++t) {
      for (int64_t b = 0; b < nb; ++b) {
        const double cnt = double(BlockCount(lens[s], b, block));
        double score = 0.0;
        for (int e = 0; e < G; ++e) {
          const int j = heads[size_t(t * G + e)];
          double dot = 0.0;
          for (int d = 0; d < kD; ++d) {
            dot += double(Fp8E4M3ToFloat(hq.q8[size_t((t * kH + j) * kD + d)])) *
                   (double(hb.sums[size_t((s * hb.sum_stride + b) * kD + d)]) / cnt);
          }
          score += double(hq.w[size_t(t * kH + j)]) * std::max(dot, 0.0);
        }
        bs[size_t(b)] = std::max(bs[size_t(b)], score);
      }
    }
    // Kept blocks from the GPU list.
    std::set<int64_t> kept;
    int64_t expect_len = 0;
    for (int32_t i = 0; i < g_len[s]; ++i) {
      const int32_t k = g_list[s * size_t(stride) + size_t(i)];
      if (i > 0) {
        EXPECT_GT(k, g_list[s * size_t(stride) + size_t(i) - 1]) << "ascending keys";
      }
      kept.insert(k / block);
    }
    for (int64_t b : kept) expect_len += BlockCount(lens[s], b, block);
    EXPECT_EQ(int64_t(g_len[s]), expect_len) << "every key of each kept block";
    EXPECT_EQ(int64_t(kept.size()), std::min<int64_t>(keep, nb));
    EXPECT_TRUE(kept.count(0) == 1) << "first block kept";
    EXPECT_TRUE(kept.count(nb - 1) == 1) << "last block kept";
    // Any dropped middle block scores no better than the worst kept middle block.
    double worst_kept = 1e300, best_dropped = -1e300, smax = 0.0;
    for (int64_t b = 0; b < nb; ++b) smax = std::max(smax, std::fabs(bs[size_t(b)]));
    for (int64_t b = 1; b + 1 < nb; ++b) {
      if (kept.count(b)) worst_kept = std::min(worst_kept, bs[size_t(b)]);
      else best_dropped = std::max(best_dropped, bs[size_t(b)]);
    }
    if (worst_kept < 1e300 && best_dropped > -1e300) {
      EXPECT_GE(worst_kept, best_dropped - 1e-4 * smax) << "seq " << s;
    }
  }
}

// ---------------------------------------------------------------------------
// The decode path (kernel_version 3; version 0 takes it for decode-shaped
// launches): scoring into the workspace's logits, then the multi-CTA top-k.

// One query per sequence at odd sizes: shorter than top-k, partial pages, a
// query before the end of its keys, an empty sequence, mixed lengths.
TEST(CudaSelect, DecodePathDenseOddSizes) {
  SKIP_WITHOUT_GPU();
  for (int topk : {2048, 300, 1}) {
    for (bool sorted : {true, false}) {
      SelectCase c;
      c.lens = {1, 63, 64, 65, 2047, 2048, 2049, 5000, 12345, 3000, 700, 40000};
      c.positions = {{0}, {62}, {63}, {64}, {2046}, {2047}, {2048}, {4999}, {12344},
                     {1500}, {}, {39999}};
      c.topk = topk;
      c.sorted = sorted;
      c.kernel_version = 3;
      RunSelectCase(c, 200 + uint32_t(topk) + (sorted ? 1u : 0u));
    }
  }
}

// Masked MISA (the decode MISA launch) through the decode path; ties at
// exactly 0 with negative weights: h = 8 (about 1/256 of the keys score 0,
// more than top-k = 100 of them: the tie is the boundary) and h = 1 (half of
// the keys score 0: the last bin overflows every candidate list and the
// whole row is rescanned).
TEST(CudaSelect, DecodePathMaskedMisaAndTies) {
  SKIP_WITHOUT_GPU();
  {
    SelectCase c;
    c.misa = true;
    c.masked = true;
    c.lens = {300, 3000, 10001, 40000};
    c.positions = {{299}, {2999}, {10000}, {39999}};
    c.kernel_version = 3;
    RunSelectCase(c, 210);
  }
  for (int h : {8, 1}) {
    for (int topk : {100, 2048}) {
      SelectCase c;
      c.misa = true;
      c.masked = true;
      c.h = h;
      c.lens = {50000, 20011, 777};
      c.positions = {{49999}, {20010}, {776}};
      c.negative_weights = true;
      c.topk = topk;
      c.sorted = topk == 100;
      c.kernel_version = 3;
      // The boundary is inside the tie at 0 (h = 1 always; h = 8 at top-100).
      c.max_swaps = (h == 1 || topk == 100) ? 0 : -1;
      RunSelectCase(c, 220 + uint32_t(h) + uint32_t(topk));
    }
  }
}

// The last bin's candidates from shared memory (0), their global list (bit 2)
// and a rescan of the row (bit 3), and the 8-stage scoring (bit 4): the same
// selections.
TEST(CudaSelect, DecodePathCandidateTiers) {
  SKIP_WITHOUT_GPU();
  for (int experiment : {0, 4, 8, 16}) {
    SelectCase c;
    c.lens = {70001, 129, 9000};
    c.positions = {{70000}, {128}, {8999}};
    c.kernel_version = 3;
    c.experiment = experiment;
    c.sorted = experiment != 4;
    RunSelectCase(c, 230 + uint32_t(experiment));
  }
}

// Routing: version 0 takes the decode path on decode-shaped launches only;
// version 3 rejects other launches; scoring alone (bit 0) then the top-k
// alone (bit 1) gives the full launch's rows.
TEST(CudaSelect, DecodePathRoutingAndBreakdown) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(240);
  const HostBatch hb = MakeBatch(rng, {5000, 30000}, 1024);
  const HostQueries hq = MakeQueries(rng, {{4999}, {29999}});
  DeviceBatch db(hb, hq);
  DeviceBuffer<int32_t> out_a(2 * 2048), out_b(2 * 2048);
  SelectParams p;
  p.keys = db.keys;
  p.queries = db.queries;
  p.out = out_a.get();
  SelectPlan plan;
  ASSERT_CUDA(PlanSelectLaunch(p, &plan, nullptr));
  EXPECT_TRUE(plan.decode.enabled);
  SelectParams old = p;
  old.kernel_version = 2;
  SelectPlan oplan;
  ASSERT_CUDA(PlanSelectLaunch(old, &oplan, nullptr));
  EXPECT_FALSE(oplan.decode.enabled);
  {
    SelectParams two = p;
    two.queries.max_queries_per_seq = 2;
    SelectPlan tp;
    ASSERT_CUDA(PlanSelectLaunch(two, &tp, nullptr));
    EXPECT_FALSE(tp.decode.enabled);
    two.kernel_version = 3;
    EXPECT_EQ(PlanSelectLaunch(two, &tp, nullptr), cudaErrorInvalidValue);
    SelectParams sync = p;
    sync.use_wgmma = false;
    ASSERT_CUDA(PlanSelectLaunch(sync, &tp, nullptr));
    EXPECT_FALSE(tp.decode.enabled);
    // A decode plan with old-path parameters, and the reverse, are rejected.
    EXPECT_EQ(LaunchSelect(old, plan, out_b.get(), 0, nullptr), cudaErrorInvalidValue);
    EXPECT_EQ(LaunchSelect(p, oplan, out_b.get(), 0, nullptr), cudaErrorInvalidValue);
  }
  DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
  ASSERT_CUDA(LaunchSelect(p, plan, ws.get(), 0, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto full = out_a.Download();
  // Old path, same inputs: the same sets up to rounding swaps.
  {
    DeviceBuffer<uint8_t> ows(oplan.workspace_bytes);
    old.out = out_b.get();
    ASSERT_CUDA(LaunchSelect(old, oplan, ows.get(), 0, nullptr));
    ASSERT_CUDA(cudaDeviceSynchronize());
    const auto o = out_b.Download();
    for (int t = 0; t < 2; ++t) {
      std::set<int32_t> x(full.begin() + t * 2048, full.begin() + (t + 1) * 2048);
      int same = 0;
      for (int i = 0; i < 2048; ++i) same += int(x.count(o[size_t(t * 2048 + i)]));
      EXPECT_GE(same, 2048 - 10) << "query " << t;
    }
  }
  SelectParams br = p;
  br.kernel_version = 3;
  br.out = out_b.get();
  cudaMemset(out_b.get(), 0x5a, out_b.bytes());
  br.experiment = 1;
  ASSERT_CUDA(LaunchSelect(br, plan, ws.get(), 0, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto untouched = out_b.Download();
  EXPECT_EQ(untouched[0], 0x5a5a5a5a) << "scoring alone writes no row";
  br.experiment = 2;
  ASSERT_CUDA(LaunchSelect(br, plan, ws.get(), 0, nullptr));
  ASSERT_CUDA(cudaDeviceSynchronize());
  const auto split = out_b.Download();
  for (int t = 0; t < 2; ++t) {
    std::set<int32_t> x(full.begin() + t * 2048, full.begin() + (t + 1) * 2048);
    std::set<int32_t> y(split.begin() + t * 2048, split.begin() + (t + 1) * 2048);
    EXPECT_TRUE(x == y) << "query " << t;
  }
}

// Per-sequence key lists (the block filter's output) through the decode path,
// dense and masked MISA, with entries past the query's position.
TEST(CudaSelect, DecodePathKeyLists) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(250);
  const std::vector<int64_t> lens = {3000, 9000, 200, 7001, 64};
  const HostBatch hb = MakeBatch(rng, lens, 1024);
  const HostQueries hq = MakeQueries(rng, {{2999}, {8000}, {199}, {7000}, {63}});
  DeviceBatch db(hb, hq);
  const int64_t T = int64_t(hq.pos.size());
  const int64_t stride = 6000;
  std::vector<int32_t> klist(lens.size() * size_t(stride), -7), klen(lens.size());
  for (size_t s = 0; s < lens.size(); ++s) {
    std::vector<int32_t> keys;
    for (int64_t b = 0; b * 128 < lens[s]; ++b) {
      if (rng() % 3 != 0 && s != 4) continue;
      const int64_t end = std::min<int64_t>((b + 1) * 128 - int64_t(rng() % 7), lens[s]);
      for (int64_t k = b * 128; k < end; ++k) keys.push_back(int32_t(k));
    }
    if (int64_t(keys.size()) > stride) keys.resize(size_t(stride));
    klen[s] = int32_t(keys.size());
    std::copy(keys.begin(), keys.end(), klist.begin() + int64_t(s) * stride);
  }
  DeviceBuffer<int32_t> d_klist(klist), d_klen(klen);
  for (int G : {64, 8}) {
    std::vector<int32_t> heads(size_t(T) * G);
    for (int64_t t = 0; t < T; ++t) {
      for (int e = 0; e < G; ++e) heads[size_t(t * G + e)] = G == kH ? e : 7 * e + int(t % 7);
    }
    DeviceBuffer<int32_t> d_heads(heads);
    for (int topk : {2048, 500}) {
      DeviceBuffer<int32_t> d_out(size_t(T) * topk);
      SelectParams p;
      p.keys = db.keys;
      p.queries = db.queries;
      p.rows_per_query = kH;
      p.head_list = G == kH ? nullptr : d_heads.get();
      p.masked_heads = G == kH ? 0 : G;
      p.key_list = d_klist.get();
      p.key_list_len = d_klen.get();
      p.key_list_stride = stride;
      p.max_key_list_len = *std::max_element(klen.begin(), klen.end());
      p.topk = topk;
      p.sorted = topk == 500;
      p.out = d_out.get();
      SelectPlan plan;
      ASSERT_CUDA(PlanSelectLaunch(p, &plan, nullptr));
      ASSERT_TRUE(plan.decode.enabled);
      DeviceBuffer<uint8_t> ws(plan.workspace_bytes);
      ASSERT_CUDA(LaunchSelect(p, plan, ws.get(), 0));
      ASSERT_CUDA(cudaDeviceSynchronize());
      const auto gpu = d_out.Download();
      for (size_t s = 0; s < lens.size(); ++s) {
        const int64_t t = hq.start[s];
        const int64_t pos = hq.pos[size_t(t)];
        std::vector<int32_t> vis;
        for (int32_t i = 0; i < klen[s]; ++i) {
          const int32_t k = klist[s * size_t(stride) + size_t(i)];
          if (k <= pos) vis.push_back(k);
        }
        std::vector<float> ls(vis.size());
        cpu::RoutedScores(hb.View(int(s)), hq.q8.data() + t * kH * kD, hq.w.data() + t * kH,
                          heads.data() + t * G, G, vis.data(), int64_t(vis.size()), ls.data());
        std::vector<int32_t> top(static_cast<size_t>(topk));
        const int valid = cpu::TopK(ls.data(), int64_t(vis.size()), topk, top.data());
        std::vector<int32_t> cpu_row(size_t(topk), -1);
        for (int i = 0; i < valid; ++i) cpu_row[size_t(i)] = vis[size_t(top[size_t(i)])];
        std::vector<float> scores(size_t(pos + 1), std::nanf(""));
        for (size_t i = 0; i < vis.size(); ++i) scores[size_t(vis[i])] = ls[i];
        CheckRow(gpu.data() + t * topk, cpu_row.data(), scores, pos, topk, p.sorted,
                 "decode key list G=" + std::to_string(G) + " seq " + std::to_string(s), valid);
      }
    }
  }
}

}  // namespace
}  // namespace pd::kernels::cuda
