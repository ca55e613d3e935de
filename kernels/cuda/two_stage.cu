// Two-stage prefill selections (MISA-dagger, HISA): plan and launch of the
// stages (indexer_cuda.h); the kernels are the selection kernel (select.cu),
// the summaries (prep.cu) and the HISA block filter (router.cu).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cuda/indexer_cuda.h"

namespace pd::kernels::cuda {
namespace {

cudaError_t Invalid(const char** error, const char* what) {
  if (error != nullptr) *error = what;
  return cudaErrorInvalidValue;
}

size_t Align256(size_t x) { return (x + 255) & ~size_t(255); }

// MISA-dagger: query t's stage-1 row holds min(C, positions[t] + 1) keys.
__global__ void DaggerLengths(const int64_t* positions, int64_t T, int C, int32_t* len) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < T) len[t] = int32_t(positions[t] + 1 < C ? positions[t] + 1 : C);
}

SelectParams Stage1(const TwoStageParams& p, int32_t* list) {
  SelectParams s;
  s.keys = p.keys;
  s.queries = p.queries;
  s.heads = p.heads;
  s.head_dim = p.head_dim;
  s.rows_per_query = p.misa_heads;
  s.head_list = p.head_list;
  s.topk = p.dagger_candidates;
  s.sorted = false;
  s.out = list;
  return s;
}

SelectParams Stage2(const TwoStageParams& p, const int32_t* list, const int32_t* len,
                    int64_t stride) {
  SelectParams s;
  s.keys = p.keys;
  s.queries = p.queries;
  s.heads = p.heads;
  s.head_dim = p.head_dim;
  s.rows_per_query = p.heads;
  s.key_list = list;
  s.key_list_len = len;
  s.key_list_stride = stride;
  s.max_key_list_len = stride;
  s.key_list_per_query = true;
  s.topk = p.topk;
  s.sorted = p.sorted;
  s.out = p.out;
  return s;
}

// Non-null placeholders for planning (PlanSelectLaunch reads no pointer but
// checks that the key list is given).
int32_t* const kPlanDummy = reinterpret_cast<int32_t*>(uintptr_t(256));

}  // namespace

cudaError_t PlanTwoStageLaunch(const TwoStageParams& p, TwoStagePlan* plan, const char** error) {
  if (p.heads != 64 || p.head_dim != 128) {
    return Invalid(error, "two-stage selection: heads must be 64 and head_dim 128");
  }
  if (p.topk < 1 || p.topk > kSelectMaxTopk) {
    return Invalid(error, "two-stage selection: topk must be in [1, 2048]");
  }
  TwoStagePlan pl;
  const int64_t T = p.queries.num_queries;
  const int S = p.queries.num_seqs;
  if (S < 1) return Invalid(error, "two-stage selection: queries.num_seqs must be >= 1");
  const char* why = nullptr;
  cudaError_t e;
  if (p.mode == TwoStageMode::kMisaDagger) {
    if (p.dagger_candidates < p.topk || p.dagger_candidates > kSelectMaxTopkLarge) {
      return Invalid(error, "MISA-dagger: dagger_candidates must be in [topk, 8192]");
    }
    if (p.head_list == nullptr) return Invalid(error, "MISA-dagger: head_list (routed heads) is null");
    pl.list_stride = p.dagger_candidates;
    e = PlanSelectLaunch(Stage1(p, kPlanDummy), &pl.stage1, &why);
    if (e != cudaSuccess) return Invalid(error, why);
  } else {
    if (p.hisa_block < 1 || p.hisa_topk_blocks < 1) {
      return Invalid(error, "HISA: hisa_block and hisa_topk_blocks must be >= 1");
    }
    pl.list_stride = int64_t(std::max(p.hisa_topk_blocks, 2)) * p.hisa_block;
    pl.block_stride = std::max<int64_t>(CeilDiv(p.queries.max_context, p.hisa_block), 1);
    if (pl.list_stride > (int64_t(1) << 31) - 1) return Invalid(error, "HISA: key list too long");
  }
  e = PlanSelectLaunch(Stage2(p, kPlanDummy, kPlanDummy, pl.list_stride), &pl.stage2, &why);
  if (e != cudaSuccess) return Invalid(error, why);
  size_t off = 0;
  pl.list_offset = off;
  off += Align256(size_t(T) * size_t(pl.list_stride) * 4);
  pl.len_offset = off;
  off += Align256(size_t(T) * 4);
  pl.sums_offset = off;
  off += Align256(size_t(S) * size_t(pl.block_stride) * 128 * 4);
  pl.zeros_offset = off;
  off += Align256(size_t(S) * 8);
  pl.means_offset = off;
  off += Align256(size_t(S) * size_t(pl.block_stride) * 128 * 2 * 2);
  pl.select_offset = off;
  off += std::max(pl.stage1.workspace_bytes, pl.stage2.workspace_bytes);
  pl.workspace_bytes = off;
  *plan = pl;
  return cudaSuccess;
}

cudaError_t LaunchTwoStage(const TwoStageParams& p, const TwoStagePlan& plan, void* workspace,
                           cudaStream_t stream, const char** error) {
  if (workspace == nullptr || p.out == nullptr) {
    return Invalid(error, "two-stage selection: null workspace or out");
  }
  if (p.queries.num_queries == 0) return cudaSuccess;
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  int32_t* list = reinterpret_cast<int32_t*>(ws + plan.list_offset);
  int32_t* len = reinterpret_cast<int32_t*>(ws + plan.len_offset);
  void* select_ws = ws + plan.select_offset;
  cudaError_t e;
  if (p.mode == TwoStageMode::kMisaDagger) {
    e = LaunchSelect(Stage1(p, list), plan.stage1, select_ws, stream, error);
    if (e != cudaSuccess) return e;
    const int64_t T = p.queries.num_queries;
    DaggerLengths<<<unsigned((T + 255) / 256), 256, 0, stream>>>(p.queries.positions, T,
                                                                 p.dagger_candidates, len);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  } else {
    float* sums = reinterpret_cast<float*>(ws + plan.sums_offset);
    int64_t* zeros = reinterpret_cast<int64_t*>(ws + plan.zeros_offset);
    e = cudaMemsetAsync(zeros, 0, size_t(p.queries.num_seqs) * 8, stream);
    if (e != cudaSuccess) return e;
    SummaryParams sp;
    sp.pool = p.keys.pool;
    sp.page_table = p.keys.page_table;
    sp.page_table_stride = p.keys.page_table_stride;
    sp.summary_sums = sums;
    sp.summary_stride = plan.block_stride;
    sp.from = zeros;
    sp.to = p.keys.num_tokens;
    sp.num_seqs = p.queries.num_seqs;
    sp.max_blocks_touched = plan.block_stride;
    sp.layout = p.keys.layout;
    sp.layout.summary_block = p.hisa_block;
    e = LaunchUpdateSummaries(sp, stream, error);
    if (e != cudaSuccess) return e;
    uint16_t* means_hi = reinterpret_cast<uint16_t*>(ws + plan.means_offset);
    uint16_t* means_lo = means_hi + size_t(p.queries.num_seqs) * size_t(plan.block_stride) * 128;
    e = LaunchBlockMeansBf16(sums, plan.block_stride, p.keys.num_tokens, p.queries.num_seqs,
                             p.hisa_block, means_hi, means_lo, stream, error);
    if (e != cudaSuccess) return e;
    HisaBlockParams hp;
    hp.means_hi = means_hi;
    hp.means_lo = means_lo;
    hp.queries = p.queries;
    hp.num_tokens = p.keys.num_tokens;
    hp.block_sums = sums;
    hp.block_stride = plan.block_stride;
    hp.heads = p.heads;
    hp.head_dim = p.head_dim;
    hp.hisa_block = p.hisa_block;
    hp.keep_blocks = p.hisa_topk_blocks;
    hp.key_list = list;
    hp.key_list_len = len;
    hp.key_list_stride = plan.list_stride;
    e = LaunchHisaBlocks(hp, stream, error);
    if (e != cudaSuccess) return e;
  }
  return LaunchSelect(Stage2(p, list, len, plan.list_stride), plan.stage2, select_ws, stream,
                      error);
}

}  // namespace pd::kernels::cuda
