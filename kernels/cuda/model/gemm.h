// GEMMs of the GPU model engine through cuBLASLt: bf16 x bf16 and FP8
// block-scaled (DeepSeek: 128x128 weight blocks, 1x128 per-token activation
// groups; cuBLASLt's BLK128x128_32F / VEC128_32F scale modes, sm_90), fp32
// accumulation and fp32 output; with a plain CUDA fallback (RefGemm) taken when
// cuBLASLt has no algorithm for a shape or fails. Internal to kernels/cuda/model.
#ifndef PD_KERNELS_CUDA_MODEL_GEMM_H_
#define PD_KERNELS_CUDA_MODEL_GEMM_H_

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <string>
#include <tuple>

namespace pd::kernels::cuda::internal {

// A weight on the device, row-major [rows, cols] (PyTorch Linear: [out, in]).
struct DeviceMatrix {
  enum class Kind : uint8_t { kBf16, kFp8 };
  Kind kind = Kind::kBf16;
  const void* data = nullptr;   // bf16 or e4m3 [rows, ld]
  int64_t rows = 0, cols = 0, ld = 0;
  const float* scales = nullptr;  // kFp8: [ceil(rows/128), scale_ld] block scales
  int64_t scale_ld = 0;           // round_up(cols / 128, 4)
};

// Activations [m, k] prepared for a GEMM: fp32 always; bf16 for bf16 weights;
// e4m3 codes with 1x128 group scales for FP8 weights, the scales [k/128, m]
// group-major ("M-major": scale (r, g) at g * m + r) or row-major by the
// engine's layout choice (Gemm::act_scales_m_major()).
struct GemmInput {
  const float* f32 = nullptr;
  int64_t m = 0, k = 0, f32_ld = 0;
  const uint16_t* bf16 = nullptr;     // [m, k] dense
  const uint8_t* fp8 = nullptr;       // [m, k] dense
  const float* fp8_scales = nullptr;  // [k/128 * m]
};

// Owner of a cuBLASLt handle, its workspace and cached plans. Not thread-safe.
class Gemm {
 public:
  Gemm() = default;
  ~Gemm();
  Gemm(const Gemm&) = delete;
  Gemm& operator=(const Gemm&) = delete;

  bool Init(std::string* error);

  // y[i, j] = sum_k x[i, k] * w[j, k] for i < x.m, j < w.rows; y rows y_ld apart.
  bool Linear(const DeviceMatrix& w, const GemmInput& x, float* y, int64_t y_ld,
              cudaStream_t stream, std::string* error);

  // Strided-batched bf16 GEMM in cuBLAS's column-major terms, fp32 output:
  // for b < batch: D_b = op(A_b) * B_b with op = transpose when trans_a;
  // A_b = a + b * a_stride (lda), B_b = b_ptr + b * b_stride (ldb, not
  // transposed), D_b = d + b * d_stride (ldd); m x n output, inner k.
  // b_f32: B in fp32 with the same layout, used by the fallback kernel when
  // cuBLASLt cannot run the shape (null: no fallback, an error instead).
  bool BatchedBf16(bool trans_a, int64_t m, int64_t n, int64_t k, const uint16_t* a, int64_t lda,
                   int64_t a_stride, const uint16_t* b_ptr, const float* b_f32, int64_t ldb,
                   int64_t b_stride, float* d, int64_t ldd, int64_t d_stride, int batch,
                   cudaStream_t stream, std::string* error);

  // FP8 path status (decided by SelfTest): usable, and the activation scale layout.
  bool fp8_ok() const { return fp8_ok_; }
  bool act_scales_m_major() const { return act_m_major_; }
  // Runs small FP8 block-scaled GEMMs against a host float64 reference with both
  // activation-scale layouts; enables the FP8 path with the first that matches.
  // Returns false only on CUDA errors (a mismatch just leaves FP8 disabled).
  bool SelfTest(cudaStream_t stream, std::string* report, std::string* error);

  // Counters for Describe(): GEMMs run by cuBLASLt and by the fallback kernel.
  int64_t lt_calls() const { return lt_calls_; }
  int64_t fallback_calls() const { return fallback_calls_; }
  const std::string& last_fallback_reason() const { return last_fallback_reason_; }

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;  // false: no algorithm (use the fallback)
  };
  using PlanKey = std::tuple<int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, int, int, int>;
  Plan* GetPlan(const PlanKey& key, bool fp8, bool trans_a, int64_t m, int64_t n, int64_t k,
                int64_t lda, int64_t a_stride, int64_t ldb, int64_t b_stride, int64_t ldd,
                int64_t d_stride, int batch, int align_bytes, std::string* why);
  bool RunFallback(const DeviceMatrix& w, const GemmInput& x, float* y, int64_t y_ld,
                   cudaStream_t stream, std::string* error);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<PlanKey, Plan> plans_;
  bool fp8_ok_ = false;
  bool act_m_major_ = true;
  int64_t lt_calls_ = 0, fallback_calls_ = 0;
  std::string last_fallback_reason_;
};

}  // namespace pd::kernels::cuda::internal

#endif  // PD_KERNELS_CUDA_MODEL_GEMM_H_
