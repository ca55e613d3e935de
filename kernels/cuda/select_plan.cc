#include "kernels/cuda/select_plan.h"

#include <algorithm>
#include <cmath>

namespace pd::kernels::cuda {
namespace {

size_t Align256(size_t x) { return (x + 255) & ~size_t(255); }
int64_t CeilDivI(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

int SelectSeedTopk(int topk) {
  if (topk < 1) return 0;
  const double p = kSelectSampleStride;
  const double target = double(topk) + 4.5 * std::sqrt(1.3 * double(topk) * p);
  return int(std::ceil(target / p));
}

int64_t SelectSeedMinKeys(int topk) { return 4 * int64_t(std::max(topk, 1)); }

bool PlanSelect(const SelectPlanInput& in, SelectPlan* plan, const char** error) {
  const char* unused = nullptr;
  if (error == nullptr) error = &unused;
  if (!SelectRowsSupported(in.rows_per_query)) {
    *error = "rows_per_query (heads per query) must be 8, 16, 32 or 64";
    return false;
  }
  const bool large = in.topk > kSelectMaxTopk;
  if (in.topk < 1 || in.topk > (in.allow_large_topk ? kSelectMaxTopkLarge : kSelectMaxTopk)) {
    *error = in.allow_large_topk ? "topk must be in [1, 8192]" : "topk must be in [1, 2048]";
    return false;
  }
  if (in.per_query_key_lists && in.rows_per_query != 64) {
    *error = "per-query key lists need rows_per_query == 64 (one query per CTA)";
    return false;
  }
  if (in.num_queries < 0 || in.num_seqs < 1 || in.max_queries_per_seq < 0 ||
      in.max_context < 0 || in.num_sms < 1 || in.ctas_per_sm < 1 || in.num_splits < 0) {
    *error = "negative size, no sequence, or no SM in the selection plan input";
    return false;
  }
  if (in.max_queries_per_seq > in.num_queries) {
    *error = "max_queries_per_seq exceeds num_queries";
    return false;
  }
  if (in.max_context > (int64_t(1) << 31) - kSelectKeysPerIter) {
    *error = "context longer than 2^31 keys";
    return false;
  }
  SelectPlan p;
  // One query of 64 heads per sequence (decode) fills a 64-row tile exactly.
  p.rows_per_cta =
      (in.rows_per_query == 64 && (in.max_queries_per_seq <= 1 || in.per_query_key_lists))
          ? 64
          : kSelectRows;
  p.list_cap = large ? 4 * kSelectListCap : kSelectListCap;
  p.queries_per_cta = p.rows_per_cta / in.rows_per_query;
  p.groups_per_seq = CeilDivI(in.max_queries_per_seq, p.queries_per_cta);
  const int64_t ctx = std::max<int64_t>(in.max_context, 1);
  const int64_t max_splits = CeilDivI(ctx, kSelectKeysPerIter);
  int64_t splits = large ? 1 : in.num_splits;
  if (splits == 0) {
    // Fill the machine: pick the split count with the fewest CTA waves per
    // unit of work, ceil(ctas * s / slots) / s (ties: fewer splits, which means
    // less merging), never below kSelectMinSplitKeys keys per split.
    const int64_t ctas = std::max<int64_t>(1, p.groups_per_seq * in.num_seqs);
    const int64_t slots = int64_t(in.num_sms) * in.ctas_per_sm;
    const int64_t limit = std::max<int64_t>(1, std::min<int64_t>(ctx / kSelectMinSplitKeys,
                                                                 CeilDivI(4 * slots, ctas)));
    splits = 1;
    double best = double(CeilDivI(ctas, slots));
    for (int64_t s = 2; s <= limit; ++s) {
      const double cost = double(CeilDivI(ctas * s, slots)) / double(s);
      if (cost < best * 0.999) {
        best = cost;
        splits = s;
      }
    }
  }
  splits = std::clamp<int64_t>(splits, 1, max_splits);
  p.keys_per_split =
      CeilDivI(CeilDivI(ctx, splits), kSelectKeysPerIter) * kSelectKeysPerIter;
  p.splits = int(CeilDivI(ctx, p.keys_per_split));
  const size_t slots = size_t(in.num_queries) * size_t(p.splits);
  p.lists_offset = 0;
  p.lists_bytes = Align256(slots * size_t(p.list_cap) * sizeof(uint64_t));
  p.counts_offset = p.lists_offset + p.lists_bytes;
  p.counts_bytes = Align256(slots * sizeof(int32_t));
  p.workspace_bytes = p.counts_offset + p.counts_bytes;
  *plan = p;
  return true;
}

}  // namespace pd::kernels::cuda
