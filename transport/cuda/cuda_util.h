// Internal to transport/cuda and transport/nccl: CUDA runtime errors as
// Status, and one RAII owner per CUDA handle (stream, event, pinned buffer).
// Every call that creates or uses a handle selects the owning device first:
// handles are used from whichever thread runs a stream.
#ifndef PD_TRANSPORT_CUDA_CUDA_UTIL_H_
#define PD_TRANSPORT_CUDA_CUDA_UTIL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "transport/resource_counters.h"

namespace pd::transport::cuda_internal {

// OK for cudaSuccess; otherwise a Status naming `call` and CUDA's error text
// (ResourceExhausted for allocation failures, FailedPrecondition when there is
// no usable device, Internal otherwise).
inline absl::Status CudaStatus(cudaError_t e, const char* call) {
  if (e == cudaSuccess) return absl::OkStatus();
  std::string msg = absl::StrCat(call, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
  switch (e) {
    case cudaErrorMemoryAllocation: return absl::ResourceExhaustedError(msg);
    case cudaErrorNoDevice:
    case cudaErrorInvalidDevice:
    case cudaErrorInsufficientDriver: return absl::FailedPreconditionError(msg);
    default: return absl::InternalError(msg);
  }
}

#define PD_CUDA_RETURN_IF_ERROR(call)                                                \
  do {                                                                               \
    ::absl::Status pd_cuda_st_ = ::pd::transport::cuda_internal::CudaStatus((call), #call); \
    if (!pd_cuda_st_.ok()) return pd_cuda_st_;                                       \
  } while (0)

// Selects `device` for the calling thread.
inline absl::Status UseDevice(int device) {
  return CudaStatus(cudaSetDevice(device), "cudaSetDevice");
}

// A non-blocking CUDA stream on one device.
class Stream {
 public:
  static absl::StatusOr<std::unique_ptr<Stream>> Create(int device) {
    if (absl::Status s = UseDevice(device); !s.ok()) return s;
    cudaStream_t st = nullptr;
    if (absl::Status s = CudaStatus(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking),
                                    "cudaStreamCreateWithFlags");
        !s.ok()) {
      return s;
    }
    return std::unique_ptr<Stream>(new Stream(device, st));
  }
  ~Stream() {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_);
    cudaStreamDestroy(stream_);
  }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }
  int device() const { return device_; }

 private:
  Stream(int device, cudaStream_t s) : device_(device), stream_(s) {}
  const int device_;
  const cudaStream_t stream_;
};

// A timing-free event, for post-then-poll completion.
class Event {
 public:
  static absl::StatusOr<std::unique_ptr<Event>> Create(int device) {
    if (absl::Status s = UseDevice(device); !s.ok()) return s;
    cudaEvent_t ev = nullptr;
    if (absl::Status s = CudaStatus(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming),
                                    "cudaEventCreateWithFlags");
        !s.ok()) {
      return s;
    }
    return std::unique_ptr<Event>(new Event(device, ev));
  }
  ~Event() {
    cudaSetDevice(device_);
    cudaEventDestroy(event_);
  }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  absl::Status Record(cudaStream_t s) { return CudaStatus(cudaEventRecord(event_, s), "cudaEventRecord"); }
  cudaEvent_t get() const { return event_; }
  // True once the work before the recorded point finished; an error if it failed.
  absl::StatusOr<bool> Query() const {
    cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) return false;
    if (e != cudaSuccess) return CudaStatus(e, "cudaEventQuery");
    return true;
  }

 private:
  Event(int device, cudaEvent_t e) : device_(device), event_(e) {}
  const int device_;
  const cudaEvent_t event_;
};

// Page-locked host memory (cudaHostAlloc), counted as Resource::kPinnedBuffer.
class PinnedBuffer {
 public:
  static absl::StatusOr<std::unique_ptr<PinnedBuffer>> Create(size_t bytes) {
    void* p = nullptr;
    if (absl::Status s = CudaStatus(cudaHostAlloc(&p, bytes == 0 ? 1 : bytes, cudaHostAllocPortable),
                                    "cudaHostAlloc");
        !s.ok()) {
      return s;
    }
    return std::unique_ptr<PinnedBuffer>(new PinnedBuffer(static_cast<uint8_t*>(p), bytes));
  }
  ~PinnedBuffer() { cudaFreeHost(data_); }
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  PinnedBuffer(uint8_t* p, size_t n) : data_(p), size_(n), token_(Resource::kPinnedBuffer, n) {}
  uint8_t* const data_;
  const size_t size_;
  ResourceToken token_;
};

}  // namespace pd::transport::cuda_internal

#endif  // PD_TRANSPORT_CUDA_CUDA_UTIL_H_
