// Selection launcher (validation, plan, dispatch) and the split-merge kernel.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/decode_select.h"
#include "kernels/cuda/indexer_cuda.h"
#include "kernels/cuda/select_kernel.h"

namespace pd::kernels::cuda {
namespace select_internal {
namespace {

constexpr int kMergeThreads = 512;
constexpr int kMergeUnroll = 8;  // list loads in flight per thread
constexpr int kMaxSplits = 1024;
constexpr int kMergeGroup = 32;  // splits merged by one CTA in the first of two levels

// Exact top-k over the union of lists of one query. CTA (t, g) merges the
// virtual splits v in [g * group, min((g + 1) * group, vcount)), virtual split
// v being the real split v * vstride. Final level: writes the query's output
// row. First level (final == 0): writes the group's top-k back into the list
// of its first split, sets that split's count and zeroes the others'. The
// lists are walked as one flat range so every thread keeps kMergeUnroll
// independent loads in flight.
__global__ void __launch_bounds__(kMergeThreads) MergeKernel(const SelectArgs a, int group,
                                                              int vcount, int vstride, int final) {
  __shared__ int cnt[kMaxSplits];
  __shared__ uint64_t buf[kSelectMaxTopk];
  __shared__ topk::Scratch sc;
  __shared__ int total_sh, longest_sh;
  const int64_t t = blockIdx.x;
  const int S = a.splits, k = a.topk, tid = threadIdx.x;
  const int v0 = int(blockIdx.y) * group;
  const int nv = min(group, vcount - v0);
  if (tid == 0) {
    total_sh = 0;
    longest_sh = 0;
    sc.write_pos = 0;
  }
  __syncthreads();
  int local = 0, longest = 0;
  for (int v = tid; v < nv; v += kMergeThreads) {
    cnt[v] = a.counts[t * S + int64_t(v0 + v) * vstride];
    local += cnt[v];
    longest = max(longest, cnt[v]);
  }
  if (local != 0) atomicAdd(&total_sh, local);
  if (longest != 0) atomicMax(&longest_sh, longest);
  __syncthreads();
  const int total = total_sh, P = longest_sh;
  const int64_t flat = int64_t(nv) * P;
  const uint64_t* base = a.lists + t * S * int64_t(kSelectListCap);
  auto for_each = [&](auto&& f) {
    for (int64_t f0 = 0; f0 < flat; f0 += int64_t(kMergeThreads) * kMergeUnroll) {
      uint64_t x[kMergeUnroll];
#pragma unroll
      for (int u = 0; u < kMergeUnroll; ++u) {
        const int64_t fi = f0 + int64_t(u) * kMergeThreads + tid;
        x[u] = 0;
        if (fi < flat) {
          const int v = int(fi / P), i = int(fi - int64_t(v) * P);
          if (i < cnt[v]) x[u] = base[(int64_t(v0 + v) * vstride) * kSelectListCap + i];
        }
      }
#pragma unroll
      for (int u = 0; u < kMergeUnroll; ++u) f(x[u]);
    }
  };
  const int m = total < k ? total : k;
  const uint64_t T = total > k ? topk::RadixSelectKth<false>(for_each, k, sc) : 1ull;
  // Gather the selection (exactly m keys >= T) into shared memory.
  for_each([&](uint64_t x) {
    const bool keep = x != 0 && x >= T;
    const int slot = topk::WarpAppendSlot(keep, &sc.write_pos);
    if (keep) buf[slot] = x;
  });
  __syncthreads();
  if (!final) {
    uint64_t* dst = const_cast<uint64_t*>(base) + int64_t(v0) * vstride * kSelectListCap;
    for (int i = tid; i < m; i += kMergeThreads) dst[i] = buf[i];
    for (int v = tid; v < nv; v += kMergeThreads) {
      a.counts[t * S + int64_t(v0 + v) * vstride] = v == 0 ? m : 0;
    }
    return;
  }
  int32_t* o = a.merge_out + t * k;
  if (a.sorted) {
    const int N = topk::NextPow2(m > 2 ? m : 2);
    for (int i = m + tid; i < N; i += kMergeThreads) buf[i] = 0ull;
    __syncthreads();
    topk::BitonicSortDesc(buf, N);
  }
  for (int i = tid; i < k; i += kMergeThreads) o[i] = i < m ? topk::CandidateIndex(buf[i]) : -1;
}

}  // namespace

cudaError_t LaunchMergeKernel(const SelectArgs& args, int64_t num_queries, cudaStream_t stream) {
  if (num_queries == 0) return cudaSuccess;
  const int S = args.splits;
  if (S > kMergeGroup) {
    // Two levels: groups of kMergeGroup splits in parallel, then their results.
    const int groups = (S + kMergeGroup - 1) / kMergeGroup;
    MergeKernel<<<dim3(unsigned(num_queries), unsigned(groups)), kMergeThreads, 0, stream>>>(
        args, kMergeGroup, S, 1, 0);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    MergeKernel<<<dim3(unsigned(num_queries)), kMergeThreads, 0, stream>>>(args, groups, groups,
                                                                          kMergeGroup, 1);
    return cudaGetLastError();
  }
  MergeKernel<<<dim3(unsigned(num_queries)), kMergeThreads, 0, stream>>>(args, S, S, 1, 1);
  return cudaGetLastError();
}

}  // namespace select_internal

namespace {

cudaError_t Invalid(const char** error, const char* what) {
  if (error != nullptr) *error = what;
  return cudaErrorInvalidValue;
}

int DeviceSmCount() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 132;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 132;
  return sms;
}

// kernel_version 0 picks by the measurements in docs/perf.md: version 2
// whenever wgmma is used. Round 2 measured version 1 faster for the dense
// prefill tile; since round 4 (padded head weights) version 2 is faster there
// too (H200, Q = 8192: 6.96 vs 7.37 ms at 32K, 26.2 vs 29.6 ms at 128K; the
// preprint's shape 1.86 vs 2.03 ms). Version 1 remains the mma.sync path.
int ChooseVersion(const SelectParams& p) {
  if (p.kernel_version != 0) return p.kernel_version;
  if (!p.use_wgmma) return 1;
  return 2;
}

template <int G>
cudaError_t Dispatch(const select_internal::SelectArgs& args, dim3 grid, bool wgmma, bool v2,
                     cudaStream_t stream) {
  if (v2) return select_internal::LaunchSelectKernelV2<G>(args, grid, stream);
  return wgmma ? select_internal::LaunchSelectKernel<G, true>(args, grid, stream)
               : select_internal::LaunchSelectKernel<G, false>(args, grid, stream);
}

}  // namespace

cudaError_t PlanSelectLaunch(const SelectParams& p, SelectPlan* plan, const char** error) {
  if (p.head_dim != 128 || p.keys.layout.index_head_dim != 128) {
    return Invalid(error, "the CUDA indexer needs head_dim == index_head_dim == 128");
  }
  if (p.heads < p.rows_per_query || p.heads < 1) {
    return Invalid(error, "heads must be >= rows_per_query");
  }
  if (p.masked_heads < 0 || p.masked_heads > p.heads ||
      (p.masked_heads > 0 && (p.head_list == nullptr || p.rows_per_query != p.heads))) {
    return Invalid(error, "masked_heads needs head_list and rows_per_query == heads");
  }
  if (p.head_list == nullptr && p.rows_per_query != p.heads) {
    return Invalid(error, "without head_list every head is a row: rows_per_query must equal heads");
  }
  if (p.queries.num_seqs < 1 || p.queries.num_seqs > 65535 || p.queries.query_start == nullptr) {
    return Invalid(error, "queries.num_seqs must be in [1, 65535] with a query_start array");
  }
  if (p.kernel_version < 0 || p.kernel_version > 3) {
    return Invalid(error, "kernel_version must be 0 (choose), 1, 2 or 3 (decode path)");
  }
  if (UseDecodePath(p)) return PlanDecodeSelectLaunch(p, DeviceSmCount(), plan, error);
  const bool v2 = ChooseVersion(p) == 2 && p.use_wgmma;
  if (p.key_list_per_query && (!v2 || p.key_list == nullptr)) {
    return Invalid(error, "key_list_per_query needs a key_list and kernel_version 0 or 2 with wgmma");
  }
  if (p.topk > kSelectMaxTopk && (!v2 || p.key_list != nullptr || p.sorted)) {
    return Invalid(error, "topk > 2048 needs kernel_version 0 or 2 with wgmma, no key list, unsorted");
  }
  SelectPlanInput in;
  in.per_query_key_lists = p.key_list_per_query;
  in.allow_large_topk = v2 && p.key_list == nullptr && !p.sorted;
  // Version 2 runs 2 CTAs per SM, except its double-buffered variants and the
  // large-topk lists (1 CTA per SM).
  in.ctas_per_sm =
      v2 && ((p.experiment & 12) != 0 || p.topk > kSelectMaxTopk) ? 1 : 2;
  in.num_queries = p.queries.num_queries;
  in.num_seqs = p.queries.num_seqs;
  in.max_queries_per_seq = p.queries.max_queries_per_seq;
  in.max_context = p.key_list != nullptr ? p.max_key_list_len : p.queries.max_context;
  in.rows_per_query = p.rows_per_query;
  in.topk = p.topk;
  in.num_sms = DeviceSmCount();
  in.num_splits = p.num_splits;
  const char* why = nullptr;
  if (!PlanSelect(in, plan, &why)) return Invalid(error, why);
  if (plan->splits > select_internal::kMaxSplits) {
    return Invalid(error, "more than 1024 key splits: set num_splits");
  }
  return cudaSuccess;
}

cudaError_t LaunchSelect(const SelectParams& p, const SelectPlan& plan, void* workspace,
                         cudaStream_t stream, const char** error) {
  if (p.keys.pool == nullptr || p.keys.page_table == nullptr || p.keys.num_tokens == nullptr ||
      p.queries.q8 == nullptr || p.queries.weights == nullptr ||
      p.queries.positions == nullptr || p.out == nullptr || workspace == nullptr) {
    return Invalid(error, "null pointer among pool, page_table, num_tokens, q8, weights, "
                          "positions, out, workspace");
  }
  if (p.key_list != nullptr && p.key_list_len == nullptr) {
    return Invalid(error, "key_list given without key_list_len");
  }
  if (plan.decode.enabled || UseDecodePath(p)) {
    return LaunchDecodeSelect(p, plan, workspace, stream, error);
  }
  const bool v2 = ChooseVersion(p) == 2 && p.use_wgmma;
  if (plan.list_cap != (p.topk > kSelectMaxTopk ? 4 * kSelectListCap : kSelectListCap) ||
      (p.topk > kSelectMaxTopk && (plan.splits != 1 || !v2 || p.key_list != nullptr)) ||
      (p.key_list_per_query && (!v2 || plan.queries_per_cta != 1 || p.key_list == nullptr)) ||
      plan.queries_per_cta * p.rows_per_query != plan.rows_per_cta ||
      (plan.rows_per_cta != kSelectRows && plan.rows_per_cta != 64) || plan.splits < 1 ||
      plan.splits > select_internal::kMaxSplits) {
    return Invalid(error, "plan does not match these parameters (call PlanSelectLaunch)");
  }
  if (p.queries.num_queries == 0) return cudaSuccess;
  select_internal::SelectArgs a{};
  CopySharedSelectArgs(p, &a);
  a.key_list_per_query = p.key_list_per_query ? 1 : 0;
  a.experiment = p.experiment;
  // Threshold seeding: version 2's single-accumulator variants over contiguous
  // keys with top-k <= 2048 and fewer than 64 rows per query, or 64 rows in
  // the 128-row tile (two queries per CTA: dense prefill) (SelectSeedTopk;
  // experiment bit 4 turns it off). Round 3's sample pass cost dense more
  // than it saved (H200: 9.64 vs 9.40 ms at 32K, docs/perf.md); round 5 seeds
  // dense with round 4's cheaper one (sample tops of the two lanes that share
  // a query after the pair reduction).
  const bool seedable = v2 && p.key_list == nullptr && p.topk <= kSelectMaxTopk &&
                        (p.experiment & 12) == 0 &&
                        (p.rows_per_query < 64 || plan.rows_per_cta == kSelectRows);
  a.seed_k = seedable ? SelectSeedTopk(p.topk) : 0;
  a.seed_min_keys = SelectSeedMinKeys(p.topk);
  a.rows_per_cta = plan.rows_per_cta;
  a.topk = p.topk;
  a.sorted = p.sorted ? 1 : 0;
  a.splits = plan.splits;
  a.keys_per_split = plan.keys_per_split;
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  a.lists = reinterpret_cast<uint64_t*>(ws + plan.lists_offset);
  a.counts = reinterpret_cast<int32_t*>(ws + plan.counts_offset);
  a.out = plan.splits == 1 ? p.out : nullptr;
  a.merge_out = p.out;
  if (plan.groups_per_seq == 0) return cudaSuccess;
  const dim3 grid(unsigned(plan.groups_per_seq), unsigned(plan.splits),
                  unsigned(p.queries.num_seqs));
  cudaError_t e;
  switch (p.rows_per_query) {
    case 8: e = Dispatch<8>(a, grid, p.use_wgmma, v2, stream); break;
    case 16: e = Dispatch<16>(a, grid, p.use_wgmma, v2, stream); break;
    case 32: e = Dispatch<32>(a, grid, p.use_wgmma, v2, stream); break;
    case 64: e = Dispatch<64>(a, grid, p.use_wgmma, v2, stream); break;
    default: return Invalid(error, "rows_per_query must be 8, 16, 32 or 64");
  }
  if (e != cudaSuccess || plan.splits == 1) return e;
  return select_internal::LaunchMergeKernel(a, p.queries.num_queries, stream);
}

}  // namespace pd::kernels::cuda
