// The selection kernel, version 2: FP8 wgmma scoring of (query, head) rows
// against the paged indexer keys with an exact top-k fused behind the MMA.
// Template definitions; explicit instantiations live in select_g*.cu.
//
// What changed against version 1 (select_kernel.cuh), each aimed at the
// epilogue that bounds both (measurements in docs/perf.md):
// - Column permutation: the B-operand rows (query, head) are stored so that
//   the accumulator columns one lane holds are whole queries (G <= 32) or half
//   / quarter queries (G = 64): the head sum runs in-thread, with at most one
//   or two shuffle levels (version 1 needed a reduce-scatter over the quad).
// - Default variant (kDB = false): one accumulator, 3 stages, 2 CTAs of 256
//   threads per SM. The double-buffered variant (kDB = true: the wgmma of stage
//   n + 1 in flight during the epilogue of stage n, 4 or 6 stages, 1 CTA per
//   SM) measured slower: two warps per scheduler cannot hide the epilogue's
//   latencies. It serves the 16384-entry lists (which fill the shared memory
//   anyway) and SelectParams::experiment.
// - Candidate lists partitioned by warp: a warp appends to its own partition
//   of each query's list with a ballot and popc (no shared-memory atomics, no
//   shuffles); the per-warp fill lives in registers. Lists are compacted in
//   shared memory by a radix select that starts at the highest bit in which
//   the list's keys differ (at bit 63 all candidates of a query share one byte
//   and the histogram atomics serialise; block_topk.cuh's select, which
//   version 1 uses, does the same since round 2).
// - kCap is a template parameter: 4096 (top-k <= 2048) or 16384 (top-k <=
//   8192, MISA-dagger's stage 1).
// Round 3 (the epilogue's candidate traffic; docs/perf.md):
// - Threshold seeding (contiguous keys, single accumulator, top-k <= 2048,
//   fewer than 64 heads per query: dense's epilogue is its head sums): a
//   sample pass over every kSelectSampleStride-th key of the CTA's range finds
//   about the SelectSeedTopk(k)-th best sampled score per query (round 4: see
//   below), which becomes the query's threshold. About 1.46 k keys pass the
//   seed instead of k (1 + ln(N / k)) a running threshold admits, and the
//   lists rarely fill. A seeded query left with fewer than k keys at or above
//   its seed is rescanned from threshold 0 (exact either way).
// - The epilogue compares each score's 64-bit candidate key with the
//   threshold in integer arithmetic (no float pre-test and exact fallback
//   branch), checks overflow once per stage, and sums heads in up to four
//   independent chains; the contiguous copies use precomputed addresses.
//
// Round 4 (docs/perf.md, bench/kernels/round4_notes.md):
// - The sample pass keeps no candidate lists: every lane keeps the top
//   kSelectSeedLaneTop scores of each of its queries among the sampled keys it
//   scores (a sorting network of fmaxf/fminf in shared memory), and after the
//   pass one warp per query takes the SelectSeedTopk(k)-th best of the union
//   of its 64 lanes' tops (a bit-serial select over the ordered score bits).
//   A lane that saw more than kSelectSeedLaneTop of the sample's top keys only
//   lowers that rank's value, so the seed never exceeds the exact sample rank:
//   no compaction, no CTA barrier, no list traffic in the sample pass. The
//   seed is a score (all keys of that score or better enter), and the full
//   pass scans every key (the sampled ones again).
// - The head weights are stored with 16 bytes of padding per lane group
//   (column f at f + 4 (f / LC)): the four lane groups' LDS.128 of one weight
//   vector hit four different bank groups (round 3's layout put them in one:
//   16 shared-memory wavefronts per load instead of 4, 42% of all the
//   kernel's wavefronts at MISA 64K).
// - Contiguous copies read the page table one stage ahead.
//
// Round 5 (docs/perf.md, bench/kernels/round5_notes.md):
// - A key enters its list iff !(score < thrf), thrf the score of the exact
//   threshold's high word (ThresholdScore): a superset of the candidate-key
//   test, one float comparison. Entries are stored raw (score bits, ~key) by
//   one predicated store per slot (SlotInsert, inline PTX) and converted to
//   ordered candidate keys wherever they are compared.
// - The final selection runs one warp per query when a CTA holds 4 or more
//   queries (WarpSelectKth over the list in global memory).
// - Dense prefill (64 rows, 128-row tile) is seeded too.
// - Each warpgroup synchronises with itself, the CTA every kWgSyncEvery
//   stages.
//
// Round 6 (docs/perf.md, bench/kernels/round6_notes.md):
// - A key's visibility, range, list state and lane ownership fold into one
//   unsigned bound per local query, set once per pass (lim_r): no per-stage
//   visibility test or closed-mask read.
// - The overflow check runs only in the stage before each CTA-wide step.
// - The warpgroup index comes from lane 0 (__shfl_sync): warp-uniform.
// - Experiments (measured slower, kept for later designs): the key stages
//   by TMA from one producer lane per warpgroup with full / empty mbarriers
//   (bit 512), and two N = 64 MMAs per stage with the epilogue starting on
//   the first half (bit 1024).
//
// Round 7 (bench/kernels/round7_notes.md):
// - The per-warp final selection has no range pass: its first histogram
//   window comes from the list threshold (a lower bound of every entry), the
//   range is computed on the way, and a pass that counted fewer entries than
//   the list holds restarts from the range (exact either way). Its passes load
//   all eight partitions at once (16 loads per lane in flight over the whole
//   list instead of per partition).
// - Query groups run in reverse blockIdx order: longest CTAs first.

// Exactness is version 1's argument: every key whose candidate key beats the
// list's threshold enters its list (round 5: with some others), and the
// threshold is always below the k-th best key of some k keys already kept;
// every key better than the final k-th best is therefore in the list at the
// end. With seeding the list holds every key whose ordered score bits reach
// the seed bound (xseed); when the list's k-th best entry is at or above that
// bound the top-k is exact, else the query is rescanned from threshold 0.
#ifndef PD_KERNELS_CUDA_SELECT_KERNEL_V2_CUH_
#define PD_KERNELS_CUDA_SELECT_KERNEL_V2_CUH_

#include <cuda.h>  // CUtensorMap (types only; the encoder is reached through the runtime)
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda/select_kernel.h"
#include "kernels/cuda/select_plan.h"

namespace pd::kernels::cuda::select_internal::v2 {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStages = 4;                 // pipeline depth of the double-buffered variant
constexpr int kKeys = kSelectKeysPerIter;  // per stage: two 64-key pages, one per warpgroup
constexpr int kMaxQ = 16;                  // queries per CTA (128 rows / 8 heads)
// SelectArgs::experiment bit set by LaunchT when the TMA pass runs (the
// caller asked for it with bit 9 or 10 and the pool's tensor map encoded).
constexpr int kTmaActive = 1 << 30;
static_assert(kKeys == 128, "a stage is two 64-key pages");

template <int kCap, int kSt = kStages>
struct alignas(1024) Smem {
  static constexpr int kCapacity = kCap;
  uint8_t q[128 * 128];                // B operand, SW128 (16 KB)
  uint8_t keys[kSt][kKeys * 128];      // A operands, SW128 (16 KB per stage)
  uint64_t cbuf[kCap];                 // compaction buffer
  float kscale[kSt][kKeys];
  int32_t kidx[kSt][kKeys];            // key list path: key of each stage row, -1 = none
  float wl[128 + 16];                  // head weights in lane-local column order, padded:
                                       //   column f at f + 4 (f / LC) (WeightSlot)
  int64_t pos[kMaxQ];                  // -1 for padding queries
  unsigned long long thr[kMaxQ];       // the exact threshold: every key whose candidate
                                       //   key exceeds it enters the list
  float thrf[kMaxQ];                   // its score (ThresholdScore): a key enters iff
                                       //   !(score < thrf), a superset of the above
  unsigned long long xseed[kMaxQ];     // seeded queries: every key whose ordered candidate
                                       //   key is >= xseed entered the list; 0 = not seeded
  unsigned long long selT[kMaxQ];      // final selection: the keys >= selT are the top-k
  int wcnt[kWarps][kMaxQ];             // partition fill (published at compactions)
  unsigned need;                       // bit q: a partition of list q may overflow next stage
  unsigned closed;                     // bit q: list q takes no key (the rescan's others)
  unsigned fail;                       // bit q: seeded query q needs the exact rescan
  topk::Scratch sc;
  unsigned long long kmax, kmin;
  uint64_t mbar_full[2][kSt];          // TMA key stages (round 6): per warpgroup and stage,
  uint64_t mbar_empty[2][kSt];         //   the page landed / the warpgroup is done with it
};
static_assert(sizeof(Smem<4096, 4>::keys) >= 8192 * sizeof(uint64_t),
              "the final pass keeps up to 8192 survivors in the key stages");

// List entries are written by the scan in raw form, (float bits of the score
// << 32) | ~key (no conversion on the hot path), and converted to the ordered
// candidate key (select_plan.h's CandidateKey) wherever they are compared.
// Raw 0 never occurs (~key == 0 would be key -1). Split lists handed to the
// merge kernel are in the ordered form.
__device__ __forceinline__ uint64_t RawEntry(float score, int32_t key) {
  return (uint64_t(__float_as_uint(score)) << 32) | uint64_t(~uint32_t(key));
}
__device__ __forceinline__ uint64_t RawToOrdered(uint64_t raw) {
  return (uint64_t(topk::OrderedScoreBits(__uint_as_float(uint32_t(raw >> 32)))) << 32) |
         (raw & 0xffffffffull);
}
// Inverse of RawToOrdered up to -0 (-> +0) and NaN (-> one NaN).
__device__ __forceinline__ uint64_t OrderedToRaw(uint64_t ord) {
  const uint32_t o = uint32_t(ord >> 32);
  const uint32_t u = (o & 0x80000000u) ? (o ^ 0x80000000u) : ~o;
  return (uint64_t(u) << 32) | (ord & 0xffffffffull);
}
// One score slot's insertion, for the whole warp: a lane passes iff
// key < lim (visible, valid, list open) and !(score < tf) (NaN passes); the
// warp's ballot of passing lanes is returned; a passing lane stores its raw
// entry {~key, score bits} at base[cpos + the passing lanes before it in its
// query group (ltg)]. Inline PTX so that the store is predicated and its
// address computed by every lane (the compiler otherwise puts the address
// arithmetic and the store behind a branch per slot: round 5, run 1).
__device__ __forceinline__ unsigned SlotInsert(uint64_t* base, uint32_t cpos, uint32_t ltg,
                                               uint32_t key, uint32_t nkey, uint32_t lim,
                                               float score, float tf) {
  unsigned b;
  asm volatile(
      "{\n"
      ".reg .pred p, q;\n"
      ".reg .b32 t;\n"
      ".reg .b64 a;\n"
      "setp.lt.u32 p, %1, %2;\n"
      "setp.geu.and.f32 q, %3, %4, p;\n"
      "vote.sync.ballot.b32 %0, q, 0xffffffff;\n"
      "and.b32 t, %0, %5;\n"
      "popc.b32 t, t;\n"
      "add.u32 t, t, %6;\n"
      "mad.wide.u32 a, t, 8, %7;\n"
      "@q st.global.v2.b32 [a], {%8, %9};\n"
      "}\n"
      : "=r"(b)
      : "r"(key), "r"(lim), "f"(score), "f"(tf), "r"(ltg), "r"(cpos), "l"(base), "r"(nkey),
        "r"(__float_as_uint(score))
      : "memory");
  return b;
}

// The score whose ordered bits are thr's high word. A key with candidate key
// > thr has ordered score bits >= that word, i.e. !(score < ThresholdScore)
// (NaN scores pass too); thr's high word 0 gives a NaN: every key passes.
__device__ __forceinline__ float ThresholdScore(unsigned long long thr) {
  return __uint_as_float(uint32_t(OrderedToRaw(thr) >> 32));
}

template <int kCap, int kSt>
constexpr size_t SmemBytes() {
  return sizeof(Smem<kCap, kSt>) + 1024;
}

__device__ __forceinline__ uint64_t ShflXor64(uint64_t v, int o) {
  return __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(v), o);
}

// The k-th largest of buf[0, n) (1 <= k < n; keys non-zero and distinct).
// Whole CTA. kmax / kmin must hold 0 / ~0 on entry (set before a barrier).
template <class S>
__device__ uint64_t SelectKth(const uint64_t* buf, int n, int k, S& sm) {
  const int tid = threadIdx.x, lane = tid & 31;
  uint64_t mx = 0, mn = ~0ull;
  for (int i = tid; i < n; i += kThreads) {
    const uint64_t x = buf[i];
    mx = x > mx ? x : mx;
    mn = x < mn ? x : mn;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t a = ShflXor64(mx, o), b = ShflXor64(mn, o);
    mx = a > mx ? a : mx;
    mn = b < mn ? b : mn;
  }
  if (lane == 0) {
    atomicMax(&sm.kmax, static_cast<unsigned long long>(mx));
    atomicMin(&sm.kmin, static_cast<unsigned long long>(mn));
  }
  __syncthreads();
  const uint64_t diff = sm.kmax ^ sm.kmin;  // != 0: n >= 2 distinct keys
  const int hb = 63 - __clzll(static_cast<long long>(diff));
  uint64_t mask = hb == 63 ? 0ull : (~0ull << (hb + 1));
  uint64_t prefix = sm.kmax & mask;
  int shift = hb - 7 > 0 ? hb - 7 : 0;
  unsigned rem = unsigned(k);
  topk::Scratch& sc = sm.sc;
  for (;;) {
    for (int i = tid; i < 256; i += kThreads) sc.hist[i] = 0;
    __syncthreads();
    for (int i = tid; i < n; i += kThreads) {
      const uint64_t x = buf[i];
      if ((x & mask) == prefix) atomicAdd(&sc.hist[unsigned(x >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (tid < 32) {
      unsigned b[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        b[j] = sc.hist[8 * lane + j];
        sum += b[j];
      }
      unsigned suf = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned t = __shfl_down_sync(0xffffffffu, suf, o);
        if (lane + o < 32) suf += t;
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, suf >= rem);
      const int top = 31 - __clz(ballot);
      if (lane == top) {
        unsigned above = suf - sum;
        int d = 8 * lane;
        unsigned cnt = b[0];
#pragma unroll
        for (int j = 7; j >= 0; --j) {
          if (above + b[j] >= rem) {
            d = 8 * lane + j;
            cnt = b[j];
            break;
          }
          above += b[j];
        }
        sc.digit = unsigned(d);
        sc.above = above;
        sc.count = cnt;
      }
    }
    __syncthreads();
    // Windows may overlap at the low end (shift clamped to 0): the overlapping
    // bits of d equal the prefix's, since only matching keys were counted.
    prefix |= uint64_t(sc.digit) << shift;
    mask |= uint64_t(0xff) << shift;
    rem -= sc.above;
    const bool done = sc.count == rem || shift == 0;
    __syncthreads();  // sc is rewritten by the next pass
    if (done) break;
    shift = shift - 8 > 0 ? shift - 8 : 0;
  }
  return prefix;
}

// Gathers list q's warp partitions (fill sm.wcnt[w][q], raw entries) into
// sm.cbuf as ordered candidate keys; returns the total. Ends with a barrier;
// resets write_pos / kmax / kmin.
template <class S>
__device__ int GatherList(const uint64_t* L, int q, S& sm) {
  constexpr int kCapW = S::kCapacity / kWarps;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int off = 0, n = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const int c = sm.wcnt[w][q];
    off += w < warp ? c : 0;
    n += c;
  }
  const int mine = sm.wcnt[warp][q];
  const uint64_t* src = L + warp * kCapW;
  for (int i = lane; i < mine; i += 32) sm.cbuf[off + i] = RawToOrdered(src[i]);
  if (threadIdx.x == 0) {
    sm.sc.write_pos = 0;
    sm.kmax = 0;
    sm.kmin = ~0ull;
  }
  __syncthreads();
  return n;
}

// Writes the entries of sm.cbuf[0, n) that are >= T to dst(p), p = 0, 1, ...
// in no particular order (warp-aggregated positions).
template <class S, class Dst>
__device__ __forceinline__ void WriteSurvivors(int n, uint64_t T, S& sm, Dst&& dst) {
  const int lane = threadIdx.x & 31;
  for (int i0 = threadIdx.x - lane; i0 < n; i0 += kThreads) {
    const int i = i0 + lane;
    const uint64_t x = i < n ? sm.cbuf[i] : 0ull;
    const bool keep = x != 0 && x >= T;
    const unsigned b = __ballot_sync(0xffffffffu, keep);
    if (b == 0) continue;
    int base = 0;
    if (lane == 0) base = atomicAdd(&sm.sc.write_pos, __popc(b));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (keep) dst(base + __popc(b & ((1u << lane) - 1u)), x);
  }
}

// Compacts list q to its top k (when longer), rebalances the survivors over
// the warp partitions and raises the threshold to below the k-th key (never
// lowers it: a query whose list is complete holds the maximum). Whole CTA.
template <class S>
__device__ void CompactList(uint64_t* L, int q, int k, S& sm) {
  constexpr int kCapW = S::kCapacity / kWarps;
  const int n = GatherList(L, q, sm);
  const int kw = (k + kWarps - 1) / kWarps;
  const uint64_t T = n > k ? SelectKth(sm.cbuf, n, k, sm) : 1ull;
  WriteSurvivors(n, T, sm,
                 [&](int p, uint64_t x) { L[(p / kw) * kCapW + p % kw] = OrderedToRaw(x); });
  __syncthreads();
  const int m = n < k ? n : k;
  if (threadIdx.x < kWarps) {
    const int c = m - int(threadIdx.x) * kw;
    sm.wcnt[threadIdx.x][q] = c < 0 ? 0 : (c > kw ? kw : c);
  }
  if (threadIdx.x == 0 && n > k && T - 1 > sm.thr[q]) {
    sm.thr[q] = T - 1;
    sm.thrf[q] = ThresholdScore(T - 1);
  }
  __syncthreads();
}

// ---- the final selection of one query by one warp (no CTA barrier) ----
// Entries of list q (raw) through f(raw), 0 for none; every lane calls f the
// same number of times (kU loads in flight per lane), partition by partition
// in slot order (the in-place write of split lists relies on that order).
template <int kU, class S, class F>
__device__ __forceinline__ void WarpForEachEntry(const uint64_t* L, int q, const S& sm, F&& f) {
  constexpr int kCapW = S::kCapacity / kWarps;
  const int lane = threadIdx.x & 31;
#pragma unroll 1
  for (int w = 0; w < kWarps; ++w) {
    const int c = sm.wcnt[w][q];
    const uint64_t* src = L + w * kCapW;
#pragma unroll 1
    for (int i0 = 0; i0 < c; i0 += 32 * kU) {
      uint64_t x[kU];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = i0 + 32 * u + lane;
        x[u] = i < c ? src[i] : 0ull;
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) f(x[u]);
    }
  }
}

// The same entries in no particular order, all partitions at once (round 7):
// a batch loads kU entries per lane from each of the kWarps partitions
// (kWarps * kU loads in flight per lane), so a pass over a list of n entries
// spread evenly takes ~n / (32 kWarps kU) round trips to L2 instead of one or
// more per partition. Not for the in-place write of split lists.
template <int kU, class S, class F>
__device__ __forceinline__ void WarpForEachEntryAll(const uint64_t* L, int q, const S& sm, F&& f) {
  constexpr int kCapW = S::kCapacity / kWarps;
  const int lane = threadIdx.x & 31;
  int c[kWarps], cmax = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    c[w] = sm.wcnt[w][q];
    cmax = c[w] > cmax ? c[w] : cmax;
  }
#pragma unroll 1
  for (int i0 = 0; i0 < cmax; i0 += 32 * kU) {
    uint64_t x[kWarps][kU];
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int i = i0 + 32 * u + lane;
        x[w][u] = i < c[w] ? L[w * kCapW + i] : 0ull;
      }
    }
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
#pragma unroll
      for (int u = 0; u < kU; ++u) f(x[w][u]);
    }
  }
}

constexpr int kWarpSelU = 16;         // list loads in flight per lane (partition by partition)

// kAU > 0: WarpForEachEntryAll<kAU>; 0: WarpForEachEntry<kWarpSelU> (round 5's order).
template <int kAU, class S, class F>
__device__ __forceinline__ void WarpForEach(const uint64_t* L, int q, const S& sm, F&& f) {
  if constexpr (kAU > 0) {
    WarpForEachEntryAll<kAU>(L, q, sm, f);
  } else {
    WarpForEachEntry<kWarpSelU>(L, q, sm, f);
  }
}
constexpr int kWarpHistBits = 11;     // digit width of the warp's radix select
constexpr int kWarpHistBins = 1 << kWarpHistBits;

// Max and min ordered key of list q (0 / ~0 when empty). One warp; kAU
// loads per partition and lane in flight.
template <int kAU, class S>
__device__ void WarpListRange(const uint64_t* L, int q, const S& sm, uint64_t& mx, uint64_t& mn) {
  mx = 0ull;
  mn = ~0ull;
  WarpForEach<kAU>(L, q, sm, [&](uint64_t raw) {
    if (raw != 0ull) {
      const uint64_t x = RawToOrdered(raw);
      mx = x > mx ? x : mx;
      mn = x < mn ? x : mn;
    }
  });
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t a = ShflXor64(mx, o), b = ShflXor64(mn, o);
    mx = a > mx ? a : mx;
    mn = b < mn ? b : mn;
  }
}

// The k-th largest ordered key of list q (n entries, 1 <= k < n; keys
// distinct). One warp; hist: kWarpHistBins words of shared memory private to
// the warp. Radix select, kWarpHistBits bits per pass; stops as soon as the
// k-th key's bucket holds exactly the keys still needed.
// Round 7: no separate range pass. lo is a probable lower bound of the
// list's keys (the list threshold's high word): every key >= lo shares lo's
// bits above lo's highest zero bit hs, so the first pass histograms bits
// [hs - 10, hs] under that prefix and computes the list's range on the way.
// If it counted fewer than n keys (some key below lo: the bound did not
// hold), the passes restart from the highest bit in which the keys differ
// (round 5's start). Later windows start no higher than that bit.
template <int kAU, class S>
__device__ uint64_t WarpSelectKth(const uint64_t* L, int q, int k, int n, uint64_t lo,
                                  unsigned* hist, const S& sm) {
  constexpr int kPerLane = kWarpHistBins / 32;  // 64 bins, 8 groups of 8
  const int lane = threadIdx.x & 31;
  const int hs = 63 - __clzll(static_cast<long long>(~lo));  // ~lo != 0 (lo's low word is 0)
  uint64_t mask = hs == 63 ? 0ull : (~0ull << (hs + 1));
  uint64_t prefix = lo & mask;
  int shift = hs - (kWarpHistBits - 1) > 0 ? hs - (kWarpHistBits - 1) : 0;
  unsigned rem = unsigned(k);
  bool first = true;
  int hb = 63;  // the highest bit in which the keys differ (after the first pass)
  uint64_t mx = 0ull, mn = ~0ull;
  uint4* const h4 = reinterpret_cast<uint4*>(hist) + lane * (kPerLane / 4);
  for (;;) {
#pragma unroll
    for (int i = 0; i < kPerLane / 4; ++i) h4[i] = make_uint4(0u, 0u, 0u, 0u);
    __syncwarp();
    if (first) {
      WarpForEach<kAU>(L, q, sm, [&](uint64_t raw) {
        if (raw != 0ull) {
          const uint64_t x = RawToOrdered(raw);
          mx = x > mx ? x : mx;
          mn = x < mn ? x : mn;
          if ((x & mask) == prefix) atomicAdd(&hist[unsigned(x >> shift) & (kWarpHistBins - 1u)], 1u);
        }
      });
    } else {
      WarpForEach<kAU>(L, q, sm, [&](uint64_t raw) {
        const uint64_t x = RawToOrdered(raw);
        if (raw != 0ull && (x & mask) == prefix) {
          atomicAdd(&hist[unsigned(x >> shift) & (kWarpHistBins - 1u)], 1u);
        }
      });
    }
    __syncwarp();
    // Lane l holds bins [64 l, 64 l + 64) as 8 groups of 8.
    unsigned g[8], sum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint4 a = h4[2 * j], b = h4[2 * j + 1];
      g[j] = a.x + a.y + a.z + a.w + b.x + b.y + b.z + b.w;
      sum += g[j];
    }
    unsigned suf = sum;  // over lanes >= lane
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned t = __shfl_down_sync(0xffffffffu, suf, o);
      if (lane + o < 32) suf += t;
    }
    if (first) {
      first = false;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const uint64_t a = ShflXor64(mx, o), b = ShflXor64(mn, o);
        mx = a > mx ? a : mx;
        mn = b < mn ? b : mn;
      }
      hb = 63 - __clzll(static_cast<long long>(mx ^ mn));
      const unsigned total = __shfl_sync(0xffffffffu, suf, 0);
      if (total != unsigned(n)) {  // warp-uniform: restart from the range
        mask = hb == 63 ? 0ull : (~0ull << (hb + 1));
        prefix = mx & mask;
        shift = hb - (kWarpHistBits - 1) > 0 ? hb - (kWarpHistBits - 1) : 0;
        __syncwarp();  // every lane has read hist before the next pass clears it
        continue;
      }
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, suf >= rem);
    const int top = 31 - __clz(ballot);  // the highest lane whose suffix covers rem
    unsigned d = 0, above = 0, cnt = 0;
    if (lane == top) {
      above = suf - sum;
      int j = 0;  // the group holding the digit (unrolled: g stays in registers)
      bool found = false;
#pragma unroll
      for (int jj = 7; jj >= 0; --jj) {
        if (!found) {
          if (jj == 0 || above + g[jj] >= rem) {
            found = true;
            j = jj;
          } else {
            above += g[jj];
          }
        }
      }
      const unsigned* hb8 = hist + kPerLane * lane + 8 * j;
      int i = 7;
      for (; i > 0; --i) {
        if (above + hb8[i] >= rem) break;
        above += hb8[i];
      }
      d = unsigned(kPerLane * lane + 8 * j + i);
      cnt = hb8[i];
    }
    d = __shfl_sync(0xffffffffu, d, top);
    above = __shfl_sync(0xffffffffu, above, top);
    cnt = __shfl_sync(0xffffffffu, cnt, top);
    // Windows may overlap at the low end (shift clamped to 0): the
    // overlapping bits of d equal the prefix's (only matching keys counted).
    prefix |= uint64_t(d) << shift;
    mask |= uint64_t(kWarpHistBins - 1) << shift;
    rem -= above;
    __syncwarp();  // every lane has read hist before the next pass clears it
    if (cnt == rem || shift == 0) break;
    int wtop = shift - 1;
    if (hb < wtop) {
      // Bits (hb, shift) are the same in every key (those of mx): skip them.
      const uint64_t m2 = (~0ull << (hb + 1)) & ((1ull << shift) - 1ull);
      mask |= m2;
      prefix |= mx & m2;
      wtop = hb;
    }
    shift = wtop - (kWarpHistBits - 1) > 0 ? wtop - (kWarpHistBits - 1) : 0;
  }
  return prefix;
}

// G: heads (B rows) per query; R: B rows per CTA (128, or 64 for one 64-head
// query); kKeyList: keys from a list (per sequence or per query) instead of
// the contiguous range; kCap: list capacity per (query, split); kSt: stages;
// kDB: double-buffered accumulators (1 CTA per SM), else one accumulator and
// 2 CTAs per SM (an MMA then its epilogue, stage by stage).
template <int G, int R, bool kKeyList, int kCap, int kSt, bool kDB>
__global__ void __launch_bounds__(kThreads, kDB ? 1 : 2)
    SelectKernelV2(const SelectArgs a, const __grid_constant__ CUtensorMap key_map) {
  constexpr int NQ = R / G;                   // queries per CTA
  constexpr int LC = R / 4;                   // accumulator columns per lane
  constexpr int QL = LC >= G ? LC / G : 1;    // queries per lane
  constexpr int LPQ = G > LC ? G / LC : 1;    // lanes sharing one query: 1, 2 or 4
  constexpr int CPQ = LC >= G ? G : LC;       // columns per query per lane
  constexpr int NS = LPQ == 1 ? 2 * QL : 1;   // scores per lane per stage
  constexpr int NP = CPQ >= 32 ? 4 : (CPQ >= 16 ? 2 : 1);  // partial sums per head sum
  constexpr int ACC = R / 2;
  constexpr int kCapW = kCap / kWarps;
  // Seeding: single accumulator, contiguous keys, top-k <= 2048, and one or
  // two lanes per query (G < 64, or G = 64 with two queries per CTA).
  constexpr bool kSeedable =
      !kDB && !kKeyList && kCap == kSelectListCap && (LPQ == 1 || (LPQ == 2 && R == 128));
  // A query's sampled scores are held by 64 (G < 64) or 128 (G = 64) lanes,
  // whose tops a warp reads 2 or 4 lanes' worth per lane.
  constexpr int kUnionPerLane = LPQ == 1 ? 2 : 4;
  constexpr int kP = kSelectSampleStride;
  static_assert(R == 64 || R == 128, "R must be 64 or 128");
  static_assert(NQ >= 1 && NQ <= kMaxQ && LPQ <= 4, "G must be 8, 16, 32 or 64");
  static_assert(kCapW >= 2 * 16 + 256 || kCap == 4096, "partition too small");
  constexpr int kTop = kSelectSeedLaneTop;   // sampled scores kept per (lane, query)
  static_assert(kP >= 2, "the sample must be sparser than the range");
  static_assert(kTop == 8, "the sample tops are two float4 per (lane, query)");
  static_assert(kSelectSeedLanes == kWarps * 8,
                "a query's sampled keys are scored by 8 lanes per warp");
  using S = Smem<kCap, kSt>;
  static_assert(!kSeedable || sizeof(float) * kTop * QL * kThreads <= sizeof(S::cbuf),
                "the sample tops live in the compaction buffer");
  constexpr int kStages = kSt;
  // 1024-byte aligned (SW128 tiles), computed so that the compiler keeps
  // the shared address space (plain LDS/STS rather than generic accesses).
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  S& sm = *reinterpret_cast<S*>(smem_raw + ((1024u - (smem_base & 1023u)) & 1023u));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  // The warpgroup index from lane 0 (round 6): known warp-uniform, so that the
  // wgmma descriptors derived from it stay in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);
  const int w4 = warp & 3, g8 = lane >> 2, c4 = lane & 3;
  const int seq = blockIdx.z, split = blockIdx.y;
  const int64_t qs_begin = a.query_start[seq], qs_end = a.query_start[seq + 1];
  // Query groups in reverse launch order (round 7): CTAs start roughly in
  // blockIdx order, and a causal prefill's later queries see more keys, so
  // the longest CTAs start first and the short ones fill the last wave
  // (experiment bit 12: round 6's ascending order).
  const int64_t gx = (a.experiment & 4096) != 0 ? int64_t(blockIdx.x)
                                                : int64_t(gridDim.x) - 1 - int64_t(blockIdx.x);
  const int64_t q0 = qs_begin + gx * NQ;
  if (q0 >= qs_end) return;
  const int nq = int(qs_end - q0 < NQ ? qs_end - q0 : NQ);
  const int64_t ntok = a.num_tokens[seq];
  const int k = a.topk;

  // ---- per-query state and the B operand, once per CTA ----
  if (tid < NQ) {
    sm.pos[tid] = tid < nq ? a.positions[q0 + tid] : -1;
    sm.thr[tid] = 0;
    sm.thrf[tid] = ThresholdScore(0);
    sm.xseed[tid] = 0;
  }
  if (tid == 0) {
    sm.need = 0;
    sm.closed = 0;
    sm.fail = 0;
  }
  if ((tid >> 1) < R) {
    // B row r is accumulator column r = 8 i + 2 c + e, held by lanes with
    // lane % 4 == c as their local column m = 2 i + e; f = c * LC + m orders
    // the columns lane by lane, and column f serves query f / G, slot f % G.
    const int r = tid >> 1, half = tid & 1;
    const int f = ((r >> 1) & 3) * LC + 2 * (r >> 3) + (r & 1);
    const int qi = f / G, slot = f % G;
    int4 v[4] = {};
    float wv = 0.0f;
    if (qi < nq) {
      const int64_t t = q0 + qi;
      int head = (a.head_list != nullptr && a.masked_heads == 0) ? a.head_list[t * G + slot] : slot;
      head = min(max(head, 0), a.heads - 1);
      bool keep = true;
      if (a.masked_heads > 0) {
        keep = false;
        for (int e = 0; e < a.masked_heads; ++e) keep |= a.head_list[t * a.masked_heads + e] == head;
      }
      const int4* src = reinterpret_cast<const int4*>(a.q8 + (t * a.heads + head) * 128 + half * 64);
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = src[c];
      wv = keep ? a.weights[t * a.heads + head] : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      *reinterpret_cast<int4*>(sm.q + ptx::Sw128Offset(r, (half * 4 + c) * 16)) = v[c];
    }
    if (half == 0) sm.wl[f + 4 * (f / LC)] = wv;
  }
  for (int i = tid; i < kWarps * kMaxQ; i += kThreads) (&sm.wcnt[0][0])[i] = 0;
  __syncthreads();

  // ---- this CTA's key slots: keys [0, kend) or key_list[0, kend) ----
  int64_t maxpos = -1, minpos = INT64_MAX;
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    maxpos = max(maxpos, sm.pos[q]);
    minpos = min(minpos, sm.pos[q]);
  }
  const int32_t* klist = nullptr;
  int64_t kend;
  if constexpr (kKeyList) {
    const int64_t row = a.key_list_per_query ? q0 : int64_t(seq);
    klist = a.key_list + row * a.key_list_stride;
    kend = a.key_list_len[row];
  } else {
    kend = min(ntok, maxpos + 1);
  }
  const int64_t sbeg = int64_t(split) * a.keys_per_split;
  const int64_t send = min(kend, sbeg + a.keys_per_split);
  const int n_iter = send > sbeg ? int((send - sbeg + kKeys - 1) / kKeys) : 0;
  const int32_t* ptab = a.page_table + int64_t(seq) * a.page_table_stride;
  const int64_t list_stride = int64_t(a.splits) * kCap;  // between consecutive queries
  uint64_t* lists = a.lists + (q0 * a.splits + split) * int64_t(kCap);
  // 32-bit key arithmetic in the epilogue (keys < num_tokens <= INT32_MAX).
  const int32_t sbeg32 = int32_t(sbeg), send32 = int32_t(send);
  const int32_t list_stride32 = int32_t(list_stride);  // <= 1024 splits x 16384

  // Seeding (kSeedable; see SelectSeedTopk): a sample pass over the keys
  // sbeg + kP j of the range (per-lane tops, no lists), the seeds, then the
  // full pass over every key.
  bool seed = false;
  int n_samp_iter = 0;
  if constexpr (kSeedable) {
    seed = a.seed_k > 0 && send - sbeg >= a.seed_min_keys && !(a.experiment & 16);
    const int64_t ns = send > sbeg ? (send - sbeg + kP - 1) / kP : 0;
    n_samp_iter = int((ns + kKeys - 1) / kKeys);
  }
  // Keys of the current pass: row r of pass iteration it holds key
  // sbeg + pass_stride * (it * kKeys + r).
  int32_t pass_stride = 1;
  bool pass_sample = false;
  // Sample tops: float4 (2 ql + e) * kThreads + tid holds scores 4e..4e+3 of
  // thread tid's local query ql, descending (-inf: none). Each thread touches
  // only its own entries during the sample pass.
  float4* const top4 = reinterpret_cast<float4*>(sm.cbuf);

  const uint32_t keys_smem = ptx::SmemAddr(sm.keys[0]);
  const uint32_t kscale_smem = ptx::SmemAddr(sm.kscale[0]);
  // Contiguous copies: thread (ld_pg, ld_u) copies 16-byte chunks ld_u + 128 j
  // (j < 4) of page ld_pg of the stage; chunk c is row c / 8, so the four
  // destinations are 2048 bytes apart under the swizzle (row % 8 is fixed).
  const int ld_pg = tid >> 7, ld_u = tid & 127;
  const uint32_t ld_dst0 = uint32_t(ld_pg * 64 * 128) + ptx::Sw128Offset(ld_u >> 3, (ld_u & 7) * 16);
  const int32_t ld_page0 = int32_t(sbeg >> 6) + ld_pg;
  // The page-table entry of the next iteration is read one call ahead (its
  // load latency then hides behind a stage instead of stalling the copies):
  // a pass calls load_contig with it = 0, 1, 2, ... in order.
  // Page bounds in 32 bits: page * 64 < 2^31 + 256 (keys < 2^31) fits unsigned.
  int32_t pt_next = 0;
  const uint32_t send_u = uint32_t(send);
  auto load_contig = [&](int stage, int it) {
    const int32_t page = ld_page0 + 2 * it;
    const bool live = uint32_t(page) * 64u < send_u;
    const int32_t page_id = it != 0 ? pt_next : (live ? ptab[page] : 0);
    pt_next = uint32_t(page + 2) * 64u < send_u ? ptab[page + 2] : 0;
    if (live) {
      const uint8_t* pg = a.pool + int64_t(page_id) * int64_t(a.page_bytes);
      const uint32_t dst = keys_smem + uint32_t(stage * kKeys * 128) + ld_dst0;
      const uint8_t* src = pg + ld_u * 16;
#pragma unroll
      for (int j = 0; j < 4; ++j) ptx::CpAsync16(dst + 2048u * j, src + 2048 * j);
      if (ld_u < 16) {
        ptx::CpAsync16(kscale_smem + uint32_t((stage * kKeys + ld_pg * 64 + 4 * ld_u) * 4),
                       pg + a.scale_offset + 16 * ld_u);
      }
    }
  };
  // Gathered copies (sample pass; key lists): thread pair r copies row r.
  auto load_rows = [&](int stage, int it) {
    const int r = tid >> 1, half = tid & 1;
    int64_t key = -1;
    if constexpr (kKeyList) {
      const int64_t s = sbeg + int64_t(it) * kKeys + r;
      if (s < send) key = int64_t(klist[s]);
      if (key >= ntok) key = -1;
      if (half == 0) sm.kidx[stage][r] = int32_t(key);
    } else {
      const int64_t s = sbeg + int64_t(kP) * (int64_t(it) * kKeys + r);
      if (s < send) key = s;
    }
    if (key >= 0) {
      const uint8_t* pg = a.pool + int64_t(ptab[key >> 6]) * int64_t(a.page_bytes);
      const int slotp = int(key & 63);
      const uint8_t* src = pg + slotp * 128 + half * 64;
      const uint32_t dst = keys_smem + uint32_t(stage * kKeys * 128);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        ptx::CpAsync16(dst + ptx::Sw128Offset(r, (half * 4 + c) * 16), src + c * 16);
      }
      if (half == 0) {
        ptx::CpAsync4(kscale_smem + uint32_t((stage * kKeys + r) * 4), pg + a.scale_offset + slotp * 4);
      }
    }
  };
  auto load_stage = [&](int stage, int it) {
    if constexpr (kKeyList) {
      load_rows(stage, it);
    } else if constexpr (kSeedable) {
      if (pass_sample) {
        load_rows(stage, it);
      } else {
        load_contig(stage, it);
      }
    } else {
      load_contig(stage, it);
    }
  };

  // ---- lane-local query bookkeeping ----
  // Query of local slot ql, the lanes sharing it (gmask) and their leader.
  auto lane_query = [&](int ql) -> int {
    if constexpr (LPQ == 1) return c4 * QL + ql;
    else if constexpr (LPQ == 2) return c4 >> 1;
    else return 0;
  };
  const unsigned gmask = LPQ == 1 ? (0x11111111u << c4)
                                  : (LPQ == 2 ? (0x33333333u << (c4 & 2)) : 0x55555555u);
  const bool leader = g8 == 0 && (c4 % LPQ) == 0;
  // This lane's partition of the list of its first local query.
  uint64_t* const lane_list = lists + int64_t(lane_query(0)) * list_stride + warp * kCapW;
  const unsigned lt_mask = (1u << lane) - 1u;
  const unsigned lt_group = gmask & lt_mask;  // the lanes before this one sharing its query
  int cnt_r[QL];
#pragma unroll
  for (int ql = 0; ql < QL; ++ql) cnt_r[ql] = 0;
  // Round 6: a key of the current pass enters (or, in the sample pass, is
  // ranked for) local query ql only if key < lim_r[ql] (unsigned): the key is
  // visible (key <= position; positions < num_tokens <= INT32_MAX, -1 for
  // padding), inside the range (< send; list keys are < num_tokens and -1 for
  // none), the lane holds a whole score (LPQ = 4: even c4), and in a full pass
  // the list is open and insertion on. Set at the start of each pass: no
  // per-stage visibility test (a stage whose keys are all visible passes the
  // same test).
  uint32_t lim_r[QL];
  auto set_limits = [&](bool sample) {
    const unsigned closed = sm.closed;
    const bool lane_whole = LPQ != 4 || (c4 & 1) == 0;
#pragma unroll
    for (int ql = 0; ql < QL; ++ql) {
      const int q = lane_query(ql);
      const int32_t p1 = int32_t(sm.pos[q]) + 1;
      int32_t l = kKeyList ? p1 : min(p1, send32);
      if (!lane_whole) l = 0;
      if (!sample && ((a.experiment & 2) != 0 || ((closed >> q) & 1u) != 0u)) l = 0;
      lim_r[ql] = uint32_t(max(l, 0));
    }
  };
  auto publish_counts = [&]() {
    if (leader) {
#pragma unroll
      for (int ql = 0; ql < QL; ++ql) sm.wcnt[warp][lane_query(ql)] = cnt_r[ql];
    }
  };
  auto refresh_counts = [&]() {
#pragma unroll
    for (int ql = 0; ql < QL; ++ql) cnt_r[ql] = sm.wcnt[warp][lane_query(ql)];
  };

  // Descriptors as 32-bit low words (ptx::Sw128DescLo; the high word is a
  // constant): a stage is 16 KB (1024 in the address field), a k step of 32
  // bytes 2.
  const uint32_t desc_a_lo0 = ptx::Sw128DescLo(ptx::SmemAddr(sm.keys[0]) + wg * 64 * 128);
  const uint32_t desc_b_lo0 = ptx::Sw128DescLo(ptx::SmemAddr(sm.q));
  auto issue_mma = [&](float (&acc)[ACC], int stage) {
    const uint32_t da = desc_a_lo0 + uint32_t(stage) * uint32_t((kKeys * 128) >> 4);
    ptx::WgmmaFence();
    if constexpr (R == 128) {
      ptx::WgmmaM64N128K32E4M3Zero(acc, ptx::Sw128DescFromLo(da), ptx::Sw128DescFromLo(desc_b_lo0));
    } else {
      ptx::WgmmaM64N64K32E4M3Zero(acc, ptx::Sw128DescFromLo(da), ptx::Sw128DescFromLo(desc_b_lo0));
    }
#pragma unroll
    for (int kk = 1; kk < 4; ++kk) {
      const uint64_t a = ptx::Sw128DescFromLo(da + 2 * kk);
      const uint64_t b = ptx::Sw128DescFromLo(desc_b_lo0 + 2 * kk);
      if constexpr (R == 128) {
        ptx::WgmmaM64N128K32E4M3(acc, a, b, 1);
      } else {
        ptx::WgmmaM64N64K32E4M3(acc, a, b, 1);
      }
    }
    ptx::WgmmaCommit();
  };
  // Half-tile schedule (round 6, R = 128): the same product as two N = 64
  // MMAs of B rows [0, 64) and [64, 128) into acc[0, 32) and acc[32, 64), one
  // commit group each; column r of the N = 128 tile is column r % 64 of half
  // r / 64 and lands in the same register, so the epilogue reads the same
  // values, and it starts on the first half while the second is in flight.
  auto issue_mma_halves = [&](float (&acc)[ACC], int stage) {
    if constexpr (R == 128) {
      const uint32_t da = desc_a_lo0 + uint32_t(stage) * uint32_t((kKeys * 128) >> 4);
      ptx::WgmmaFence();
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float (&d)[32] = *reinterpret_cast<float(*)[32]>(&acc[32 * hf]);
        const uint32_t db = desc_b_lo0 + uint32_t(hf) * uint32_t((64 * 128) >> 4);
        ptx::WgmmaM64N64K32E4M3Zero(d, ptx::Sw128DescFromLo(da), ptx::Sw128DescFromLo(db));
#pragma unroll
        for (int kk = 1; kk < 4; ++kk) {
          ptx::WgmmaM64N64K32E4M3(d, ptx::Sw128DescFromLo(da + 2 * kk), ptx::Sw128DescFromLo(db + 2 * kk),
                                  1);
        }
        ptx::WgmmaCommit();
      }
    }
  };

  // A partition whose fill exceeds need_at after a stage is compacted at the
  // next CTA-wide step (a stage adds at most 16 keys to it). Warpgroup
  // schedule (see the pipeline below): CTA-wide steps every kWgSyncEvery
  // stages, the check only before them.
  constexpr int kWgSyncEvery = 4;
  const bool wg_sync = !kDB && (a.experiment & 256) == 0;
  const bool check_every_stage = !wg_sync;
  const int need_at = wg_sync ? kCapW - 16 * kWgSyncEvery : kCapW - 16;

  // ---- epilogue of pass iteration `it` (in stage buffer `stage`) ----
  // Each score is compared with the score of its query's threshold (float;
  // see ThresholdScore); a warp inserts the passing keys' raw entries with one
  // ballot per score slot, and checks its partitions for overflow once per
  // stage (a stage adds at most 16 keys per query to a warp's partition).
  // mid_wait (half-tile schedule): the second half of acc is waited for
  // before its first column is read.
  auto epilogue = [&](float (&acc)[ACC], int stage, int it, bool mid_wait) {
    auto mid = [&]() {
      if (mid_wait) {
        ptx::WgmmaWait<0>();
#pragma unroll
        for (int i = ACC / 2; i < ACC; ++i) ptx::FenceOperand(acc[i]);
      }
    };
    if (a.experiment & 1) {  // benchmark-only: no epilogue at all
      mid();
      return;
    }
    float w[LC];
#pragma unroll
    for (int m = 0; m < LC; m += 4) {
      const float4 t4 = *reinterpret_cast<const float4*>(&sm.wl[c4 * (LC + 4) + m]);
      w[m] = t4.x;
      w[m + 1] = t4.y;
      w[m + 2] = t4.z;
      w[m + 3] = t4.w;
    }
    // In-thread head sums: s[h][ql] for key rows g8 + 8h, in NP independent
    // chains (a 32-long chain of dependent FMAs stalls on its latency); chain
    // p of (h, ql) takes the query's columns mm = p, p + NP, ... in order. The
    // columns are visited in order, and mid() runs before the first column of
    // the second half (local columns LC / 2 on: the second N = 64 MMA of the
    // half-tile schedule, which may still be in flight until then).
    float v[2][QL][NP];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int ql = 0; ql < QL; ++ql) {
#pragma unroll
        for (int p = 0; p < NP; ++p) v[h][ql][p] = 0.0f;
      }
    }
#pragma unroll
    for (int m = 0; m < LC; ++m) {
      if (m == LC / 2) mid();
      const int ql = m / CPQ, mm = m % CPQ;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        v[h][ql][mm % NP] =
            fmaf(fmaxf(acc[4 * (m >> 1) + 2 * h + (m & 1)], 0.0f), w[m], v[h][ql][mm % NP]);
      }
    }
    float s[2][QL];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int ql = 0; ql < QL; ++ql) {
        if constexpr (NP == 4) {
          s[h][ql] = (v[h][ql][0] + v[h][ql][1]) + (v[h][ql][2] + v[h][ql][3]);
        } else if constexpr (NP == 2) {
          s[h][ql] = v[h][ql][0] + v[h][ql][1];
        } else {
          s[h][ql] = v[h][ql][0];
        }
      }
    }
    // Lanes sharing a query: reduce (scatter over the two key rows).
    float sc[NS];
    int hrow[NS], qloc[NS];
    if constexpr (LPQ == 1) {
#pragma unroll
      for (int ql = 0; ql < QL; ++ql) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          sc[2 * ql + h] = s[h][ql];
          hrow[2 * ql + h] = h;
          qloc[2 * ql + h] = ql;
        }
      }
    } else if constexpr (LPQ == 2) {
      const bool hi = (c4 & 1) != 0;
      sc[0] = (hi ? s[1][0] : s[0][0]) + __shfl_xor_sync(0xffffffffu, hi ? s[0][0] : s[1][0], 1);
      hrow[0] = hi ? 1 : 0;
      qloc[0] = 0;
    } else {
      const bool hi = (c4 & 2) != 0;
      const float r1 = (hi ? s[1][0] : s[0][0]) + __shfl_xor_sync(0xffffffffu, hi ? s[0][0] : s[1][0], 2);
      sc[0] = r1 + __shfl_xor_sync(0xffffffffu, r1, 1);
      hrow[0] = hi ? 1 : 0;
      qloc[0] = 0;
    }
    const int row0 = wg * 64 + 16 * w4 + g8;
    int32_t key[2];  // key indices < num_tokens <= INT32_MAX; -1: none (key lists)
    float ks[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + 8 * h;
      if constexpr (kKeyList) {
        key[h] = sm.kidx[stage][row];
      } else {
        key[h] = sbeg32 + pass_stride * (it * kKeys + row);
      }
      ks[h] = sm.kscale[stage][row];
    }
    if constexpr (kSeedable) {
      if (pass_sample) {
        // Sample pass: merge this lane's scores into its per-query tops (a
        // descending insertion network; invisible keys and NaN scores enter
        // as -inf, which displaces nothing). Slot j is row hrow[j] of local
        // query qloc[j] (G < 64: j = 2 ql + h; G = 64: one slot, one query,
        // the lane's row after the pair reduction).
#pragma unroll
        for (int ql = 0; ql < QL; ++ql) {
          float4* const tq = top4 + (2 * ql) * kThreads + tid;
          const float4 t0 = tq[0], t1 = tq[kThreads];
          float v[kTop] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
#pragma unroll
          for (int j = 0; j < NS; ++j) {
            if (qloc[j] != ql) continue;
            const int h = hrow[j];
            const float score = sc[j] * (h ? ks[1] : ks[0]);
            const int32_t kj = h ? key[1] : key[0];
            const bool ok = uint32_t(kj) < lim_r[ql] && score > -INFINITY;
            float x = ok ? score : -INFINITY;
#pragma unroll
            for (int i = 0; i < kTop; ++i) {
              const float hi = fmaxf(v[i], x);
              x = fminf(v[i], x);
              v[i] = hi;
            }
          }
          tq[0] = make_float4(v[0], v[1], v[2], v[3]);
          tq[kThreads] = make_float4(v[4], v[5], v[6], v[7]);
        }
        return;
      }
    }
    // Round 5: the threshold test is one float comparison with the
    // threshold's score (a superset of the exact candidate-key test: it also
    // admits the keys of exactly that score with a higher index, and NaN
    // scores), and a passing key is stored as its raw entry (no ordered-key
    // conversion). Visibility, key validity and an open list fold into one
    // unsigned bound per query and stage (lim: a key passes iff key < lim),
    // and the store's address is computed whether or not the lane passes, so
    // that the store alone is predicated: per slot one ballot and no branch.
    float tf[QL];
    uint32_t cpos[QL];
#pragma unroll
    for (int ql = 0; ql < QL; ++ql) {
      tf[ql] = sm.thrf[lane_query(ql)];
      cpos[ql] = uint32_t(ql * list_stride32 + cnt_r[ql]);  // slot offset from lane_list
    }
    const uint32_t nkey[2] = {~uint32_t(key[0]), ~uint32_t(key[1])};
    auto slots = [&](auto branch) {
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        const int h = hrow[j], ql = qloc[j];
        // h may be lane-dependent: selects, no local arrays.
        const float score = sc[j] * (h ? ks[1] : ks[0]);
        const uint32_t kj = uint32_t(h ? key[1] : key[0]);
        unsigned b;
        if constexpr (decltype(branch)::value) {
          const bool pass = kj < lim_r[ql] && !(score < tf[ql]);
          b = __ballot_sync(0xffffffffu, pass);
          if (b == 0) continue;
          if (pass) {
            lane_list[cpos[ql] + uint32_t(__popc(b & lt_group))] =
                (uint64_t(__float_as_uint(score)) << 32) | uint64_t(h ? nkey[1] : nkey[0]);
          }
        } else {
          b = SlotInsert(lane_list, cpos[ql], lt_group, kj, h ? nkey[1] : nkey[0], lim_r[ql], score,
                         tf[ql]);
        }
        cpos[ql] += uint32_t(__popc(b & gmask));
      }
    };
    // Experiment bit 6: round 4's branch around a slot's store code when no
    // lane of the warp passes.
    if (a.experiment & 64) {
      slots(std::true_type{});
    } else {
      slots(std::false_type{});
    }
#pragma unroll
    for (int ql = 0; ql < QL; ++ql) cnt_r[ql] = int(cpos[ql]) - ql * list_stride32;
    // Overflow check (round 6): with the warpgroup schedule only in the stage
    // before each CTA-wide step (it % kWgSyncEvery == kWgSyncEvery - 1), the
    // one that compacts: a partition at most need_at = kCapW - 16 kWgSyncEvery
    // full after a check takes at most kWgSyncEvery stages of 16 keys before
    // the next check, which is followed by the compaction.
    if (leader && (check_every_stage || (it & (kWgSyncEvery - 1)) == kWgSyncEvery - 1)) {
      unsigned bits = 0;
#pragma unroll
      for (int ql = 0; ql < QL; ++ql) {
        if (cnt_r[ql] > need_at) bits |= 1u << lane_query(ql);
      }
      // A closed list takes no key; its entries may already be final output
      // (split lists) and must not be compacted.
      bits &= ~sm.closed;
      if (bits != 0) atomicOr(&sm.need, bits);
    }
  };

  // ---- pipeline ----
  // Copies run kPrefetch stages ahead, one cp.async group per stage. The step
  // for iteration it: this thread's copies of its stage landed, barrier (every
  // warp is done with the stage being refilled), compactions of lists that
  // may overflow, the next copies.
  //
  // Single accumulator (round 5): the two warpgroups synchronise with the
  // whole CTA only every kWgSyncEvery stages and otherwise each with itself
  // (a named barrier): a warpgroup copies, multiplies and reads only its own
  // half of each stage (page wg: its A rows, scales and key slots), so the two
  // may drift apart by up to that many stages and one's MMA overlap the
  // other's epilogue. Compactions run at the CTA-wide points only, so a
  // partition flags itself kWgSyncEvery stages (16 keys each) early.
  // Experiment bit 8: a CTA-wide barrier at every stage (round 4).
  constexpr int kPrefetch = kStages - 1;
  // The CTA-wide step: barrier, then the compactions of the lists whose
  // partitions may overflow.
  auto cta_step = [&]() {
    __syncthreads();
    const unsigned need = sm.need;
    if (need != 0) {
      publish_counts();
      __syncthreads();
      if (tid == 0) sm.need = 0;
      for (int q = 0; q < NQ; ++q) {
        if ((need >> q) & 1u) CompactList(lists + q * list_stride, q, k, sm);
      }
      refresh_counts();
    }
  };
  auto step_top = [&](int load_slot, int load_it) {
    ptx::CpAsyncWait<kDB ? kPrefetch - 2 : kPrefetch - 1>();
    ptx::FenceProxyAsync();
    if (wg_sync && (load_it - kPrefetch) % kWgSyncEvery != 0) {
      asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
    } else {
      cta_step();
    }
    load_stage(load_slot, load_it);  // no copy past send
    ptx::CpAsyncCommit();
  };
  auto retire = [&](float (&acc)[ACC]) {
#pragma unroll
    for (int i = 0; i < ACC; ++i) ptx::FenceOperand(acc[i]);
  };
  float acc0[ACC], acc1[ACC];
  // One pass of n iterations (single accumulator): an MMA then its epilogue,
  // stage by stage; ends with every copy landed and a barrier.
  auto run_pass = [&](int n) {
    set_limits(pass_sample);
#pragma unroll
    for (int s = 0; s < kPrefetch; ++s) {
      load_stage(s, s);
      ptx::CpAsyncCommit();
    }
    int st = 0, ld = kPrefetch % kStages;
    for (int s = 0; s < n; ++s) {
      step_top(ld, s + kPrefetch);
      issue_mma(acc0, st);
      ptx::WgmmaWait<0>();
      retire(acc0);
      epilogue(acc0, st, s, false);
      st = st + 1 == kStages ? 0 : st + 1;
      ld = ld + 1 == kStages ? 0 : ld + 1;
    }
    ptx::CpAsyncWait<0>();
    __syncthreads();
  };

  // ---- the full pass over contiguous keys by TMA (round 6; an experiment) ----
  // Lane 0 of each warpgroup's first warp produces: per stage it loads the
  // warpgroup's 64-key page (a 3-D tiled TMA of the pool, rows swizzled as
  // wgmma reads them) and its 256 bytes of scales (a bulk copy), both
  // completing on the stage's full barrier; every thread of the warpgroup
  // arrives on the stage's empty barrier once its MMA and epilogue are done
  // with it, and the producer warp waits on that before refilling the stage.
  // The consumers issue no copies and the warpgroup no per-stage barrier; the
  // CTA-wide step (compactions) stays every kWgSyncEvery stages (every stage
  // with experiment bit 8). Measured on the H200 (round 6, run 2): 16% fewer
  // instructions than round 5 but no faster for MISA and 13% slower for dense
  // than the cp.async stages (the wgmma's warpgroup arrival and the producer
  // warp's wait on the slowest warp gate every stage; round6_notes.md), so it
  // runs only on request: experiment bit 9 (512), or bit 10 (1024, with the
  // half-tile schedule), when LaunchT could encode the pool's tensor map
  // (it then sets kTmaActive).
  constexpr bool kTmaCapable = !kDB && !kKeyList;
  const bool use_tma = kTmaCapable && (a.experiment & kTmaActive) != 0;
  // Experiment bit 10 (1024): the half-tile schedule (issue_mma_halves) in
  // the TMA pass of the 128-row tile (measured slower too).
  const bool halves = R == 128 && use_tma && (a.experiment & 1024) != 0;
  bool mbar_live = false;  // the mbarriers hold objects (inval before re-init)
  auto run_pass_tma = [&](int n) {
    set_limits(false);
    // Earlier generic-proxy writes to the stages (the sample pass's copies,
    // the final selection's histograms before a rescan) before TMA writes.
    ptx::FenceProxyAsync();
    if (tid == 0) {
#pragma unroll 1
      for (int i = 0; i < 2 * kStages; ++i) {
        const uint32_t f = ptx::SmemAddr(&sm.mbar_full[0][0] + i);
        const uint32_t e = ptx::SmemAddr(&sm.mbar_empty[0][0] + i);
        if (mbar_live) {
          ptx::MbarInval(f);
          ptx::MbarInval(e);
        }
        ptx::MbarInit(f, 1);
        ptx::MbarInit(e, 128);
      }
      ptx::FenceMbarInit();
    }
    mbar_live = true;
    __syncthreads();
    const uint32_t full0 = ptx::SmemAddr(&sm.mbar_full[wg][0]);
    const uint32_t empty0 = ptx::SmemAddr(&sm.mbar_empty[wg][0]);
    // The producer is lane 0 of the warpgroup's first warp; the whole warp
    // waits for a stage to be free (no spin loop on a divergent path before
    // the warp's wgmma, which must run converged), then lane 0 issues.
    const bool producer_warp = w4 == 0, producer = producer_warp && lane == 0;
    int32_t pid_next = 0;  // page id of the producer's next page (read one stage ahead)
    auto produce = [&](int it, int slot) {
      const int32_t page = ld_page0 + 2 * it;
      const uint32_t full = full0 + 8u * uint32_t(slot);
      const int32_t pid = pid_next;
      pid_next = uint32_t(page + 2) * 64u < send_u ? ptab[page + 2] : 0;
      if (uint32_t(page) * 64u < send_u) {
        ptx::MbarArriveExpectTx(full, 64u * 128u + 64u * 4u);
        ptx::TmaLoad3D(keys_smem + uint32_t(slot * kKeys * 128 + wg * 64 * 128), &key_map, full, 0, 0,
                       pid);
        ptx::BulkLoad(kscale_smem + uint32_t((slot * kKeys + wg * 64) * 4),
                      a.pool + int64_t(pid) * int64_t(a.page_bytes) + a.scale_offset, 256u, full);
      } else {
        ptx::MbarArrive(full);  // past the range: nothing to load (keys fail send)
      }
    };
    if (producer) {
      ptx::PrefetchTensorMap(&key_map);
      pid_next = uint32_t(ld_page0) * 64u < send_u ? ptab[ld_page0] : 0;
      for (int s = 0; s < kPrefetch && s < n; ++s) produce(s, s);
    }
    __syncwarp();
    int st = 0, ld = kPrefetch % kStages;
    uint32_t fph = 0, eph = 0;  // phase parities of slot st's fill / slot ld's refill
    for (int s = 0; s < n; ++s) {
      if (!wg_sync || (s & (kWgSyncEvery - 1)) == 0) cta_step();
      if (producer_warp && s + kPrefetch < n) {
        // Slot ld last held iteration s + kPrefetch - kStages (if any).
        if (s + kPrefetch >= kStages) ptx::MbarWait<1>(empty0 + 8u * uint32_t(ld), eph ^ 1u);
        if (lane == 0) produce(s + kPrefetch, ld);
        __syncwarp();
      }
      ptx::MbarWait<0>(full0 + 8u * uint32_t(st), fph);
      __syncwarp();  // converged before the warpgroup's wgmma
      if (halves) {
        issue_mma_halves(acc0, st);
        ptx::WgmmaWait<1>();
#pragma unroll
        for (int i = 0; i < ACC / 2; ++i) ptx::FenceOperand(acc0[i]);
        epilogue(acc0, st, s, true);
      } else {
        issue_mma(acc0, st);
        ptx::WgmmaWait<0>();
        retire(acc0);
        epilogue(acc0, st, s, false);
      }
      ptx::MbarArrive(empty0 + 8u * uint32_t(st));
      if (++st == kStages) {
        st = 0;
        fph ^= 1u;
      }
      if (++ld == kStages) {
        ld = 0;
        eph ^= 1u;
      }
    }
    __syncthreads();
  };
  auto main_pass = [&](int n) {
    if constexpr (kTmaCapable) {
      if (use_tma) {
        run_pass_tma(n);
        return;
      }
    }
    run_pass(n);
  };

  if constexpr (!kDB) {
    if constexpr (kSeedable) {
      if (seed) {
        // Sample pass: each lane's tops of its queries' sampled scores.
        const float4 ninf4 = make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
#pragma unroll
        for (int i = 0; i < 2 * QL; ++i) top4[i * kThreads + tid] = ninf4;
        pass_stride = kP;
        pass_sample = true;
        run_pass(n_samp_iter);  // ends with a barrier: every lane's tops are written
        // Seeds: warp w takes queries w, w + kWarps, ...; the r-th best of the
        // union U of the query's 64 lane tops (8 warps x 8 lanes with c4 ==
        // q / QL) is found bit by bit on the ordered score bits, from the
        // highest bit in which U's values differ down to 24 bits below it
        // (lower bits 0: a value no higher than the exact one). The union
        // misses only scores that a lane ranked below its kTop-th, so U's r-th
        // is no higher than the sample's r-th. Threshold: below the candidate
        // keys of that score (every key scoring at least as much enters).
        const int r_seed = (a.experiment & 32) ? max(1, k / (4 * kP)) : a.seed_k;
        for (int q = warp; q < nq; q += kWarps) {
          const int cq = q / QL, qlq = q % QL;
          uint32_t v[kUnionPerLane * kTop];
          unsigned vmax = 0, vmin = ~0u;
          int nz = 0;
#pragma unroll
          for (int e = 0; e < kUnionPerLane; ++e) {
            const int u = lane + 32 * e;
            // Its thread. G < 64: union slot u is warp u / 8, g8 u % 8, the
            // lanes with c4 == q / QL; G = 64 (two lanes per query): warp
            // u / 16, g8 (u / 2) % 8, c4 = 2 q + u % 2.
            const int t = LPQ == 1 ? (u >> 3) * 32 + (u & 7) * 4 + cq
                                   : (u >> 4) * 32 + ((u >> 1) & 7) * 4 + 2 * q + (u & 1);
            const float4 x0 = top4[(2 * qlq) * kThreads + t];
            const float4 x1 = top4[(2 * qlq + 1) * kThreads + t];
            const float xs[kTop] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
            for (int i = 0; i < kTop; ++i) {
              const uint32_t o = xs[i] > -INFINITY ? topk::OrderedScoreBits(xs[i]) : 0u;
              v[kTop * e + i] = o;
              vmax = max(vmax, o);
              vmin = min(vmin, o);
              nz += o != 0u ? 1 : 0;
            }
          }
          vmax = __reduce_max_sync(0xffffffffu, vmax);
          vmin = __reduce_min_sync(0xffffffffu, vmin);
          nz = __reduce_add_sync(0xffffffffu, unsigned(nz));
          uint32_t T = 0;
          if (nz >= r_seed && r_seed >= 1) {
            if (vmax == vmin) {
              T = vmax;
            } else {
              const int hb = 31 - __clz(int(vmax ^ vmin));
              T = hb == 31 ? 0u : (vmax & (~0u << (hb + 1)));  // common prefix: <= every value
              const int lo = hb - 23 > 0 ? hb - 23 : 0;
              for (int b = hb; b >= lo; --b) {
                const uint32_t c = T | (1u << b);
                int n = 0;
#pragma unroll
                for (int i = 0; i < kUnionPerLane * kTop; ++i) n += v[i] >= c ? 1 : 0;
                n = int(__reduce_add_sync(0xffffffffu, unsigned(n)));
                if (n >= r_seed) T = c;  // invariant: at least r_seed values >= T
              }
            }
          }
          if (lane == 0) {
            const unsigned long long thr =
                T == 0u ? 0ull : (static_cast<unsigned long long>(T) << 32) - 1ull;
            sm.thr[q] = thr;
            sm.thrf[q] = ThresholdScore(thr);
            // The float test admits every key of ordered score bits >= T - 1
            // (thr's high word): the bound the final selection checks.
            sm.xseed[q] = thr & 0xffffffff00000000ull;
          }
        }
        __syncthreads();
        pass_stride = 1;
        pass_sample = false;
      }
    }
    main_pass(n_iter);
    publish_counts();
    __syncthreads();
  } else {
    // Double-buffered: four stages per trip; in trip stages s..s+3 the
    // warpgroup issues MMA(s) and MMA(s+1), then runs each stage's epilogue
    // while the next stage's MMA is in flight (the last of the four runs
    // alone). The wgmma sequence is the same in every thread and free of
    // branches (ptxas serialises wgmma issued on divergent paths or kept in
    // flight across a loop back-edge): stages at or past n_iter hold stale
    // data and produce no candidates (keys -1 or past send).
    set_limits(false);
#pragma unroll
    for (int s = 0; s < kPrefetch; ++s) {
      load_stage(s, s);
      ptx::CpAsyncCommit();
    }
    auto top = [&](int st) { step_top((st + kPrefetch) % kStages, st + kPrefetch); };
    for (int s = 0; s < n_iter; s += 4) {
      top(s);
      issue_mma(acc0, s % kStages);
      issue_mma(acc1, (s + 1) % kStages);
      ptx::WgmmaWait<1>();
      retire(acc0);
      epilogue(acc0, s % kStages, s, false);
      top(s + 1);
      issue_mma(acc0, (s + 2) % kStages);
      ptx::WgmmaWait<1>();
      retire(acc1);
      epilogue(acc1, (s + 1) % kStages, s + 1, false);
      top(s + 2);
      issue_mma(acc1, (s + 3) % kStages);
      ptx::WgmmaWait<1>();
      retire(acc0);
      epilogue(acc0, (s + 2) % kStages, s + 2, false);
      top(s + 3);
      ptx::WgmmaWait<0>();
      retire(acc1);
      epilogue(acc1, (s + 3) % kStages, s + 3, false);
    }
    ptx::CpAsyncWait<0>();
    publish_counts();
    __syncthreads();
  }

  // ---- final selection ----
  // Each query's top-k is the keys of its list at or above its k-th best
  // entry T. Fewer than 64 rows per query (4 or more queries per CTA): one
  // warp per query, radix passes over the list in global memory with a
  // private histogram, no CTA barrier (round 5; experiment bit 7: round 4's
  // CTA-wide selection of one query at a time, which the 64-row tile keeps:
  // it has one or two queries per CTA). A seeded query whose k-th best entry
  // lies below its seed bound (xseed; fewer than k entries) is not written:
  // it is marked in sm.fail for the exact rescan below.
  const bool warp_final = NQ >= 4 && !(a.experiment & 128);
  // List loads per partition and lane in flight in the warp's passes (round 7;
  // G = 16: 0, partition by partition as in round 5: with all partitions at
  // once ptxas spilled a register of that kernel).
  constexpr int kWarpAllU = G == 16 ? 0 : 2;
  uint64_t* scratch = reinterpret_cast<uint64_t*>(&sm.keys[0][0]);
  static_assert(offsetof(S, cbuf) == offsetof(S, keys) + sizeof(S::keys) &&
                    sizeof(S::keys) + sizeof(S::cbuf) >= kWarps * kWarpHistBins * sizeof(unsigned),
                "the warps' histograms live in the key stages and the compaction buffer");
  auto final_pass = [&](unsigned todo) {
    if (warp_final) {
      unsigned* hist = reinterpret_cast<unsigned*>(&sm.keys[0][0]) + warp * kWarpHistBins;
      const unsigned lt = (1u << lane) - 1u;
      for (int q = warp; q < nq; q += kWarps) {
        if (((todo >> q) & 1u) == 0u) continue;
        uint64_t* L = lists + q * list_stride;
        int n = 0;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) n += sm.wcnt[w][q];
        const unsigned long long xs = sm.xseed[q];
        uint64_t T = 1ull, Tk = 0ull;  // Tk: the k-th best entry (0: fewer than k)
        if (n > k || (xs != 0ull && n == k)) {
          if (n == k) {
            uint64_t mx, mn;
            WarpListRange<kWarpAllU>(L, q, sm, mx, mn);
            Tk = mn;
          } else {
            // Experiment bit 11: a bound no key reaches (the range restart).
            const uint64_t lo = (a.experiment & 2048) != 0 ? 0xffffffff00000000ull
                                                            : sm.thr[q] & 0xffffffff00000000ull;
            Tk = WarpSelectKth<kWarpAllU>(L, q, k, n, lo, hist, sm);
          }
          if (n > k) T = Tk;
        }
        if (xs != 0ull && Tk < xs) {
          if (lane == 0) atomicOr(&sm.fail, 1u << q);
          continue;
        }
        const int m = n < k ? n : k;
        const int64_t t = q0 + q;
        if (a.out != nullptr && a.sorted) {
          if (lane == 0) sm.selT[q] = T;  // sorted below, CTA-wide
          continue;
        }
        int base = 0;
        if (a.out == nullptr) {
          // Split lists: the survivors, ordered, into the list's first m
          // slots; a survivor's slot never passes the slot it was read from
          // (entries are read in slot order, each load before the stores
          // that depend on it), so nothing unread is overwritten.
          WarpForEachEntry<kWarpSelU>(L, q, sm, [&](uint64_t raw) {
            const uint64_t x = raw != 0ull ? RawToOrdered(raw) : 0ull;
            const bool keep = x != 0ull && x >= T;
            const unsigned b = __ballot_sync(0xffffffffu, keep);
            if (keep) L[base + __popc(b & lt)] = x;
            base += __popc(b);
          });
          if (lane == 0) a.counts[t * a.splits + split] = m;
        } else {
          int32_t* o = a.out + t * k;
          WarpForEach<kWarpAllU>(L, q, sm, [&](uint64_t raw) {
            const uint64_t x = raw != 0ull ? RawToOrdered(raw) : 0ull;
            const bool keep = x != 0ull && x >= T;
            const unsigned b = __ballot_sync(0xffffffffu, keep);
            if (keep) o[base + __popc(b & lt)] = topk::CandidateIndex(x);
            base += __popc(b);
          });
          for (int i = m + lane; i < k; i += 32) o[i] = -1;
        }
      }
      __syncthreads();  // fail bits, selT; the histograms are dead
      if (a.out != nullptr && a.sorted) {
        const unsigned fail = sm.fail;
        for (int q = 0; q < nq; ++q) {
          if (((todo >> q) & 1u) == 0u || ((fail >> q) & 1u) != 0u) continue;
          if (tid == 0) sm.sc.write_pos = 0;
          __syncthreads();
          const uint64_t T = sm.selT[q];
          int n = 0;
#pragma unroll
          for (int w = 0; w < kWarps; ++w) n += sm.wcnt[w][q];
          const int c = sm.wcnt[warp][q];
          const uint64_t* src = lists + q * list_stride + warp * kCapW;
          for (int i0 = 0; i0 < c; i0 += 32) {
            const int i = i0 + lane;
            const uint64_t x = i < c ? RawToOrdered(src[i]) : 0ull;
            const bool keep = i < c && x >= T;
            const int slot = topk::WarpAppendSlot(keep, &sm.sc.write_pos);
            if (keep) scratch[slot] = x;
          }
          const int m = n < k ? n : k;
          const int N = topk::NextPow2(max(m, 2));
          __syncthreads();
          for (int i = m + tid; i < N; i += kThreads) scratch[i] = 0ull;
          __syncthreads();
          topk::BitonicSortDesc(scratch, N);
          int32_t* o = a.out + (q0 + q) * k;
          for (int i = tid; i < k; i += kThreads) o[i] = i < m ? topk::CandidateIndex(scratch[i]) : -1;
          __syncthreads();  // scratch and write_pos are reused by the next query
        }
      }
    } else {
      for (int q = 0; q < nq; ++q) {
        if (((todo >> q) & 1u) == 0u) continue;
        uint64_t* L = lists + q * list_stride;
        const int64_t t = q0 + q;
        const int n = GatherList(L, q, sm);
        const uint64_t T = n > k ? SelectKth(sm.cbuf, n, k, sm) : 1ull;
        const unsigned long long xs = sm.xseed[q];
        if (xs != 0ull) {
          uint64_t Tk = n > k ? T : 0ull;
          if (n == k) {  // the k-th best is the smallest (kmin is ~0 since GatherList)
            uint64_t mn = ~0ull;
            for (int i = tid; i < n; i += kThreads) mn = sm.cbuf[i] < mn ? sm.cbuf[i] : mn;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
              const uint64_t b = ShflXor64(mn, o);
              mn = b < mn ? b : mn;
            }
            if (lane == 0) atomicMin(&sm.kmin, static_cast<unsigned long long>(mn));
            __syncthreads();
            Tk = sm.kmin;
          }
          if (Tk < xs) {  // CTA-uniform
            if (tid == 0) sm.fail |= 1u << q;
            __syncthreads();
            continue;
          }
        }
        const int m = n < k ? n : k;
        if (a.out == nullptr) {
          // Split lists: the survivors straight back into the list (GatherList
          // copied all of it to cbuf and synchronised: nothing reads L any more).
          WriteSurvivors(n, T, sm, [&](int p, uint64_t x) { L[p] = x; });
          if (tid == 0) a.counts[t * a.splits + split] = m;
        } else if (!a.sorted) {
          // Unsorted rows: the survivors straight into the output row (any
          // order), then the -1 padding; no staging copy, one barrier less.
          int32_t* o = a.out + t * k;
          WriteSurvivors(n, T, sm, [&](int p, uint64_t x) { o[p] = topk::CandidateIndex(x); });
          for (int i = m + tid; i < k; i += kThreads) o[i] = -1;
        } else {
          int32_t* o = a.out + t * k;
          WriteSurvivors(n, T, sm, [&](int p, uint64_t x) { scratch[p] = x; });
          __syncthreads();
          const int N = topk::NextPow2(max(m, 2));
          for (int i = m + tid; i < N; i += kThreads) scratch[i] = 0ull;
          __syncthreads();
          topk::BitonicSortDesc(scratch, N);
          for (int i = tid; i < k; i += kThreads) o[i] = i < m ? topk::CandidateIndex(scratch[i]) : -1;
        }
        __syncthreads();  // cbuf and sc are reused by the next query
      }
    }
  };
  final_pass(nq >= 32 ? ~0u : (1u << nq) - 1u);
  if constexpr (kSeedable) {
    // A seeded query's list holds every key of the range at or above its
    // seed bound; when its k-th best lies below (fewer than k keys there), its
    // top-k reaches below the seed: rescan those queries from threshold 0
    // (the others take no key: closed) and select them again.
    __syncthreads();
    const unsigned fail = sm.fail;
    if (fail != 0u) {
      __syncthreads();  // every thread has read sm.fail
      if (tid < NQ && ((fail >> tid) & 1u)) {
        sm.thr[tid] = 0ull;
        sm.thrf[tid] = ThresholdScore(0ull);
        sm.xseed[tid] = 0ull;
      }
      if (tid == 0) {
        sm.need = 0;
        sm.closed = ~fail;
        sm.fail = 0;
      }
      for (int i = tid; i < kWarps * kMaxQ; i += kThreads) {
        if ((fail >> (i % kMaxQ)) & 1u) (&sm.wcnt[0][0])[i] = 0;
      }
      __syncthreads();
      refresh_counts();
      main_pass(n_iter);
      publish_counts();
      __syncthreads();
      final_pass(fail);
    }
  }
}

// The tensor map of the key pool for the TMA pass (round 6): 3-D, bytes x
// 64 rows (128 bytes apart) x pages (page_bytes apart), box of one page's
// keys, 128-byte swizzle (the layout wgmma reads). The page count is not
// known here: the map spans 2^24 pages, and only pages of the page table are
// read. False when the layout cannot be described (alignment) or the driver
// entry point is missing: the kernel then uses its cp.async stages.
inline bool EncodeKeyPoolMap(const SelectArgs& a, CUtensorMap* map) {
  using Encode = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                              const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                              CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                              CUtensorMapFloatOOBfill);
  static const Encode encode = []() -> Encode {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      return nullptr;
    }
    return reinterpret_cast<Encode>(fn);
  }();
  if (encode == nullptr || a.pool == nullptr) return false;
  if ((reinterpret_cast<uintptr_t>(a.pool) & 15u) != 0 || (a.page_bytes & 15u) != 0 ||
      (a.scale_offset & 15u) != 0 || a.page_bytes < 64u * 128u ||
      a.scale_offset + 64u * 4u > a.page_bytes || a.scale_offset < 64u * 128u) {
    return false;
  }
  const cuuint64_t dims[3] = {128, 64, cuuint64_t(1) << 24};
  const cuuint64_t strides[2] = {128, a.page_bytes};
  const cuuint32_t box[3] = {128, 64, 1};
  const cuuint32_t elem[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<uint8_t*>(a.pool), dims, strides, box,
                elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <int G, int R, bool kKeyList, int kCap, int kSt = kStages, bool kDB = true>
cudaError_t LaunchT(const SelectArgs& args, dim3 grid, cudaStream_t stream) {
  static const cudaError_t attr = cudaFuncSetAttribute(
      SelectKernelV2<G, R, kKeyList, kCap, kSt, kDB>,
      cudaFuncAttributeMaxDynamicSharedMemorySize, int(SmemBytes<kCap, kSt>()));
  if (attr != cudaSuccess) return attr;
  SelectArgs a = args;
  CUtensorMap map{};
  a.experiment &= ~kTmaActive;
  if constexpr (!kDB && !kKeyList) {
    // The TMA pass on request (experiment bits 9 / 10), if the map encodes.
    if ((a.experiment & (512 | 1024)) != 0 && EncodeKeyPoolMap(a, &map)) a.experiment |= kTmaActive;
  }
  SelectKernelV2<G, R, kKeyList, kCap, kSt, kDB><<<grid, kThreads, SmemBytes<kCap, kSt>(), stream>>>(a, map);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda::select_internal::v2

namespace pd::kernels::cuda::select_internal {

template <int G>
cudaError_t LaunchSelectKernelV2(const SelectArgs& args, dim3 grid, cudaStream_t stream) {
  const bool list = args.key_list != nullptr;
  if (args.topk > kSelectMaxTopk) {
    if (list || args.rows_per_cta != 128) return cudaErrorInvalidValue;
    return v2::LaunchT<G, 128, false, 4 * kSelectListCap>(args, grid, stream);
  }
  // Default: one accumulator, 3 stages, 2 CTAs per SM. Experiment bit 3:
  // double-buffered accumulators, 4 stages, 1 CTA per SM; bit 2: the same
  // with 6 stages (contiguous keys only).
  const bool db = (args.experiment & 8) != 0;
  if (!list && (args.experiment & 4) != 0) {
    return v2::LaunchT<G, 128, false, kSelectListCap, 6>(args, grid, stream);
  }
  if constexpr (G == 64) {
    if (args.rows_per_cta == 64) {
      if (db) {
        return list ? v2::LaunchT<G, 64, true, kSelectListCap>(args, grid, stream)
                    : v2::LaunchT<G, 64, false, kSelectListCap>(args, grid, stream);
      }
      return list ? v2::LaunchT<G, 64, true, kSelectListCap, 3, false>(args, grid, stream)
                  : v2::LaunchT<G, 64, false, kSelectListCap, 3, false>(args, grid, stream);
    }
  }
  if (db) {
    return list ? v2::LaunchT<G, 128, true, kSelectListCap>(args, grid, stream)
                : v2::LaunchT<G, 128, false, kSelectListCap>(args, grid, stream);
  }
  return list ? v2::LaunchT<G, 128, true, kSelectListCap, 3, false>(args, grid, stream)
              : v2::LaunchT<G, 128, false, kSelectListCap, 3, false>(args, grid, stream);
}

}  // namespace pd::kernels::cuda::select_internal

#endif  // PD_KERNELS_CUDA_SELECT_KERNEL_V2_CUH_
