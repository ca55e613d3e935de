// CTA-wide exact top-k building blocks over 64-bit candidate keys (see
// CandidateKey in select_plan.h: larger is better, 0 = empty, keys unique).
// Internal to kernels/cuda.
#ifndef PD_KERNELS_CUDA_BLOCK_TOPK_CUH_
#define PD_KERNELS_CUDA_BLOCK_TOPK_CUH_

#include <cstdint>

namespace pd::kernels::cuda::topk {

// Branch-free: negative scores flip every bit, others only the sign bit
// (the same values as select_plan.h's host OrderedScoreBits).
__device__ __forceinline__ uint32_t OrderedScoreBits(float f) {
  const uint32_t u = __float_as_uint(f + 0.0f);  // -0 -> +0
  const uint32_t ord = u ^ (uint32_t(int32_t(u) >> 31) | 0x80000000u);
  return f != f ? 0u : ord;
}
__device__ __forceinline__ uint64_t CandidateKey(float score, int32_t index) {
  return (uint64_t(OrderedScoreBits(score)) << 32) | uint64_t(~uint32_t(index));
}
__device__ __forceinline__ int32_t CandidateIndex(uint64_t key) {
  return int32_t(~uint32_t(key & 0xffffffffu));
}

// Scratch shared by the routines below (one per CTA).
struct Scratch {
  unsigned hist[256];
  unsigned digit, above, count;
  int write_pos;
  unsigned long long kmax, kmin;
};

// Warp-aggregated slot for this lane's item when `keep` (one shared atomic
// per warp instead of one per item: the survivors of a selection all hit
// one counter). All lanes of the warp must call it.
__device__ __forceinline__ int WarpAppendSlot(bool keep, int* counter) {
  const unsigned b = __ballot_sync(0xffffffffu, keep);
  const int lane = threadIdx.x & 31;
  int base = 0;
  if (lane == 0 && b != 0) base = atomicAdd(counter, __popc(b));
  base = __shfl_sync(0xffffffffu, base, 0);
  return base + __popc(b & ((1u << lane) - 1u));
}

// Returns T such that exactly k of the keys visited are >= T (k >= 1 and at
// most the number of non-zero keys). for_each(f) must call f(key) for each of
// this thread's keys; across the CTA every key is visited once. Zeros are
// ignored. All threads of the CTA must call it; it returns the same T to all.
//
// The digits start at the highest bit in which the keys differ (a first pass
// finds their max and min): the candidates of one query share their top bits,
// and a histogram over a shared byte would put every key in one bin (its
// shared-memory atomics serialise).
// kFindRange = false skips that first pass and starts at bit 63 (for callers
// that stream their keys from global memory, where a pass costs more than the
// contended histogram of the top byte).
template <bool kFindRange = true, class ForEach>
__device__ uint64_t RadixSelectKth(ForEach&& for_each, int k, Scratch& sc) {
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  if constexpr (!kFindRange) {
    uint64_t prefix = 0, mask = 0;
    unsigned rem = unsigned(k);
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = tid; i < 256; i += blockDim.x) sc.hist[i] = 0;
      __syncthreads();
      for_each([&](uint64_t x) {
        if (x != 0 && (x & mask) == prefix) atomicAdd(&sc.hist[unsigned(x >> shift) & 255u], 1u);
      });
      __syncthreads();
      if (tid < 32) {
        unsigned b[8], sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          b[j] = sc.hist[8 * lane + j];
          sum += b[j];
        }
        unsigned suf = sum;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const unsigned t = __shfl_down_sync(0xffffffffu, suf, o);
          if (lane + o < 32) suf += t;
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, suf >= rem);
        const int top = 31 - __clz(ballot);
        if (lane == top) {
          unsigned above = suf - sum;
          int d = 8 * lane;
          unsigned cnt = b[0];
#pragma unroll
          for (int j = 7; j >= 0; --j) {
            if (above + b[j] >= rem) {
              d = 8 * lane + j;
              cnt = b[j];
              break;
            }
            above += b[j];
          }
          sc.digit = unsigned(d);
          sc.above = above;
          sc.count = cnt;
        }
      }
      __syncthreads();
      const unsigned d = sc.digit, above = sc.above, cnt = sc.count;
      prefix |= uint64_t(d) << shift;
      mask |= uint64_t(0xff) << shift;
      rem -= above;
      __syncthreads();
      if (cnt == rem) break;
    }
    return prefix;
  }
  if (tid == 0) {
    sc.kmax = 0ull;
    sc.kmin = ~0ull;
  }
  __syncthreads();
  {
    uint64_t mx = 0, mn = ~0ull;
    for_each([&](uint64_t x) {
      if (x != 0) {
        mx = x > mx ? x : mx;
        mn = x < mn ? x : mn;
      }
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const uint64_t a = __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(mx), o);
      const uint64_t b = __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(mn), o);
      mx = a > mx ? a : mx;
      mn = b < mn ? b : mn;
    }
    if (lane == 0 && mx != 0) {
      atomicMax(&sc.kmax, static_cast<unsigned long long>(mx));
      atomicMin(&sc.kmin, static_cast<unsigned long long>(mn));
    }
  }
  __syncthreads();
  const uint64_t kmax = sc.kmax, kmin = sc.kmin;
  __syncthreads();  // sc.kmax / kmin may be reset by the next call
  if (kmax == kmin) return kmax;  // one distinct key (k == 1)
  const int hb = 63 - __clzll(static_cast<long long>(kmax ^ kmin));
  uint64_t mask = hb == 63 ? 0ull : (~0ull << (hb + 1));
  uint64_t prefix = kmax & mask;
  unsigned rem = unsigned(k);
  // Windows of 8 bits from hb down; the last one is clamped to bit 0 and may
  // overlap the previous (the overlapping bits of its digit equal the prefix,
  // since only keys matching the prefix are counted).
  for (int shift = hb - 7 > 0 ? hb - 7 : 0;; shift = shift - 8 > 0 ? shift - 8 : 0) {
    for (int i = tid; i < 256; i += blockDim.x) sc.hist[i] = 0;
    __syncthreads();
    for_each([&](uint64_t x) {
      if (x != 0 && (x & mask) == prefix) atomicAdd(&sc.hist[unsigned(x >> shift) & 255u], 1u);
    });
    __syncthreads();
    if (tid < 32) {
      unsigned b[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        b[j] = sc.hist[8 * lane + j];
        sum += b[j];
      }
      unsigned suf = sum;  // sum over lanes >= lane
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned t = __shfl_down_sync(0xffffffffu, suf, o);
        if (lane + o < 32) suf += t;
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, suf >= rem);
      const int top = 31 - __clz(ballot);  // highest lane whose suffix covers rem
      if (lane == top) {
        unsigned above = suf - sum;
        int d = 8 * lane;
        unsigned cnt = b[0];
#pragma unroll
        for (int j = 7; j >= 0; --j) {
          if (above + b[j] >= rem) {
            d = 8 * lane + j;
            cnt = b[j];
            break;
          }
          above += b[j];
        }
        sc.digit = unsigned(d);
        sc.above = above;
        sc.count = cnt;
      }
    }
    __syncthreads();
    const unsigned d = sc.digit, above = sc.above, cnt = sc.count;
    prefix |= uint64_t(d) << shift;
    mask |= uint64_t(0xff) << shift;
    rem -= above;
    __syncthreads();  // sc.hist is cleared by the next pass
    if (cnt == rem || shift == 0) break;  // every key matching the prefix is selected
  }
  return prefix;
}

// Sorts s[0, n) descending (n a power of two, <= 8192) with the whole CTA.
__device__ inline void BitonicSortDesc(uint64_t* s, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < (n >> 1); i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1));
        const int hi = lo + stride;
        const bool desc = (lo & size) == 0;
        const uint64_t a = s[lo], b = s[hi];
        if ((a < b) == desc) {
          s[lo] = b;
          s[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

__host__ __device__ constexpr int NextPow2(int n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

}  // namespace pd::kernels::cuda::topk

#endif  // PD_KERNELS_CUDA_BLOCK_TOPK_CUH_
