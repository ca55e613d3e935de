// Explicit instantiation of the selection kernel for 16 rows (heads) per query.
#include "kernels/cuda/select_kernel.cuh"
#include "kernels/cuda/select_kernel_v2.cuh"

namespace pd::kernels::cuda::select_internal {

template cudaError_t LaunchSelectKernel<16, true>(const SelectArgs&, dim3, cudaStream_t);
template cudaError_t LaunchSelectKernel<16, false>(const SelectArgs&, dim3, cudaStream_t);
template cudaError_t LaunchSelectKernelV2<16>(const SelectArgs&, dim3, cudaStream_t);

}  // namespace pd::kernels::cuda::select_internal
