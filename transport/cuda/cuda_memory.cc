#include "transport/cuda/cuda_memory.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
#include "transport/cuda/cuda_util.h"

namespace pd::transport {
namespace {

using cuda_internal::CudaStatus;
using cuda_internal::Event;
using cuda_internal::PinnedBuffer;
using cuda_internal::Stream;
using cuda_internal::UseDevice;

class DeviceAllocator final : public kvcache::Allocator {
 public:
  explicit DeviceAllocator(int device) : device_(device) {}
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError("zero-byte device arena");
    PD_RETURN_IF_ERROR(UseDevice(device_));
    void* p = nullptr;
    PD_RETURN_IF_ERROR(Annotate(CudaStatus(cudaMalloc(&p, bytes), "cudaMalloc"),
                                absl::StrCat("KV arena of ", bytes, " bytes on device ", device_)));
    absl::Status st = CudaStatus(cudaMemset(p, 0, bytes), "cudaMemset");
    if (st.ok()) st = CudaStatus(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    if (!st.ok()) {
      cudaFree(p);
      return st;
    }
    return p;
  }
  void Free(void* p, size_t) override {
    if (p == nullptr) return;
    cudaSetDevice(device_);
    absl::Status st = CudaStatus(cudaFree(p), "cudaFree");
    if (!st.ok()) LOG(ERROR) << "freeing a device KV arena: " << st;
  }
  bool on_device() const override { return true; }

 private:
  const int device_;
};

class PinnedStaging final : public StagingBuffer {
 public:
  explicit PinnedStaging(std::unique_ptr<PinnedBuffer> b) : b_(std::move(b)) {}
  uint8_t* data() const override { return b_->data(); }
  size_t size() const override { return b_->size(); }

 private:
  std::unique_ptr<PinnedBuffer> b_;
};

// Host memory allocated elsewhere, page-locked with cudaHostRegister.
class RegisteredHost final : public HostPin {
 public:
  RegisteredHost(void* p, size_t n) : p_(p), token_(Resource::kPinnedBuffer, n) {}
  ~RegisteredHost() override {
    absl::Status st = CudaStatus(cudaHostUnregister(p_), "cudaHostUnregister");
    if (!st.ok()) LOG(WARNING) << st;
  }

 private:
  void* const p_;
  ResourceToken token_;
};

// One ReadOnHost in progress: a stream and two pinned pieces.
struct Stager {
  std::unique_ptr<Stream> stream;
  std::unique_ptr<PinnedBuffer> buf[2];
  std::unique_ptr<Event> done[2];
};

class CudaOps final : public MemoryOps {
 public:
  explicit CudaOps(const CudaMemoryOptions& o) : o_(o) {}
  bool device() const override { return true; }

  absl::Status CopyToHost(uint8_t* dst, const uint8_t* src, size_t n) override {
    PD_RETURN_IF_ERROR(UseDevice(o_.device));
    return CudaStatus(cudaMemcpy(dst, src, n, cudaMemcpyDeviceToHost), "cudaMemcpy(device to host)");
  }
  absl::Status CopyFromHost(uint8_t* dst, const uint8_t* src, size_t n) override {
    PD_RETURN_IF_ERROR(UseDevice(o_.device));
    return CudaStatus(cudaMemcpy(dst, src, n, cudaMemcpyHostToDevice), "cudaMemcpy(host to device)");
  }

  absl::Status ReadOnHost(const uint8_t* src, size_t n,
                          const std::function<void(const uint8_t*, size_t)>& fn) override {
    PD_ASSIGN_OR_RETURN(std::unique_ptr<Stager> s, AcquireStager());
    absl::Status st = ReadWith(*s, src, n, fn);
    if (st.ok()) {
      absl::MutexLock lock(&mu_);
      idle_.push_back(std::move(s));
    }  // else: drop it (its stream may hold a failed copy)
    return st;
  }

  absl::StatusOr<std::unique_ptr<StagingBuffer>> AllocateStaging(size_t bytes) override {
    PD_ASSIGN_OR_RETURN(std::unique_ptr<PinnedBuffer> b, PinnedBuffer::Create(bytes));
    std::memset(b->data(), 0, b->size());
    return std::unique_ptr<StagingBuffer>(new PinnedStaging(std::move(b)));
  }

  absl::StatusOr<std::unique_ptr<HostPin>> PinHostMemory(uint8_t* p, size_t n) override {
    if (p == nullptr || n == 0) return std::make_unique<HostPin>();
    PD_RETURN_IF_ERROR(UseDevice(o_.device));
    cudaError_t e = cudaHostRegister(p, n, cudaHostRegisterPortable);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();  // pinned already (by its owner): nothing to undo
      return std::make_unique<HostPin>();
    }
    if (e != cudaSuccess) cudaGetLastError();
    PD_RETURN_IF_ERROR(Annotate(CudaStatus(e, "cudaHostRegister"),
                                absl::StrCat("pinning ", n, " bytes of host memory")));
    return std::unique_ptr<HostPin>(new RegisteredHost(p, n));
  }

 private:
  absl::StatusOr<std::unique_ptr<Stager>> AcquireStager() {
    {
      absl::MutexLock lock(&mu_);
      if (!idle_.empty()) {
        std::unique_ptr<Stager> s = std::move(idle_.back());
        idle_.pop_back();
        return s;
      }
    }
    auto s = std::make_unique<Stager>();
    PD_ASSIGN_OR_RETURN(s->stream, Stream::Create(o_.device));
    for (int i = 0; i < 2; ++i) {
      PD_ASSIGN_OR_RETURN(s->buf[i], PinnedBuffer::Create(o_.piece_bytes));
      PD_ASSIGN_OR_RETURN(s->done[i], Event::Create(o_.device));
    }
    return s;
  }

  absl::Status ReadWith(Stager& s, const uint8_t* src, size_t n,
                        const std::function<void(const uint8_t*, size_t)>& fn) {
    PD_RETURN_IF_ERROR(UseDevice(o_.device));
    const size_t piece = std::max<size_t>(1, o_.piece_bytes);
    const size_t pieces = (n + piece - 1) / piece;
    auto issue = [&](size_t i) -> absl::Status {
      const size_t off = i * piece, len = std::min(piece, n - off);
      PD_RETURN_IF_ERROR(CudaStatus(cudaMemcpyAsync(s.buf[i % 2]->data(), src + off, len,
                                                    cudaMemcpyDeviceToHost, s.stream->get()),
                                    "cudaMemcpyAsync(device to host)"));
      return s.done[i % 2]->Record(s.stream->get());
    };
    if (pieces > 0) PD_RETURN_IF_ERROR(issue(0));
    for (size_t i = 0; i < pieces; ++i) {
      // Piece i+1 goes into the other buffer, whose piece i-1 fn already consumed.
      if (i + 1 < pieces) PD_RETURN_IF_ERROR(issue(i + 1));
      while (true) {
        PD_ASSIGN_OR_RETURN(bool ready, s.done[i % 2]->Query());
        if (ready) break;
        std::this_thread::yield();
      }
      fn(s.buf[i % 2]->data(), std::min(piece, n - i * piece));
    }
    return absl::OkStatus();
  }

  const CudaMemoryOptions o_;
  absl::Mutex mu_;
  std::vector<std::unique_ptr<Stager>> idle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

std::unique_ptr<kvcache::Allocator> NewCudaDeviceAllocator(int device) {
  return std::make_unique<DeviceAllocator>(device);
}

absl::StatusOr<std::unique_ptr<MemoryOps>> NewCudaMemoryOps(const CudaMemoryOptions& options) {
  const int n = CudaDeviceCount();
  if (options.device < 0 || options.device >= n) {
    return absl::FailedPreconditionError(absl::StrCat("CUDA device ", options.device,
                                                      " does not exist (", n, " visible)"));
  }
  if (options.piece_bytes == 0) return absl::InvalidArgumentError("CudaMemoryOptions.piece_bytes is 0");
  return std::unique_ptr<MemoryOps>(new CudaOps(options));
}

}  // namespace pd::transport
