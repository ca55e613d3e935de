// Sparse MLA attention over the paged FP8 MLA cache and the cache write.
//
// SparseMlaImpl::kWgmma: mla_wgmma.cuh (warp-specialised, wgmma).
// SparseMlaImpl::kMmaSync, the first version below. Attention tile: one CTA per (query token, 64 heads), 8 warps. The token's 64
// query rows (q_abs | q_pe, 576 bf16) stay in shared memory; the selected
// tokens are processed 32 at a time: their 656-byte records are gathered and
// dequantised to bf16 rows (c_kv | k_pe) in shared memory, S = Q K^T runs with
// warp w on heads 16 (w % 4) and tokens 16 (w / 4) (mma.sync m16n8k16 bf16,
// fp32 accumulate), an online softmax keeps each head's running max and sum,
// and O += P V runs with warp w on heads 16 (w % 4) and output dims
// 256 (w / 4) (V fragments through ldmatrix.trans).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/cuda/mla_cuda.h"
#include "kernels/cuda/mla_wgmma.cuh"
#include "kernels/cuda/ptx.cuh"
#include "kernels/numeric.h"

namespace pd::kernels::cuda {
namespace {

constexpr int kR = 512, kRope = 64, kW = kR + kRope;  // latent, rope, row width
constexpr int kHB = 64;                               // heads per CTA
constexpr int kTT = 32;                               // tokens per tile
constexpr int kThreads = 256;
constexpr int kRow = kW + 8;                          // bf16 per shared row (conflict-free)
constexpr int kPRow = kTT + 8;                        // bf16 per P row

struct MlaSmem {
  __nv_bfloat16 q[kHB * kRow];
  __nv_bfloat16 kv[kTT * kRow];
  __nv_bfloat16 p[kHB * kPRow];
  float rmax[2][kHB];   // per token half: tile row max (scaled logits)
  float rsum[2][kHB];   // per token half: sum of exp(logit - m_new)
  float m_run[kHB], l_run[kHB];
  int valid[kTT];
};

cudaError_t Invalid(const char** error, const char* what) {
  if (error != nullptr) *error = what;
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ uint32_t Lds32(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ uint32_t PackBf16x2(float a, float b) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Two e4m3 bytes (low byte first) -> two floats (exact).
__device__ __forceinline__ float2 Fp8x2ToFloat2(uint16_t v) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(v), __NV_E4M3);
  return __half22float2(__half2(h));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(ptx::SmemAddr(smem_row)));
}

__global__ void __launch_bounds__(kThreads, 1) SparseMlaKernel(const SparseMlaParams p) {
  extern __shared__ __align__(16) uint8_t smem_raw[];
  MlaSmem& sm = *reinterpret_cast<MlaSmem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g8 = lane >> 2, c4 = lane & 3;
  const int64_t t = blockIdx.y;
  const int h0 = blockIdx.x * kHB;
  const int H = p.heads;
  const int seq = p.query_seq != nullptr ? p.query_seq[t] : 0;
  const int64_t ntok = p.cache.num_tokens[seq];
  const int32_t* ptab = p.cache.page_table + seq * p.cache.page_table_stride;
  const size_t page_bytes = p.cache.layout.MlaPageBytes();
  const size_t rec_bytes = p.cache.layout.MlaTokenBytes();
  const float scale = p.softmax_scale;
  const float kNegInf = -__int_as_float(0x7f800000);

  // Stage the 64 query rows as bf16.
  for (int i = tid; i < kHB * (kW / 4); i += kThreads) {
    const int h = i / (kW / 4), c = (i % (kW / 4)) * 4;
    const int64_t qh = t * H + h0 + h;
    const float4 v = c < kR ? *reinterpret_cast<const float4*>(p.q_abs + qh * kR + c)
                            : *reinterpret_cast<const float4*>(p.q_pe + qh * kRope + (c - kR));
    uint2 packed;
    packed.x = PackBf16x2(v.x, v.y);
    packed.y = PackBf16x2(v.z, v.w);
    *reinterpret_cast<uint2*>(&sm.q[h * kRow + c]) = packed;
  }
  if (tid < kHB) {
    sm.m_run[tid] = kNegInf;
    sm.l_run[tid] = 0.0f;
    sm.rmax[0][tid] = sm.rmax[1][tid] = kNegInf;
    sm.rsum[0][tid] = sm.rsum[1][tid] = 0.0f;
  }

  const int hb = warp & 3, half = warp >> 2;  // head block of 16; token / dim half
  float o[32][4];
#pragma unroll
  for (int i = 0; i < 32; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  // Folds the last tile's partial max / sum into the running state (tid < 64).
  auto fold = [&]() {
    if (tid < kHB) {
      const float m_old = sm.m_run[tid];
      const float m_new = fmaxf(m_old, fmaxf(sm.rmax[0][tid], sm.rmax[1][tid]));
      const float m_use = m_new == kNegInf ? 0.0f : m_new;
      sm.l_run[tid] = sm.l_run[tid] * __expf(m_old - m_use) + sm.rsum[0][tid] + sm.rsum[1][tid];
      sm.m_run[tid] = m_new;
    }
  };

  const int n_tiles = (p.topk + kTT - 1) / kTT;
  for (int tile = 0; tile < n_tiles; ++tile) {
    // ---- gather + dequantise 32 tokens (8 threads per token) ----
    {
      const int j = tid >> 3, sub = tid & 7;
      const int i = tile * kTT + j;
      int32_t idx = i < p.topk ? p.indices[t * p.topk + i] : -1;
      if (idx >= ntok) idx = -1;
      __nv_bfloat16* row = sm.kv + j * kRow;
      if (idx >= 0) {
        const uint8_t* rec = p.cache.pool + size_t(ptab[idx >> 6]) * page_bytes +
                             size_t(idx & 63) * rec_bytes;
        const float s = *reinterpret_cast<const float*>(rec + kR + 4 * (sub >> 1));
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          // 16 e4m3 values -> 16 bf16 (32 bytes): byte pair (2i, 2i + 1) of the
          // chunk becomes bf16x2 word i.
          const uint4 v = *reinterpret_cast<const uint4*>(rec + 64 * sub + 16 * c);
          const uint32_t w[4] = {v.x, v.y, v.z, v.w};
          uint32_t outw[8];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 lo = Fp8x2ToFloat2(uint16_t(w[e] & 0xffffu));
            const float2 hi = Fp8x2ToFloat2(uint16_t(w[e] >> 16));
            outw[2 * e] = PackBf16x2(lo.x * s, lo.y * s);
            outw[2 * e + 1] = PackBf16x2(hi.x * s, hi.y * s);
          }
          uint4* dst = reinterpret_cast<uint4*>(row + 64 * sub + 16 * c);
          dst[0] = make_uint4(outw[0], outw[1], outw[2], outw[3]);
          dst[1] = make_uint4(outw[4], outw[5], outw[6], outw[7]);
        }
        *reinterpret_cast<uint4*>(row + kR + 8 * sub) =
            *reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * sub);
      } else {
        const uint4 z = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int c = 0; c < 8; ++c) *reinterpret_cast<uint4*>(row + 64 * sub + 8 * c) = z;
        *reinterpret_cast<uint4*>(row + kR + 8 * sub) = z;
      }
      if (sub == 0) sm.valid[j] = idx >= 0;
    }
    fold();  // the previous tile's partials (no-op values on the first tile)
    __syncthreads();

    // ---- S = Q K^T: warp (hb, half): heads 16 hb.., tokens 16 half.. ----
    float s[2][4] = {};
    {
      const __nv_bfloat16* qa = sm.q + (16 * hb + g8) * kRow + 2 * c4;
      const __nv_bfloat16* qb = qa + 8 * kRow;
      const __nv_bfloat16* k0 = sm.kv + (16 * half + g8) * kRow + 2 * c4;
      const __nv_bfloat16* k1 = k0 + 8 * kRow;
#pragma unroll 4
      for (int kk = 0; kk < kW / 16; ++kk) {
        const int o16 = kk * 16;
        const uint32_t a[4] = {Lds32(qa + o16), Lds32(qb + o16), Lds32(qa + o16 + 8),
                               Lds32(qb + o16 + 8)};
        const uint32_t b0[2] = {Lds32(k0 + o16), Lds32(k0 + o16 + 8)};
        const uint32_t b1[2] = {Lds32(k1 + o16), Lds32(k1 + o16 + 8)};
        ptx::MmaM16N8K16Bf16(s[0], a, b0);
        ptx::MmaM16N8K16Bf16(s[1], a, b1);
      }
    }
    // Scale, mask, tile row max over this warp's 16 tokens.
    float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = 16 * half + 8 * nt + 2 * c4 + e;
        const bool ok = sm.valid[j] != 0;
        s[nt][e] = ok ? s[nt][e] * scale : kNegInf;
        s[nt][2 + e] = ok ? s[nt][2 + e] * scale : kNegInf;
        mx0 = fmaxf(mx0, s[nt][e]);
        mx1 = fmaxf(mx1, s[nt][2 + e]);
      }
    }
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, sh));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, sh));
    }
    if (c4 == 0) {
      sm.rmax[half][16 * hb + g8] = mx0;
      sm.rmax[half][16 * hb + g8 + 8] = mx1;
    }
    __syncthreads();

    // ---- P = exp(S - m_new) (bf16 to shared), partial row sums ----
    {
      const int ha = 16 * hb + g8, hbb = ha + 8;
      const float ma = fmaxf(sm.m_run[ha], fmaxf(sm.rmax[0][ha], sm.rmax[1][ha]));
      const float mb = fmaxf(sm.m_run[hbb], fmaxf(sm.rmax[0][hbb], sm.rmax[1][hbb]));
      const float mua = ma == kNegInf ? 0.0f : ma, mub = mb == kNegInf ? 0.0f : mb;
      float sa = 0.0f, sb = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float p0 = __expf(s[nt][0] - mua), p1 = __expf(s[nt][1] - mua);
        const float p2 = __expf(s[nt][2] - mub), p3 = __expf(s[nt][3] - mub);
        sa += p0 + p1;
        sb += p2 + p3;
        const int j = 16 * half + 8 * nt + 2 * c4;
        *reinterpret_cast<uint32_t*>(&sm.p[ha * kPRow + j]) = PackBf16x2(p0, p1);
        *reinterpret_cast<uint32_t*>(&sm.p[hbb * kPRow + j]) = PackBf16x2(p2, p3);
      }
#pragma unroll
      for (int sh = 1; sh <= 2; sh <<= 1) {
        sa += __shfl_xor_sync(0xffffffffu, sa, sh);
        sb += __shfl_xor_sync(0xffffffffu, sb, sh);
      }
      if (c4 == 0) {
        sm.rsum[half][ha] = sa;
        sm.rsum[half][hbb] = sb;
      }
    }
    __syncthreads();

    // ---- O = O * exp(m_old - m_new) + P V: warp (hb, half): dims 256 half.. ----
    {
      const int ha = 16 * hb + g8, hbb = ha + 8;
      const float ma = fmaxf(sm.m_run[ha], fmaxf(sm.rmax[0][ha], sm.rmax[1][ha]));
      const float mb = fmaxf(sm.m_run[hbb], fmaxf(sm.rmax[0][hbb], sm.rmax[1][hbb]));
      const float fa = __expf(sm.m_run[ha] - (ma == kNegInf ? 0.0f : ma));
      const float fb = __expf(sm.m_run[hbb] - (mb == kNegInf ? 0.0f : mb));
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        o[i][0] *= fa;
        o[i][1] *= fa;
        o[i][2] *= fb;
        o[i][3] *= fb;
      }
      const __nv_bfloat16* pa = sm.p + ha * kPRow + 2 * c4;
      const __nv_bfloat16* pb = pa + 8 * kPRow;
#pragma unroll
      for (int kk = 0; kk < kTT / 16; ++kk) {
        const uint32_t a[4] = {Lds32(pa + 16 * kk), Lds32(pb + 16 * kk), Lds32(pa + 16 * kk + 8),
                               Lds32(pb + 16 * kk + 8)};
        // ldmatrix.x4.trans: lane l addresses token 16 kk + 8 ((l >> 3) & 1) + (l & 7),
        // dims n0 + 8 (l >> 4): registers {b0, b1} of n-tile n0 and of n0 + 8.
        const int tok = 16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7);
        const __nv_bfloat16* vrow = sm.kv + tok * kRow + 256 * half + 8 * (lane >> 4);
#pragma unroll
        for (int np = 0; np < 16; ++np) {
          uint32_t b[4];
          LdMatrixX4Trans(b, vrow + 16 * np);
          const uint32_t b0[2] = {b[0], b[1]}, b1[2] = {b[2], b[3]};
          ptx::MmaM16N8K16Bf16(o[2 * np], a, b0);
          ptx::MmaM16N8K16Bf16(o[2 * np + 1], a, b1);
        }
      }
    }
    __syncthreads();
  }
  fold();
  __syncthreads();

  // ---- normalise and write ----
  const int ha = 16 * hb + g8, hbb = ha + 8;
  const float la = sm.l_run[ha], lb = sm.l_run[hbb];
  const float ia = la > 0.0f ? 1.0f / la : 0.0f, ib = lb > 0.0f ? 1.0f / lb : 0.0f;
  float* oa = p.out + (t * H + h0 + ha) * kR + 256 * half + 2 * c4;
  float* ob = p.out + (t * H + h0 + hbb) * kR + 256 * half + 2 * c4;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    *reinterpret_cast<float2*>(oa + 8 * i) = make_float2(o[i][0] * ia, o[i][1] * ia);
    *reinterpret_cast<float2*>(ob + 8 * i) = make_float2(o[i][2] * ib, o[i][3] * ib);
  }
  if (p.lse != nullptr && tid < kHB) {
    const float l = sm.l_run[tid];
    p.lse[t * H + h0 + tid] = l > 0.0f ? sm.m_run[tid] + logf(l) : kNegInf;
  }
}

// Warp per token: lane l quantises c_kv[16 l, 16 l + 16) (group l / 8) and
// writes k_pe[2 l, 2 l + 2).
__global__ void __launch_bounds__(256) WriteMlaKernel(const MlaWriteParams p) {
  const int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (t >= p.num_tokens) return;
  const int seq = p.token_seq != nullptr ? p.token_seq[t] : 0;
  const int64_t pos = p.positions[t];
  uint8_t* rec = p.pool + size_t(p.page_table[seq * p.page_table_stride + pos / kPageTokens]) *
                              p.layout.MlaPageBytes() +
                 size_t(pos % kPageTokens) * p.layout.MlaTokenBytes();
  float x[16];
  const float4* src = reinterpret_cast<const float4*>(p.c_kv + t * kR + 16 * lane);
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = src[i];
    x[4 * i] = v.x;
    x[4 * i + 1] = v.y;
    x[4 * i + 2] = v.z;
    x[4 * i + 3] = v.w;
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(x[i]));
#pragma unroll
  for (int sh = 1; sh <= 4; sh <<= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, sh));
  const float s = Fp8Scale(amax, true);
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int i = 0; i < 16; ++i) w[i / 4] |= uint32_t(FloatToFp8E4M3(x[i] / s)) << (8 * (i % 4));
  *reinterpret_cast<uint4*>(rec + 16 * lane) = make_uint4(w[0], w[1], w[2], w[3]);
  if ((lane & 7) == 0) *reinterpret_cast<float*>(rec + kR + 4 * (lane >> 3)) = s;
  const float2 pe = *reinterpret_cast<const float2*>(p.k_pe + t * kRope + 2 * lane);
  *reinterpret_cast<uint32_t*>(rec + kR + 16 + 4 * lane) =
      uint32_t(FloatToBf16(pe.x)) | (uint32_t(FloatToBf16(pe.y)) << 16);
}

// Warp per token: lane l dequantises c_kv[16 l, 16 l + 16) (group l / 8);
// lanes 0..7 copy k_pe[8 l, 8 l + 8).
__global__ void __launch_bounds__(256) UpconvertMlaKernel(const MlaUpconvertParams p) {
  const int s = blockIdx.y;
  const int64_t tok = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (tok >= p.cache.num_tokens[s]) return;
  const uint8_t* rec =
      p.cache.pool +
      size_t(p.cache.page_table[s * p.cache.page_table_stride + (tok >> 6)]) *
          p.cache.layout.MlaPageBytes() +
      size_t(tok & 63) * p.cache.layout.MlaTokenBytes();
  const int64_t row = (p.row_start != nullptr ? p.row_start[s] : 0) + tok;
  uint16_t* out = p.rows + row * kW;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(rec + 16 * lane));
  const float scale = __ldg(reinterpret_cast<const float*>(rec + kR + 4 * (lane >> 3)));
  uint4 lo, hi;
  mla_internal::Dequant16(v, scale, lo, hi);
  reinterpret_cast<uint4*>(out + 16 * lane)[0] = lo;
  reinterpret_cast<uint4*>(out + 16 * lane)[1] = hi;
  if (lane < 8) {
    *reinterpret_cast<uint4*>(out + kR + 8 * lane) =
        __ldg(reinterpret_cast<const uint4*>(rec + kR + 16 + 16 * lane));
  }
}

bool LayoutOk(const KvLayout& l) {
  return l.kv_lora_rank == kR && l.rope_dim == kRope &&
         l.MlaScaleOffset() == size_t(kR) && l.MlaRopeOffset() == size_t(kR + 16);
}

// The default schedule of the wgmma kernel (SparseMlaParams::experiment 0-2 and
// the bf16-rows path): the one measured on the H200 (docs/perf.md); the other
// schedules are benchmark variants until measured faster.
constexpr mla_internal::Schedule kDefaultSchedule = {/*late=*/false, /*prefetch=*/false,
                                                     /*named=*/false};
// The pair kernel's bf16-rows default and the timing-only experiment 2: early
// gather start + L2 prefetch ahead of the loads, the round-1 hand-over (=
// experiment 5's producer; bf16 rows: prefetch, = experiment 4). The FP8
// default (experiment 0, kAuto's choice) is experiment 13 since round 3 (5 with
// CTA-scope buffer waits and releases, persistent; measured fastest on the
// H200 for decode and prefill in two runs, docs/perf.md; the st.async
// hand-over 6 / 7 / 9, the seesaw 14-16, the split producer 17, the loads
// after the publish 19-21 and the overlapped WG0 22-25 measured slower).
constexpr bool kPairAsync = false, kPairEarly = true, kPairPrefetch = true, kPairPersist = false;

template <int kVariant, bool kLate, bool kPrefetch, bool kNamed, bool kBf16 = false,
          bool kPair = false, bool kEarly = false, bool kAsync = false, bool kPersist = false,
          bool kLight = false, bool kSeesaw = false, bool kSplit = false, bool kAfter = false,
          bool kOverlap = false>
cudaError_t LaunchWgmma(const SparseMlaParams& p, cudaStream_t stream) {
  using mla_internal::Smem;
  auto* kernel = mla_internal::SparseMlaWgmmaKernel<kVariant, kLate, kPrefetch, kNamed, kBf16,
                                                    kPair, kEarly, kAsync, kPersist, kLight,
                                                    kSeesaw, kSplit, kAfter, kOverlap>;
  static const cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(Smem)));
  if (attr != cudaSuccess) return attr;
  int64_t ctas = p.num_queries * (p.heads / mla_internal::kRows);
  if constexpr (kPair) {
    // Clusters of 2 along x: head blocks 2k and 2k+1 of one token (heads / 64 is even).
    cudaLaunchConfig_t config = {};
    config.blockDim = dim3(mla_internal::kThreads);
    config.dynamicSmemBytes = sizeof(Smem);
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = 2;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    if constexpr (kPersist) {
      // As many clusters as fit at once (one CTA per SM), each looping over
      // the pairs c, c + G, ... (at most one cluster per pair).
      // Once per instantiation (thread-safe static initialisation; the
      // kernel's attribute above is set first).
      static const int max_clusters = [&] {
        cudaLaunchConfig_t probe = config;
        probe.gridDim = dim3(2);
        int n = 0;
        return cudaOccupancyMaxActiveClusters(&n, kernel, &probe) == cudaSuccess ? n : -1;
      }();
      if (max_clusters < 1) return cudaErrorInvalidConfiguration;
      ctas = 2 * std::min<int64_t>(ctas / 2, max_clusters);
    }
    config.gridDim = dim3(unsigned(ctas));
    const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, p);
    if (launched != cudaSuccess) return launched;
  } else {
    kernel<<<unsigned(ctas), mla_internal::kThreads, sizeof(Smem), stream>>>(p);
  }
  return cudaGetLastError();
}

bool Aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

cudaError_t LaunchSparseMla(const SparseMlaParams& p, cudaStream_t stream, const char** error) {
  if (!LayoutOk(p.cache.layout)) {
    return Invalid(error, "sparse MLA: layout must have kv_lora_rank 512 and rope_dim 64");
  }
  if (p.heads < kHB || p.heads % kHB != 0) {
    return Invalid(error, "sparse MLA: heads must be a positive multiple of 64");
  }
  if (p.topk < 0) return Invalid(error, "sparse MLA: topk must be >= 0");
  const bool mma_sync = p.impl == SparseMlaImpl::kMmaSync;
  const bool pair_asked = p.impl == SparseMlaImpl::kWgmmaPair;
  if (!mma_sync && !pair_asked && p.impl != SparseMlaImpl::kAuto &&
      p.impl != SparseMlaImpl::kWgmma) {
    return Invalid(error, "sparse MLA: unknown impl");
  }
  if (pair_asked && p.heads % (2 * kHB) != 0) {
    return Invalid(error, "sparse MLA: impl kWgmmaPair needs heads to be a multiple of 128");
  }
  // kAuto: the pair kernel where it applies (heads a multiple of 128, no
  // benchmark experiment), else kWgmma.
  const bool pair = pair_asked || (p.impl == SparseMlaImpl::kAuto && p.experiment == 0 &&
                                   p.heads % (2 * kHB) == 0);
  if (p.num_queries < 0 || (mma_sync && p.num_queries > 65535) ||
      p.num_queries * (p.heads / kHB) > int64_t(0x7fffffff)) {
    return Invalid(error,
                   "sparse MLA: num_queries must be >= 0, at most 65535 per launch for kMmaSync, "
                   "and num_queries * heads / 64 must fit a grid (2^31 - 1)");
  }
  if (p.experiment < 0 || p.experiment > (pair ? 25 : 10) || (mma_sync && p.experiment != 0)) {
    return Invalid(error,
                   "sparse MLA: experiment must be 0, 1..10 with kWgmma, 1..25 with kWgmmaPair");
  }
  if (p.bf16_rows != nullptr &&
      (mma_sync || (p.experiment != 0 &&
                    !(pair && (p.experiment == 2 || p.experiment == 4 || p.experiment == 7 ||
                               p.experiment == 9))))) {
    return Invalid(error,
                   "sparse MLA: bf16_rows needs impl kAuto, kWgmma or kWgmmaPair and experiment 0 "
                   "(kWgmmaPair: also 2, 4, 7 or 9)");
  }
  if (p.num_queries == 0) return cudaSuccess;
  if (p.q_abs == nullptr || p.q_pe == nullptr || p.out == nullptr ||
      (p.topk > 0 && (p.indices == nullptr || p.cache.pool == nullptr ||
                      p.cache.page_table == nullptr || p.cache.num_tokens == nullptr))) {
    return Invalid(error, "sparse MLA: null q_abs, q_pe, out, indices or cache pointer");
  }
  if (!Aligned16(p.q_abs) || !Aligned16(p.q_pe) || !Aligned16(p.out)) {
    return Invalid(error, "sparse MLA: q_abs, q_pe and out must be 16-byte aligned");
  }
  // kAuto with the pair kernel ignores bf16_rows: the same tiles (the
  // up-conversion is exact), and over the FP8 records the pair kernel measured
  // faster (prefill 6.81 vs 8.05 ms, docs/perf.md).
  const bool use_rows = p.bf16_rows != nullptr && !(pair && !pair_asked);
  if (use_rows) {
    if (!Aligned16(p.bf16_rows)) return Invalid(error, "sparse MLA: bf16_rows must be 16-byte aligned");
    if (pair) {
      using namespace mla_internal;
      constexpr bool kP = kPairPrefetch, kA = kPairAsync, kS = kPairPersist;
      switch (p.experiment) {
        case 2:
          return LaunchWgmma<kVariantNoConsumer, false, kP, false, true, true, false, kA, kS>(p,
                                                                                             stream);
        case 4: return LaunchWgmma<kVariantFull, false, true, false, true, true>(p, stream);
        case 7: return LaunchWgmma<kVariantFull, false, true, false, true, true, false, true>(p, stream);
        case 9:
          return LaunchWgmma<kVariantFull, false, true, false, true, true, false, true, true>(p,
                                                                                          stream);
        default:
          return LaunchWgmma<kVariantFull, false, kP, false, true, true, false, kA, kS>(p, stream);
      }
    }
    return LaunchWgmma<mla_internal::kVariantFull, false, false, kDefaultSchedule.named, true>(
        p, stream);
  }
  if (pair) {
    using namespace mla_internal;
    constexpr bool kP = kPairPrefetch, kE = kPairEarly, kA = kPairAsync, kS = kPairPersist;
    switch (p.experiment) {
      case 1: return LaunchWgmma<kVariantNoProducer, false, false, false, false, true>(p, stream);
      case 2:
        return LaunchWgmma<kVariantNoConsumer, false, kP, false, false, true, kE, kA, kS>(p, stream);
      case 3: return LaunchWgmma<kVariantFull, false, false, false, false, true, true>(p, stream);
      case 4: return LaunchWgmma<kVariantFull, false, true, false, false, true>(p, stream);
      case 5: return LaunchWgmma<kVariantFull, false, true, false, false, true, true>(p, stream);
      case 6: return LaunchWgmma<kVariantFull, false, false, false, false, true, false, true>(p, stream);
      case 7: return LaunchWgmma<kVariantFull, false, true, false, false, true, true, true>(p, stream);
      case 8: return LaunchWgmma<kVariantNoConsumer, false, true, false, false, true, true>(p, stream);
      case 9:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, true, true>(p, stream);
      case 10:
        return LaunchWgmma<kVariantNoConsumer, false, true, false, false, true, true, true>(p, stream);
      // 5 with CTA-scope buffer waits (11), its producer alone (12), 11
      // persistent (13, the default since round 3).
      case 11:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, false, true>(
            p, stream);
      case 12:
        return LaunchWgmma<kVariantNoConsumer, false, true, false, false, true, true, false, false,
                           true>(p, stream);
      case 13:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, true, true>(
            p, stream);
      // Seesaw consumers (measured slower: two buffers are held at once): over
      // 5's producer (14), over 11's (15), consumers alone (16, timing only).
      case 14:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, false, false,
                           true>(p, stream);
      case 15:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, false, true,
                           true>(p, stream);
      case 16:
        return LaunchWgmma<kVariantNoProducer, false, false, false, false, true, false, false, false,
                           false, true>(p, stream);
      // Split producer (two groups of producer warps, one per buffer, next
      // loads issued after the publish) with CTA-scope buffer waits and
      // releases (11's): 17, its producer alone (18, timing only).
      case 17:
        return LaunchWgmma<kVariantFull, false, false, false, false, true, false, false, false, true,
                           false, true>(p, stream);
      case 18:
        return LaunchWgmma<kVariantNoConsumer, false, false, false, false, true, false, false, false,
                           true, false, true>(p, stream);
      // 11 with the next block's loads issued after the publish (19), its
      // producer alone (20, timing only), 19 persistent (21).
      case 19:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, false, true,
                           false, false, true>(p, stream);
      case 20:
        return LaunchWgmma<kVariantNoConsumer, false, true, false, false, true, true, false, false,
                           true, false, false, true>(p, stream);
      case 21:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, true, true,
                           false, false, true>(p, stream);
      // Overlapped WG0 (Q K^T and softmax of block b+1 during P V of b): over
      // 19 (22), consumers alone (23, timing only), 22 persistent (24), over
      // the split producer 17 (25).
      case 22:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, false, true,
                           false, false, true, true>(p, stream);
      case 23:
        return LaunchWgmma<kVariantNoProducer, false, false, false, false, true, false, false, false,
                           false, false, false, false, true>(p, stream);
      case 24:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, true, true,
                           false, false, true, true>(p, stream);
      case 25:
        return LaunchWgmma<kVariantFull, false, false, false, false, true, false, false, false, true,
                           false, true, false, true>(p, stream);
      // The default: exactly experiment 13's instantiation.
      default:
        return LaunchWgmma<kVariantFull, false, true, false, false, true, true, false, true, true>(
            p, stream);
    }
  }
  if (!mma_sync) {
    using namespace mla_internal;
    constexpr bool kL = kDefaultSchedule.late, kP = kDefaultSchedule.prefetch;
    constexpr bool kN = kDefaultSchedule.named;
    switch (p.experiment) {
      case 1: return LaunchWgmma<kVariantNoProducer, kL, kP, kN>(p, stream);
      case 2: return LaunchWgmma<kVariantNoConsumer, kL, kP, kN>(p, stream);
      case 3: return LaunchWgmma<kVariantFull, false, false, false>(p, stream);
      case 4: return LaunchWgmma<kVariantFull, true, false, false>(p, stream);
      case 5: return LaunchWgmma<kVariantFull, false, true, false>(p, stream);
      case 6: return LaunchWgmma<kVariantFull, false, false, true>(p, stream);
      case 7: return LaunchWgmma<kVariantFull, false, true, true>(p, stream);
      case 8: return LaunchWgmma<kVariantFull, true, true, true>(p, stream);
      case 9: return LaunchWgmma<kVariantNoProducer, false, true, true>(p, stream);
      case 10: return LaunchWgmma<kVariantNoConsumer, false, true, true>(p, stream);
      default: return LaunchWgmma<kVariantFull, kL, kP, kN>(p, stream);
    }
  }
  static const cudaError_t attr = cudaFuncSetAttribute(
      SparseMlaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(MlaSmem)));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(unsigned(p.heads / kHB), unsigned(p.num_queries));
  SparseMlaKernel<<<grid, kThreads, sizeof(MlaSmem), stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchUpconvertMlaCache(const MlaUpconvertParams& p, cudaStream_t stream,
                                    const char** error) {
  if (!LayoutOk(p.cache.layout)) {
    return Invalid(error, "MLA up-convert: layout must have kv_lora_rank 512 and rope_dim 64");
  }
  if (p.num_seqs < 0 || p.num_seqs > 65535 || p.max_tokens < 0 ||
      (p.max_tokens + 7) / 8 > int64_t(0x7fffffff)) {
    return Invalid(error, "MLA up-convert: num_seqs must be in [0, 65535], max_tokens >= 0");
  }
  if (p.num_seqs == 0 || p.max_tokens == 0) return cudaSuccess;
  if (p.cache.pool == nullptr || p.cache.page_table == nullptr || p.cache.num_tokens == nullptr ||
      p.rows == nullptr) {
    return Invalid(error, "MLA up-convert: null pool, page_table, num_tokens or rows");
  }
  if (!Aligned16(p.rows)) return Invalid(error, "MLA up-convert: rows must be 16-byte aligned");
  const dim3 grid(unsigned((p.max_tokens + 7) / 8), unsigned(p.num_seqs));
  UpconvertMlaKernel<<<grid, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchWriteMlaCache(const MlaWriteParams& p, cudaStream_t stream, const char** error) {
  if (!LayoutOk(p.layout)) {
    return Invalid(error, "MLA cache write: layout must have kv_lora_rank 512 and rope_dim 64");
  }
  if (p.num_tokens < 0) return Invalid(error, "MLA cache write: num_tokens must be >= 0");
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.pool == nullptr || p.page_table == nullptr || p.c_kv == nullptr || p.k_pe == nullptr ||
      p.positions == nullptr) {
    return Invalid(error, "MLA cache write: null pool, page_table, c_kv, k_pe or positions");
  }
  const int64_t threads = p.num_tokens * 32;
  WriteMlaKernel<<<unsigned((threads + 255) / 256), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda
