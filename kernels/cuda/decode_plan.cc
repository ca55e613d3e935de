#include "kernels/cuda/decode_plan.h"

#include <algorithm>

namespace pd::kernels::cuda {
namespace {

size_t Align256(size_t x) { return (x + 255) & ~size_t(255); }
int64_t CeilDivI(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The per-sequence CTA count in [1, limit] with the fewest waves per unit of
// work, ceil(S c / slots) / c (ties: fewer CTAs).
int64_t BestCtas(int64_t seqs, int64_t slots, int64_t limit) {
  int64_t best_c = 1;
  double best = double(CeilDivI(seqs, slots));
  for (int64_t c = 2; c <= limit; ++c) {
    const double cost = double(CeilDivI(seqs * c, slots)) / double(c);
    if (cost < best * 0.999) {
      best = cost;
      best_c = c;
    }
  }
  return best_c;
}

}  // namespace

bool PlanDecodeSelect(const DecodePlanInput& in, DecodeSelectPlan* plan, const char** error) {
  const char* unused = nullptr;
  if (error == nullptr) error = &unused;
  if (in.num_seqs < 1 || in.num_seqs > 65535 || in.max_rows < 0 || in.num_sms < 1) {
    *error = "decode plan: num_seqs must be in [1, 65535], max_rows >= 0, num_sms >= 1";
    return false;
  }
  if (in.max_rows > (int64_t(1) << 31) - 64) {
    *error = "decode plan: more than 2^31 keys per sequence";
    return false;
  }
  DecodeSelectPlan p;
  p.enabled = true;
  const int64_t S = in.num_seqs;
  p.row_stride = std::max<int64_t>(64, CeilDivI(in.max_rows, 64) * 64);
  const int64_t pages = p.row_stride / 64;
  {
    const int64_t slots = int64_t(in.num_sms) * kDecodeScoreCtasPerSm;
    const int64_t limit = std::max<int64_t>(1, pages / kDecodeMinPagesPerCta);
    // At most two waves: each CTA's setup (query tile, histogram) and drain
    // are amortised over a long range, and the key traffic stays continuous.
    const int64_t c = BestCtas(S, slots, std::min(limit, CeilDivI(2 * slots, S)));
    p.rows_per_cta = CeilDivI(pages, c) * 64;
    p.score_ctas = int(CeilDivI(p.row_stride, p.rows_per_cta));
  }
  {
    const int64_t slots = int64_t(in.num_sms) * kDecodeTopkCtasPerSm;
    const int64_t limit = std::max<int64_t>(1, p.row_stride / kDecodeMinTopkRows);
    const int64_t c = BestCtas(S, slots, std::min(limit, CeilDivI(2 * slots, S)));
    p.topk_rows_per_cta = CeilDivI(CeilDivI(p.row_stride, c), 64) * 64;
    p.topk_ctas = int(CeilDivI(p.row_stride, p.topk_rows_per_cta));
  }
  p.cand_cap = std::max<int64_t>(kDecodeSmemCand, CeilDivI(p.row_stride / 16, 64) * 64);
  size_t off = 0;
  p.logits_offset = off;
  off += Align256(size_t(S) * size_t(p.row_stride) * 4);
  p.cand_offset = off;
  off += Align256(size_t(S) * size_t(p.cand_cap) * 4);
  p.hist_offset = off;
  p.counters_offset = off + size_t(S) * kDecodeBins * 4;  // 256-aligned: 16 KB per sequence
  p.zero_bytes = size_t(S) * kDecodeBins * 4 + size_t(S) * kDecodeCounters * 4;
  off += Align256(p.zero_bytes);
  p.workspace_bytes = off;
  *plan = p;
  return true;
}

}  // namespace pd::kernels::cuda
