// RAII owner of a device allocation, for tests, benchmarks and callers that do
// not bring their own allocator (std + CUDA runtime only).
#ifndef PD_KERNELS_CUDA_DEVICE_BUFFER_H_
#define PD_KERNELS_CUDA_DEVICE_BUFFER_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <utility>
#include <vector>

namespace pd::kernels::cuda {

template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  // Allocates n elements; ok() is false when cudaMalloc failed (error()).
  explicit DeviceBuffer(size_t n) : size_(n) {
    if (n > 0) error_ = cudaMalloc(reinterpret_cast<void**>(&ptr_), n * sizeof(T));
    if (error_ != cudaSuccess) {
      ptr_ = nullptr;
      size_ = 0;
    }
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    if (ok() && !host.empty()) {
      error_ = cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
    }
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_ != nullptr) cudaFree(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      size_ = std::exchange(o.size_, 0);
      error_ = o.error_;
    }
    return *this;
  }

  T* get() const { return ptr_; }
  size_t size() const { return size_; }
  size_t bytes() const { return size_ * sizeof(T); }
  bool ok() const { return error_ == cudaSuccess; }
  cudaError_t error() const { return error_; }

  cudaError_t Upload(const std::vector<T>& host) {
    if (host.size() != size_) return cudaErrorInvalidValue;
    return cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice);
  }
  std::vector<T> Download() const {
    std::vector<T> h(size_);
    if (size_ > 0) cudaMemcpy(h.data(), ptr_, bytes(), cudaMemcpyDeviceToHost);
    return h;
  }

 private:
  T* ptr_ = nullptr;
  size_t size_ = 0;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_DEVICE_BUFFER_H_
