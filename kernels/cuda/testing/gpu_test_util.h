// Shared helpers of the GPU kernel tests (minitest harness).
#ifndef PD_KERNELS_CUDA_TESTING_GPU_TEST_UTIL_H_
#define PD_KERNELS_CUDA_TESTING_GPU_TEST_UTIL_H_

#include <cuda_runtime.h>

#include "kernels/testing/minitest.h"

namespace pd::kernels::cuda::testing {

// True when a CUDA device is visible (tests skip, not fail, without one).
inline bool HaveGpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

}  // namespace pd::kernels::cuda::testing

// Skips the running test when no CUDA device is visible.
#define SKIP_WITHOUT_GPU() \
  if (!::pd::kernels::cuda::testing::HaveGpu()) MINITEST_SKIP() << "no CUDA device"

// Fails (and returns from) the running test when a CUDA call does not succeed.
#define ASSERT_CUDA(expr)                                                  \
  do {                                                                     \
    const cudaError_t e_ = (expr);                                         \
    ASSERT_EQ(e_, cudaSuccess) << #expr << ": " << cudaGetErrorString(e_); \
  } while (0)

#endif  // PD_KERNELS_CUDA_TESTING_GPU_TEST_UTIL_H_
