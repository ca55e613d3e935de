// CUDA device memory for KV streams: a kvcache::Allocator for device KV
// arenas, and the MemoryOps through which a stream reaches a device cache
// from the host (checksums of device chunks, staging through pinned host
// memory when a backend cannot reach device memory). Built only with CUDA.
#ifndef PD_TRANSPORT_CUDA_CUDA_MEMORY_H_
#define PD_TRANSPORT_CUDA_CUDA_MEMORY_H_

#include <cstddef>
#include <memory>

#include "absl/status/statusor.h"
#include "kvcache/kv_cache.h"
#include "transport/memory_ops.h"

namespace pd::transport {

// CUDA devices this process can use; 0 when there is no driver or no GPU
// (never an error: GPU tests use it to skip).
int CudaDeviceCount();

// Device memory on `device`: cudaMalloc, zeroed with cudaMemset before it is
// handed out; cudaFree on Free. Thread-safe.
std::unique_ptr<kvcache::Allocator> NewCudaDeviceAllocator(int device);

struct CudaMemoryOptions {
  int device = 0;
  // ReadOnHost copies device bytes to the host in pieces of this size through
  // two pinned buffers, so that the copy of piece i+1 overlaps the caller's
  // work on piece i.
  size_t piece_bytes = 4u << 20;
};

// MemoryOps for a KV cache on one device: cudaMemcpy for copies, pinned
// double-buffered pieces for ReadOnHost, cudaHostAlloc for staging buffers,
// cudaHostRegister for PinHostMemory (each counted as Resource::kPinnedBuffer
// while alive; memory already registered gives an empty pin). Thread-safe; each
// concurrent ReadOnHost uses its own stream and pinned pair (kept for reuse).
// FailedPrecondition when `device` does not exist.
absl::StatusOr<std::unique_ptr<MemoryOps>> NewCudaMemoryOps(const CudaMemoryOptions& options = {});

}  // namespace pd::transport

#endif  // PD_TRANSPORT_CUDA_CUDA_MEMORY_H_
