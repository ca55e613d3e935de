// Dense ops of the GPU model engine: see model_kernels.h for the contracts.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/model/model_kernels.h"
#include "kernels/numeric.h"

namespace pd::kernels::cuda::internal {
namespace {

constexpr int kThreads = 256;

unsigned GridFor(int64_t count, int threads = kThreads) {
  int64_t blocks = (count + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535LL * 32) blocks = 65535LL * 32;  // grid-stride loops cover the rest
  return unsigned(blocks);
}

// Block-wide sum of doubles (blockDim.x a multiple of 32, <= 1024).
__device__ double BlockSumDouble(double v) {
  __shared__ double part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < int(blockDim.x >> 5); ++w) t += part[w];
    part[0] = t;
  }
  __syncthreads();
  return part[0];
}

__global__ void EmbedGatherKernel(const uint16_t* table, int64_t hidden, const int32_t* tokens,
                                  float* out) {
  const int64_t i = blockIdx.x;
  const uint16_t* row = table + int64_t(tokens[i]) * hidden;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) out[i * hidden + c] = Bf16ToFloat(row[c]);
}

__global__ void RmsNormKernel(const float* x, int64_t n, int64_t x_stride, const float* gamma,
                              float eps, float* y, int64_t y_stride) {
  const int64_t r = blockIdx.x;
  const float* xr = x + r * x_stride;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += double(xr[i]) * double(xr[i]);
  ss = BlockSumDouble(ss);
  const float inv = float(1.0 / sqrt(ss / double(n) + double(eps)));
  float* yr = y + r * y_stride;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    yr[i] = __fmul_rn(__fmul_rn(xr[i], inv), gamma[i]);
  }
}

__global__ void AddRmsNormKernel(float* x, const float* delta, int64_t n, const float* gamma,
                                 float eps, float* y) {
  const int64_t r = blockIdx.x;
  float* xr = x + r * n;
  const float* dr = delta + r * n;
  double ss = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = __fadd_rn(xr[i], dr[i]);
    xr[i] = v;
    ss += double(v) * double(v);
  }
  ss = BlockSumDouble(ss);
  const float inv = float(1.0 / sqrt(ss / double(n) + double(eps)));
  float* yr = y + r * n;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    yr[i] = __fmul_rn(__fmul_rn(xr[i], inv), gamma[i]);
  }
}

__global__ void AddInPlaceKernel(float* x, const float* d, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    x[i] = __fadd_rn(x[i], d[i]);
  }
}

__global__ void GatherRowsKernel(const float* src, int64_t src_stride, int64_t width,
                                 const int32_t* rows, float* dst) {
  const int64_t i = blockIdx.x;
  const float* s = src + int64_t(rows[i]) * src_stride;
  for (int64_t c = threadIdx.x; c < width; c += blockDim.x) dst[i * width + c] = s[c];
}

__global__ void RopeInterleavedKernel(float* x, int64_t tokens, int heads, int64_t token_stride,
                                      int64_t head_stride, const int64_t* positions,
                                      const float* inv_freq, int dim, float* copy_out) {
  const int half = dim / 2;
  const int64_t total = tokens * heads * half;
  for (int64_t w = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; w < total;
       w += int64_t(gridDim.x) * blockDim.x) {
    const int i = int(w % half);
    const int64_t th = w / half;
    const int h = int(th % heads);
    const int64_t t = th / heads;
    const float angle = __fmul_rn(float(positions[t]), inv_freq[i]);
    const float c = cosf(angle), s = sinf(angle);
    float* v = x + t * token_stride + h * head_stride;
    const float a = v[2 * i], b = v[2 * i + 1];
    const float o0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    const float o1 = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    v[2 * i] = o0;
    v[2 * i + 1] = o1;
    if (copy_out != nullptr) {
      float* o = copy_out + (t * heads + h) * dim;
      o[2 * i] = o0;
      o[2 * i + 1] = o1;
    }
  }
}

__global__ void CastToBf16Kernel(const float* x, int64_t count, uint16_t* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = FloatToBf16(x[i]);
  }
}

__global__ void Bf16ToFloatKernel(const uint16_t* x, int64_t count, float* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    y[i] = Bf16ToFloat(x[i]);
  }
}

__global__ void CopyOutKernel(const void* src, bool src_bf16, bool transposed, int64_t m, int64_t n,
                              int64_t src_ld, float* y, int64_t y_ld) {
  const int64_t total = m * n;
  for (int64_t w = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; w < total;
       w += int64_t(gridDim.x) * blockDim.x) {
    // Consecutive threads walk the source's contiguous dimension.
    int64_t i, j;
    if (transposed) {
      i = w % m;
      j = w / m;
    } else {
      i = w / n;
      j = w % n;
    }
    const int64_t o = transposed ? j * src_ld + i : i * src_ld + j;
    y[i * y_ld + j] = src_bf16 ? Bf16ToFloat(static_cast<const uint16_t*>(src)[o])
                               : static_cast<const float*>(src)[o];
  }
}

// One warp per (row, 128-value group); each lane 4 consecutive values.
__global__ void QuantizeFp8Kernel(const QuantizeParams p) {
  const int64_t groups = p.k / 128;
  const int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= p.m * groups) return;
  const int64_t r = warp / groups, g = warp % groups;
  const float* xr = p.x + r * p.x_stride + g * 128 + lane * 4;
  float v[4];
  float amax = 0.0f;
  for (int i = 0; i < 4; ++i) {
    v[i] = xr[i];
    amax = fmaxf(amax, fabsf(v[i]));
  }
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float s = Fp8Scale(amax, true);
  uint32_t packed = 0;
  for (int i = 0; i < 4; ++i) packed |= uint32_t(FloatToFp8E4M3(__fdiv_rn(v[i], s))) << (8 * i);
  *reinterpret_cast<uint32_t*>(p.q + r * p.k + g * 128 + lane * 4) = packed;
  if (lane == 0) {
    int64_t r0 = 0, rows = p.m, off = 0;
    if (p.segment_start != nullptr) {
      r0 = p.segment_start[r];
      rows = p.segment_rows[r];
      off = p.segment_scale_offset[r];
    }
    const int64_t idx = p.m_major ? off + g * rows + (r - r0) : off + (r - r0) * groups + g;
    p.scales[idx] = s;
  }
}

__global__ void SiluMulKernel(const float* gu, int64_t m, int64_t inter, float* out) {
  const int64_t total = m * inter;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / inter, j = i % inter;
    const float g = gu[r * 2 * inter + j];
    const float u = gu[r * 2 * inter + inter + j];
    out[i] = __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
  }
}

// (score, index) order of cpu::MoeRoute's selections: larger score first, ties
// to the lower index.
__device__ __forceinline__ bool Better(float sa, int a, float sb, int b) {
  return sa != sb ? sa > sb : a < b;
}

__global__ void MoeRouteKernel(const float* logits, const float* bias, int64_t m, int experts,
                               int n_group, int topk_group, int topk, bool norm_topk,
                               float route_scale, int32_t* idx, float* weights) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= m) return;
  const float kNegInf = -__int_as_float(0x7f800000);
  float score[256], sel[256];
  const float* lr = logits + r * experts;
  for (int e = 0; e < experts; ++e) {
    score[e] = 1.0f / (1.0f + expf(-lr[e]));
    sel[e] = score[e] + (bias != nullptr ? bias[e] : 0.0f);
  }
  if (n_group > 1) {
    const int gs = experts / n_group;
    float gscore[256];
    for (int g = 0; g < n_group; ++g) {
      const float* s = sel + g * gs;
      if (gs == 1) {
        gscore[g] = s[0];
        continue;
      }
      float a = kNegInf, b = kNegInf;
      for (int e = 0; e < gs; ++e) {
        if (s[e] > a) {
          b = a;
          a = s[e];
        } else if (s[e] > b) {
          b = s[e];
        }
      }
      gscore[g] = a + b;
    }
    // Keep the topk_group best groups (stable: ties to the lower group).
    bool keep[256];
    for (int g = 0; g < n_group; ++g) keep[g] = false;
    for (int k = 0; k < topk_group; ++k) {
      int best = -1;
      for (int g = 0; g < n_group; ++g) {
        if (keep[g]) continue;
        if (best < 0 || gscore[g] > gscore[best]) best = g;
      }
      keep[best] = true;
    }
    for (int g = 0; g < n_group; ++g) {
      if (!keep[g]) {
        for (int e = g * gs; e < (g + 1) * gs; ++e) sel[e] = kNegInf;
      }
    }
  }
  float sum = 0.0f;
  int32_t* out_idx = idx + r * topk;
  float* out_w = weights + r * topk;
  for (int k = 0; k < topk; ++k) {
    int best = -1;
    for (int e = 0; e < experts; ++e) {
      bool taken = false;
      for (int j = 0; j < k; ++j) taken |= out_idx[j] == e;
      if (taken) continue;
      if (best < 0 || Better(sel[e], e, sel[best], best)) best = e;
    }
    out_idx[k] = best;
    out_w[k] = score[best];
    sum += score[best];
  }
  for (int k = 0; k < topk; ++k) {
    float wk = out_w[k];
    if (norm_topk) wk /= sum;
    out_w[k] = wk * route_scale;
  }
}

__global__ void MoeCombineKernel(float* out, const float* y, int64_t hidden,
                                 const int32_t* route_rows, const float* route_weights, int k) {
  const int64_t t = blockIdx.x;
  for (int64_t c = threadIdx.x; c < hidden; c += blockDim.x) {
    float acc = out[t * hidden + c];
    for (int j = 0; j < k; ++j) {
      const int32_t row = route_rows[t * k + j];
      if (row < 0) continue;
      acc = __fadd_rn(acc, __fmul_rn(route_weights[t * k + j], y[int64_t(row) * hidden + c]));
    }
    out[t * hidden + c] = acc;
  }
}

__device__ __forceinline__ bool ArgBetter(float v, int64_t i, float bv, int64_t bi) {
  if (v != v) return false;
  if (bi < 0) return true;
  return v > bv || (v == bv && i < bi);
}

__global__ void ArgmaxKernel(const float* logits, int64_t vocab, int32_t* out) {
  const int64_t r = blockIdx.x;
  const float* row = logits + r * vocab;
  float best = 0.0f;
  int64_t bi = -1;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    if (ArgBetter(row[i], i, best, bi)) {
      best = row[i];
      bi = i;
    }
  }
  __shared__ float sv[kThreads];
  __shared__ int64_t si[kThreads];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (int(threadIdx.x) < s) {
      const float v = sv[threadIdx.x + s];
      const int64_t i = si[threadIdx.x + s];
      if (i >= 0 && ArgBetter(v, i, sv[threadIdx.x], si[threadIdx.x])) {
        sv[threadIdx.x] = v;
        si[threadIdx.x] = i;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[r] = int32_t(si[0]);
}

__global__ void DequantKernel(const DequantParams p) {
  const int64_t total = p.rows * p.cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / p.cols, c = i % p.cols;
    const float s = p.scales[((p.row0 + r) / p.block - p.scale_row0) * p.scale_ld +
                             (p.col0 + c) / p.block - p.scale_col0];
    p.out[i] = FloatToBf16(Fp8E4M3ToFloat(p.q[i]) * s);
  }
}

// Counter-based N(0, 1): splitmix64 of (seed, i), Box-Muller.
__device__ __forceinline__ float NormalAt(uint64_t seed, uint64_t i) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u1 = float((z >> 40) + 1) * (1.0f / 16777216.0f);  // (0, 1]
  const float u2 = float(z & 0xffffffull) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

__global__ void RandomFp8Kernel(uint8_t* q, int64_t count, uint64_t seed, float value_scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    q[i] = FloatToFp8E4M3(NormalAt(seed, uint64_t(i)) * value_scale);
  }
}

__global__ void RandomBf16Kernel(uint16_t* x, int64_t count, uint64_t seed, float std) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    x[i] = FloatToBf16(NormalAt(seed, uint64_t(i)) * std);
  }
}

__global__ void FillFloatKernel(float* x, int64_t count, float value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count;
       i += int64_t(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

__global__ void RandomKvKernel(uint8_t* mla_pool, uint8_t* index_pool, const int32_t* page_table,
                               int64_t num_tokens, KvLayout l, uint64_t seed) {
  const int64_t t = blockIdx.x;
  if (t >= num_tokens) return;
  const int32_t page = page_table[t / kPageTokens];
  const int slot = int(t % kPageTokens);
  const uint64_t base = uint64_t(t) * 4096u;
  uint8_t* rec = mla_pool + size_t(page) * l.MlaPageBytes() + size_t(slot) * l.MlaTokenBytes();
  for (int c = threadIdx.x; c < l.kv_lora_rank; c += blockDim.x) {
    rec[c] = FloatToFp8E4M3(NormalAt(seed, base + c) * 16.0f);
  }
  for (int g = threadIdx.x; g < l.MlaScaleCount(); g += blockDim.x) {
    reinterpret_cast<float*>(rec + l.MlaScaleOffset())[g] = 0.03125f;
  }
  uint16_t* pe = reinterpret_cast<uint16_t*>(rec + l.MlaRopeOffset());
  for (int c = threadIdx.x; c < l.rope_dim; c += blockDim.x) {
    pe[c] = FloatToBf16(NormalAt(seed, base + 1024 + c));
  }
  uint8_t* ipage = index_pool + size_t(page) * l.IndexPageBytes();
  for (int c = threadIdx.x; c < l.index_head_dim; c += blockDim.x) {
    ipage[l.IndexValueOffset(slot) + c] = FloatToFp8E4M3(NormalAt(seed ^ 0x5bd1e995u, base + c) * 64.0f);
  }
  if (threadIdx.x == 0) *reinterpret_cast<float*>(ipage + l.IndexScaleOffset(slot)) = 0.015625f;
}

// 16x16 output tile per block; k in tiles of 16.
__global__ void RefGemmKernel(const RefGemmParams p) {
  __shared__ float xs[16][17];
  __shared__ float ws[16][17];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i = int64_t(blockIdx.y) * 16 + ty;  // row of y
  const int64_t j = int64_t(blockIdx.x) * 16 + tx;  // column of y
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < p.k; k0 += 16) {
    const int64_t xi = int64_t(blockIdx.y) * 16 + ty, xk = k0 + tx;
    xs[ty][tx] = (xi < p.m && xk < p.k) ? p.x[xi * p.x_ld + xk] : 0.0f;
    const int64_t wj = int64_t(blockIdx.x) * 16 + ty, wk = k0 + tx;
    float wv = 0.0f;
    if (wj < p.n && wk < p.k) {
      if (p.w_fp8) {
        const uint8_t q = static_cast<const uint8_t*>(p.w)[wj * p.w_ld + wk];
        wv = Fp8E4M3ToFloat(q) * p.scales[(wj / 128) * p.scale_ld + wk / 128];
      } else {
        const int64_t off = p.transposed ? wk * p.w_ld + wj : wj * p.w_ld + wk;
        wv = Bf16ToFloat(static_cast<const uint16_t*>(p.w)[off]);
      }
    }
    ws[ty][tx] = wv;  // ws[j within tile][k within tile]
    __syncthreads();
    for (int kk = 0; kk < 16; ++kk) acc = fmaf(xs[ty][kk], ws[tx][kk], acc);
    __syncthreads();
  }
  if (i < p.m && j < p.n) p.y[i * p.y_ld + j] = acc;
}

}  // namespace

cudaError_t EmbedGather(const uint16_t* table, int64_t hidden, const int32_t* tokens, int64_t n,
                        float* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  EmbedGatherKernel<<<unsigned(n), kThreads, 0, stream>>>(table, hidden, tokens, out);
  return cudaGetLastError();
}

cudaError_t RmsNorm(const float* x, int64_t rows, int64_t n, int64_t x_stride, const float* gamma,
                    float eps, float* y, int64_t y_stride, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  RmsNormKernel<<<unsigned(rows), kThreads, 0, stream>>>(x, n, x_stride, gamma, eps, y, y_stride);
  return cudaGetLastError();
}

cudaError_t AddRmsNorm(float* x, const float* delta, int64_t rows, int64_t n, const float* gamma,
                       float eps, float* y, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  AddRmsNormKernel<<<unsigned(rows), kThreads, 0, stream>>>(x, delta, n, gamma, eps, y);
  return cudaGetLastError();
}

cudaError_t AddInPlace(float* x, const float* d, int64_t count, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  AddInPlaceKernel<<<GridFor(count), kThreads, 0, stream>>>(x, d, count);
  return cudaGetLastError();
}

cudaError_t GatherRows(const float* src, int64_t src_stride, int64_t width, const int32_t* rows,
                       int64_t n, float* dst, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  GatherRowsKernel<<<unsigned(n), kThreads, 0, stream>>>(src, src_stride, width, rows, dst);
  return cudaGetLastError();
}

cudaError_t RopeInterleaved(float* x, int64_t tokens, int heads, int64_t token_stride,
                            int64_t head_stride, const int64_t* positions, const float* inv_freq,
                            int dim, float* copy_out, cudaStream_t stream) {
  const int64_t total = tokens * heads * (dim / 2);
  if (total <= 0) return cudaSuccess;
  RopeInterleavedKernel<<<GridFor(total), kThreads, 0, stream>>>(
      x, tokens, heads, token_stride, head_stride, positions, inv_freq, dim, copy_out);
  return cudaGetLastError();
}

cudaError_t CastToBf16(const float* x, int64_t count, uint16_t* y, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  CastToBf16Kernel<<<GridFor(count), kThreads, 0, stream>>>(x, count, y);
  return cudaGetLastError();
}

cudaError_t CastBf16ToFloat(const uint16_t* x, int64_t count, float* y, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  Bf16ToFloatKernel<<<GridFor(count), kThreads, 0, stream>>>(x, count, y);
  return cudaGetLastError();
}

cudaError_t CopyOut(const void* src, bool src_bf16, bool transposed, int64_t m, int64_t n,
                    int64_t src_ld, float* y, int64_t y_ld, cudaStream_t stream) {
  if (m * n <= 0) return cudaSuccess;
  CopyOutKernel<<<GridFor(m * n), kThreads, 0, stream>>>(src, src_bf16, transposed, m, n, src_ld, y, y_ld);
  return cudaGetLastError();
}

cudaError_t QuantizeFp8Rows(const QuantizeParams& p, cudaStream_t stream) {
  if (p.k % 128 != 0) return cudaErrorInvalidValue;
  const int64_t warps = p.m * (p.k / 128);
  if (warps <= 0) return cudaSuccess;
  QuantizeFp8Kernel<<<GridFor(warps * 32), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t SiluMulRows(const float* gu, int64_t m, int64_t inter, float* out,
                        cudaStream_t stream) {
  if (m * inter <= 0) return cudaSuccess;
  SiluMulKernel<<<GridFor(m * inter), kThreads, 0, stream>>>(gu, m, inter, out);
  return cudaGetLastError();
}

cudaError_t MoeRoute(const float* logits, const float* bias, int64_t m, int experts, int n_group,
                     int topk_group, int topk, bool norm_topk, float route_scale, int32_t* idx,
                     float* weights, cudaStream_t stream) {
  if (experts < 1 || experts > 256 || n_group < 1 || n_group > 256 || experts % n_group != 0 ||
      topk < 1 || topk > experts || (n_group > 1 && (topk_group < 1 || topk_group > n_group))) {
    return cudaErrorInvalidValue;
  }
  if (m <= 0) return cudaSuccess;
  MoeRouteKernel<<<GridFor(m, 64), 64, 0, stream>>>(logits, bias, m, experts, n_group, topk_group,
                                                    topk, norm_topk, route_scale, idx, weights);
  return cudaGetLastError();
}

cudaError_t MoeCombine(float* out, const float* y, int64_t hidden, const int32_t* route_rows,
                       const float* route_weights, int k, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  MoeCombineKernel<<<unsigned(n), kThreads, 0, stream>>>(out, y, hidden, route_rows, route_weights, k);
  return cudaGetLastError();
}

cudaError_t ArgmaxRows(const float* logits, int64_t rows, int64_t vocab, int32_t* out,
                       cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  ArgmaxKernel<<<unsigned(rows), kThreads, 0, stream>>>(logits, vocab, out);
  return cudaGetLastError();
}

cudaError_t DequantFp8ToBf16(const DequantParams& p, cudaStream_t stream) {
  if (p.rows * p.cols <= 0) return cudaSuccess;
  DequantKernel<<<GridFor(p.rows * p.cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t RandomFp8(uint8_t* q, int64_t count, uint64_t seed, float value_scale,
                      cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  RandomFp8Kernel<<<GridFor(count), kThreads, 0, stream>>>(q, count, seed, value_scale);
  return cudaGetLastError();
}

cudaError_t RandomBf16(uint16_t* x, int64_t count, uint64_t seed, float std,
                       cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  RandomBf16Kernel<<<GridFor(count), kThreads, 0, stream>>>(x, count, seed, std);
  return cudaGetLastError();
}

cudaError_t FillFloat(float* x, int64_t count, float value, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  FillFloatKernel<<<GridFor(count), kThreads, 0, stream>>>(x, count, value);
  return cudaGetLastError();
}

cudaError_t RandomKvRecords(uint8_t* mla_pool, uint8_t* index_pool, const int32_t* page_table,
                            int64_t num_tokens, const KvLayout& layout, uint64_t seed,
                            cudaStream_t stream) {
  if (num_tokens <= 0) return cudaSuccess;
  if (num_tokens > 2147483647LL) return cudaErrorInvalidValue;
  RandomKvKernel<<<unsigned(num_tokens), 128, 0, stream>>>(mla_pool, index_pool, page_table,
                                                          num_tokens, layout, seed);
  return cudaGetLastError();
}

cudaError_t RefGemm(const RefGemmParams& p, cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0) return cudaSuccess;
  if ((p.m + 15) / 16 > 65535) return cudaErrorInvalidValue;
  dim3 grid(unsigned((p.n + 15) / 16), unsigned((p.m + 15) / 16));
  RefGemmKernel<<<grid, dim3(16, 16), 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda::internal
