// GEMMs of the GPU model engine through cuBLASLt: bf16 x bf16 and FP8
// block-scaled (DeepSeek: 128x128 weight blocks, 1x128 per-token activation
// groups; cuBLASLt's BLK128x128_32F / VEC128_32F scale modes, sm_90), fp32
// accumulation and fp32 output; with a plain CUDA fallback (RefGemm) taken when
// cuBLASLt has no algorithm for a shape or fails. Internal to kernels/cuda/model.
//
// The FP8 path's exact cuBLASLt configuration (which operand is A, the output
// type, whether the token count must be padded to 16, the activation-scale
// layout) is not pinned down by the documentation we have; SelfTest() tries
// the candidates against a float64 reference and keeps the first that runs and
// matches (Fp8Config), or disables FP8.
#ifndef PD_KERNELS_CUDA_MODEL_GEMM_H_
#define PD_KERNELS_CUDA_MODEL_GEMM_H_

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <string>

namespace pd::kernels::cuda::internal {

// A weight on the device, row-major [rows, cols] (PyTorch Linear: [out, in]).
struct DeviceMatrix {
  enum class Kind : uint8_t { kBf16, kFp8 };
  Kind kind = Kind::kBf16;
  const void* data = nullptr;   // bf16 or e4m3 [rows, ld]
  int64_t rows = 0, cols = 0, ld = 0;
  const float* scales = nullptr;  // kFp8: [ceil(rows/128), scale_ld] block scales
  int64_t scale_ld = 0;           // cols / 128 (cols a multiple of 512)
};

// Activations [m, k] prepared for a GEMM: fp32 always; bf16 for bf16 weights;
// e4m3 codes with 1x128 group scales for FP8 weights, the scales laid out as
// Gemm::act_scales_m_major() says: [k/128, m] (scale (r, g) at g * m + r) or
// [m, k/128].
struct GemmInput {
  const float* f32 = nullptr;
  int64_t m = 0, k = 0, f32_ld = 0;
  const uint16_t* bf16 = nullptr;     // [m, k] dense
  const uint8_t* fp8 = nullptr;       // [m, k] dense
  const float* fp8_scales = nullptr;  // [k/128 * m]
};

// How the FP8 block-scaled GEMM is posed to cuBLASLt.
struct Fp8Config {
  bool weight_is_a = true;  // A = weight (128x128 scales), B = activations (1x128); else swapped
  int out = 0;              // 0: D and C fp32; 1: D and C bf16; 2: D fp32, C bf16
  bool pad16 = false;       // token count padded to a multiple of 16
  bool m_major = true;      // activation scales [k/128, m] (else [m, k/128])
  std::string Name() const;
};

// Owner of a cuBLASLt handle, its workspace, scratch and cached plans. Not thread-safe.
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

  bool fp8_ok() const { return fp8_ok_; }
  bool act_scales_m_major() const { return fp8_.m_major; }
  const Fp8Config& fp8_config() const { return fp8_; }
  // Tries the FP8 configurations (both operand orders, three output types,
  // both scale layouts, with and without padding) on small GEMMs (m = 64, 1, 5,
  // 200; n = 256; k = 512; distinct block scales) against a host float64
  // reference; enables FP8 with the first that runs and matches. *report lists
  // what was tried. Returns false only on CUDA errors.
  bool SelfTest(cudaStream_t stream, std::string* report, std::string* error);

  // Counters for Describe(): GEMMs run by cuBLASLt and by the fallback kernel.
  int64_t lt_calls() const { return lt_calls_; }
  int64_t fallback_calls() const { return fallback_calls_; }
  const std::string& last_fallback_reason() const { return last_fallback_reason_; }

 private:
  struct PlanSpec {
    cudaDataType_t ab = CUDA_R_16BF, c = CUDA_R_32F, d = CUDA_R_32F;
    int a_scale_mode = -1, b_scale_mode = -1;  // -1: no block scaling
    bool trans_a = true;
    int64_t m = 0, n = 0, k = 0, lda = 0, a_stride = 0, ldb = 0, b_stride = 0, ldd = 0,
            d_stride = 0;
    int batch = 1;
    int align = 256;
    std::string Key() const;
  };
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
    cublasLtMatmulAlgo_t algo{};
    bool ok = false;  // false: no algorithm (use the fallback)
    std::string why;
  };
  // A scratch allocation that grows (a growth waits for the device: cudaFree).
  struct Scratch {
    void* p = nullptr;
    size_t bytes = 0;
    cudaError_t Ensure(size_t n);
    ~Scratch();
  };

  Plan* GetPlan(const PlanSpec& spec);
  bool RunPlan(Plan* plan, const void* a, const void* b, void* d, const void* a_scale,
               const void* b_scale, cudaStream_t stream, std::string* why);
  // The FP8 GEMM with configuration cfg; *ran is false when cuBLASLt could not
  // run it (no error then: the caller falls back).
  bool RunFp8(const Fp8Config& cfg, const DeviceMatrix& w, const GemmInput& x, float* y,
              int64_t y_ld, cudaStream_t stream, bool* ran, std::string* error);
  bool RunFallback(const DeviceMatrix& w, const GemmInput& x, float* y, int64_t y_ld,
                   cudaStream_t stream, std::string* error);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<std::string, Plan> plans_;
  Scratch pad_q_, pad_s_, out_;
  bool fp8_ok_ = false;
  Fp8Config fp8_;
  int64_t lt_calls_ = 0, fallback_calls_ = 0;
  std::string last_fallback_reason_;
};

}  // namespace pd::kernels::cuda::internal

#endif  // PD_KERNELS_CUDA_MODEL_GEMM_H_
