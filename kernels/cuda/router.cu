// MISA router (head scores over the pooled summaries + top-h heads) and the
// pooled-summary block filter, on bf16 tensor cores (mma.sync m16n8k16) with
// each block mean split into bf16 hi + lo parts.
//
// The MMA's k order within each 16-dim block is permuted (the dot products
// are sums, so any order used by both operands gives the same products): lane
// c4's k columns 2 c4 + {0, 1} and 2 c4 + 8 + {0, 1} hold dims 4 c4 + {0, 1}
// and 4 c4 + {2, 3}, so that a lane reads its four dims of a query row as one
// 32-bit word and of a staged block mean as one 64-bit word.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/indexer_cuda.h"
#include "kernels/cuda/ptx.cuh"
#include "kernels/numeric.h"

namespace pd::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kChunk = 64;             // summary blocks staged in shared memory at a time
constexpr int kRowPad = 144;           // bf16 per staged row (128 + 16: conflict-free 64-bit
                                       // B reads, 8 rows of a half-warp in 8 bank groups)
constexpr int kRouterGroups = 8;       // query groups per router CTA (a group: 8 warps x 16 heads)

cudaError_t Invalid(const char** error, const char* what) {
  if (error != nullptr) *error = what;
  return cudaErrorInvalidValue;
}

// Stages kbar (hi and lo bf16 parts) of blocks [b0, b0 + kChunk) of one sequence.
__device__ void StageMeans(const float* sums, int64_t ntok, int block, int64_t b0, int64_t nb,
                           uint16_t* hi, uint16_t* lo) {
  for (int i = threadIdx.x; i < kChunk * 128; i += blockDim.x) {
    const int r = i >> 7, d = i & 127;
    const int64_t b = b0 + r;
    float m = 0.0f;
    if (b < nb) m = sums[b * 128 + d] / float(BlockCount(ntok, b, block));
    const uint16_t h = FloatToBf16(m);
    hi[r * kRowPad + d] = h;
    lo[r * kRowPad + d] = FloatToBf16(m - Bf16ToFloat(h));
  }
}

// Two e4m3 values (low byte first) -> bf16x2 (low half first), exactly: every
// e4m3 value (NaN aside) is an f16 and a bf16 value. Hardware conversions
// (sm_89+) instead of decoding the bits one byte at a time.
__device__ __forceinline__ uint32_t E4m3x2ToBf16x2(uint32_t two) {
  uint32_t h2;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(static_cast<unsigned short>(two & 0xffffu)));
  float f0, f1;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f0) : "h"(static_cast<unsigned short>(h2 & 0xffffu)));
  asm("cvt.f32.f16 %0, %1;" : "=f"(f1) : "h"(static_cast<unsigned short>(h2 >> 16)));
  uint32_t out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(f1), "f"(f0));  // f1 -> upper half
  return out;
}

// A fragments (16 rows x 128) of e4m3 query vectors rows[0..15] (row pointers,
// 4-byte aligned), in the permuted k order (file comment): lane c4 of row r
// reads the word of dims kk * 16 + 4 c4 .. + 3.
__device__ __forceinline__ void LoadQueryFragments(const uint8_t* row_g, const uint8_t* row_g8,
                                                   uint32_t (&a)[8][4]) {
  const int c4 = threadIdx.x & 3;
  const uint32_t* r0 = reinterpret_cast<const uint32_t*>(row_g) + c4;
  const uint32_t* r1 = reinterpret_cast<const uint32_t*>(row_g8) + c4;
  uint32_t w0[8], w1[8];
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    w0[kk] = __ldg(r0 + 4 * kk);
    w1[kk] = __ldg(r1 + 4 * kk);
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    a[kk][0] = E4m3x2ToBf16x2(w0[kk]);
    a[kk][1] = E4m3x2ToBf16x2(w1[kk]);
    a[kk][2] = E4m3x2ToBf16x2(w0[kk] >> 16);
    a[kk][3] = E4m3x2ToBf16x2(w1[kk] >> 16);
  }
}

// dots for 16 query rows x 8 blocks (staged rows n0..n0+7): acc per mma layout.
__device__ __forceinline__ void DotTile(const uint32_t (&a)[8][4], const uint16_t* hi,
                                        const uint16_t* lo, int n0, float (&acc)[4]) {
  const int lane = threadIdx.x & 31, g8 = lane >> 2, c4 = lane & 3;
  acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
  // Permuted k order: lane c4 reads dims kk * 16 + 4 c4 .. + 3 as one word.
  const uint16_t* h = hi + (n0 + g8) * kRowPad + 4 * c4;
  const uint16_t* l = lo + (n0 + g8) * kRowPad + 4 * c4;
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const uint2 vh = *reinterpret_cast<const uint2*>(h + kk * 16);
    const uint2 vl = *reinterpret_cast<const uint2*>(l + kk * 16);
    const uint32_t bh[2] = {vh.x, vh.y};
    const uint32_t bl[2] = {vl.x, vl.y};
    ptx::MmaM16N8K16Bf16(acc, a[kk], bh);
    ptx::MmaM16N8K16Bf16(acc, a[kk], bl);
  }
}

// Per CTA: kRouterGroups groups of `qpc` queries of one sequence (so that the
// staged block means serve 8 x as many queries as one group's); in group g,
// warp w serves query g * qpc + w / (H/16), heads 16 * (w % (H/16)) + [0, 16).
// The ReLU sums accumulate in shared memory across the staged chunks (one
// writer per entry).
__global__ void __launch_bounds__(kThreads, 4) RouterKernel(const RouterParams p, int qpc) {
  __shared__ __align__(16) uint16_t hi[kChunk * kRowPad];
  __shared__ __align__(16) uint16_t lo[kChunk * kRowPad];
  __shared__ float r_sh[kRouterGroups][128];       // group g: row qi * H + j: sum of ReLUs
  __shared__ int64_t nb_sh[kRouterGroups * 8];     // visible blocks of each query of the CTA
  const int H = p.heads, wpq = H / 16;
  const int cpq = qpc * kRouterGroups;             // queries per CTA (<= 64)
  const int seq = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g8 = lane >> 2;
  const int64_t qs0 = p.queries.query_start[seq], qs1 = p.queries.query_start[seq + 1];
  const int64_t q0 = qs0 + int64_t(blockIdx.x) * cpq;
  if (q0 >= qs1) return;
  const int nq = int(qs1 - q0 < cpq ? qs1 - q0 : cpq);
  const int block = p.keys.layout.summary_block;
  const int64_t ntok = p.keys.num_tokens[seq];
  const int64_t m_total = (ntok + block - 1) / block;
  const float* sums = p.keys.summary_sums + seq * p.keys.summary_stride * 128;
  for (int i = threadIdx.x; i < kRouterGroups * 128; i += kThreads) (&r_sh[0][0])[i] = 0.0f;
  for (int i = threadIdx.x; i < cpq; i += kThreads) {
    int64_t n = 0;
    if (i < nq) {
      const int64_t pos = p.queries.positions[q0 + i];
      n = pos / block + 1 < m_total ? pos / block + 1 : m_total;
    }
    nb_sh[i] = n;
  }
  __syncthreads();
  int64_t nb_max = 0;
  for (int i = 0; i < nq; ++i) nb_max = nb_sh[i] > nb_max ? nb_sh[i] : nb_max;
  const int qi = warp / wpq, ht = warp % wpq;
  for (int64_t b0 = 0; b0 < nb_max; b0 += kChunk) {
    __syncthreads();
    StageMeans(sums, ntok, block, b0, nb_max, hi, lo);
    __syncthreads();
#pragma unroll 1
    for (int g = 0; g < kRouterGroups; ++g) {
      const int qc = g * qpc + qi;
      if (qc >= nq) continue;  // warp-uniform
      const int64_t nb = nb_sh[qc];
      if (b0 >= nb) continue;
      const int64_t t = q0 + qc;
      uint32_t a[8][4];
      const uint8_t* q = p.queries.q8 + (t * H + 16 * ht) * 128;
      LoadQueryFragments(q + g8 * 128, q + (g8 + 8) * 128, a);
      float x0 = 0.0f, x1 = 0.0f;  // rows g8 and g8 + 8
      for (int n0 = 0; n0 < kChunk && b0 + n0 < nb; n0 += 8) {
        float acc[4];
        DotTile(a, hi, lo, n0, acc);
        const int64_t b = b0 + n0 + 2 * (lane & 3);
        if (b < nb) {
          x0 += fmaxf(acc[0], 0.0f);
          x1 += fmaxf(acc[2], 0.0f);
        }
        if (b + 1 < nb) {
          x0 += fmaxf(acc[1], 0.0f);
          x1 += fmaxf(acc[3], 0.0f);
        }
      }
      x0 += __shfl_xor_sync(0xffffffffu, x0, 1);
      x0 += __shfl_xor_sync(0xffffffffu, x0, 2);
      x1 += __shfl_xor_sync(0xffffffffu, x1, 1);
      x1 += __shfl_xor_sync(0xffffffffu, x1, 2);
      if ((lane & 3) == 0) {
        r_sh[g][qi * H + 16 * ht + g8] += x0;
        r_sh[g][qi * H + 16 * ht + g8 + 8] += x1;
      }
    }
  }
  __syncthreads();
  // Top-h per query: warp w takes queries w, w + 8, ...; `h` rounds of a warp arg-max.
  for (int qc = warp; qc < nq; qc += kThreads / 32) {
    const float* rs = &r_sh[qc / qpc][(qc % qpc) * H];
    const int64_t tq = q0 + qc;
    float r0 = 0.0f, r1 = 0.0f;  // r[t, lane], r[t, lane + 32] = |w| * sum of ReLUs
    if (lane < H) r0 = fabsf(p.queries.weights[tq * H + lane]) * rs[lane];
    if (lane + 32 < H) r1 = fabsf(p.queries.weights[tq * H + lane + 32]) * rs[lane + 32];
    uint64_t k0 = 0, k1 = 0;
    if (lane < H) k0 = topk::CandidateKey(r0, lane);
    if (lane + 32 < H) k1 = topk::CandidateKey(r1, lane + 32);
    if (p.scores != nullptr) {
      if (lane < H) p.scores[tq * H + lane] = r0;
      if (lane + 32 < H) p.scores[tq * H + lane + 32] = r1;
    }
    uint64_t chosen = 0;  // bit j: head j is active
    for (int e = 0; e < p.active_heads; ++e) {
      uint64_t best = k0 > k1 ? k0 : k1;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const uint64_t other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
      }
      const int j = topk::CandidateIndex(best);
      chosen |= uint64_t(1) << j;
      if (k0 == best) k0 = 0;
      if (k1 == best) k1 = 0;
    }
    // Ascending head order: lane j < H writes its rank among the chosen heads.
    for (int j = lane; j < H; j += 32) {
      if ((chosen >> j) & 1u) {
        const int rank = __popcll(chosen & ((uint64_t(1) << j) - 1));
        p.active[tq * p.active_heads + rank] = j;
      }
    }
  }
}

// Block filter: one CTA per sequence.
constexpr int kMaxFilterBlocks = 4096;

__global__ void __launch_bounds__(kThreads) BlockFilterKernel(const BlockFilterParams p) {
  __shared__ uint64_t keys[kMaxFilterBlocks];
  __shared__ float qf[8][128];
  __shared__ float wq[8];
  const int seq = blockIdx.x;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t qs0 = p.queries.query_start[seq], qs1 = p.queries.query_start[seq + 1];
  const int block = p.keys.layout.summary_block;
  const int64_t ntok = p.keys.num_tokens[seq];
  const int64_t m_total = (ntok + block - 1) / block;
  const float* sums = p.keys.summary_sums + seq * p.keys.summary_stride * 128;
  int64_t maxpos = -1;
  for (int64_t t = qs0; t < qs1; ++t) maxpos = max(maxpos, p.queries.positions[t]);
  const int64_t nvis = maxpos < 0 ? 0 : (m_total < maxpos / block + 1 ? m_total : maxpos / block + 1);
  const int n = int(nvis < kMaxFilterBlocks ? nvis : kMaxFilterBlocks);
  const int G = p.rows_per_query;
  for (int i = threadIdx.x; i < n; i += kThreads) keys[i] = 0;
  // Block score: max over the sequence's queries of sum_j w_j * relu(q_j . kbar_b).
  for (int64_t t = qs0; t < qs1; ++t) {
    __syncthreads();
    for (int i = threadIdx.x; i < G * 128; i += kThreads) {
      const int e = i >> 7, d = i & 127;
      const int j = p.head_list != nullptr ? p.head_list[t * G + e] : e;
      qf[e][d] = Fp8E4M3ToFloat(p.queries.q8[(t * p.heads + j) * 128 + d]);
      if (d == 0) wq[e] = p.queries.weights[t * p.heads + j];
    }
    __syncthreads();
    for (int b = warp; b < n; b += kThreads / 32) {
      const float cnt = float(BlockCount(ntok, b, block));
      float kb[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) kb[c] = sums[int64_t(b) * 128 + lane * 4 + c] / cnt;
      float score = 0.0f;
      for (int e = 0; e < G; ++e) {
        float dot = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) dot = fmaf(qf[e][lane * 4 + c], kb[c], dot);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        score = fmaf(wq[e], fmaxf(dot, 0.0f), score);
      }
      if (lane == 0) {
        const uint64_t k = topk::CandidateKey(score, b);
        if (k > keys[b]) keys[b] = k;
      }
    }
  }
  __syncthreads();
  // First and last visible blocks always kept: give them the largest keys.
  if (threadIdx.x == 0 && n > 0) {
    keys[0] = ~uint64_t(0);
    keys[n - 1] = ~uint64_t(0) - 1;
  }
  __syncthreads();
  const int N = topk::NextPow2(n > 2 ? n : 2);
  for (int i = n + threadIdx.x; i < N; i += kThreads) keys[i] = 0;
  __syncthreads();
  topk::BitonicSortDesc(keys, N);
  const int keep = min(p.keep_blocks, n);
  // Kept block ids (any order) -> ascending via a rank count, then their keys.
  __shared__ int kept[1024];
  for (int i = threadIdx.x; i < keep; i += kThreads) {
    const uint64_t k = keys[i];
    int b;
    if (k == ~uint64_t(0)) b = 0;
    else if (k == ~uint64_t(0) - 1) b = n - 1;
    else b = topk::CandidateIndex(k);
    kept[i] = b;
  }
  __syncthreads();
  int32_t* out = p.key_list + seq * p.key_list_stride;
  __shared__ int base[1024];
  if (threadIdx.x == 0) {
    // Tiny insertion sort of the kept ids (keep <= 1024), then prefix offsets.
    for (int i = 1; i < keep; ++i) {
      const int v = kept[i];
      int j = i - 1;
      while (j >= 0 && kept[j] > v) {
        kept[j + 1] = kept[j];
        --j;
      }
      kept[j + 1] = v;
    }
    int off = 0;
    for (int i = 0; i < keep; ++i) {
      base[i] = off;
      off += int(BlockCount(ntok, kept[i], block));
    }
    p.key_list_len[seq] = off;
  }
  __syncthreads();
  for (int i = 0; i < keep; ++i) {
    const int64_t first = int64_t(kept[i]) * block;
    const int cnt = int(BlockCount(ntok, kept[i], block));
    for (int s = threadIdx.x; s < cnt; s += kThreads) out[base[i] + s] = int32_t(first + s);
  }
}

// Stages precomputed bf16 hi / lo block means (LaunchBlockMeansBf16) of blocks
// [b0, b0 + kChunk): 16-byte copies, zeros past nb.
__device__ void StageMeansBf16(const uint16_t* hi_g, const uint16_t* lo_g, int64_t b0, int64_t nb,
                               uint16_t* hi, uint16_t* lo) {
  for (int i = threadIdx.x; i < kChunk * 16; i += blockDim.x) {
    const int r = i >> 4, c = i & 15;
    const int64_t b = b0 + r;
    uint4 vh = make_uint4(0, 0, 0, 0), vl = vh;
    if (b < nb) {
      vh = reinterpret_cast<const uint4*>(hi_g + b * 128)[c];
      vl = reinterpret_cast<const uint4*>(lo_g + b * 128)[c];
    }
    *reinterpret_cast<uint4*>(hi + r * kRowPad + c * 8) = vh;
    *reinterpret_cast<uint4*>(lo + r * kRowPad + c * 8) = vl;
  }
}

__global__ void BlockMeansBf16Kernel(const float* sums, int64_t block_stride,
                                     const int64_t* num_tokens, int block, uint16_t* hi,
                                     uint16_t* lo) {
  const int64_t seq = blockIdx.y;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= block_stride * 128) return;
  const int64_t b = i >> 7;
  const int64_t cnt = BlockCount(num_tokens[seq], b, block);
  const int64_t o = seq * block_stride * 128 + i;
  const float m = cnt > 0 ? sums[o] / float(cnt) : 0.0f;
  const uint16_t h = FloatToBf16(m);
  hi[o] = h;
  lo[o] = FloatToBf16(m - Bf16ToFloat(h));
}

// HISA block filter (prefill): a CTA serves 2 queries of 64 heads (warp w:
// query w / 4, heads 16 (w % 4) + [0, 16)); block means staged as bf16 hi + lo.
constexpr int kHisaQueries = 2;
constexpr int kHisaMaxBlocks = 4096;

struct HisaSmem {
  uint16_t hi[kChunk * kRowPad];
  uint16_t lo[kChunk * kRowPad];
  float part[8][kChunk];
  uint64_t bkeys[kHisaQueries][kHisaMaxBlocks];
  int32_t kept[kHisaMaxBlocks];
  int64_t nvis[kHisaQueries];
  unsigned warp_sum[8];
  topk::Scratch sc;
};

__global__ void __launch_bounds__(kThreads) HisaBlockKernel(const HisaBlockParams p) {
  extern __shared__ __align__(16) uint8_t hisa_raw[];
  HisaSmem& sm = *reinterpret_cast<HisaSmem*>(hisa_raw);
  const int seq = blockIdx.y;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g8 = lane >> 2, c4 = lane & 3;
  const int64_t qs0 = p.queries.query_start[seq], qs1 = p.queries.query_start[seq + 1];
  const int64_t q0 = qs0 + int64_t(blockIdx.x) * kHisaQueries;
  if (q0 >= qs1) return;
  const int nq = int(qs1 - q0 < kHisaQueries ? qs1 - q0 : kHisaQueries);
  const int hb = p.hisa_block;
  const int64_t ntok = p.num_tokens[seq];
  const int64_t m_total = (ntok + hb - 1) / hb;
  const float* sums = p.block_sums + seq * p.block_stride * 128;
  if (threadIdx.x < kHisaQueries) {
    int64_t nv = 0;
    if (int(threadIdx.x) < nq) {
      const int64_t pos = p.queries.positions[q0 + threadIdx.x];
      nv = pos / hb + 1 < m_total ? pos / hb + 1 : m_total;
    }
    sm.nvis[threadIdx.x] = nv;
  }
  __syncthreads();
  const int qi = warp >> 2, ht = warp & 3;
  const bool active_warp = qi < nq;
  const int64_t t = q0 + qi;
  uint32_t a[8][4];
  float wa = 0.0f, wb = 0.0f;
  if (active_warp) {
    const uint8_t* q = p.queries.q8 + (t * 64 + 16 * ht) * 128;
    LoadQueryFragments(q + g8 * 128, q + (g8 + 8) * 128, a);
    wa = p.queries.weights[t * 64 + 16 * ht + g8];
    wb = p.queries.weights[t * 64 + 16 * ht + g8 + 8];
  }
  const int64_t nb_max = sm.nvis[0] > sm.nvis[1] ? sm.nvis[0] : sm.nvis[1];
  for (int64_t b0 = 0; b0 < nb_max; b0 += kChunk) {
    __syncthreads();
    if (p.means_hi != nullptr) {
      const int64_t off = seq * p.block_stride * 128;
      StageMeansBf16(p.means_hi + off, p.means_lo + off, b0, nb_max, sm.hi, sm.lo);
    } else {
      StageMeans(sums, ntok, hb, b0, nb_max, sm.hi, sm.lo);
    }
    __syncthreads();
    if (active_warp) {
#pragma unroll 1
      for (int n0 = 0; n0 < kChunk; n0 += 8) {
        float acc[4];
        DotTile(a, sm.hi, sm.lo, n0, acc);
        // Weighted ReLU over this lane's two heads, then the sum over the
        // warp's 16 heads (lanes with the same c4).
        float p0 = fmaf(wb, fmaxf(acc[2], 0.0f), wa * fmaxf(acc[0], 0.0f));
        float p1 = fmaf(wb, fmaxf(acc[3], 0.0f), wa * fmaxf(acc[1], 0.0f));
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) {
          p0 += __shfl_xor_sync(0xffffffffu, p0, o);
          p1 += __shfl_xor_sync(0xffffffffu, p1, o);
        }
        if (g8 == 0) {
          sm.part[warp][n0 + 2 * c4] = p0;
          sm.part[warp][n0 + 2 * c4 + 1] = p1;
        }
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kHisaQueries * kChunk; i += kThreads) {
      const int q = i / kChunk, j = i % kChunk;
      const int64_t b = b0 + j;
      if (q < nq && b < sm.nvis[q]) {
        const float* pp = &sm.part[4 * q][j];
        const float bs = ((pp[0] + pp[kChunk]) + pp[2 * kChunk]) + pp[3 * kChunk];
        sm.bkeys[q][b] = topk::CandidateKey(bs, int32_t(b));
      }
    }
  }
  __syncthreads();
  // Per query: first and last visible block, then the best others.
  for (int q = 0; q < nq; ++q) {
    const int n = int(sm.nvis[q]);
    uint64_t* keys = sm.bkeys[q];
    if (threadIdx.x == 0) {
      keys[0] = ~uint64_t(0);
      if (n > 1) keys[n - 1] = ~uint64_t(0) - 1;
    }
    __syncthreads();
    const int fixed = n > 1 ? 2 : 1;
    const int keep = min(max(p.keep_blocks, fixed), n);
    uint64_t T = 1;
    if (keep < n) {
      T = topk::RadixSelectKth(
          [&](auto&& f) {
            for (int i = threadIdx.x; i < n; i += kThreads) f(keys[i]);
          },
          keep, sm.sc);
    }
    // Kept blocks in ascending order: per-thread runs, then an exclusive scan.
    const int per = (n + kThreads - 1) / kThreads;
    const int b_lo = threadIdx.x * per, b_hi = min(b_lo + per, n);
    unsigned mine = 0;
    for (int b = b_lo; b < b_hi; ++b) mine += keys[b] >= T ? 1u : 0u;
    unsigned incl = mine;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const unsigned v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    if (lane == 31) sm.warp_sum[warp] = incl;
    __syncthreads();
    unsigned base = incl - mine;
    for (int w = 0; w < warp; ++w) base += sm.warp_sum[w];
    for (int b = b_lo; b < b_hi; ++b) {
      if (keys[b] >= T) sm.kept[base++] = b;
    }
    __syncthreads();
    // Keys of kept block rank i at [i * hb, ...): only the cache's last block
    // can be partial, and it is the last kept block when kept.
    const int64_t tq = q0 + q;
    int32_t* out = p.key_list + tq * p.key_list_stride;
    const int64_t total_slots = int64_t(keep) * hb;
    for (int64_t idx = threadIdx.x; idx < total_slots; idx += kThreads) {
      const int64_t key = int64_t(sm.kept[idx / hb]) * hb + idx % hb;
      if (key < ntok) out[idx] = int32_t(key);
    }
    if (threadIdx.x == 0) {
      const int last = sm.kept[keep - 1];
      p.key_list_len[tq] = int32_t(int64_t(keep - 1) * hb + BlockCount(ntok, last, hb));
    }
    __syncthreads();
  }
}

}  // namespace

cudaError_t LaunchMisaRouter(const RouterParams& p, cudaStream_t stream, const char** error) {
  if (p.head_dim != 128 || p.keys.layout.index_head_dim != 128) {
    return Invalid(error, "router: head_dim must be 128");
  }
  if (p.heads != 16 && p.heads != 32 && p.heads != 64) {
    return Invalid(error, "router: heads must be 16, 32 or 64");
  }
  if (p.active_heads < 1 || p.active_heads > p.heads) {
    return Invalid(error, "router: active_heads must be in [1, heads]");
  }
  if (p.keys.summary_sums == nullptr || p.keys.num_tokens == nullptr || p.active == nullptr ||
      p.queries.q8 == nullptr || p.queries.weights == nullptr ||
      p.queries.positions == nullptr || p.queries.query_start == nullptr) {
    return Invalid(error, "router: null pointer among summary_sums, num_tokens, active, q8, "
                          "weights, positions, query_start");
  }
  if (p.keys.layout.summary_block < 1) return Invalid(error, "router: summary_block must be >= 1");
  if (p.queries.num_seqs < 1 || p.queries.num_seqs > 65535) {
    return Invalid(error, "router: queries.num_seqs must be in [1, 65535]");
  }
  if (p.queries.num_queries == 0 || p.queries.max_queries_per_seq == 0) return cudaSuccess;
  const int qpc = 8 / (p.heads / 16);
  const int64_t cpq = int64_t(qpc) * kRouterGroups;
  const dim3 grid(unsigned((p.queries.max_queries_per_seq + cpq - 1) / cpq),
                  unsigned(p.queries.num_seqs));
  RouterKernel<<<grid, kThreads, 0, stream>>>(p, qpc);
  return cudaGetLastError();
}

cudaError_t LaunchBlockFilter(const BlockFilterParams& p, cudaStream_t stream,
                              const char** error) {
  if (p.head_dim != 128 || p.keys.layout.index_head_dim != 128) {
    return Invalid(error, "block filter: head_dim must be 128");
  }
  if (p.rows_per_query < 1 || p.rows_per_query > 8 || p.rows_per_query > p.heads) {
    return Invalid(error, "block filter: rows_per_query must be in [1, min(8, heads)]");
  }
  if (p.keep_blocks < 1 || p.keep_blocks > 1024) {
    return Invalid(error, "block filter: keep_blocks must be in [1, 1024]");
  }
  if (p.key_list_stride < int64_t(p.keep_blocks) * p.keys.layout.summary_block) {
    return Invalid(error, "block filter: key_list_stride < keep_blocks * summary_block");
  }
  if (p.queries.max_context > int64_t(kMaxFilterBlocks) * p.keys.layout.summary_block) {
    return Invalid(error, "block filter: more than 4096 summary blocks per sequence");
  }
  if (p.keys.summary_sums == nullptr || p.key_list == nullptr || p.key_list_len == nullptr) {
    return Invalid(error, "block filter: null summary_sums, key_list or key_list_len");
  }
  BlockFilterKernel<<<dim3(unsigned(p.queries.num_seqs)), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda

namespace pd::kernels::cuda {

cudaError_t LaunchBlockMeansBf16(const float* sums, int64_t block_stride, const int64_t* num_tokens,
                                int num_seqs, int block, uint16_t* hi, uint16_t* lo,
                                cudaStream_t stream, const char** error) {
  if (sums == nullptr || num_tokens == nullptr || hi == nullptr || lo == nullptr) {
    return Invalid(error, "block means: null sums, num_tokens, hi or lo");
  }
  if (block < 1 || num_seqs < 1 || num_seqs > 65535 || block_stride < 0) {
    return Invalid(error, "block means: block must be >= 1 and num_seqs in [1, 65535]");
  }
  if (block_stride == 0) return cudaSuccess;
  const dim3 grid(unsigned((block_stride * 128 + 255) / 256), unsigned(num_seqs));
  BlockMeansBf16Kernel<<<grid, 256, 0, stream>>>(sums, block_stride, num_tokens, block, hi, lo);
  return cudaGetLastError();
}

cudaError_t LaunchHisaBlocks(const HisaBlockParams& p, cudaStream_t stream, const char** error) {
  if (p.heads != 64 || p.head_dim != 128) {
    return Invalid(error, "HISA blocks: heads must be 64 and head_dim 128");
  }
  if (p.hisa_block < 1 || p.keep_blocks < 1) {
    return Invalid(error, "HISA blocks: hisa_block and keep_blocks must be >= 1");
  }
  if (p.queries.num_seqs < 1 || p.queries.num_seqs > 65535 || p.queries.query_start == nullptr) {
    return Invalid(error, "HISA blocks: queries.num_seqs must be in [1, 65535] with query_start");
  }
  if (CeilDiv(p.queries.max_context, p.hisa_block) > kHisaMaxBlocks) {
    return Invalid(error, "HISA blocks: more than 4096 blocks per sequence (context / hisa_block)");
  }
  if (p.key_list_stride < int64_t(p.keep_blocks) * p.hisa_block) {
    return Invalid(error, "HISA blocks: key_list_stride < keep_blocks * hisa_block");
  }
  if ((p.means_hi == nullptr) != (p.means_lo == nullptr)) {
    return Invalid(error, "HISA blocks: give both means_hi and means_lo, or neither");
  }
  if (p.num_tokens == nullptr || p.block_sums == nullptr || p.key_list == nullptr ||
      p.key_list_len == nullptr || p.queries.q8 == nullptr || p.queries.weights == nullptr ||
      p.queries.positions == nullptr) {
    return Invalid(error, "HISA blocks: null pointer among num_tokens, block_sums, key_list, "
                          "key_list_len, q8, weights, positions");
  }
  if (p.queries.num_queries == 0 || p.queries.max_queries_per_seq == 0) return cudaSuccess;
  static const cudaError_t attr = cudaFuncSetAttribute(
      HisaBlockKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sizeof(HisaSmem)));
  if (attr != cudaSuccess) return attr;
  const dim3 grid(unsigned((p.queries.max_queries_per_seq + kHisaQueries - 1) / kHisaQueries),
                  unsigned(p.queries.num_seqs));
  HisaBlockKernel<<<grid, kThreads, sizeof(HisaSmem), stream>>>(p);
  return cudaGetLastError();
}

}  // namespace pd::kernels::cuda
