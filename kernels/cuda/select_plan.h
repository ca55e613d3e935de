// Host-side tiling math of the CUDA indexer selection kernels: how many query
// rows a CTA takes, how the key axis is split, and the byte layout of the
// caller-owned workspace. Plain C++ (no CUDA), so it is unit-tested on the CPU.
#ifndef PD_KERNELS_CUDA_SELECT_PLAN_H_
#define PD_KERNELS_CUDA_SELECT_PLAN_H_

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/decode_plan.h"

namespace pd::kernels::cuda {

// Fixed tile shape of the selection kernel (see select_kernel.cuh).
inline constexpr int kSelectThreads = 256;        // two consumer warpgroups
inline constexpr int kSelectRows = 128;           // (query, head) rows per CTA: the MMA's N
                                                  // (64 when a sequence has one 64-head query)
inline constexpr int kSelectKeysPerIter = 128;    // keys per pipeline stage (two 64-key pages)
inline constexpr int kSelectListCap = 4096;       // candidate slots per (query, split)
inline constexpr int kSelectMaxTopk = 2048;       // largest top-k a CTA keeps exactly
inline constexpr int kSelectMaxTopkLarge = 8192;  // version-2 kernel, no key list, no split
                                                  // (MISA-dagger's stage 1, list cap 16384)
inline constexpr int kSelectMinSplitKeys = 512;   // smallest key range one split CTA scans

// Threshold seeding (version-2 kernel, contiguous keys): before its full scan a
// CTA scores every kSelectSampleStride-th key of its range and starts each
// query's threshold at about the SelectSeedTopk(k)-th best score of that
// sample, which about 1.46 k keys of the range beat; insertions then fall from
// about k (1 + ln(N / k)) to about 1.46 k, and list compactions mostly vanish.
// The sample pass keeps no lists: each of the 64 lanes that score a query's
// sampled keys keeps its kSelectSeedLaneTop best scores, and the seed is the
// rank's score within the union of those tops (no higher than the exact
// sample rank's: a lane that saw more than kSelectSeedLaneTop of the top keys
// only lowers it). A query that ends with fewer than k keys above its seeded
// threshold is rescanned without it (exactness never depends on the sample).
inline constexpr int kSelectSampleStride = 16;
inline constexpr int kSelectSeedLaneTop = 8;
inline constexpr int kSelectSeedLanes = 64;       // lanes scoring one query's sampled keys

// The sample rank: ceil((k + 4.5 sqrt(1.3 k P)) / P), P = kSelectSampleStride,
// so that the expected count of keys above the seed, about P times the rank,
// exceeds k by 4.5 sqrt(1.3 k P): about 4 of its standard deviations for keys
// in random order from k = 1024 on (at k = 2048: rank 187, about 1.46 k keys
// pass; a lane holds 2.9 of the rank's keys on average, 8 are kept). At most
// kSelectSeedLanes * kSelectSeedLaneTop for k <= kSelectMaxTopk. 0 for k < 1.
int SelectSeedTopk(int topk);
// Smallest key range (keys of one CTA) worth seeding: 4 k (below it a running
// threshold inserts at most ~2.4 k keys and the sample would cost more).
int64_t SelectSeedMinKeys(int topk);

// True for the per-query row counts the kernel is instantiated for.
inline bool SelectRowsSupported(int rows_per_query) {
  return rows_per_query == 8 || rows_per_query == 16 || rows_per_query == 32 ||
         rows_per_query == 64;
}

struct SelectPlanInput {
  int64_t num_queries = 0;        // T, all sequences together
  int num_seqs = 1;               // sequences in the batch
  int64_t max_queries_per_seq = 0;  // host-known bound on any sequence's query count
  int64_t max_context = 0;        // host-known bound on any sequence's key count
  int rows_per_query = 64;        // G: H for dense, h for MISA
  int topk = 2048;
  int num_sms = 132;
  int ctas_per_sm = 2;            // resident CTAs per SM the kernel is built for
  int num_splits = 0;             // 0 = choose; otherwise forced (clamped to the context)
  bool per_query_key_lists = false;  // key lists per query: one 64-head query per CTA
  bool allow_large_topk = false;     // topk in (2048, 8192]: lists of 16384, no split
};

// Byte layout of the workspace (one allocation; every part 256-byte aligned):
//   lists:  [T, splits, list_cap] uint64 candidate keys
//   counts: [T, splits] int32 valid entries of each list after the scan
struct SelectPlan {
  int rows_per_cta = 0;           // kSelectRows, or 64 for one 64-head query per sequence
  int queries_per_cta = 0;        // rows_per_cta / rows_per_query
  int64_t groups_per_seq = 0;     // CTAs along the query axis of one sequence
  int splits = 1;                 // CTAs along the key axis
  int64_t keys_per_split = 0;     // multiple of kSelectKeysPerIter
  int list_cap = kSelectListCap;  // candidate slots per (query, split): 4096, or 16384 for topk > 2048
  size_t lists_offset = 0, lists_bytes = 0;
  size_t counts_offset = 0, counts_bytes = 0;
  size_t workspace_bytes = 0;
  // The decode path (decode_plan.h; PlanSelectLaunch sets it for decode-shaped
  // launches): the fields above are then unused and workspace_bytes is its size.
  DecodeSelectPlan decode;
};

// Returns false (and leaves *plan untouched) when the input is out of range;
// *error then names what is wrong.
bool PlanSelect(const SelectPlanInput& in, SelectPlan* plan, const char** error);

// The 64-bit candidate key the kernels rank by: larger is better. High word:
// the score's bits mapped to an unsigned order (NaN lowest, -0 == +0); low
// word: ~index (lower index wins ties). 0 never encodes a real candidate.
inline uint32_t OrderedScoreBits(float f) {
  if (f != f) return 0u;
  f = f + 0.0f;  // -0 -> +0
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t CandidateKey(float score, int32_t index) {
  return (uint64_t(OrderedScoreBits(score)) << 32) | uint64_t(~uint32_t(index));
}
inline int32_t CandidateIndex(uint64_t key) { return int32_t(~uint32_t(key & 0xffffffffu)); }

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_SELECT_PLAN_H_
