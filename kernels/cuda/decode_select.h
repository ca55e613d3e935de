// The decode selection path (decode_select.cu, plan in decode_plan.h), reached
// through PlanSelectLaunch / LaunchSelect (indexer_cuda.h). Internal to
// kernels/cuda.
#ifndef PD_KERNELS_CUDA_DECODE_SELECT_H_
#define PD_KERNELS_CUDA_DECODE_SELECT_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/indexer_cuda.h"

namespace pd::kernels::cuda {

// One 64-head query per sequence (rows_per_query == heads == 64, dense or
// masked MISA), contiguous keys or per-sequence key lists, topk <= 2048, wgmma,
// no forced splits.
bool DecodeShaped(const SelectParams& p);
// kernel_version 3, or kernel_version 0 on a decode-shaped launch without
// experiment bits.
bool UseDecodePath(const SelectParams& p);
cudaError_t PlanDecodeSelectLaunch(const SelectParams& p, int num_sms, SelectPlan* plan,
                                   const char** error);
cudaError_t LaunchDecodeSelect(const SelectParams& p, const SelectPlan& plan, void* workspace,
                               cudaStream_t stream, const char** error);

// Copies the key cache, query and head-list fields of p that the prefill
// (select_internal::SelectArgs) and the decode (decode_internal::Args) kernel
// argument structs share, under the same names.
template <class KernelArgs>
void CopySharedSelectArgs(const SelectParams& p, KernelArgs* a) {
  a->pool = p.keys.pool;
  a->page_table = p.keys.page_table;
  a->page_table_stride = p.keys.page_table_stride;
  a->num_tokens = p.keys.num_tokens;
  a->page_bytes = uint32_t(p.keys.layout.IndexPageBytes());
  a->scale_offset = uint32_t(p.keys.layout.IndexScaleOffset(0));
  a->q8 = p.queries.q8;
  a->weights = p.queries.weights;
  a->positions = p.queries.positions;
  a->query_start = p.queries.query_start;
  a->heads = p.heads;
  a->head_list = p.head_list;
  a->masked_heads = p.masked_heads;
  a->key_list = p.key_list;
  a->key_list_len = p.key_list_len;
  a->key_list_stride = p.key_list_stride;
}

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_DECODE_SELECT_H_
