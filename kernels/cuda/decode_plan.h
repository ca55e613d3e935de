// Host-side plan of the decode selection path (kernels/cuda/decode_select.cu):
// one 64-head query per sequence, scored into fp32-ordered logits [S, K] by a
// memory-bound wgmma kernel, then an exact multi-CTA radix top-k per row.
// Plain C++ (no CUDA), unit-tested on the CPU (decode_plan_test.cc).
//
// Decode-only choice: the logits buffer costs 4 bytes per key of workspace
// (against the 132 bytes of key read per key); the prefill paths keep the
// top-k fused behind the MMA (select_kernel_v2.cuh).
#ifndef PD_KERNELS_CUDA_DECODE_PLAN_H_
#define PD_KERNELS_CUDA_DECODE_PLAN_H_

#include <cstddef>
#include <cstdint>

namespace pd::kernels::cuda {

inline constexpr int kDecodeScoreThreads = 128;   // one warpgroup per scoring CTA
inline constexpr int kDecodeScoreCtasPerSm = 3;   // resident scoring CTAs per SM
inline constexpr int kDecodeMinPagesPerCta = 2;   // smallest key range of a scoring CTA
inline constexpr int kDecodeTopkThreads = 512;
inline constexpr int kDecodeTopkCtasPerSm = 2;
inline constexpr int kDecodeMinTopkRows = 2048;   // smallest logits range of a top-k CTA
inline constexpr int kDecodeBins = 4096;          // first-level histogram: top 12 bits of
inline constexpr int kDecodeBinShift = 20;        //   the ordered score bits
inline constexpr int kDecodeSmemCand = 4096;      // candidates the last CTA selects in shared memory
inline constexpr int kDecodeCounters = 4;         // per sequence: out fill, candidates, CTAs done, spare

struct DecodePlanInput {
  int num_seqs = 1;
  int64_t max_rows = 0;       // host bound on the keys (or key-list entries) of a sequence
  int num_sms = 132;
};

// Workspace (one allocation, every part 256-byte aligned):
//   logits:   [S, row_stride] uint32 ordered score bits (0 = no key, 1 = NaN)
//   cand:     [S, cand_cap] int32 rows in the k-th key's histogram bin
//   hist:     [S, kDecodeBins] uint32, zeroed by the launch
//   counters: [S, kDecodeCounters] int32, zeroed by the launch (right after hist)
struct DecodeSelectPlan {
  bool enabled = false;
  int64_t row_stride = 0;         // multiple of 64, >= max_rows
  int64_t rows_per_cta = 0;       // scoring: multiple of 64
  int score_ctas = 0;             // scoring CTAs per sequence
  int64_t topk_rows_per_cta = 0;  // top-k scan: multiple of 64
  int topk_ctas = 0;              // top-k CTAs per sequence
  int64_t cand_cap = 0;           // >= kDecodeSmemCand
  size_t logits_offset = 0, cand_offset = 0, hist_offset = 0, counters_offset = 0;
  size_t zero_bytes = 0;          // hist + counters (one memset)
  size_t workspace_bytes = 0;
};

bool PlanDecodeSelect(const DecodePlanInput& in, DecodeSelectPlan* plan, const char** error);

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_DECODE_PLAN_H_
