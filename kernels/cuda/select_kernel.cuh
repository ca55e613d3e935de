// The selection kernel: FP8 tensor-core scoring of (query, head) rows against
// the paged indexer keys with an exact top-k fused behind the MMA.
// Template definitions; explicit instantiations live in select_g*.cu.
//
// Tile: a CTA holds 128 B-operand rows = queries_per_cta x G (query, head)
// pairs of one sequence, K-major in shared memory (128-byte swizzle). Two
// consumer warpgroups each take a 64-key page of a 128-key pipeline stage
// (cp.async, kSelectStages deep) and compute D[64 keys x 128 rows] with wgmma
// m64n128k32 (or mma.sync m16n8k32 when use_wgmma is false). The epilogue applies
// ReLU and the head weights, sums the heads of each query (in-thread, then a
// reduce-scatter over the 4 lanes of a quad), multiplies by the key scale,
// applies the causal mask and offers the score to the query's candidate list.
//
// Fused top-k: each (query, split) owns a list of kSelectListCap 64-bit keys in
// the workspace and a threshold in shared memory; a score enters the list only
// if its key beats the threshold. When a list may overflow in the next stage,
// the whole CTA radix-selects its top-k in place and raises the threshold to
// the k-th key. Every key better than the final k-th best is therefore in the
// list at the end: the selection is exact.
#ifndef PD_KERNELS_CUDA_SELECT_KERNEL_CUH_
#define PD_KERNELS_CUDA_SELECT_KERNEL_CUH_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/ptx.cuh"
#include "kernels/cuda/select_kernel.h"
#include "kernels/cuda/select_plan.h"

namespace pd::kernels::cuda::select_internal {

constexpr int kStages = 3;
constexpr int kThreads = kSelectThreads;
constexpr int kRows = kSelectRows;
constexpr int kKeysPerIter = kSelectKeysPerIter;
constexpr int kCap = kSelectListCap;
constexpr int kPerThread = kCap / kThreads;  // list entries each thread holds in a compaction
constexpr int kMaxQueriesPerCta = kRows / 8;
static_assert(kCap % kThreads == 0, "list capacity must divide among the threads");
static_assert(kKeysPerIter == 2 * 64, "a stage is two 64-key pages, one per warpgroup");

struct alignas(1024) Smem {
  uint8_t q[kRows * 128];                     // B operand, SW128, 16 KB
  uint8_t keys[kStages][kKeysPerIter * 128];  // A operands, SW128, 16 KB per stage
  float kscale[kStages][kKeysPerIter];
  int32_t kidx[kStages][kKeysPerIter];        // key index of each stage row, -1 = none
  float w[kRows];                             // head weight of each B row
  int64_t pos[kMaxQueriesPerCta];             // -1 for padding queries
  unsigned long long thr[kMaxQueriesPerCta];  // list entry threshold (enter iff key > thr)
  float thr_f[kMaxQueriesPerCta];             // score of thr: score > thr_f enters at once
  int cnt[kMaxQueriesPerCta];                 // list fill
  unsigned need;                              // bit q: list q may overflow in the next stage
  topk::Scratch sc;
};
static_assert(sizeof(Smem::keys) >= kCap * sizeof(uint64_t),
              "the sorted final pass reuses the key stages as its buffer");

constexpr size_t kSmemBytes = sizeof(Smem) + 1024;  // + alignment slack

__device__ __forceinline__ uint32_t Lds32(const uint8_t* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// The float whose OrderedScoreBits are `ord` (-inf for the NaN class 0, so
// that every non-NaN score compares above it).
__device__ __forceinline__ float ScoreOfOrderedBits(uint32_t ord) {
  if (ord == 0) return -__int_as_float(0x7f800000);
  return __uint_as_float((ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord);
}

// Compacts list `L` (n entries, n > topk) to its top-k, in place, and raises
// the list's thresholds to the k-th key. Whole CTA.
__device__ __forceinline__ void CompactList(uint64_t* L, int n, int topk, Smem& sm, int q) {
  uint64_t x[kPerThread];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int i = threadIdx.x + kThreads * j;
    x[j] = i < n ? L[i] : 0ull;
  }
  const uint64_t T = topk::RadixSelectKth(
      [&](auto&& f) {
#pragma unroll
        for (int j = 0; j < kPerThread; ++j) f(x[j]);
      },
      topk, sm.sc);
  if (threadIdx.x == 0) sm.sc.write_pos = 0;
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const bool keep = x[j] != 0 && x[j] >= T;
    const int slot = topk::WarpAppendSlot(keep, &sm.sc.write_pos);
    if (keep) L[slot] = x[j];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm.cnt[q] = topk;
    sm.thr[q] = T - 1;
    sm.thr_f[q] = ScoreOfOrderedBits(uint32_t(T >> 32));
  }
  __syncthreads();
}

// kKeyList: the keys come from a per-sequence list (any order, any page);
// otherwise they are the contiguous range [0, kend) and each warpgroup copies
// its whole 64-key page with loop-invariant offsets.
// R: B rows per CTA (128, or 64 for one query of 64 heads: decode).
template <int G, int R, bool kWgmma, bool kKeyList>
__global__ void __launch_bounds__(kThreads, 2) SelectKernel(const SelectArgs a) {
  constexpr int NQ = R / G;
  constexpr int kNT = R / 8;  // n8 tiles of the accumulator
  static_assert(R == 64 || R == 128, "R must be 64 or 128");
  static_assert(NQ >= 1 && NQ <= kMaxQueriesPerCta, "G must be 8, 16, 32 or 64");
  extern __shared__ uint8_t smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) &
                                      ~uintptr_t(1023));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int seq = blockIdx.z, split = blockIdx.y;
  const int64_t qs_begin = a.query_start[seq], qs_end = a.query_start[seq + 1];
  const int64_t q0 = qs_begin + int64_t(blockIdx.x) * NQ;
  if (q0 >= qs_end) return;
  const int nq = int(qs_end - q0 < NQ ? qs_end - q0 : NQ);
  const int64_t ntok = a.num_tokens[seq];

  // ---- per-query state and the B operand (queries' rows), once per CTA ----
  if (tid < NQ) {
    sm.pos[tid] = tid < nq ? a.positions[q0 + tid] : -1;
    sm.thr[tid] = 0;
    sm.thr_f[tid] = -__int_as_float(0x7f800000);
    sm.cnt[tid] = 0;
  }
  if (tid == 0) sm.need = 0;
  if ((tid >> 1) < R) {
    const int r = tid >> 1, half = tid & 1;
    const int qi = r / G, slot = r % G;
    int4 v[4] = {};
    float wv = 0.0f;
    if (qi < nq) {
      const int64_t t = q0 + qi;
      int head = (a.head_list != nullptr && a.masked_heads == 0) ? a.head_list[t * G + slot] : slot;
      head = min(max(head, 0), a.heads - 1);
      bool keep = true;
      if (a.masked_heads > 0) {
        keep = false;
        for (int e = 0; e < a.masked_heads; ++e) keep |= a.head_list[t * a.masked_heads + e] == head;
      }
      const int4* src =
          reinterpret_cast<const int4*>(a.q8 + (t * a.heads + head) * 128 + half * 64);
#pragma unroll
      for (int c = 0; c < 4; ++c) v[c] = src[c];
      wv = keep ? a.weights[t * a.heads + head] : 0.0f;
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      *reinterpret_cast<int4*>(sm.q + ptx::Sw128Offset(r, (half * 4 + c) * 16)) = v[c];
    }
    if (half == 0) sm.w[r] = wv;
  }
  __syncthreads();

  // ---- this CTA's key slots: keys [0, kend) or key_list[0, kend) ----
  int64_t maxpos = -1, minpos = INT64_MAX;
#pragma unroll
  for (int q = 0; q < NQ; ++q) {
    maxpos = max(maxpos, sm.pos[q]);
    minpos = min(minpos, sm.pos[q]);  // -1 when the CTA has padding queries
  }
  const int32_t* klist = nullptr;
  int64_t kend;
  if constexpr (kKeyList) {
    klist = a.key_list + int64_t(seq) * a.key_list_stride;
    kend = a.key_list_len[seq];
  } else {
    kend = min(ntok, maxpos + 1);
  }
  const int64_t sbeg = int64_t(split) * a.keys_per_split;
  const int64_t send = min(kend, sbeg + a.keys_per_split);
  const int n_iter = send > sbeg ? int((send - sbeg + kKeysPerIter - 1) / kKeysPerIter) : 0;
  const int32_t* ptab = a.page_table + int64_t(seq) * a.page_table_stride;
  uint64_t* lists = a.lists + (q0 * a.splits + split) * int64_t(kCap);
  const int64_t list_stride = int64_t(a.splits) * kCap;  // between consecutive queries

  // Contiguous keys: warpgroup g copies page g of each stage; its thread u
  // copies the page's 16-byte chunks u + 128 j (row (u + 128 j) / 8), and
  // threads u < 16 the page's 64 scales.
  const int ld_pg = tid >> 7, ld_u = tid & 127;
  uint32_t ld_dst[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int c = ld_u + 128 * j;
    ld_dst[j] = uint32_t(ld_pg * 64 * 128) + ptx::Sw128Offset(c >> 3, (c & 7) * 16);
  }
  auto load_stage = [&](int stage, int it) {
    if constexpr (kKeyList) {
      const int r = tid >> 1, half = tid & 1;
      const int64_t s = sbeg + int64_t(it) * kKeysPerIter + r;
      int64_t key = -1;
      if (s < send) key = int64_t(klist[s]);
      if (key >= ntok) key = -1;
      if (key >= 0) {
        const int64_t page = ptab[key >> 6];
        const int slotp = int(key & 63);
        const uint8_t* pg = a.pool + page * int64_t(a.page_bytes);
        const uint8_t* src = pg + slotp * 128 + half * 64;
        uint8_t* dst = sm.keys[stage];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          ptx::CpAsync16(dst + ptx::Sw128Offset(r, (half * 4 + c) * 16), src + c * 16);
        }
        if (half == 0) ptx::CpAsync4(&sm.kscale[stage][r], pg + a.scale_offset + slotp * 4);
      }
      if (half == 0) sm.kidx[stage][r] = int32_t(key);
    } else {
      const int64_t key0 = sbeg + int64_t(it) * kKeysPerIter + ld_pg * 64;
      if (key0 < send) {
        const uint8_t* pg = a.pool + int64_t(ptab[key0 >> 6]) * int64_t(a.page_bytes);
        uint8_t* dst = sm.keys[stage];
#pragma unroll
        for (int j = 0; j < 4; ++j) ptx::CpAsync16(dst + ld_dst[j], pg + (ld_u + 128 * j) * 16);
        if (ld_u < 16) {
          ptx::CpAsync16(&sm.kscale[stage][ld_pg * 64 + 4 * ld_u], pg + a.scale_offset + 16 * ld_u);
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_iter) load_stage(s, s);
    ptx::CpAsyncCommit();
  }

  const int wg = warp >> 2, w4 = warp & 3, g8 = lane >> 2, c4 = lane & 3;
  const bool hi1 = (c4 & 2) != 0, hi0 = (c4 & 1) != 0;
  float acc[R / 2];
#pragma unroll
  for (int i = 0; i < R / 2; ++i) acc[i] = 0.0f;
  const uint64_t desc_a0 = ptx::Sw128Desc(ptx::SmemAddr(sm.keys[0]) + wg * 64 * 128);
  const uint64_t desc_b0 = ptx::Sw128Desc(ptx::SmemAddr(sm.q));

  for (int it = 0; it < n_iter; ++it) {
    ptx::CpAsyncWait<kStages - 2>();
    ptx::FenceProxyAsync();
    __syncthreads();

    // Compact any list that could overflow during this stage (uniform decision:
    // every thread reads `need` before thread 0 clears it after a barrier).
    const unsigned need = sm.need;
    if (need != 0) {
      __syncthreads();
      if (tid == 0) sm.need = 0;
      for (int q = 0; q < NQ; ++q) {
        if ((need >> q) & 1u) CompactList(lists + q * list_stride, sm.cnt[q], a.topk, sm, q);
      }
    }

    {
      const int nxt = it + kStages - 1;
      if (nxt < n_iter) load_stage(nxt % kStages, nxt);
      ptx::CpAsyncCommit();
    }

    const int stage = it % kStages;
    const uint8_t* A = sm.keys[stage] + wg * 64 * 128;
    if constexpr (kWgmma) {
#pragma unroll
      for (int i = 0; i < R / 2; ++i) ptx::FenceOperand(acc[i]);
      ptx::WgmmaFence();
      // Descriptor start addresses are in 16-byte units: +2 per 32-byte k step.
      const uint64_t da = desc_a0 + uint64_t((stage * kKeysPerIter * 128) >> 4);
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        if constexpr (R == 128) {
          ptx::WgmmaM64N128K32E4M3(acc, da + 2 * kk, desc_b0 + 2 * kk, kk > 0 ? 1 : 0);
        } else {
          ptx::WgmmaM64N64K32E4M3(acc, da + 2 * kk, desc_b0 + 2 * kk, kk > 0 ? 1 : 0);
        }
      }
      ptx::WgmmaCommit();
      ptx::WgmmaWait<0>();
#pragma unroll
      for (int i = 0; i < R / 2; ++i) ptx::FenceOperand(acc[i]);
    } else {
#pragma unroll
      for (int i = 0; i < R / 2; ++i) acc[i] = 0.0f;
      const int ra = 16 * w4 + g8, rb = ra + 8;
#pragma unroll 1
      for (int kk = 0; kk < 4; ++kk) {
        const int k0 = kk * 32 + 4 * c4;
        const uint32_t af[4] = {Lds32(A + ptx::Sw128Offset(ra, k0)),
                                Lds32(A + ptx::Sw128Offset(rb, k0)),
                                Lds32(A + ptx::Sw128Offset(ra, k0 + 16)),
                                Lds32(A + ptx::Sw128Offset(rb, k0 + 16))};
#pragma unroll
        for (int i = 0; i < kNT; ++i) {
          const int br = 8 * i + g8;
          const uint32_t bf[2] = {Lds32(sm.q + ptx::Sw128Offset(br, k0)),
                                  Lds32(sm.q + ptx::Sw128Offset(br, k0 + 16))};
          float c[4] = {acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]};
          ptx::MmaM16N8K32E4M3(c, af, bf);
          acc[4 * i] = c[0];
          acc[4 * i + 1] = c[1];
          acc[4 * i + 2] = c[2];
          acc[4 * i + 3] = c[3];
        }
      }
    }

    // ---- epilogue: ReLU, weights, head sum, key scale, mask, list ----
    float v[2 * NQ];
#pragma unroll
    for (int i = 0; i < 2 * NQ; ++i) v[i] = 0.0f;
#pragma unroll
    for (int i = 0; i < kNT; ++i) {
      constexpr int kTilesPerQuery = G / 8;
      const int q = i / kTilesPerQuery;
      const float2 wv = *reinterpret_cast<const float2*>(&sm.w[8 * i + 2 * c4]);
      v[q] = fmaf(fmaxf(acc[4 * i + 0], 0.0f), wv.x, v[q]);
      v[q] = fmaf(fmaxf(acc[4 * i + 1], 0.0f), wv.y, v[q]);
      v[NQ + q] = fmaf(fmaxf(acc[4 * i + 2], 0.0f), wv.x, v[NQ + q]);
      v[NQ + q] = fmaf(fmaxf(acc[4 * i + 3], 0.0f), wv.y, v[NQ + q]);
    }
    // Reduce-scatter over the quad: lane bit 1 picks the key row, bit 0 the
    // half of the queries; each lane ends with NQ/2 complete sums (one query:
    // both lanes of a pair get the sum and the even one uses it).
    constexpr int kPer = NQ >= 2 ? NQ / 2 : 1;
    float r2[kPer];
    if constexpr (NQ >= 2) {
      float r1[NQ];
#pragma unroll
      for (int k = 0; k < NQ; ++k) {
        const float send = hi1 ? v[k] : v[NQ + k];
        const float keep = hi1 ? v[NQ + k] : v[k];
        r1[k] = keep + __shfl_xor_sync(0xffffffffu, send, 2);
      }
#pragma unroll
      for (int k = 0; k < NQ / 2; ++k) {
        const float send = hi0 ? r1[k] : r1[NQ / 2 + k];
        const float keep = hi0 ? r1[NQ / 2 + k] : r1[k];
        r2[k] = keep + __shfl_xor_sync(0xffffffffu, send, 1);
      }
    } else {
      const float r1 = (hi1 ? v[1] : v[0]) + __shfl_xor_sync(0xffffffffu, hi1 ? v[0] : v[1], 2);
      r2[0] = r1 + __shfl_xor_sync(0xffffffffu, r1, 1);
    }
    const int row = wg * 64 + 16 * w4 + g8 + (hi1 ? 8 : 0);
    int64_t key;
    if constexpr (kKeyList) {
      key = sm.kidx[stage][row];
    } else {
      key = sbeg + int64_t(it) * kKeysPerIter + row;
      if (key >= send) key = -1;
    }
    const float ks = sm.kscale[stage][row];
    // Every query of the CTA sees the whole stage: skip the per-query mask.
    const bool all_visible = !kKeyList && sbeg + int64_t(it + 1) * kKeysPerIter - 1 <= minpos;
    // Odd lanes (hi0) serve queries NQ/2 + k, even lanes queries k. A score
    // above the list's float threshold enters at once; equal scores (and NaN)
    // take the exact 64-bit comparison. Entering lanes of a query share one
    // atomicAdd.
    const unsigned group = (NQ >= 2 && hi0) ? 0xaaaaaaaau : 0x55555555u;
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const int q = NQ >= 2 ? (hi0 ? NQ / 2 : 0) + k : 0;
      const float score = r2[k] * ks;
      const float tf = sm.thr_f[q];
      bool pass = key >= 0 && (NQ >= 2 || !hi0) && (all_visible || key <= sm.pos[q]) &&
                  (score > tf || ((score == tf || score != score) &&
                                  topk::CandidateKey(score, int32_t(key)) > sm.thr[q]));
      if (pass) {
        const unsigned gm = __activemask() & group;
        const int leader = __ffs(gm) - 1;
        const int n = __popc(gm);
        int base = 0;
        if (lane == leader) {
          base = atomicAdd(&sm.cnt[q], n);
          if (base + n > kCap - kKeysPerIter) atomicOr(&sm.need, 1u << q);
        }
        base = __shfl_sync(gm, base, leader);
        lists[q * list_stride + base + __popc(gm & ((1u << lane) - 1u))] =
            topk::CandidateKey(score, int32_t(key));
      }
    }
  }

  // ---- final selection per query ----
  ptx::CpAsyncWait<0>();
  __syncthreads();
  for (int q = 0; q < nq; ++q) {
    uint64_t* L = lists + q * list_stride;
    const int n = sm.cnt[q];
    const int k = a.topk;
    const int64_t t = q0 + q;
    if (a.out == nullptr) {
      if (n > k) CompactList(L, n, k, sm, q);
      if (tid == 0) a.counts[t * a.splits + split] = min(n, k);
      continue;
    }
    int32_t* o = a.out + t * k;
    if (a.sorted) {
      // Compact to the top k first: the sort then runs on <= k entries.
      int m = n;
      if (n > k) {
        CompactList(L, n, k, sm, q);
        m = k;
      }
      uint64_t* buf = reinterpret_cast<uint64_t*>(sm.keys);
      const int N = topk::NextPow2(max(m, 2));
      for (int i = tid; i < N; i += kThreads) buf[i] = i < m ? L[i] : 0ull;
      __syncthreads();
      topk::BitonicSortDesc(buf, N);
      for (int i = tid; i < k; i += kThreads) o[i] = i < m ? topk::CandidateIndex(buf[i]) : -1;
      __syncthreads();
    } else {
      int m = n;
      if (n > k) {
        CompactList(L, n, k, sm, q);
        m = k;
      }
      for (int i = tid; i < k; i += kThreads) o[i] = i < m ? topk::CandidateIndex(L[i]) : -1;
      __syncthreads();
    }
  }
}

template <int G, int R, bool kWgmma, bool kKeyList>
cudaError_t LaunchSelectKernelT(const SelectArgs& args, dim3 grid, cudaStream_t stream) {
  static const cudaError_t attr =
      cudaFuncSetAttribute(SelectKernel<G, R, kWgmma, kKeyList>,
                           cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes));
  if (attr != cudaSuccess) return attr;
  SelectKernel<G, R, kWgmma, kKeyList><<<grid, kThreads, kSmemBytes, stream>>>(args);
  return cudaGetLastError();
}

template <int G, int R, bool kWgmma>
cudaError_t LaunchSelectKernelR(const SelectArgs& args, dim3 grid, cudaStream_t stream) {
  return args.key_list != nullptr ? LaunchSelectKernelT<G, R, kWgmma, true>(args, grid, stream)
                                  : LaunchSelectKernelT<G, R, kWgmma, false>(args, grid, stream);
}

template <int G, bool kWgmma>
cudaError_t LaunchSelectKernel(const SelectArgs& args, dim3 grid, cudaStream_t stream) {
  if constexpr (G == 64) {
    if (args.rows_per_cta == 64) return LaunchSelectKernelR<G, 64, kWgmma>(args, grid, stream);
  }
  return LaunchSelectKernelR<G, 128, kWgmma>(args, grid, stream);
}

}  // namespace pd::kernels::cuda::select_internal

#endif  // PD_KERNELS_CUDA_SELECT_KERNEL_CUH_
