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

std::string Fp8Config::Name() const {
  static const char* kOut[] = {"D fp32", "D bf16", "D fp32/C bf16"};
  return std::string(weight_is_a ? "A=weight" : "A=activations") + ", " + kOut[out] +
         (pad16 ? ", tokens padded to 16" : "") + (m_major ? ", scales M-major" : ", scales K-major");
}

std::string Gemm::PlanSpec::Key() const {
  char buf[320];
  std::snprintf(buf, sizeof(buf), "%d/%d/%d/%d/%d/%d/%lld/%lld/%lld/%lld/%lld/%lld/%lld/%lld/%lld/%d/%d",
                int(ab), int(c), int(d), a_scale_mode, b_scale_mode, int(trans_a), (long long)m,
                (long long)n, (long long)k, (long long)lda, (long long)a_stride, (long long)ldb,
                (long long)b_stride, (long long)ldd, (long long)d_stride, batch, align);
  return buf;
}

cudaError_t Gemm::Scratch::Ensure(size_t n) {
  if (n <= bytes && p != nullptr) return cudaSuccess;
  if (p != nullptr) cudaFree(p);
  p = nullptr;
  bytes = 0;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(n, 256));
  if (e != cudaSuccess) {
    p = nullptr;
    return e;
  }
  bytes = std::max<size_t>(n, 256);
  return cudaSuccess;
}

Gemm::Scratch::~Scratch() {
  if (p != nullptr) cudaFree(p);
}

Gemm::~Gemm() {
  for (auto& [key, plan] : plans_) {
    if (plan.a != nullptr) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b != nullptr) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.c != nullptr) cublasLtMatrixLayoutDestroy(plan.c);
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

Gemm::Plan* Gemm::GetPlan(const PlanSpec& spec) {
  const std::string key = spec.Key();
  auto it = plans_.find(key);
  if (it != plans_.end()) return &it->second;
  Plan& plan = plans_[key];
  auto fail = [&](const char* what, cublasStatus_t s) {
    plan.why = LtError(what, s);
    plan.ok = false;
    return &plan;
  };
  cublasStatus_t s = cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("cublasLtMatmulDescCreate", s);
  const cublasOperation_t ta = spec.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta));
  cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb));
  if (spec.a_scale_mode >= 0) {
    const int32_t a_mode = spec.a_scale_mode, b_mode = spec.b_scale_mode;
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
  s = cublasLtMatrixLayoutCreate(&plan.a, spec.ab, uint64_t(spec.trans_a ? spec.k : spec.m),
                                 uint64_t(spec.trans_a ? spec.m : spec.k), spec.lda);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout A", s);
  s = cublasLtMatrixLayoutCreate(&plan.b, spec.ab, uint64_t(spec.k), uint64_t(spec.n), spec.ldb);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout B", s);
  s = cublasLtMatrixLayoutCreate(&plan.c, spec.c, uint64_t(spec.m), uint64_t(spec.n), spec.ldd);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout C", s);
  s = cublasLtMatrixLayoutCreate(&plan.d, spec.d, uint64_t(spec.m), uint64_t(spec.n), spec.ldd);
  if (s != CUBLAS_STATUS_SUCCESS) return fail("layout D", s);
  if (spec.batch > 1) {
    const int32_t count = spec.batch;
    const cublasLtMatrixLayout_t layouts[4] = {plan.a, plan.b, plan.c, plan.d};
    const int64_t strides[4] = {spec.a_stride, spec.b_stride, spec.d_stride, spec.d_stride};
    for (int i = 0; i < 4; ++i) {
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
  const uint32_t align = uint32_t(spec.align);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                       sizeof(ws));
  for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
    cublasLtMatmulPreferenceSetAttribute(pref, attr, &align, sizeof(align));
  }
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  s = cublasLtMatmulAlgoGetHeuristic(handle_, plan.desc, plan.a, plan.b, plan.c, plan.d, pref, 1,
                                     &result, &returned);
  cublasLtMatmulPreferenceDestroy(pref);
  if (s != CUBLAS_STATUS_SUCCESS || returned == 0) {
    plan.why = s != CUBLAS_STATUS_SUCCESS ? LtError("cublasLtMatmulAlgoGetHeuristic", s)
                                          : std::string("cuBLASLt has no algorithm for this shape");
    plan.ok = false;
    return &plan;
  }
  plan.algo = result.algo;
  plan.ok = true;
  return &plan;
}

bool Gemm::RunPlan(Plan* plan, const void* a, const void* b, void* d, const void* a_scale,
                   const void* b_scale, cudaStream_t stream, std::string* why) {
  if (!plan->ok) {
    *why = plan->why;
    return false;
  }
  if (a_scale != nullptr) {
    cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &a_scale,
                                   sizeof(a_scale));
    cublasLtMatmulDescSetAttribute(plan->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &b_scale,
                                   sizeof(b_scale));
  }
  const float alpha = 1.0f, beta = 0.0f;
  const cublasStatus_t s = cublasLtMatmul(handle_, plan->desc, &alpha, a, plan->a, b, plan->b, &beta, d,
                                          plan->c, d, plan->d, &plan->algo, workspace_, workspace_bytes_,
                                          stream);
  if (s != CUBLAS_STATUS_SUCCESS) {
    plan->ok = false;  // never again for this shape
    plan->why = LtError("cublasLtMatmul", s);
    *why = plan->why;
    return false;
  }
  ++lt_calls_;
  return true;
}

bool Gemm::RunFp8(const Fp8Config& cfg, const DeviceMatrix& w, const GemmInput& x, float* y,
                  int64_t y_ld, cudaStream_t stream, bool* ran, std::string* error) {
  *ran = false;
  const int64_t m = x.m, n_out = w.rows, k = w.cols, kb = k / 128;
  const int64_t mp = cfg.pad16 ? (m + 15) / 16 * 16 : m;
  const uint8_t* q = x.fp8;
  const float* s = x.fp8_scales;
  if (mp != m) {
    if (pad_q_.Ensure(size_t(mp * k)) != cudaSuccess || pad_s_.Ensure(size_t(mp * kb) * 4) != cudaSuccess) {
      *error = "FP8 GEMM padding scratch: cudaMalloc failed";
      return false;
    }
    uint8_t* pq = static_cast<uint8_t*>(pad_q_.p);
    float* ps = static_cast<float*>(pad_s_.p);
    cudaError_t e = cudaMemcpyAsync(pq, q, size_t(m * k), cudaMemcpyDeviceToDevice, stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(pq + m * k, 0, size_t((mp - m) * k), stream);
    if (cfg.m_major) {
      if (e == cudaSuccess) {
        e = cudaMemcpy2DAsync(ps, size_t(mp) * 4, s, size_t(m) * 4, size_t(m) * 4, size_t(kb),
                              cudaMemcpyDeviceToDevice, stream);
      }
      if (e == cudaSuccess) e = cudaMemset2DAsync(ps + m, size_t(mp) * 4, 0, size_t(mp - m) * 4, size_t(kb), stream);
    } else {
      if (e == cudaSuccess) e = cudaMemcpyAsync(ps, s, size_t(m * kb) * 4, cudaMemcpyDeviceToDevice, stream);
      if (e == cudaSuccess) e = cudaMemsetAsync(ps + m * kb, 0, size_t((mp - m) * kb) * 4, stream);
    }
    if (e != cudaSuccess) {
      *error = std::string("FP8 GEMM padding: ") + cudaGetErrorString(e);
      return false;
    }
    q = pq;
    s = ps;
  }
  const bool out_bf16 = cfg.out == 1;
  const bool direct = cfg.weight_is_a && !out_bf16 && mp == m;
  void* d = y;
  int64_t ldd = y_ld;
  if (!direct) {
    if (out_.Ensure(size_t(mp * n_out) * (out_bf16 ? 2 : 4)) != cudaSuccess) {
      *error = "FP8 GEMM output scratch: cudaMalloc failed";
      return false;
    }
    d = out_.p;
    ldd = cfg.weight_is_a ? n_out : mp;
  }
  PlanSpec spec;
  spec.ab = CUDA_R_8F_E4M3;
  spec.d = out_bf16 ? CUDA_R_16BF : CUDA_R_32F;
  spec.c = cfg.out == 0 ? CUDA_R_32F : CUDA_R_16BF;
  spec.trans_a = true;
  spec.k = k;
  spec.ldd = ldd;
  const void *a, *b, *a_scale, *b_scale;
  if (cfg.weight_is_a) {
    spec.a_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    spec.b_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    spec.m = n_out;
    spec.n = mp;
    spec.lda = w.ld;
    spec.ldb = k;
    a = w.data;
    b = q;
    a_scale = w.scales;
    b_scale = s;
  } else {
    spec.a_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    spec.b_scale_mode = CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
    spec.m = mp;
    spec.n = n_out;
    spec.lda = k;
    spec.ldb = w.ld;
    a = q;
    b = w.data;
    a_scale = s;
    b_scale = w.scales;
  }
  spec.align = std::min({PtrAlign(a), PtrAlign(b), PtrAlign(d), PtrAlign(a_scale), PtrAlign(b_scale)});
  // The layout variant is not part of cuBLAS's plan, but keep plans apart per variant.
  spec.batch = 1;
  spec.d_stride = cfg.m_major ? 0 : 1;
  Plan* plan = GetPlan(spec);
  std::string why;
  if (!RunPlan(plan, a, b, d, a_scale, b_scale, stream, &why)) {
    last_fallback_reason_ = why;
    return true;  // *ran stays false
  }
  if (!direct) {
    const cudaError_t e = CopyOut(d, out_bf16, /*transposed=*/!cfg.weight_is_a, m, n_out, ldd, y, y_ld, stream);
    if (e != cudaSuccess) {
      *error = std::string("FP8 GEMM output copy: ") + cudaGetErrorString(e);
      return false;
    }
  }
  *ran = true;
  return true;
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
  if (w.kind == DeviceMatrix::Kind::kFp8) {
    if (!fp8_ok_ || x.fp8 == nullptr || x.fp8_scales == nullptr) {
      last_fallback_reason_ = "FP8 activations not prepared";
      return RunFallback(w, x, y, y_ld, stream, error);
    }
    bool ran = false;
    if (!RunFp8(fp8_, w, x, y, y_ld, stream, &ran, error)) return false;
    return ran ? true : RunFallback(w, x, y, y_ld, stream, error);
  }
  if (x.bf16 == nullptr) {
    last_fallback_reason_ = "bf16 activations not prepared";
    return RunFallback(w, x, y, y_ld, stream, error);
  }
  PlanSpec spec;
  spec.ab = CUDA_R_16BF;
  spec.trans_a = true;
  spec.m = w.rows;
  spec.n = x.m;
  spec.k = w.cols;
  spec.lda = w.ld;
  spec.ldb = w.cols;
  spec.ldd = y_ld;
  spec.align = std::min({PtrAlign(w.data), PtrAlign(x.bf16), PtrAlign(y)});
  std::string why;
  if (RunPlan(GetPlan(spec), w.data, x.bf16, y, nullptr, nullptr, stream, &why)) return true;
  last_fallback_reason_ = why;
  return RunFallback(w, x, y, y_ld, stream, error);
}

bool Gemm::BatchedBf16(bool trans_a, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                       int64_t lda, int64_t a_stride, const uint16_t* b_ptr, const float* b_f32,
                       int64_t ldb, int64_t b_stride, float* d, int64_t ldd, int64_t d_stride,
                       int batch, cudaStream_t stream, std::string* error) {
  if (n <= 0 || batch <= 0) return true;
  PlanSpec spec;
  spec.ab = CUDA_R_16BF;
  spec.trans_a = trans_a;
  spec.m = m;
  spec.n = n;
  spec.k = k;
  spec.lda = lda;
  spec.a_stride = a_stride;
  spec.ldb = ldb;
  spec.b_stride = b_stride;
  spec.ldd = ldd;
  spec.d_stride = d_stride;
  spec.batch = batch;
  spec.align = std::min({PtrAlign(a), PtrAlign(b_ptr), PtrAlign(d)});
  std::string why;
  if (RunPlan(GetPlan(spec), a, b_ptr, d, nullptr, nullptr, stream, &why)) return true;
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
  constexpr int64_t kN = 256, kK = 512, kKb = kK / 128, kMaxM = 208;
  std::mt19937 rng(12345);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  // Weight: codes of N(0,1) * 32, block scales 2^-(3 + (nb * 3 + kb) % 6).
  std::vector<uint8_t> wq(static_cast<size_t>(kN * kK));
  std::vector<float> ws(static_cast<size_t>((kN / 128) * kKb));
  for (int64_t nb = 0; nb < kN / 128; ++nb) {
    for (int64_t kb = 0; kb < kKb; ++kb) ws[size_t(nb * kKb + kb)] = std::ldexp(1.0f, -3 - int((nb * 3 + kb) % 6));
  }
  for (auto& q : wq) q = FloatToFp8E4M3(nd(rng) * 32.0f);
  DevPtr d_wq, d_ws, d_xq, d_xs, d_y, d_xf;
  if (d_wq.Alloc(wq.size()) != cudaSuccess || d_ws.Alloc(ws.size() * 4) != cudaSuccess ||
      d_xq.Alloc(size_t(kMaxM * kK)) != cudaSuccess || d_xs.Alloc(size_t(kMaxM * kKb * 4)) != cudaSuccess ||
      d_y.Alloc(size_t(kMaxM * kN * 4)) != cudaSuccess || d_xf.Alloc(size_t(kMaxM * kK * 4)) != cudaSuccess) {
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
  std::vector<double> wd(wq.size());
  for (int64_t j = 0; j < kN; ++j) {
    for (int64_t c = 0; c < kK; ++c) {
      wd[size_t(j * kK + c)] = double(Fp8E4M3ToFloat(wq[size_t(j * kK + c)])) * ws[size_t((j / 128) * kKb + c / 128)];
    }
  }
  // One trial: 0 = ran and matched, 1 = no algorithm, 2 = ran but mismatched.
  auto trial = [&](const Fp8Config& cfg, int64_t m, double* rel, int* outcome) {
    std::vector<float> x(static_cast<size_t>(m * kK)), xd(static_cast<size_t>(m * kK)), xs(static_cast<size_t>(m * kKb));
    std::vector<uint8_t> xq(static_cast<size_t>(m * kK));
    for (int64_t r = 0; r < m; ++r) {
      for (int64_t c = 0; c < kK; ++c) x[size_t(r * kK + c)] = nd(rng) * std::ldexp(1.0f, int(r % 5) - 2 + int(c / 128));
      for (int64_t g = 0; g < kKb; ++g) {
        float amax = 0.0f;
        for (int64_t c = g * 128; c < (g + 1) * 128; ++c) amax = std::max(amax, std::fabs(x[size_t(r * kK + c)]));
        const float s = Fp8Scale(amax, true);
        xs[size_t(cfg.m_major ? g * m + r : r * kKb + g)] = s;
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
    bool ran = false;
    if (!RunFp8(cfg, w, in, static_cast<float*>(d_y.p), kN, stream, &ran, error)) return false;
    if (!ran) {
      *outcome = 1;
      return true;
    }
    std::vector<float> y(static_cast<size_t>(m * kN));
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
        for (int64_t c = 0; c < kK; ++c) ref += double(xd[size_t(r * kK + c)]) * wd[size_t(j * kK + c)];
        max_ref = std::max(max_ref, std::fabs(ref));
        max_err = std::max(max_err, std::fabs(ref - double(y[size_t(r * kN + j)])));
      }
    }
    *rel = max_ref > 0 ? max_err / max_ref : max_err;
    *outcome = *rel < 1e-2 ? 0 : 2;
    return true;
  };
  std::string log;
  bool chosen = false;
  for (bool weight_is_a : {true, false}) {
    for (int out : {0, 1, 2}) {
      for (bool m_major : {true, false}) {
        Fp8Config cfg;
        cfg.weight_is_a = weight_is_a;
        cfg.out = out;
        cfg.m_major = m_major;
        // m = 64 first (a multiple of 16), then odd token counts, padded if need be.
        double rel = 0;
        int outcome = 0;
        if (!trial(cfg, 64, &rel, &outcome)) return false;
        char buf[200];
        if (outcome != 0) {
          std::snprintf(buf, sizeof(buf), " [%s: m=64 %s]", cfg.Name().c_str(),
                        outcome == 1 ? "no algorithm" : "MISMATCH");
          log += buf;
          continue;
        }
        bool all = true;
        double worst = rel;
        for (bool pad : {false, true}) {
          cfg.pad16 = pad;
          all = true;
          worst = rel;
          for (int64_t m : {int64_t(1), int64_t(5), int64_t(200)}) {
            double r2 = 0;
            int o2 = 0;
            if (!trial(cfg, m, &r2, &o2)) return false;
            worst = std::max(worst, r2);
            if (o2 != 0) {
              all = false;
              break;
            }
          }
          if (all) break;
        }
        std::snprintf(buf, sizeof(buf), " [%s: %s, max rel err %.1e]", cfg.Name().c_str(),
                      all ? "ok" : "fails for odd token counts", worst);
        log += buf;
        if (all) {
          fp8_ = cfg;
          chosen = true;
          break;
        }
      }
      if (chosen) break;
    }
    if (chosen) break;
  }
  fp8_ok_ = chosen;
  *report = std::string("FP8 block-scaled cuBLASLt self-test:") + log +
            (chosen ? " -> enabled: " + fp8_.Name()
                    : std::string(" -> DISABLED (FP8 weights are dequantised to bf16)"));
  return true;
}

}  // namespace pd::kernels::cuda::internal
