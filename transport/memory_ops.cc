#include "transport/memory_ops.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace pd::transport {
namespace {

class HostStaging final : public StagingBuffer {
 public:
  HostStaging(uint8_t* p, size_t n) : p_(p), n_(n), token_(Resource::kPinnedBuffer, n) {}
  ~HostStaging() override { std::free(p_); }
  uint8_t* data() const override { return p_; }
  size_t size() const override { return n_; }

 private:
  uint8_t* p_;
  size_t n_;
  ResourceToken token_;
};

class HostOps final : public MemoryOps {
 public:
  bool device() const override { return false; }
  absl::Status CopyToHost(uint8_t* dst, const uint8_t* src, size_t n) override {
    std::memcpy(dst, src, n);
    return absl::OkStatus();
  }
  absl::Status CopyFromHost(uint8_t* dst, const uint8_t* src, size_t n) override {
    std::memcpy(dst, src, n);
    return absl::OkStatus();
  }
  absl::Status ReadOnHost(const uint8_t* src, size_t n,
                          const std::function<void(const uint8_t*, size_t)>& fn) override {
    fn(src, n);
    return absl::OkStatus();
  }
  absl::StatusOr<std::unique_ptr<StagingBuffer>> AllocateStaging(size_t bytes) override {
    size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* p = std::aligned_alloc(4096, rounded == 0 ? 4096 : rounded);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(absl::StrCat("staging buffer of ", bytes, " bytes"));
    }
    std::memset(p, 0, rounded == 0 ? 4096 : rounded);
    return std::unique_ptr<StagingBuffer>(new HostStaging(static_cast<uint8_t*>(p), bytes));
  }
};

}  // namespace

MemoryOps& HostMemoryOps() {
  static HostOps* ops = new HostOps();
  return *ops;
}

}  // namespace pd::transport
