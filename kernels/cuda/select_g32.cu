// Explicit instantiation of the selection kernel for 32 rows (heads) per query.
#include "kernels/cuda/select_kernel.cuh"
#include "kernels/cuda/select_kernel_v2.cuh"

namespace pd::kernels::cuda::select_internal {

template cudaError_t LaunchSelectKernel<32, true>(const SelectArgs&, dim3, cudaStream_t);
template cudaError_t LaunchSelectKernel<32, false>(const SelectArgs&, dim3, cudaStream_t);
template cudaError_t LaunchSelectKernelV2<32>(const SelectArgs&, dim3, cudaStream_t);

}  // namespace pd::kernels::cuda::select_internal
