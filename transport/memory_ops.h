// Copies between the memory a KV cache lives in and host memory, and staging
// buffers: plain memcpy/malloc for host caches, CUDA copies and pinned host
// memory for device caches (transport/cuda/, built when CUDA is found). The
// stream protocol reaches cache bytes only through this interface.
#ifndef PD_TRANSPORT_MEMORY_OPS_H_
#define PD_TRANSPORT_MEMORY_OPS_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "transport/resource_counters.h"

namespace pd::transport {

// A host staging buffer (pinned where the implementation pins). Counted as
// Resource::kPinnedBuffer while alive.
class StagingBuffer {
 public:
  virtual ~StagingBuffer() = default;
  virtual uint8_t* data() const = 0;
  virtual size_t size() const = 0;
};

// Host memory registered for fast device copies (page-locked) while alive.
class HostPin {
 public:
  virtual ~HostPin() = default;
};

class MemoryOps {
 public:
  virtual ~MemoryOps() = default;
  virtual bool device() const = 0;
  // Copies `n` bytes from cache memory `src` to host `dst`, and back.
  virtual absl::Status CopyToHost(uint8_t* dst, const uint8_t* src, size_t n) = 0;
  virtual absl::Status CopyFromHost(uint8_t* dst, const uint8_t* src, size_t n) = 0;
  // Calls `fn` on host-readable pieces that together are the `n` bytes at `src`
  // (in order): `src` itself for host memory, staged copies for device memory.
  virtual absl::Status ReadOnHost(const uint8_t* src, size_t n,
                                  const std::function<void(const uint8_t*, size_t)>& fn) = 0;
  virtual absl::StatusOr<std::unique_ptr<StagingBuffer>> AllocateStaging(size_t bytes) = 0;
  // Registers `n` bytes of host memory at `p`, allocated elsewhere (a
  // backend's staging ring, a peer's ring mapped into this process), so that
  // CopyToHost / CopyFromHost with it run at full speed until the returned pin
  // is destroyed; counted as Resource::kPinnedBuffer. Callers may go on
  // without the pin on error (copies are then slower). Default (host memory):
  // nothing to register.
  virtual absl::StatusOr<std::unique_ptr<HostPin>> PinHostMemory(uint8_t* p, size_t n) {
    return std::make_unique<HostPin>();
  }
};

// Host memory: memcpy, page-aligned zeroed staging buffers. Thread-safe.
MemoryOps& HostMemoryOps();

}  // namespace pd::transport

#endif  // PD_TRANSPORT_MEMORY_OPS_H_
