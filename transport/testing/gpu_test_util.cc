#include "transport/testing/gpu_test_util.h"

#include <cuda_runtime_api.h>

#include "absl/strings/str_cat.h"

namespace pd::transport::testing {

absl::Status CopyArena(const kvcache::KvCache& from, kvcache::KvCache& to) {
  if (from.arena_bytes() != to.arena_bytes()) {
    return absl::InvalidArgumentError(absl::StrCat("arenas differ: ", from.arena_bytes(), " vs ",
                                                   to.arena_bytes(), " bytes"));
  }
  // cudaMemcpyDefault: unified addressing tells host and device pointers apart.
  cudaError_t e = cudaMemcpy(to.arena(), from.arena(), from.arena_bytes(), cudaMemcpyDefault);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("cudaMemcpy of the arena: ", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace pd::transport::testing
