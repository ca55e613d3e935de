// Generic (any-dimension) indexer and sparse-MLA kernels of the GPU model
// engine: see model_kernels.h. Simple, one block per vector or query; written
// to reproduce the CPU reference's arithmetic (bit-exact where the CPU's order
// is fixed: indexer scores, router, summaries, key quantisation).
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/model/model_kernels.h"
#include "kernels/numeric.h"

namespace pd::kernels::cuda::internal {
namespace {

__device__ __forceinline__ float NegInf() { return -__int_as_float(0x7f800000); }
__device__ __forceinline__ float Relu(float x) { return x > 0.0f ? x : 0.0f; }

// Block-wide reductions (blockDim.x a multiple of 32, <= 1024). Every thread
// gets the result.
template <typename T, typename Op>
__device__ T BlockReduce(T v, Op op) {
  __shared__ T part[32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T t = part[0];
    for (int w = 1; w < int(blockDim.x >> 5); ++w) t = op(t, part[w]);
    part[0] = t;
  }
  __syncthreads();
  const T r = part[0];
  __syncthreads();
  return r;
}

struct SumD {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxF {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumF {
  __device__ float operator()(float a, float b) const { return a + b; }
};
struct SumI {
  __device__ int operator()(int a, int b) const { return a + b; }
};

// ---------------------------------------------------------------------------
// Indexer preparation: one block of D threads (D a power of two, >= 32) per token.

// RoPE (half-split, explicit fma as cpu::IndexerPrep), Hadamard * D^-0.5, FP8
// with a ue8m0 scale. v: [D] in shared memory; returns the scale, writes code.
__device__ float FinishVector(float* v, const float* cs, const float* sn, int half, int D,
                              float d_scale, uint8_t* code) {
  const int d = threadIdx.x;
  if (d < half) {
    const float a = v[d], b = v[d + half];
    v[d] = fmaf(a, cs[d], -__fmul_rn(b, sn[d]));
    v[d + half] = fmaf(a, sn[d], __fmul_rn(b, cs[d]));
  }
  __syncthreads();
  for (int h = 1; h < D; h <<= 1) {
    if ((d & h) == 0) {
      const float a = v[d], b = v[d + h];
      v[d] = __fadd_rn(a, b);
      v[d + h] = __fsub_rn(a, b);
    }
    __syncthreads();
  }
  const float x = __fmul_rn(v[d], d_scale);
  const float amax = BlockReduce(fabsf(x), MaxF());
  const float scale = Fp8Scale(amax, true);
  *code = FloatToFp8E4M3(__fdiv_rn(x, scale));
  __syncthreads();  // v is reused by the caller
  return scale;
}

__global__ void PrepGenericKernel(const PrepParams p) {
  extern __shared__ float sm[];
  const int D = p.head_dim, H = p.heads, half = p.rope_dim / 2;
  float* v = sm;            // [D]
  float* cs = sm + D;       // [half]
  float* sn = cs + D / 2;   // [half]
  const int64_t t = blockIdx.x;
  const int d = threadIdx.x;
  const int64_t pos = p.positions[t];
  const int seq = p.token_seq != nullptr ? p.token_seq[t] : 0;
  if (d < half) {
    const float angle = __fmul_rn(float(pos), p.inv_freq[d]);
    cs[d] = cosf(angle);
    sn[d] = sinf(angle);
  }
  const float d_scale = float(1.0 / sqrt(double(D)));
  const float h_scale = float(1.0 / sqrt(double(H)));
  // Key: LayerNorm (statistics in double), then the common finish.
  const float kp = p.k_proj[t * D + d];
  const double mean = BlockReduce(double(kp), SumD()) / double(D);
  const double dev = double(kp) - mean;
  const double var = BlockReduce(dev * dev, SumD()) / double(D);
  const float mean_f = float(mean);
  const float rstd = float(1.0 / sqrt(var + double(p.ln_eps)));
  v[d] = fmaf(__fmul_rn(__fsub_rn(kp, mean_f), rstd), p.ln_gamma[d], p.ln_beta[d]);
  __syncthreads();
  uint8_t code;
  const float k_scale = FinishVector(v, cs, sn, half, D, d_scale, &code);
  const KvLayout& l = p.layout;
  uint8_t* page = p.pool + size_t(p.page_table[seq * p.page_table_stride + pos / kPageTokens]) *
                               l.IndexPageBytes();
  const int slot = int(pos % kPageTokens);
  page[l.IndexValueOffset(slot) + d] = code;
  if (d == 0) *reinterpret_cast<float*>(page + l.IndexScaleOffset(slot)) = k_scale;
  for (int j = 0; j < H; ++j) {
    v[d] = p.q_proj[(t * H + j) * D + d];
    __syncthreads();
    const float q_scale = FinishVector(v, cs, sn, half, D, d_scale, &code);
    p.q8[(t * H + j) * D + d] = code;
    if (d == 0) {
      p.weights[t * H + j] =
          __fmul_rn(__fmul_rn(__fmul_rn(p.w_proj[t * H + j], h_scale), q_scale), d_scale);
    }
  }
}

// One block (D threads) per (sequence, touched block): cpu::UpdateSummaries.
__global__ void SummaryGenericKernel(const SummaryParams p) {
  const int seq = blockIdx.y;
  const int64_t from = p.from[seq], to = p.to[seq];
  if (to <= from) return;
  const int B = p.layout.summary_block, D = p.layout.index_head_dim;
  const int64_t b = from / B + blockIdx.x;
  const int64_t s0 = b * B > from ? b * B : from;
  const int64_t s1 = (b + 1) * B < to ? (b + 1) * B : to;
  if (s0 >= s1) return;
  const int d = threadIdx.x;
  float* sum = p.summary_sums + (seq * p.summary_stride + b) * D + d;
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

// ---------------------------------------------------------------------------
// MISA router: one block per query; thread j owns head j.

// True when (a, ia) ranks before (b, ib): larger first, -0 == +0, NaN last,
// ties to the lower index (cpu ScoreOrderKey).
__device__ __forceinline__ bool RanksBefore(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na == nb ? ia < ib : nb;
  if (a != b) return a > b;
  return ia < ib;
}

__global__ void RouterGenericKernel(const RouterGenericParams p) {
  extern __shared__ float r[];  // [H]
  const int64_t t = blockIdx.x;
  const int H = p.heads, D = p.head_dim, B = p.summary_block;
  const int j = threadIdx.x;
  const int seq = p.token_seq[t];
  const int64_t ntok = p.num_tokens[seq];
  const int64_t pos = p.positions[t];
  const int64_t m_total = (ntok + B - 1) / B;
  const int64_t nb = pos / B + 1 < m_total ? pos / B + 1 : m_total;
  if (j < H) {
    const uint8_t* q = p.q8 + (t * H + j) * D;
    const float* sums = p.summary_sums + seq * p.summary_stride * D;
    float acc = 0.0f;
    for (int64_t b = 0; b < nb; ++b) {
      const float count = float(BlockCount(ntok, b, B));
      float dot = 0.0f;
      for (int d = 0; d < D; ++d) {
        dot = fmaf(Fp8E4M3ToFloat(q[d]), __fdiv_rn(sums[b * D + d], count), dot);
      }
      acc = __fadd_rn(acc, Relu(dot));
    }
    r[j] = __fmul_rn(fabsf(p.weights[t * H + j]), acc);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    // Top-h by repeated selection, then written in ascending head order.
    unsigned long long chosen[16] = {};  // up to 1024 heads
    for (int e = 0; e < p.active_heads; ++e) {
      int best = -1;
      for (int k = 0; k < H; ++k) {
        if ((chosen[k >> 6] >> (k & 63)) & 1ull) continue;
        if (best < 0 || RanksBefore(r[k], k, r[best], best)) best = k;
      }
      chosen[best >> 6] |= 1ull << (best & 63);
    }
    int e = 0;
    for (int k = 0; k < H; ++k) {
      if ((chosen[k >> 6] >> (k & 63)) & 1ull) p.active[t * p.active_heads + e++] = k;
    }
  }
}

// ---------------------------------------------------------------------------
// Token scores: block (128 keys of one query); the query's listed heads staged
// as fp32 in shared memory.
constexpr int kScoreKeys = 128;
constexpr int kHeadChunk = 16;

__global__ void ScoresGenericKernel(const SelectGenericParams p) {
  extern __shared__ float sq[];  // [G][D] then w[G]
  const int64_t t = blockIdx.y;
  const int D = p.head_dim, H = p.heads;
  const int G = p.head_list != nullptr ? p.num_listed : H;
  float* sw = sq + G * D;
  for (int i = threadIdx.x; i < G * D; i += blockDim.x) {
    const int e = i / D, d = i % D;
    const int j = p.head_list != nullptr ? p.head_list[t * G + e] : e;
    sq[i] = Fp8E4M3ToFloat(p.q8[(t * H + j) * D + d]);
  }
  for (int e = threadIdx.x; e < G; e += blockDim.x) {
    const int j = p.head_list != nullptr ? p.head_list[t * G + e] : e;
    sw[e] = p.weights[t * H + j];
  }
  __syncthreads();
  const int64_t s = int64_t(blockIdx.x) * kScoreKeys + threadIdx.x;
  const int64_t pos = p.positions[t];
  if (s > pos) return;
  const int seq = p.token_seq[t];
  const KvLayout& l = p.layout;
  const uint8_t* pg = p.pool + size_t(p.page_table[seq * p.page_table_stride + s / kPageTokens]) *
                                   l.IndexPageBytes();
  const int slot = int(s % kPageTokens);
  const uint8_t* key = pg + l.IndexValueOffset(slot);
  const float kscale = *reinterpret_cast<const float*>(pg + l.IndexScaleOffset(slot));
  float acc = 0.0f;
  for (int e0 = 0; e0 < G; e0 += kHeadChunk) {
    const int ne = G - e0 < kHeadChunk ? G - e0 : kHeadChunk;
    float dot[kHeadChunk];
#pragma unroll
    for (int e = 0; e < kHeadChunk; ++e) dot[e] = 0.0f;
    for (int d = 0; d < D; ++d) {
      const float kd = Fp8E4M3ToFloat(key[d]);
#pragma unroll
      for (int e = 0; e < kHeadChunk; ++e) {
        if (e < ne) dot[e] = fmaf(sq[(e0 + e) * D + d], kd, dot[e]);
      }
    }
#pragma unroll
    for (int e = 0; e < kHeadChunk; ++e) {
      if (e < ne) acc = fmaf(sw[e0 + e], Relu(dot[e]), acc);
    }
  }
  p.logits[t * p.logits_stride + s] = __fmul_rn(acc, kscale);
}

// The kernels' candidate order key: larger is better; NaN lowest; -0 == +0;
// ties to the lower index. 0 is never a real key.
__device__ __forceinline__ uint64_t OrderKey(float f, int64_t index) {
  uint32_t o = 0u;
  if (!(f != f)) {
    const uint32_t u = __float_as_uint(f + 0.0f);
    o = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (uint64_t(o) << 32) | uint64_t(~uint32_t(index));
}

constexpr int kTopKThreads = 256;
constexpr int kTopKMax = 2048;

// Sorts keys[0, n) descending (n a power of two <= kTopKMax).
__device__ void BitonicSortDesc(uint64_t* keys, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const bool desc = (i & size) == 0;
          const uint64_t a = keys[i], b = keys[j];
          if (desc ? (a < b) : (a > b)) {
            keys[i] = b;
            keys[j] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

__global__ void TopKGenericKernel(const SelectGenericParams p) {
  __shared__ uint64_t keys[kTopKMax];
  __shared__ int count;
  const int64_t t = blockIdx.x;
  const float* row = p.logits + t * p.logits_stride;
  const int64_t n = p.positions[t] + 1;
  const int k = p.topk;
  int32_t* out = p.out + t * k;
  int valid = 0;
  if (n <= k) {
    valid = int(n);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) keys[i] = OrderKey(row[i], i);
  } else {
    // The k-th largest key, bit by bit from the top: th is the largest value
    // with at least k keys >= th.
    uint64_t th = 0;
    for (int bit = 63; bit >= 0; --bit) {
      const uint64_t cand = th | (1ull << bit);
      int c = 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) c += OrderKey(row[i], i) >= cand;
      c = BlockReduce(c, SumI());
      if (c >= k) th = cand;
    }
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const uint64_t key = OrderKey(row[i], i);
      if (key >= th) {
        const int slot = atomicAdd(&count, 1);
        if (slot < kTopKMax) keys[slot] = key;
      }
    }
    valid = k;
  }
  int padded = 1;
  while (padded < valid) padded <<= 1;
  for (int i = valid + threadIdx.x; i < padded; i += blockDim.x) keys[i] = 0;
  __syncthreads();
  BitonicSortDesc(keys, padded);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    out[i] = i < valid ? int32_t(~uint32_t(keys[i] & 0xffffffffu)) : -1;
  }
}

// ---------------------------------------------------------------------------
// MLA cache write: one block of 128 threads per token.
__global__ void WriteMlaGenericKernel(const MlaWriteParams p) {
  const int64_t t = blockIdx.x;
  const KvLayout& l = p.layout;
  const int r = l.kv_lora_rank, rope = l.rope_dim;
  const int64_t pos = p.positions[t];
  const int seq = p.token_seq != nullptr ? p.token_seq[t] : 0;
  uint8_t* rec = p.pool + size_t(p.page_table[seq * p.page_table_stride + pos / kPageTokens]) *
                              l.MlaPageBytes() +
                 size_t(pos % kPageTokens) * l.MlaTokenBytes();
  const float* x = p.c_kv + t * r;
  for (int g = 0; g < r / kQuantGroup; ++g) {
    const float v = x[g * kQuantGroup + threadIdx.x];
    const float amax = BlockReduce(fabsf(v), MaxF());
    const float s = Fp8Scale(amax, true);
    rec[g * kQuantGroup + threadIdx.x] = FloatToFp8E4M3(__fdiv_rn(v, s));
    if (threadIdx.x == 0) reinterpret_cast<float*>(rec + l.MlaScaleOffset())[g] = s;
  }
  uint16_t* pe = reinterpret_cast<uint16_t*>(rec + l.MlaRopeOffset());
  for (int i = threadIdx.x; i < rope; i += blockDim.x) pe[i] = FloatToBf16(p.k_pe[t * rope + i]);
}

// ---------------------------------------------------------------------------
// Sparse MLA: one block of 128 threads per (head, token).
constexpr int kMlaThreads = 128;

__global__ void SparseMlaGenericKernel(const SparseMlaParams p) {
  extern __shared__ float sm[];
  const KvLayout& l = p.cache.layout;
  const int r = l.kv_lora_rank, rope = l.rope_dim, k = p.topk;
  float* q = sm;                 // [r + rope]
  float* lg = sm + r + rope;     // [k] logits, then probabilities
  const int h = blockIdx.x;
  const int64_t t = blockIdx.y;
  const int64_t qh = t * p.heads + h;
  const int seq = p.query_seq != nullptr ? p.query_seq[t] : 0;
  const int64_t ntok = p.cache.num_tokens[seq];
  const int32_t* ptab = p.cache.page_table + seq * p.cache.page_table_stride;
  const int32_t* idx = p.indices + t * k;
  for (int c = threadIdx.x; c < r; c += blockDim.x) q[c] = p.q_abs[qh * r + c];
  for (int c = threadIdx.x; c < rope; c += blockDim.x) q[r + c] = p.q_pe[qh * rope + c];
  __syncthreads();
  auto record = [&](int32_t s) {
    return p.cache.pool + size_t(ptab[s / kPageTokens]) * l.MlaPageBytes() +
           size_t(s % kPageTokens) * l.MlaTokenBytes();
  };
  float lmax = NegInf();
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const int32_t s = idx[i];
    float logit = NegInf();
    if (s >= 0 && s < ntok) {
      const uint8_t* rec = record(s);
      const float* scales = reinterpret_cast<const float*>(rec + l.MlaScaleOffset());
      const uint16_t* pe = reinterpret_cast<const uint16_t*>(rec + l.MlaRopeOffset());
      float dot = 0.0f;
      for (int c = 0; c < r; ++c) {
        dot = fmaf(q[c], Fp8E4M3ToFloat(rec[c]) * scales[c / kQuantGroup], dot);
      }
      for (int c = 0; c < rope; ++c) dot = fmaf(q[r + c], Bf16ToFloat(pe[c]), dot);
      logit = dot * p.softmax_scale;
    }
    lg[i] = logit;
    lmax = fmaxf(lmax, logit);
  }
  lmax = BlockReduce(lmax, MaxF());
  float lsum = 0.0f;
  if (lmax != NegInf()) {
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
      const float e = lg[i] == NegInf() ? 0.0f : expf(lg[i] - lmax);
      lg[i] = e;
      lsum += e;
    }
  }
  lsum = BlockReduce(lsum, SumF());  // also orders the lg writes before the reads below
  float* out = p.out + qh * r;
  if (!(lsum > 0.0f)) {
    for (int c = threadIdx.x; c < r; c += blockDim.x) out[c] = 0.0f;
    if (p.lse != nullptr && threadIdx.x == 0) p.lse[qh] = NegInf();
    return;
  }
  const float inv = 1.0f / lsum;
  for (int c = threadIdx.x; c < r; c += blockDim.x) {
    float acc = 0.0f;
    for (int i = 0; i < k; ++i) {
      const float w = lg[i];
      if (w == 0.0f) continue;
      const uint8_t* rec = record(idx[i]);
      const float sc = reinterpret_cast<const float*>(rec + l.MlaScaleOffset())[c / kQuantGroup];
      acc = fmaf(w, Fp8E4M3ToFloat(rec[c]) * sc, acc);
    }
    out[c] = acc * inv;
  }
  if (p.lse != nullptr && threadIdx.x == 0) p.lse[qh] = lmax + logf(lsum);
}

bool PowerOfTwo(int x) { return x > 0 && (x & (x - 1)) == 0; }

}  // namespace

cudaError_t IndexerPrepGeneric(const PrepParams& p, cudaStream_t stream) {
  if (!PowerOfTwo(p.head_dim) || p.head_dim < 32 || p.head_dim > 1024 ||
      p.layout.index_head_dim != p.head_dim || p.rope_dim < 0 || p.rope_dim % 2 != 0 ||
      p.rope_dim > p.head_dim || p.heads < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens <= 0) return cudaSuccess;
  const size_t smem = size_t(p.head_dim) * 2 * sizeof(float);
  PrepGenericKernel<<<unsigned(p.num_tokens), unsigned(p.head_dim), smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t UpdateSummariesGeneric(const SummaryParams& p, cudaStream_t stream) {
  const int D = p.layout.index_head_dim;
  if (D < 1 || D > 1024 || p.layout.summary_block < 1) return cudaErrorInvalidValue;
  if (p.num_seqs < 1 || p.max_blocks_touched < 1) return cudaSuccess;
  SummaryGenericKernel<<<dim3(unsigned(p.max_blocks_touched), unsigned(p.num_seqs)), unsigned(D), 0,
                         stream>>>(p);
  return cudaGetLastError();
}

cudaError_t MisaRouterGeneric(const RouterGenericParams& p, cudaStream_t stream) {
  if (p.heads < 1 || p.heads > 1024 || p.active_heads < 1 || p.active_heads > p.heads ||
      p.head_dim < 1 || p.summary_block < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_queries <= 0) return cudaSuccess;
  const unsigned threads = unsigned((p.heads + 31) / 32 * 32);
  RouterGenericKernel<<<unsigned(p.num_queries), threads, size_t(p.heads) * sizeof(float), stream>>>(p);
  return cudaGetLastError();
}

cudaError_t SelectGeneric(const SelectGenericParams& p, cudaStream_t stream) {
  const int G = p.head_list != nullptr ? p.num_listed : p.heads;
  const size_t smem = (size_t(G) * p.head_dim + G) * sizeof(float);
  if (G < 1 || p.head_dim < 1 || smem > 48 * 1024 || p.topk < 1 || p.topk > kTopKMax ||
      p.logits_stride < p.max_position + 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_queries <= 0) return cudaSuccess;
  const int64_t key_blocks = (p.max_position + 1 + kScoreKeys - 1) / kScoreKeys;
  if (p.num_queries > 65535 || key_blocks > 2147483647LL) return cudaErrorInvalidValue;
  ScoresGenericKernel<<<dim3(unsigned(key_blocks), unsigned(p.num_queries)), kScoreKeys, smem,
                        stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  TopKGenericKernel<<<unsigned(p.num_queries), kTopKThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t WriteMlaCacheGeneric(const MlaWriteParams& p, cudaStream_t stream) {
  if (p.layout.kv_lora_rank < kQuantGroup || p.layout.kv_lora_rank % kQuantGroup != 0 ||
      p.layout.rope_dim < 0) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens <= 0) return cudaSuccess;
  WriteMlaGenericKernel<<<unsigned(p.num_tokens), kQuantGroup, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t SparseMlaGeneric(const SparseMlaParams& p, cudaStream_t stream) {
  const KvLayout& l = p.cache.layout;
  if (l.kv_lora_rank < kQuantGroup || l.kv_lora_rank % kQuantGroup != 0 || l.rope_dim < 0 ||
      p.topk < 0 || p.topk > 4096 || p.heads < 1 || p.num_queries > 65535) {
    return cudaErrorInvalidValue;
  }
  if (p.num_queries <= 0) return cudaSuccess;
  const size_t smem = size_t(l.kv_lora_rank + l.rope_dim + p.topk) * sizeof(float);
  SparseMlaGenericKernel<<<dim3(unsigned(p.heads), unsigned(p.num_queries)), kMlaThreads, smem,
                           stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda::internal
