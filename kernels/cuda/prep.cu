// Fused indexer preparation (LayerNorm, RoPE, Hadamard, FP8 ue8m0 quantisation
// straight into the paged key cache; the same for the query heads and the head
// weights) and the pooled-key summary update. Each operation is evaluated with
// the roundings of cpu::IndexerPrep / cpu::UpdateSummaries (explicit fma where
// the reference uses fma, separate roundings elsewhere), so the results agree
// with it up to the cos/sin of the rotary angle and the LayerNorm statistics'
// summation order.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/indexer_cuda.h"
#include "kernels/numeric.h"

namespace pd::kernels::cuda {
namespace {

constexpr int kPrepWarps = 8;

cudaError_t Invalid(const char** error, const char* what) {
  if (error != nullptr) *error = what;
  return cudaErrorInvalidValue;
}

// RoPE (half-split) on v (lane holds dims 4*lane + [0, 4)), Hadamard * D^-0.5,
// FP8 quantisation; returns the ue8m0 scale and the packed 4 e4m3 codes.
__device__ __forceinline__ float FinishVector(float (&v)[4], const float* cs, const float* sn,
                                              int half, uint32_t* packed) {
  const int lane = threadIdx.x & 31;
  // RoPE pairs (i, i + half), i < half: both live in this warp.
  {
    float partner[4];
    // Lane holding dim i + half is lane + half/4 (half is a multiple of 4 here).
    const int hl = half / 4;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = 4 * lane + e;
      const int src = d < half ? lane + hl : (d < 2 * half ? lane - hl : lane);
      partner[e] = __shfl_sync(0xffffffffu, v[e], src & 31);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int d = 4 * lane + e;
      // The reference's explicit fma: v[i] = fma(a, cos, -(b sin)),
      // v[i + half] = fma(a, sin, b cos).
      if (d < half) {
        const float a = v[e], b = partner[e];
        v[e] = __fmaf_rn(a, cs[d], -__fmul_rn(b, sn[d]));
      } else if (d < 2 * half) {
        const float a = partner[e], b = v[e];
        v[e] = __fmaf_rn(a, sn[d - half], __fmul_rn(b, cs[d - half]));
      }
    }
  }
  // Hadamard (Sylvester order, h = 1, 2, ..., 64): pairs (j, j + h), j & h == 0.
#pragma unroll
  for (int h = 1; h <= 2; h <<= 1) {
    float n[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int o = e ^ h;
      n[e] = (e & h) ? __fsub_rn(v[o], v[e]) : __fadd_rn(v[e], v[o]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = n[e];
  }
#pragma unroll
  for (int m = 1; m <= 16; m <<= 1) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float o = __shfl_xor_sync(0xffffffffu, v[e], m);
      v[e] = upper ? __fsub_rn(o, v[e]) : __fadd_rn(v[e], o);
    }
  }
  const float d_scale = 0.08838834764831845f;  // float(1 / sqrt(128.0))
  float amax = 0.0f;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    v[e] = __fmul_rn(v[e], d_scale);
    amax = fmaxf(amax, fabsf(v[e]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float scale = Fp8Scale(amax, true);
  uint32_t p = 0;
#pragma unroll
  for (int e = 0; e < 4; ++e) p |= uint32_t(FloatToFp8E4M3(__fdiv_rn(v[e], scale))) << (8 * e);
  *packed = p;
  return scale;
}

// One CTA per token: warp w handles vectors w, w + 8, ... of [key, head 0..H-1].
__global__ void __launch_bounds__(kPrepWarps * 32) PrepKernel(const PrepParams p) {
  __shared__ float cs[64], sn[64];
  const int64_t t = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int half = p.rope_dim / 2;
  const int64_t pos = p.positions[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(float(pos), p.inv_freq[i]);
    double s, c;
    sincos(double(angle), &s, &c);
    cs[i] = float(c);
    sn[i] = float(s);
  }
  __syncthreads();
  const int H = p.heads;
  const float h_scale = float(1.0 / sqrt(double(H)));
  const float d_scale = 0.08838834764831845f;
  for (int j = warp; j <= H; j += kPrepWarps) {
    float v[4];
    if (j == H) {
      // Key: LayerNorm with statistics in double (as the reference).
      const float4 x = reinterpret_cast<const float4*>(p.k_proj + t * 128)[lane];
      v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
      double s = double(v[0]) + double(v[1]) + double(v[2]) + double(v[3]);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      const double mean = s / 128.0;
      double q = 0.0;
#pragma unroll
      for (int e = 0; e < 4; ++e) q += (double(v[e]) - mean) * (double(v[e]) - mean);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
      const double var = q / 128.0;
      const float mean_f = float(mean);
      const float rstd = float(1.0 / sqrt(var + double(p.ln_eps)));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = 4 * lane + e;
        v[e] = __fmaf_rn(__fmul_rn(__fsub_rn(v[e], mean_f), rstd), p.ln_gamma[d], p.ln_beta[d]);
      }
      uint32_t packed;
      const float scale = FinishVector(v, cs, sn, half, &packed);
      const int seq = p.token_seq != nullptr ? p.token_seq[t] : 0;
      const int32_t page = p.page_table[seq * p.page_table_stride + pos / kPageTokens];
      uint8_t* pg = p.pool + int64_t(page) * int64_t(p.layout.IndexPageBytes());
      const int slot = int(pos % kPageTokens);
      reinterpret_cast<uint32_t*>(pg + p.layout.IndexValueOffset(slot))[lane] = packed;
      if (lane == 0) *reinterpret_cast<float*>(pg + p.layout.IndexScaleOffset(slot)) = scale;
    } else {
      const float4 x = reinterpret_cast<const float4*>(p.q_proj + (t * H + j) * 128)[lane];
      v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
      uint32_t packed;
      const float scale = FinishVector(v, cs, sn, half, &packed);
      reinterpret_cast<uint32_t*>(p.q8 + (t * H + j) * 128)[lane] = packed;
      if (lane == 0) {
        p.weights[t * H + j] =
            __fmul_rn(__fmul_rn(__fmul_rn(p.w_proj[t * H + j], h_scale), scale), d_scale);
      }
    }
  }
}

// One CTA (128 threads = dims) per (sequence, touched block).
__global__ void __launch_bounds__(128) SummaryKernel(const SummaryParams p) {
  const int seq = blockIdx.y;
  const int64_t from = p.from[seq], to = p.to[seq];
  if (to <= from) return;
  const int B = p.layout.summary_block;
  const int64_t b = from / B + blockIdx.x;
  const int64_t s0 = b * B > from ? b * B : from;
  const int64_t s1 = (b + 1) * B < to ? (b + 1) * B : to;
  if (s0 >= s1) return;
  const int d = threadIdx.x;
  float* sum = p.summary_sums + (seq * p.summary_stride + b) * 128 + d;
  float acc = (s0 % B == 0) ? 0.0f : *sum;
  const int32_t* ptab = p.page_table + seq * p.page_table_stride;
  const size_t page_bytes = p.layout.IndexPageBytes();
  for (int64_t s = s0; s < s1; ++s) {
    const uint8_t* pg = p.pool + size_t(ptab[s / kPageTokens]) * page_bytes;
    const int slot = int(s % kPageTokens);
    const float scale = *reinterpret_cast<const float*>(pg + p.layout.IndexScaleOffset(slot));
    acc = __fadd_rn(acc, __fmul_rn(Fp8E4M3ToFloat(pg[p.layout.IndexValueOffset(slot) + d]), scale));
  }
  *sum = acc;
}

}  // namespace

cudaError_t LaunchIndexerPrep(const PrepParams& p, cudaStream_t stream, const char** error) {
  if (p.head_dim != 128 || p.layout.index_head_dim != 128) {
    return Invalid(error, "indexer prep: head_dim and layout.index_head_dim must be 128");
  }
  if (p.rope_dim < 0 || p.rope_dim > 128 || p.rope_dim % 8 != 0) {
    return Invalid(error, "indexer prep: rope_dim must be a multiple of 8 in [0, 128]");
  }
  if (p.heads < 1) return Invalid(error, "indexer prep: heads must be >= 1");
  if (p.num_tokens < 0) return Invalid(error, "indexer prep: num_tokens must be >= 0");
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.q_proj == nullptr || p.k_proj == nullptr || p.w_proj == nullptr ||
      p.ln_gamma == nullptr || p.ln_beta == nullptr || p.positions == nullptr ||
      (p.rope_dim > 0 && p.inv_freq == nullptr) || p.pool == nullptr ||
      p.page_table == nullptr || p.q8 == nullptr || p.weights == nullptr) {
    return Invalid(error, "indexer prep: null input or output pointer");
  }
  PrepKernel<<<dim3(unsigned(p.num_tokens)), kPrepWarps * 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchUpdateSummaries(const SummaryParams& p, cudaStream_t stream,
                                  const char** error) {
  if (p.layout.index_head_dim != 128) {
    return Invalid(error, "summaries: layout.index_head_dim must be 128");
  }
  if (p.layout.summary_block < 1) return Invalid(error, "summaries: summary_block must be >= 1");
  if (p.pool == nullptr || p.page_table == nullptr || p.summary_sums == nullptr ||
      p.from == nullptr || p.to == nullptr) {
    return Invalid(error, "summaries: null pool, page_table, summary_sums, from or to");
  }
  if (p.num_seqs < 1 || p.max_blocks_touched < 1) return cudaSuccess;
  SummaryKernel<<<dim3(unsigned(p.max_blocks_touched), unsigned(p.num_seqs)), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda
