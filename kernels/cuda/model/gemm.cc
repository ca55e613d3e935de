#include "kernels/cuda/model/gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "kernels/cuda/model/model_kernels.h"
#include "kernels/numeric.h"

namespace pd::kernels::cuda::internal {
namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;

std::string LtError(const char* what, cublasStatus_t s) {
  return std::string(what) + ": cuBLAS status " + std::to_string(int(s));
}

int PtrAlign(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  if (u == 0) return 256;
  int a = 1;
  while (a < 256 && (u & uintptr_t(a)) == 0) a <<= 1;
  return a;
}

// RAII for the temporaries of SelfTest.
struct DevPtr {
  void* p = nullptr;
  ~DevPtr() {
    if (p != nullptr) cudaFree(p);
  }
  cudaError_t Alloc(size_t bytes) { return cudaMalloc(&p, bytes); }
};

}  // namespace

Gemm::~Gemm() {
  for (auto& [key, plan] : plans_) {
    if (plan.a != nullptr) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b != nullptr) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.d != nullptr) cublasLtMatrixLayoutDestroy(plan.d);
    if (plan.desc != nullptr) cublasLtMatmulDescDestroy(plan.desc);
  }
  if (workspace_ != nullptr) cudaFree(workspace_);
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

bool Gemm::Init(std::string* error) {
  cublasStatus_t s = cublasLtCreate(&handle_);
  if (s != CUBLAS_STATUS_SUCCESS) {
    *error = LtError("cublasLtCreate", s);
    return false;
  }
  cudaError_t e = cudaMalloc(&workspace_, kWorkspaceBytes);
  if (e != cudaSuccess) {
    *error = std::string("cuBLASLt workspace: ") + cudaGetErrorString(e);
    return false;
  }
  workspace_bytes_ = kWorkspaceBytes;
  return true;
}

Gemm::Plan* Gemm::GetPlan(const PlanKey& key, bool fp8, bool trans_a, int64_t m, int64_t n,
                          int64_t k, int64_t lda, int64_t a_stride, int64_t ldb, int64_t b_stride,
                          int64_t ldd, int64_t d_stride, int batch, int align_bytes,
                          std::string* why) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return &it->second;
  Plan& plan = plans_[key];
  auto fail = [&](const char* what, cublasStatus_t s) {
    *why = LtError(what, s);
    plan.ok = false;
    return &plan;
  };
  cublasStatus_t s = cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("cublasLtMatmulDescCreate", s);
  const cublasOperation_t ta = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  const cudaDataType_t ab_type = fp8 ? CUDA_R_8F_E4M3 : CUDA_R_16BF;
  if (fp8) {
    const int32_t a_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    const int32_t b_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    s = cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode,
                                       sizeof(a_mode));
    if (s != CUBLAS_STATUS_SUCCESS) return fail("set A_SCALE_MODE", s);
    s = cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode,
                                       sizeof(b_mode));
    if (s != CUBLAS_STATUS_SUCCESS) return fail("set B_SCALE_MODE", s);
    // Placeholders for the heuristic; every call sets the real pointers.
    const void* dummy = workspace_;
    cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &dummy,
                                   sizeof(dummy));
    cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &dummy,
                                   sizeof(dummy));
  }
  s = cublasLtMatrixLayoutCreate(&plan.a, ab_type, uint64_t(trans_a ? k : m),
                                 uint64_t(trans_a ? m : k), lda);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout A", s);
  s = cublasLtMatrixLayoutCreate(&plan.b, ab_type, uint64_t(k), uint64_t(n), ldb);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout B", s);
  s = cublasLtMatrixLayoutCreate(&plan.d, CUDA_R_32F, uint64_t(m), uint64_t(n), ldd);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout D", s);
  if (batch > 1) {
    const int32_t count = batch;
    const cublasLtMatrixLayout_t layouts[3] = {plan.a, plan.b, plan.d};
    const int64_t strides[3] = {a_stride, b_stride, d_stride};
    for (int i = 0; i < 3; ++i) {
      cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                       sizeof(count));
      cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                       &strides[i], sizeof(strides[i]));
    }
  }
  cublasLtMatmulPreference_t pref = nullptr;
  s = cublasLtMatmulPreferenceCreate(&pref);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("preference", s);
  const uint64_t ws = workspace_bytes_;
  const uint32_t align = uint32_t(align_bytes);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof(ws));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align,
                                       sizeof(align));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align,
                                       sizeof(align));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align,
                                       sizeof(align));
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align,
                                       sizeof(align));
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  s = cublasLtMatmulAlgoGetHeuristic(handle_, plan.desc, plan.a, plan.b, plan.d, plan.d, pref, 1,
                                     &result, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || returned == 0) {
    *why = s != CUBLAS_STATUS_SUCCESS ? LtError("cublasLtMatmulAlgoGetHeuristic", s)
                                      : std::string("cuBLASLt has no algorithm for this shape");
    plan.ok = false;
    return &plan;
  }
  plan.algo = result.algo;
  plan.ok = true;
  return &plan;
}

bool Gemm::RunFallback(const DeviceMatrix& w, const GemmInput& x, float* y, int64_t y_ld,
                       cudaStream_t stream, std::string* error) {
  ++fallback_calls_;
  RefGemmParams p;
  p.x = x.f32;
  p.m = x.m;
  p.n = w.rows;
  p.k = w.cols;
  p.x_ld = x.f32_ld;
  p.y_ld = y_ld;
  p.w = w.data;
  p.w_fp8 = w.kind == DeviceMatrix::Kind::kFp8;
  p.w_ld = w.ld;
  p.scales = w.scales;
  p.scale_ld = w.scale_ld;
  p.y = y;
  const cudaError_t e = RefGemm(p, stream);
  if (e != cudaSuccess) {
    *error = std::string("fallback GEMM: ") + cudaGetErrorString(e);
    return false;
  }
  return true;
}

bool Gemm::Linear(const DeviceMatrix& w, const GemmInput& x, float* y, int64_t y_ld,
                  cudaStream_t stream, std::string* error) {
  if (x.m <= 0) return true;
  if (x.k != w.cols) {
    *error = "GEMM: activation width " + std::to_string(x.k) + " != weight columns " +
             std::to_string(w.cols);
    return false;
  }
  const bool fp8 = w.kind == DeviceMatrix::Kind::kFp8;
  const void* b = fp8 ? static_cast<const void*>(x.fp8) : static_cast<const void*>(x.bf16);
  if (b == nullptr || (fp8 && (!fp8_ok_ || x.fp8_scales == nullptr))) {
    last_fallback_reason_ = "activations not prepared for this weight";
    return RunFallback(w, x, y, y_ld, stream, error);
  }
  int align = std::min({PtrAlign(w.data), PtrAlign(b), PtrAlign(y)});
  if (fp8) align = std::min({align, PtrAlign(w.scales), PtrAlign(x.fp8_scales)});
  const PlanKey key{fp8 ? 1 : 0, 1, w.rows, x.m, w.cols, w.ld, 0, w.cols, 0, y_ld, 0, 1, align,
                    fp8 ? (act_m_major_ ? 1 : 2) : 0};
  std::string why;
  Plan* plan = GetPlan(key, fp8, /*trans_a=*/true, w.rows, x.m, w.cols, w.ld, 0, w.cols, 0, y_ld,
                       0, 1, align, &why);
  if (!plan->ok) {
    if (!why.empty()) last_fallback_reason_ = why;
    return RunFallback(w, x, y, y_ld, stream, error);
  }
  if (fp8) {
    cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &w.scales,
                                   sizeof(w.scales));
    cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                                   &x.fp8_scales, sizeof(x.fp8_scales));
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t s =
      cublasLtMatmul(handle_, plan->desc, &alpha, w.data, plan->a, b, plan->b, &beta, y, plan->d,
                     y, plan->d, &plan->algo, workspace_, workspace_bytes_, stream);
  if (s != CUBLAS_STATUS_SUCCESS) {
    plan->ok = false;  // never again for this shape
    last_fallback_reason_ = LtError("cublasLtMatmul", s);
    return RunFallback(w, x, y, y_ld, stream, error);
  }
  ++lt_calls_;
  return true;
}

bool Gemm::BatchedBf16(bool trans_a, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                       int64_t lda, int64_t a_stride, const uint16_t* b_ptr, const float* b_f32,
                       int64_t ldb, int64_t b_stride, float* d, int64_t ldd, int64_t d_stride,
                       int batch, cudaStream_t stream, std::string* error) {
  if (n <= 0 || batch <= 0) return true;
  const int align = std::min({PtrAlign(a), PtrAlign(b_ptr), PtrAlign(d)});
  const PlanKey key{0, trans_a ? 1 : 0, m, n, k, lda, a_stride, ldb, b_stride, ldd, d_stride,
                    batch, align, 3};
  std::string why;
  Plan* plan = GetPlan(key, false, trans_a, m, n, k, lda, a_stride, ldb, b_stride, ldd, d_stride,
                       batch, align, &why);
  if (plan->ok) {
    const float alpha = 1.0f, beta = 0.0f;
    const cublasStatus_t s =
        cublasLtMatmul(handle_, plan->desc, &alpha, a, plan->a, b_ptr, plan->b, &beta, d,
                       plan->d, d, plan->d, &plan->algo, workspace_, workspace_bytes_, stream);
    if (s == CUBLAS_STATUS_SUCCESS) {
      ++lt_calls_;
      return true;
    }
    plan->ok = false;
    why = LtError("cublasLtMatmul (batched)", s);
  }
  if (b_f32 != nullptr) {
    // D_b(i, j) = sum_k op(A_b)(i, k) B_b(k, j): RefGemm with x = B_b's columns
    // (rows of x), y rows = D_b's columns, W(i, k) = op(A_b)(i, k).
    last_fallback_reason_ = why;
    for (int bi = 0; bi < batch; ++bi) {
      ++fallback_calls_;
      RefGemmParams p;
      p.x = b_f32 + bi * b_stride;
      p.m = n;
      p.n = m;
      p.k = k;
      p.x_ld = ldb;
      p.y = d + bi * d_stride;
      p.y_ld = ldd;
      p.w = a + bi * a_stride;
      p.w_ld = lda;
      p.transposed = !trans_a;
      const cudaError_t e = RefGemm(p, stream);
      if (e != cudaSuccess) {
        *error = std::string("fallback batched GEMM: ") + cudaGetErrorString(e);
        return false;
      }
    }
    return true;
  }
  *error = "batched bf16 GEMM " + std::to_string(m) + "x" + std::to_string(n) + "x" +
           std::to_string(k) + " (batch " + std::to_string(batch) + "): " + why;
  return false;
}

bool Gemm::SelfTest(cudaStream_t stream, std::string* report, std::string* error) {
  constexpr int64_t kN = 256, kK = 512, kKb = kK / 128;
  std::mt19937 rng(12345);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // Weight: codes of N(0,1) * 32, block scales 2^-(3 + (nb * 3 + kb) % 6) (all different per row of blocks).
  std::vector<uint8_t> wq(size_t(kN * kK));
  std::vector<float> ws(size_t((kN / 128) * kKb));
  for (int64_t nb = 0; nb < kN / 128; ++nb) {
    for (int64_t kb = 0; kb < kKb; ++kb) ws[size_t(nb * kKb + kb)] = std::ldexp(1.0f, -3 - int((nb * 3 + kb) % 6));
  }
  for (auto& q : wq) q = FloatToFp8E4M3(nd(rng) * 32.0f);
  DevPtr d_wq, d_ws, d_xq, d_xs, d_y, d_xf;
  const int64_t kMaxM = 64;
  if (d_wq.Alloc(wq.size()) != cudaSuccess || d_ws.Alloc(ws.size() * 4) != cudaSuccess ||
      d_xq.Alloc(size_t(kMaxM * kK)) != cudaSuccess ||
      d_xs.Alloc(size_t(kMaxM * kKb * 4)) != cudaSuccess ||
      d_y.Alloc(size_t(kMaxM * kN * 4)) != cudaSuccess ||
      d_xf.Alloc(size_t(kMaxM * kK * 4)) != cudaSuccess) {
    *error = "FP8 self-test: cudaMalloc failed";
    return false;
  }
  cudaMemcpy(d_wq.p, wq.data(), wq.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(d_ws.p, ws.data(), ws.size() * 4, cudaMemcpyHostToDevice);
  DeviceMatrix w;
  w.kind = DeviceMatrix::Kind::kFp8;
  w.data = d_wq.p;
  w.rows = kN;
  w.cols = kK;
  w.ld = kK;
  w.scales = static_cast<const float*>(d_ws.p);
  w.scale_ld = kKb;
  const bool saved_ok = fp8_ok_, saved_major = act_m_major_;
  std::string log;
  bool chosen = false;
  for (bool m_major : {true, false}) {
    bool all = true;
    for (int64_t m : {int64_t(1), int64_t(5), int64_t(64)}) {
      // Activations: rows of different magnitude, quantised per 1x128 group.
      std::vector<float> x(size_t(m * kK)), xd(size_t(m * kK)), xs(size_t(m * kKb));
      std::vector<uint8_t> xq(size_t(m * kK));
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t c = 0; c < kK; ++c) x[size_t(r * kK + c)] = nd(rng) * std::ldexp(1.0f, int(r % 5) - 2 + int(c / 128));
        for (int64_t g = 0; g < kKb; ++g) {
          float amax = 0.0f;
          for (int64_t c = g * 128; c < (g + 1) * 128; ++c) amax = std::max(amax, std::fabs(x[size_t(r * kK + c)]));
          const float s = Fp8Scale(amax, true);
          xs[size_t(m_major ? g * m + r : r * kKb + g)] = s;
          for (int64_t c = g * 128; c < (g + 1) * 128; ++c) {
            const uint8_t q = FloatToFp8E4M3(x[size_t(r * kK + c)] / s);
            xq[size_t(r * kK + c)] = q;
            xd[size_t(r * kK + c)] = Fp8E4M3ToFloat(q) * s;
          }
        }
      }
      cudaMemcpy(d_xq.p, xq.data(), xq.size(), cudaMemcpyHostToDevice);
      cudaMemcpy(d_xs.p, xs.data(), xs.size() * 4, cudaMemcpyHostToDevice);
      cudaMemcpy(d_xf.p, xd.data(), xd.size() * 4, cudaMemcpyHostToDevice);
      cudaMemsetAsync(d_y.p, 0, size_t(m * kN * 4), stream);  // ordered before the GEMM
      GemmInput in;
      in.f32 = static_cast<const float*>(d_xf.p);
      in.m = m;
      in.k = kK;
      in.f32_ld = kK;
      in.fp8 = static_cast<const uint8_t*>(d_xq.p);
      in.fp8_scales = static_cast<const float*>(d_xs.p);
      fp8_ok_ = true;
      act_m_major_ = m_major;
      const int64_t before = fallback_calls_;
      if (!Linear(w, in, static_cast<float*>(d_y.p), kN, stream, error)) return false;
      const bool used_lt = fallback_calls_ == before;
      std::vector<float> y(size_t(m * kN));
      cudaError_t e = cudaStreamSynchronize(stream);
      if (e == cudaSuccess) e = cudaMemcpy(y.data(), d_y.p, y.size() * 4, cudaMemcpyDeviceToHost);
      if (e != cudaSuccess) {
        *error = std::string("FP8 self-test: ") + cudaGetErrorString(e);
        return false;
      }
      double max_err = 0.0, max_ref = 0.0;
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t j = 0; j < kN; ++j) {
          double ref = 0.0;
          for (int64_t c = 0; c < kK; ++c) {
            ref += double(xd[size_t(r * kK + c)]) *
                   double(Fp8E4M3ToFloat(wq[size_t(j * kK + c)]) * ws[size_t((j / 128) * kKb + c / 128)]);
          }
          max_ref = std::max(max_ref, std::fabs(ref));
          max_err = std::max(max_err, std::fabs(ref - double(y[size_t(r * kN + j)])));
        }
      }
      const double rel = max_ref > 0 ? max_err / max_ref : max_err;
      const bool pass = used_lt && rel < 1e-2;
      char buf[160];
      std::snprintf(buf, sizeof(buf), " [%s m=%lld: %s, max err %.2e of %.2e]",
                    m_major ? "M-major" : "K-major", static_cast<long long>(m),
                    used_lt ? (pass ? "ok" : "MISMATCH") : "no cuBLASLt algorithm", max_err,
                    max_ref);
      log += buf;
      all = all && pass;
      if (!used_lt) break;
    }
    if (all) {
      chosen = true;
      fp8_ok_ = true;
      act_m_major_ = m_major;
      break;
    }
  }
  if (!chosen) {
    fp8_ok_ = false;
    act_m_major_ = saved_major;
  }
  (void)saved_ok;
  *report = std::string("FP8 block-scaled cuBLASLt self-test:") + log +
            (chosen ? (act_m_major_ ? " -> enabled (activation scales M-major)"
                                    : " -> enabled (activation scales K-major)")
                    : " -> DISABLED (FP8 weights are dequantised to bf16)");
  return true;
}

}  // namespace pd::kernels::cuda::internal
