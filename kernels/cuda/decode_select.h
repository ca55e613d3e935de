// The decode selection path (decode_select.cu, plan in decode_plan.h), reached
// through PlanSelectLaunch / LaunchSelect (indexer_cuda.h). Internal to
// kernels/cuda.
#ifndef PD_KERNELS_CUDA_DECODE_SELECT_H_
#define PD_KERNELS_CUDA_DECODE_SELECT_H_

#include <cuda_runtime.h>

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

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_DECODE_SELECT_H_
