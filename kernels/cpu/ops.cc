// Dense operations of the CPU backend (kernels/ops.h): GEMMs over weight views
// of any dtype, norms, RoPE (YaRN), Hadamard, FP8 quantisation, activations and
// the MoE router.
#include "kernels/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <vector>

#include "kernels/cpu/internal/check.h"
#include "kernels/cpu/internal/vec.h"
#include "kernels/kv_layout.h"
#include "kernels/numeric.h"

namespace pd::kernels {

// ---------------------------------------------------------------------------
// YaRN (DeepSeek-V3.2-Exp inference/model.py, precompute_freqs_cis). The
// correction range is computed in double (Python floats), the frequencies in
// fp32 exactly as the torch code does (fp32 tensors).
// ---------------------------------------------------------------------------
std::vector<float> YarnInvFreq(const YarnParams& p) {
  PD_KCHECK(p.dim > 0 && p.dim % 2 == 0, "YarnInvFreq: dim must be positive and even, got %d",
            p.dim);
  PD_KCHECK(p.theta > 1.0f, "YarnInvFreq: theta must be > 1, got %g", double(p.theta));
  const int half = p.dim / 2;
  std::vector<float> f(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) {
    const float e = float(2 * i) / float(p.dim);
    f[size_t(i)] = 1.0f / std::pow(p.theta, e);
  }
  if (!p.yarn) return f;
  PD_KCHECK(p.factor > 0.0f && p.original_max_position > 0 && p.beta_fast > 0.0f &&
                p.beta_slow > 0.0f,
            "YarnInvFreq: factor (%g), original_max_position (%lld), beta_fast (%g) and "
            "beta_slow (%g) must be positive",
            double(p.factor), static_cast<long long>(p.original_max_position),
            double(p.beta_fast), double(p.beta_slow));
  auto correction_dim = [&](double num_rotations) {
    return double(p.dim) *
           std::log(double(p.original_max_position) / (num_rotations * 2.0 * std::numbers::pi)) /
           (2.0 * std::log(double(p.theta)));
  };
  double low = std::floor(correction_dim(double(p.beta_fast)));
  double high = std::ceil(correction_dim(double(p.beta_slow)));
  low = std::max(low, 0.0);
  high = std::min(high, double(p.dim - 1));
  if (low == high) high += 0.001;
  const float lo = float(low);
  const float span = float(high - low);
  for (int i = 0; i < half; ++i) {
    float ramp = (float(i) - lo) / span;
    ramp = std::clamp(ramp, 0.0f, 1.0f);
    const float smooth = 1.0f - ramp;
    const float fi = f[size_t(i)];
    f[size_t(i)] = fi / p.factor * (1.0f - smooth) + fi * smooth;
  }
  return f;
}

float YarnSoftmaxScale(int qk_head_dim, const YarnParams& p, float mscale_coef) {
  PD_KCHECK(qk_head_dim > 0, "YarnSoftmaxScale: qk_head_dim must be positive, got %d",
            qk_head_dim);
  double scale = std::pow(double(qk_head_dim), -0.5);
  if (p.yarn) {
    PD_KCHECK(p.factor > 0.0f, "YarnSoftmaxScale: factor must be positive, got %g",
              double(p.factor));
    const double mscale = 0.1 * double(mscale_coef) * std::log(double(p.factor)) + 1.0;
    scale *= mscale * mscale;
  }
  return float(scale);
}

namespace cpu {
namespace {

using internal::ConvertRow;

// ---------------------------------------------------------------------------
// GEMM over a weight view. The weight operand is packed, converted to fp32,
// into a thread-local tile of kKc x kNt values (panels of kNr columns, each
// [kc][kNr] row-major), then reused for every activation row of the task by a
// kMr x kNr register-blocked micro-kernel.
// ---------------------------------------------------------------------------
constexpr int kMr = 6;
constexpr int kNr = 16;
constexpr int kNt = 64;    // output columns per task tile (4 panels)
constexpr int kKc = 256;   // depth of one packed tile
// Batch invariance: every m goes through the packed path below, whose
// per-element summation order (sequential over k within kKc-deep tiles, tiles
// added in order) does not depend on m, on the other rows or on the pool. So a
// token's activations are bit-identical whether it is prefilled in a chunk of
// 2048 or decoded alone (model/forward_test relies on this). The unpacked GEMV
// paths this replaced were up to 2x faster at m = 1 (10.6 vs ~20 us at
// 256x512 F32) but summed in another order.

void CheckWeight(const char* fn, const WeightView& w) {
  PD_KCHECK(w.dtype == DType::kF32 || w.dtype == DType::kBF16 || w.dtype == DType::kF16 ||
                w.dtype == DType::kFP8E4M3,
            "%s: weight dtype %s is not a floating type", fn, DTypeName(w.dtype));
  PD_KCHECK(w.rows >= 0 && w.cols >= 0, "%s: negative weight shape [%lld, %lld]", fn,
            static_cast<long long>(w.rows), static_cast<long long>(w.cols));
  if (w.rows == 0 || w.cols == 0) return;
  PD_KCHECK(w.data != nullptr, "%s: weight data is null", fn);
  PD_KCHECK(w.ld >= w.cols, "%s: weight ld (%lld) < cols (%lld)", fn,
            static_cast<long long>(w.ld), static_cast<long long>(w.cols));
  if (w.dtype == DType::kFP8E4M3) {
    PD_KCHECK(w.scale != nullptr, "%s: FP8 weight without block scales", fn);
    PD_KCHECK(w.block > 0, "%s: FP8 weight block (%d) must be positive", fn, w.block);
    PD_KCHECK(w.row0 >= 0 && w.col0 >= 0, "%s: negative FP8 view offset (%lld, %lld)", fn,
              static_cast<long long>(w.row0), static_cast<long long>(w.col0));
    PD_KCHECK(w.scale_ld >= CeilDiv(w.col0 + w.cols, w.block),
              "%s: FP8 scale_ld (%lld) too small for columns up to %lld with block %d", fn,
              static_cast<long long>(w.scale_ld), static_cast<long long>(w.col0 + w.cols),
              w.block);
  }
}

template <int MR>
inline void MicroKernel(const float* __restrict a, int64_t lda, const float* __restrict b,
                        int64_t kc, float* __restrict c, int64_t ldc, int nc, bool accumulate) {
  float acc[MR][kNr] = {};
  for (int64_t p = 0; p < kc; ++p) {
    const float* bp = b + p * kNr;
    for (int i = 0; i < MR; ++i) {
      const float av = a[i * lda + p];
#pragma omp simd
      for (int j = 0; j < kNr; ++j) acc[i][j] += av * bp[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (nc == kNr) {
      if (accumulate) {
#pragma omp simd
        for (int j = 0; j < kNr; ++j) ci[j] += acc[i][j];
      } else {
#pragma omp simd
        for (int j = 0; j < kNr; ++j) ci[j] = acc[i][j];
      }
    } else {
      for (int j = 0; j < nc; ++j) ci[j] = accumulate ? ci[j] + acc[i][j] : acc[i][j];
    }
  }
}

void RunMicroKernel(int mr, const float* a, int64_t lda, const float* b, int64_t kc, float* c,
                    int64_t ldc, int nc, bool accumulate) {
  switch (mr) {
    case 6: MicroKernel<6>(a, lda, b, kc, c, ldc, nc, accumulate); break;
    case 5: MicroKernel<5>(a, lda, b, kc, c, ldc, nc, accumulate); break;
    case 4: MicroKernel<4>(a, lda, b, kc, c, ldc, nc, accumulate); break;
    case 3: MicroKernel<3>(a, lda, b, kc, c, ldc, nc, accumulate); break;
    case 2: MicroKernel<2>(a, lda, b, kc, c, ldc, nc, accumulate); break;
    default: MicroKernel<1>(a, lda, b, kc, c, ldc, nc, accumulate); break;
  }
}

struct GemmScratch {
  std::vector<float> pack;  // [kNt / kNr panels][kKc][kNr]
  std::vector<float> row;   // one converted weight row segment
};

GemmScratch& Scratch() {
  thread_local GemmScratch s;
  return s;
}

// Packs B[p][j] = op(W)(k0 + p, n0 + j) for p < kc, j < nt (zero beyond nt up to
// the panel width). transposed: op(W) = W^T (Linear: W is [N, K]); otherwise
// op(W) = W (MatMulXW: W is [K, N]).
void PackTile(const WeightView& w, bool transposed, int64_t n0, int nt, int64_t k0, int kc,
              float* pack, std::vector<float>& row) {
  const int panels = (nt + kNr - 1) / kNr;
  if (nt % kNr != 0) {
    // Zero the padding columns of the last panel.
    float* last = pack + int64_t(panels - 1) * kc * kNr;
    const int valid = nt - (panels - 1) * kNr;
    for (int p = 0; p < kc; ++p)
      for (int j = valid; j < kNr; ++j) last[p * kNr + j] = 0.0f;
  }
  if (transposed) {
    row.resize(size_t(kc));
    for (int jj = 0; jj < nt; ++jj) {
      const float* src;
      if (w.dtype == DType::kF32) {
        src = static_cast<const float*>(w.data) + (n0 + jj) * w.ld + k0;
      } else {
        ConvertRow(w, n0 + jj, k0, kc, row.data());
        src = row.data();
      }
      float* dst = pack + int64_t(jj / kNr) * kc * kNr + jj % kNr;
      for (int p = 0; p < kc; ++p) dst[p * kNr] = src[p];
    }
  } else {
    row.resize(size_t(nt));
    for (int p = 0; p < kc; ++p) {
      const float* src;
      if (w.dtype == DType::kF32) {
        src = static_cast<const float*>(w.data) + (k0 + p) * w.ld + n0;
      } else {
        ConvertRow(w, k0 + p, n0, nt, row.data());
        src = row.data();
      }
      for (int q = 0; q < panels; ++q) {
        const int cnt = std::min(kNr, nt - q * kNr);
        std::memcpy(pack + (int64_t(q) * kc + p) * kNr, src + q * kNr, size_t(cnt) * 4);
      }
    }
  }
}

// y[m, N] = x[m, K] * op(W), op(W) [K, N] as in PackTile.
void Gemm(const float* x, int64_t m, int64_t K, int64_t N, const WeightView& w, bool transposed,
          float* y, ThreadPool* pool) {
  const int threads = pool ? pool->num_threads() : 1;
  const int64_t n_tiles = CeilDiv(N, kNt);
  int64_t m_chunks = 1;
  if (threads > 1 && n_tiles < 4 * threads) {
    m_chunks = std::min(CeilDiv(4 * threads, n_tiles), std::max<int64_t>(1, m / 48));
  }
  const int64_t mc = CeilDiv(CeilDiv(m, m_chunks), kMr) * kMr;
  m_chunks = CeilDiv(m, mc);
  ParallelFor(pool, m_chunks * n_tiles, 1, [&](int64_t begin, int64_t end) {
    GemmScratch& s = Scratch();
    s.pack.resize(size_t(kKc) * kNt);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = (task % n_tiles) * kNt;
      const int nt = int(std::min<int64_t>(kNt, N - n0));
      const int64_t m0 = (task / n_tiles) * mc;
      const int64_t m1 = std::min(m, m0 + mc);
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int kc = int(std::min<int64_t>(kKc, K - k0));
        PackTile(w, transposed, n0, nt, k0, kc, s.pack.data(), s.row);
        for (int64_t i0 = m0; i0 < m1; i0 += kMr) {
          const int mr = int(std::min<int64_t>(kMr, m1 - i0));
          for (int q = 0; q * kNr < nt; ++q) {
            RunMicroKernel(mr, x + i0 * K + k0, K, s.pack.data() + int64_t(q) * kc * kNr, kc,
                           y + i0 * N + n0 + q * kNr, N, std::min(kNr, nt - q * kNr), k0 > 0);
          }
        }
      }
    }
  });
}

}  // namespace

void Linear(const float* x, int64_t m, const WeightView& w, float* y, ThreadPool* pool) {
  CheckWeight("Linear", w);
  PD_KCHECK(m >= 0, "Linear: negative row count %lld", static_cast<long long>(m));
  const int64_t K = w.cols, N = w.rows;
  if (m == 0 || N == 0) return;
  PD_KCHECK(x != nullptr && y != nullptr, "Linear: null x or y");
  if (K == 0) {
    std::fill(y, y + m * N, 0.0f);
    return;
  }
  // One code path for every m: a row's result never depends on the batch.
  Gemm(x, m, K, N, w, /*transposed=*/true, y, pool);
}

void MatMulXW(const float* x, int64_t m, const WeightView& w, float* y, ThreadPool* pool) {
  CheckWeight("MatMulXW", w);
  PD_KCHECK(m >= 0, "MatMulXW: negative row count %lld", static_cast<long long>(m));
  const int64_t K = w.rows, N = w.cols;
  if (m == 0 || N == 0) return;
  PD_KCHECK(x != nullptr && y != nullptr, "MatMulXW: null x or y");
  if (K == 0) {
    std::fill(y, y + m * N, 0.0f);
    return;
  }
  Gemm(x, m, K, N, w, /*transposed=*/false, y, pool);
}

// ---------------------------------------------------------------------------
// Norms and activations.
// ---------------------------------------------------------------------------
void RmsNorm(const float* x, int64_t m, int64_t n, const float* gamma, float eps, float* y) {
  PD_KCHECK(n > 0 || m == 0, "RmsNorm: row length must be positive, got %lld",
            static_cast<long long>(n));
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += double(xr[i]) * double(xr[i]);
    const float inv = float(1.0 / std::sqrt(ss / double(n) + double(eps)));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yr[i] = xr[i] * inv * gamma[i];
  }
}

void LayerNorm(const float* x, int64_t m, int64_t n, const float* gamma, const float* beta,
               float eps, float* y) {
  PD_KCHECK(n > 0 || m == 0, "LayerNorm: row length must be positive, got %lld",
            static_cast<long long>(n));
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * n;
    float* yr = y + r * n;
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) sum += double(xr[i]);
    const double mean = sum / double(n);
    double var = 0.0;
#pragma omp simd reduction(+ : var)
    for (int64_t i = 0; i < n; ++i) {
      const double d = double(xr[i]) - mean;
      var += d * d;
    }
    var /= double(n);
    const float inv = float(1.0 / std::sqrt(var + double(eps)));
    const float meanf = float(mean);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - meanf) * inv * gamma[i] + beta[i];
  }
}

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + internal::FastExp(-g)) * up[i];
  }
}

void Softmax(float* x, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = x + r * n;
    float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, xr[i]);
    const float inv = 1.0f / internal::ExpShiftSum(xr, n, mx);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xr[i] *= inv;
  }
}

// ---------------------------------------------------------------------------
// RoPE and Hadamard.
// ---------------------------------------------------------------------------
void ApplyRope(float* x, int64_t tokens, int64_t heads, int64_t token_stride,
               int64_t head_stride, const int64_t* positions, const float* inv_freq, int dim,
               bool interleaved) {
  PD_KCHECK(dim > 0 && dim % 2 == 0, "ApplyRope: dim must be positive and even, got %d", dim);
  const int half = dim / 2;
  thread_local std::vector<float> cs;
  cs.resize(size_t(dim));
  float* cosv = cs.data();
  float* sinv = cs.data() + half;
  for (int64_t t = 0; t < tokens; ++t) {
    const float pos = float(positions[t]);
    for (int i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[i];  // fp32, as torch.outer does
      cosv[i] = std::cos(angle);
      sinv[i] = std::sin(angle);
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + t * token_stride + h * head_stride;
      if (interleaved) {
        for (int i = 0; i < half; ++i) {
          const float a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * cosv[i] - b * sinv[i];
          v[2 * i + 1] = a * sinv[i] + b * cosv[i];
        }
      } else {
        float* __restrict re = v;
        float* __restrict im = v + half;
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          const float a = re[i], b = im[i];
          re[i] = a * cosv[i] - b * sinv[i];
          im[i] = a * sinv[i] + b * cosv[i];
        }
      }
    }
  }
}

void Hadamard(float* x, int64_t rows, int n, float scale) {
  PD_KCHECK(n > 0 && (n & (n - 1)) == 0, "Hadamard: n must be a power of two, got %d", n);
  for (int64_t r = 0; r < rows; ++r) {
    float* v = x + r * int64_t(n);
    for (int h = 1; h < n; h *= 2) {
      for (int i = 0; i < n; i += 2 * h) {
        float* __restrict lo = v + i;
        float* __restrict hi = v + i + h;
#pragma omp simd
        for (int j = 0; j < h; ++j) {
          const float a = lo[j], b = hi[j];
          lo[j] = a + b;
          hi[j] = a - b;
        }
      }
    }
#pragma omp simd
    for (int i = 0; i < n; ++i) v[i] *= scale;
  }
}

// ---------------------------------------------------------------------------
// FP8 quantisation.
// ---------------------------------------------------------------------------
void QuantizeFp8(const float* x, int64_t rows, int64_t n, int group, bool ue8m0, uint8_t* q,
                 float* scales) {
  PD_KCHECK(group > 0, "QuantizeFp8: group must be positive, got %d", group);
  const int64_t groups = CeilDiv(n, group);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t c0 = g * group;
      const int64_t c1 = std::min(n, c0 + group);
      const float* xs = x + r * n;
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(xs[c]));
      const float s = Fp8Scale(amax, ue8m0);
      scales[r * groups + g] = s;
      internal::EncodeFp8(xs + c0, c1 - c0, s, q + r * n + c0);
    }
  }
}

// ---------------------------------------------------------------------------
// MoE router (DeepSeek-V3 Gate, sigmoid scores + correction bias). bias may be
// null (zero bias); the group score is then still the top-2 sum, as ops.h
// states (DeepSeek's Gate without a bias would use the group max instead).
// ---------------------------------------------------------------------------
void MoeRoute(const float* logits, const float* bias, int64_t m, int experts, int n_group,
              int topk_group, int topk, bool norm_topk, float route_scale, int32_t* idx,
              float* weights) {
  PD_KCHECK(experts > 0, "MoeRoute: experts must be positive, got %d", experts);
  PD_KCHECK(n_group >= 1 && experts % n_group == 0,
            "MoeRoute: n_group (%d) must be >= 1 and divide experts (%d)", n_group, experts);
  const int group_size = experts / n_group;
  if (n_group > 1) {
    PD_KCHECK(topk_group >= 1 && topk_group <= n_group,
              "MoeRoute: topk_group (%d) must be in [1, n_group = %d]", topk_group, n_group);
  }
  const int selectable = n_group > 1 ? topk_group * group_size : experts;
  PD_KCHECK(topk >= 1 && topk <= selectable,
            "MoeRoute: topk (%d) must be in [1, %d] (experts in the kept groups)", topk,
            selectable);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> score(static_cast<size_t>(experts)), sel(static_cast<size_t>(experts));
  std::vector<float> gscore(static_cast<size_t>(n_group));
  std::vector<int32_t> order(static_cast<size_t>(experts));
  for (int64_t r = 0; r < m; ++r) {
    const float* lr = logits + r * experts;
    for (int e = 0; e < experts; ++e) {
      score[size_t(e)] = 1.0f / (1.0f + std::exp(-lr[e]));
      sel[size_t(e)] = score[size_t(e)] + (bias ? bias[e] : 0.0f);
    }
    if (n_group > 1) {
      for (int g = 0; g < n_group; ++g) {
        const float* s = sel.data() + g * group_size;
        if (group_size == 1) {
          gscore[size_t(g)] = s[0];
          continue;
        }
        // Sum of the two largest (torch.topk(2).sum()).
        float a = kNegInf, b = kNegInf;
        for (int e = 0; e < group_size; ++e) {
          if (s[e] > a) {
            b = a;
            a = s[e];
          } else if (s[e] > b) {
            b = s[e];
          }
        }
        gscore[size_t(g)] = a + b;
      }
      // Keep the top topk_group groups (ties: lower group index).
      std::vector<int32_t> gorder(static_cast<size_t>(n_group));
      for (int g = 0; g < n_group; ++g) gorder[size_t(g)] = g;
      std::stable_sort(gorder.begin(), gorder.end(), [&](int32_t a, int32_t b) {
        return gscore[size_t(a)] > gscore[size_t(b)];
      });
      for (int k = topk_group; k < n_group; ++k) {
        const int g = gorder[size_t(k)];
        std::fill(sel.begin() + int64_t(g) * group_size,
                  sel.begin() + int64_t(g + 1) * group_size, kNegInf);
      }
    }
    // Top topk experts by selection score (ties: lower index), descending.
    for (int e = 0; e < experts; ++e) order[size_t(e)] = e;
    auto better = [&](int32_t a, int32_t b) {
      const float sa = sel[size_t(a)], sb = sel[size_t(b)];
      return sa != sb ? sa > sb : a < b;
    };
    std::partial_sort(order.begin(), order.begin() + topk, order.begin() + experts, better);
    float sum = 0.0f;
    for (int k = 0; k < topk; ++k) {
      const int32_t e = order[size_t(k)];
      idx[r * topk + k] = e;
      weights[r * topk + k] = score[size_t(e)];
      sum += score[size_t(e)];
    }
    for (int k = 0; k < topk; ++k) {
      float wk = weights[r * topk + k];
      if (norm_topk) wk /= sum;
      weights[r * topk + k] = wk * route_scale;
    }
  }
}

}  // namespace cpu
}  // namespace pd::kernels
