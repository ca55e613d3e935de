// The decode selection path: one 64-head query per sequence (decode_plan.h).
//
// 1. DecodeScoreKernel (grid: score_ctas x S, one warpgroup each): streams a
//    range of one sequence's keys (whole 64-key pages, or key-list rows
//    gathered one by one) through a 5-stage cp.async pipeline (the first
//    pages issued before the query tile is loaded) into SW128
//    tiles, scores each page with four m64n64k32 FP8 wgmma against the
//    query's 64 heads, sums w[j] * ReLU(.) over the heads in registers (two
//    quad shuffles), scales by the key's scale, and writes the ordered score
//    bits (uint32, 0 = no key) to the logits row. Each CTA also histograms the
//    top 12 bits of its scores in shared memory and adds the non-zero bins to
//    the sequence's global histogram.
// 2. DecodeTopkKernel (grid: topk_ctas x S, 512 threads): every CTA finds
//    from the histogram the bin tau that holds the k-th best key; it scans its
//    range of the logits row (two 16-byte loads ahead per thread), stages the
//    rows of bins above tau and of bin tau per warp in shared memory, and
//    flushes them (one atomic per flush) to the output row and to a candidate
//    list. The last CTA of a sequence
//    (ticket counter) selects the missing k - above keys exactly among the
//    candidates (block_topk.cuh's radix select over 64-bit candidate keys:
//    ties by lower key index), optionally sorts the row, and writes it.
// Exact as cpu::SelectTokens up to the FP8 tensor-core rounding of the scores.
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/block_topk.cuh"
#include "kernels/cuda/decode_select.h"
#include "kernels/cuda/ptx.cuh"

namespace pd::kernels::cuda {
namespace decode_internal {
namespace {

constexpr int kStages = 5;      // default: 5 stages, 3 CTAs per SM
constexpr int kStagesDeep = 8;  // experiment bit 4: 8 stages, 2 CTAs per SM
constexpr int kPageKeys = 64;

struct Args {
  const uint8_t* pool;
  const int32_t* page_table;
  int64_t page_table_stride;
  const int64_t* num_tokens;
  uint32_t page_bytes, scale_offset;
  const uint8_t* q8;
  const float* weights;
  const int64_t* positions;
  const int32_t* query_start;
  int heads;
  const int32_t* head_list;
  int masked_heads;
  const int32_t* key_list;
  const int32_t* key_list_len;
  int64_t key_list_stride;
  int topk;
  int sorted;
  int experiment;
  int64_t row_stride, rows_per_cta, topk_rows_per_cta, cand_cap;
  uint32_t* logits;
  int32_t* cand;
  uint32_t* hist;
  int32_t* counters;
  int32_t* out;
};

// Rows (keys, or key-list entries) of sequence seq's query t.
__device__ __forceinline__ int64_t RowCount(const Args& a, int seq, int64_t t) {
  int64_t n;
  if (a.key_list != nullptr) {
    n = a.key_list_len[seq];
  } else {
    const int64_t pos = a.positions[t];
    n = min(a.num_tokens[seq], pos + 1);
  }
  return n < 0 ? int64_t(0) : min(n, a.row_stride);
}

// Ordered score bits with 0 reserved for "no key": NaN (ordered 0) becomes 1,
// below every other score, as in CandidateKey.
__device__ __forceinline__ uint32_t StoredBits(float s) {
  const uint32_t u = topk::OrderedScoreBits(s);
  return u > 1u ? u : 1u;
}

template <int kStages>
struct alignas(1024) ScoreSmem {
  uint8_t q[64 * 128];                 // B operand (heads x 128), SW128
  uint8_t keys[kStages][kPageKeys * 128];  // A operands, SW128
  float kscale[kStages][kPageKeys];
  int32_t kvalid[kStages][kPageKeys];  // key-list rows: 1 = a visible key
  float w[64];
  unsigned hist[kDecodeBins];
};

template <int kStages, int kMinBlocks>
__global__ void __launch_bounds__(kDecodeScoreThreads, kMinBlocks)
    DecodeScoreKernel(const Args a) {
  using ScoreSmem = decode_internal::ScoreSmem<kStages>;
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  ScoreSmem& sm =
      *reinterpret_cast<ScoreSmem*>(smem_raw + ((1024u - (smem_base & 1023u)) & 1023u));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2, c4 = lane & 3;
  const int seq = blockIdx.y;
  const int64_t t = a.query_start[seq];
  if (a.query_start[seq + 1] <= t) return;
  const int64_t nrows = RowCount(a, seq, t);
  const int64_t rbeg = int64_t(blockIdx.x) * a.rows_per_cta;
  if (rbeg >= nrows) return;
  const int64_t rend = min(nrows, rbeg + a.rows_per_cta);
  const int n_it = int((rend - rbeg + kPageKeys - 1) / kPageKeys);
  const int64_t qpos = a.positions[t];
  const int64_t ntok = a.num_tokens[seq];
  const int32_t* klist =
      a.key_list != nullptr ? a.key_list + int64_t(seq) * a.key_list_stride : nullptr;
  const int32_t* ptab = a.page_table + int64_t(seq) * a.page_table_stride;

  const uint32_t keys_smem = ptx::SmemAddr(sm.keys[0]);
  const uint32_t kscale_smem = ptx::SmemAddr(sm.kscale[0]);
  auto load = [&](int stage, int it) {
    const int64_t r0 = rbeg + int64_t(it) * kPageKeys;
    if (it >= n_it) return;
    const uint32_t dst = keys_smem + uint32_t(stage * kPageKeys * 128);
    if (klist == nullptr) {
      // Whole page: thread tid copies 16-byte chunks tid + 128 j (row chunk / 8).
      const uint8_t* pg = a.pool + int64_t(ptab[r0 >> 6]) * int64_t(a.page_bytes);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int u = tid + kDecodeScoreThreads * j;
        ptx::CpAsync16(dst + ptx::Sw128Offset(uint32_t(u >> 3), uint32_t((u & 7) * 16)),
                       pg + u * 16);
      }
      if (tid < 16) {
        ptx::CpAsync16(kscale_smem + uint32_t(stage * kPageKeys * 4 + 16 * tid),
                       pg + a.scale_offset + 16 * tid);
      }
    } else {
      // Gathered rows: thread pair r copies key-list row r0 + r.
      const int r = tid >> 1, half = tid & 1;
      const int64_t i = r0 + r;
      int64_t key = i < rend ? int64_t(klist[i]) : -1;
      if (key >= ntok || key > qpos) key = -1;
      if (half == 0) sm.kvalid[stage][r] = key >= 0 ? 1 : 0;
      if (key >= 0) {
        const uint8_t* pg = a.pool + int64_t(ptab[key >> 6]) * int64_t(a.page_bytes);
        const int slot = int(key & 63);
        const uint8_t* src = pg + slot * 128 + half * 64;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          ptx::CpAsync16(dst + ptx::Sw128Offset(uint32_t(r), uint32_t((half * 4 + c) * 16)),
                         src + c * 16);
        }
        if (half == 0) {
          ptx::CpAsync4(kscale_smem + uint32_t((stage * kPageKeys + r) * 4),
                        pg + a.scale_offset + slot * 4);
        }
      }
    }
  };

  // The first pages are in flight before the setup (its query loads would
  // otherwise leave the CTA's first microsecond without key traffic).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    load(s, s);
    ptx::CpAsyncCommit();
  }
  // ---- the query tile, the head weights, the histogram ----
  for (int i = tid; i < kDecodeBins; i += kDecodeScoreThreads) sm.hist[i] = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int u = tid + kDecodeScoreThreads * j;  // 16-byte chunk: head u / 8, bytes 16 (u % 8)
    const int h = u >> 3, c = u & 7;
    const int4 v = *reinterpret_cast<const int4*>(a.q8 + (t * a.heads + h) * 128 + c * 16);
    *reinterpret_cast<int4*>(sm.q + ptx::Sw128Offset(uint32_t(h), uint32_t(c * 16))) = v;
  }
  if (tid < 64) {
    bool keep = true;
    if (a.masked_heads > 0) {
      keep = false;
      for (int e = 0; e < a.masked_heads; ++e) keep |= a.head_list[t * a.masked_heads + e] == tid;
    }
    sm.w[tid] = keep ? a.weights[t * a.heads + tid] : 0.0f;
  }
  ptx::FenceProxyAsync();
  __syncthreads();
  // Accumulator column 8 i + 2 c4 + e of this lane is head 8 i + 2 c4 + e.
  float wr[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    wr[2 * i] = sm.w[8 * i + 2 * c4];
    wr[2 * i + 1] = sm.w[8 * i + 2 * c4 + 1];
  }

  const uint32_t desc_a0 = ptx::Sw128DescLo(keys_smem);
  const uint32_t desc_b0 = ptx::Sw128DescLo(ptx::SmemAddr(sm.q));
  uint32_t* lrow = a.logits + int64_t(seq) * a.row_stride;
  for (int it = 0; it < n_it; ++it) {
    ptx::CpAsyncWait<kStages - 2>();
    ptx::FenceProxyAsync();
    __syncthreads();  // stage it landed for every thread; stage it - 1 is free
    load((it + kStages - 1) % kStages, it + kStages - 1);
    ptx::CpAsyncCommit();
    const int stage = it % kStages;
    float acc[32];
    const uint32_t da = desc_a0 + uint32_t(stage) * uint32_t((kPageKeys * 128) >> 4);
    ptx::WgmmaFence();
    ptx::WgmmaM64N64K32E4M3Zero(acc, ptx::Sw128DescFromLo(da), ptx::Sw128DescFromLo(desc_b0));
#pragma unroll
    for (int kk = 1; kk < 4; ++kk) {
      ptx::WgmmaM64N64K32E4M3(acc, ptx::Sw128DescFromLo(da + 2 * kk),
                              ptx::Sw128DescFromLo(desc_b0 + 2 * kk), 1);
    }
    ptx::WgmmaCommit();
    ptx::WgmmaWait<0>();
#pragma unroll
    for (int i = 0; i < 32; ++i) ptx::FenceOperand(acc[i]);
    // Rows 16 warp + g8 (h = 0) and + 8 (h = 1): d[4 i + 2 h + e].
    float s0a = 0.0f, s0b = 0.0f, s1a = 0.0f, s1b = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      s0a = fmaf(wr[2 * i], fmaxf(acc[4 * i], 0.0f), s0a);
      s0a = fmaf(wr[2 * i + 1], fmaxf(acc[4 * i + 1], 0.0f), s0a);
      s1a = fmaf(wr[2 * i], fmaxf(acc[4 * i + 2], 0.0f), s1a);
      s1a = fmaf(wr[2 * i + 1], fmaxf(acc[4 * i + 3], 0.0f), s1a);
      s0b = fmaf(wr[2 * i + 2], fmaxf(acc[4 * i + 4], 0.0f), s0b);
      s0b = fmaf(wr[2 * i + 3], fmaxf(acc[4 * i + 5], 0.0f), s0b);
      s1b = fmaf(wr[2 * i + 2], fmaxf(acc[4 * i + 6], 0.0f), s1b);
      s1b = fmaf(wr[2 * i + 3], fmaxf(acc[4 * i + 7], 0.0f), s1b);
    }
    float s0 = s0a + s0b, s1 = s1a + s1b;
    s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
    s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
    s0 += __shfl_xor_sync(0xffffffffu, s0, 2);
    s1 += __shfl_xor_sync(0xffffffffu, s1, 2);
    if (c4 < 2) {
      const int r = 16 * warp + g8 + 8 * c4;
      const int64_t i = rbeg + int64_t(it) * kPageKeys + r;
      if (i < rend) {
        const bool valid = klist == nullptr || sm.kvalid[stage][r] != 0;
        const float s = (c4 == 0 ? s0 : s1) * sm.kscale[stage][r];
        const uint32_t u = valid ? StoredBits(s) : 0u;
        lrow[i] = u;
        if (valid) atomicAdd(&sm.hist[u >> kDecodeBinShift], 1u);
      }
    }
  }
  __syncthreads();
  unsigned* gh = a.hist + int64_t(seq) * kDecodeBins;
  for (int i = tid; i < kDecodeBins; i += kDecodeScoreThreads) {
    const unsigned h = sm.hist[i];
    if (h != 0) atomicAdd(&gh[i], h);
  }
}

// Shared memory of the top-k kernel: the scan's staging and the candidate
// keys (last CTA) share one buffer; sel holds the row's selection.
constexpr int kStageCap = 256;
struct TopkSmem {
  union {
    int32_t stage[kDecodeTopkThreads / 32][2][kStageCap];  // scan: per-warp staging
    uint64_t cand[kDecodeSmemCand];                        // last CTA: the candidates
  };
  uint64_t sel[kSelectMaxTopk];
  topk::Scratch sc;
  unsigned wsum[kDecodeTopkThreads / 32];
  int tau, above, total, last, ncand;
};

__global__ void __launch_bounds__(kDecodeTopkThreads, kDecodeTopkCtasPerSm) DecodeTopkKernel(const Args a) {
  extern __shared__ __align__(16) uint8_t topk_smem_raw[];
  TopkSmem& sm = *reinterpret_cast<TopkSmem*>(topk_smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  constexpr int kT = kDecodeTopkThreads;
  const int seq = blockIdx.y;
  const int64_t t = a.query_start[seq];
  if (a.query_start[seq + 1] <= t) return;
  const int64_t nrows = RowCount(a, seq, t);
  const int k = a.topk;
  const uint32_t* lrow = a.logits + int64_t(seq) * a.row_stride;
  const int32_t* klist =
      a.key_list != nullptr ? a.key_list + int64_t(seq) * a.key_list_stride : nullptr;
  int32_t* cnt = a.counters + int64_t(seq) * kDecodeCounters;  // out fill, candidates, done
  int32_t* orow = a.out + t * k;
  int32_t* crow = a.cand + int64_t(seq) * a.cand_cap;

  // ---- tau: the bin of the k-th best key (thread tid holds bins 8 tid .. 8 tid + 7) ----
  static_assert(kDecodeBins == 8 * kT, "eight bins per thread");
  unsigned b[8], local = 0;
  {
    const uint4* gh = reinterpret_cast<const uint4*>(a.hist + int64_t(seq) * kDecodeBins) + 2 * tid;
    const uint4 x = __ldcg(gh), y = __ldcg(gh + 1);
    b[0] = x.x; b[1] = x.y; b[2] = x.z; b[3] = x.w;
    b[4] = y.x; b[5] = y.y; b[6] = y.z; b[7] = y.w;
#pragma unroll
    for (int j = 0; j < 8; ++j) local += b[j];
  }
  // Inclusive suffix sum over threads (higher threads hold higher bins).
  unsigned suf = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned v = __shfl_down_sync(0xffffffffu, suf, o);
    if (lane + o < 32) suf += v;
  }
  if (lane == 0) sm.wsum[warp] = suf;
  if (tid == 0) {
    sm.tau = -1;
    sm.sc.write_pos = 0;
  }
  __syncthreads();
  unsigned higher = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kT / 32; ++w) {
    const unsigned v = sm.wsum[w];
    total += v;
    if (w > warp) higher += v;
  }
  suf += higher;
  if (total > unsigned(k)) {
    const unsigned excl = suf - local;
    if (excl < unsigned(k) && suf >= unsigned(k)) {
      unsigned above = excl;
      int bin = 8 * tid;
#pragma unroll
      for (int j = 7; j >= 0; --j) {
        if (above + b[j] >= unsigned(k)) {
          bin = 8 * tid + j;
          break;
        }
        above += b[j];
      }
      sm.tau = bin;
      sm.above = int(above);
    }
  } else if (tid == 0) {
    sm.above = int(total);
  }
  __syncthreads();  // the histogram buffer is reused below
  const int tau = sm.tau, above = sm.above;
  const int m = int(min(total, unsigned(k)));
  const int need = m - above;

  // ---- scan: rows of bins above tau to the output, bin tau to the candidates ----
  // Each warp stages its rows in shared memory (kStageCap per kind) and
  // reserves global space with one atomic per flush, so the loads are not
  // serialised behind atomic round trips; each thread keeps two 16-byte
  // loads in flight ahead of the one it filters.
  {
    int32_t* st_hi = sm.stage[warp][0];
    int32_t* st_eq = sm.stage[warp][1];
    int fh = 0, fe = 0;  // warp-uniform fills
    const unsigned lt = (1u << lane) - 1u;
    auto flush = [&](int32_t* buf, int& fill, int32_t* counter, int32_t* dst, int64_t cap) {
      __syncwarp();
      int base = 0;
      if (lane == 0) base = atomicAdd(counter, fill);
      base = __shfl_sync(0xffffffffu, base, 0);
      for (int j = lane; j < fill; j += 32) {
        if (base + j < cap) dst[base + j] = buf[j];
      }
      fill = 0;
      __syncwarp();
    };
    const int64_t beg = int64_t(blockIdx.x) * a.topk_rows_per_cta;
    const int64_t end = min(nrows, beg + a.topk_rows_per_cta);
    constexpr int kStep = 4 * kT;  // rows per group (one uint4 per thread)
    auto load4 = [&](int64_t i) -> uint4 {
      return i < end ? __ldcs(reinterpret_cast<const uint4*>(lrow + i)) : make_uint4(0, 0, 0, 0);
    };
    uint4 v0 = load4(beg + 4 * tid), v1 = load4(beg + kStep + 4 * tid);
    for (int64_t i0 = beg; i0 < end; i0 += kStep) {
      const uint4 v2 = load4(i0 + 2 * kStep + 4 * tid);  // i % 4 == 0: aligned
      const int64_t i = i0 + 4 * tid;
      const uint32_t u[4] = {v0.x, v0.y, v0.z, v0.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool live = u[e] != 0 && i + e < end;
        const int bin = int(u[e] >> kDecodeBinShift);
        const bool hi = live && bin > tau, eq = live && bin == tau;
        const unsigned bh = __ballot_sync(0xffffffffu, hi);
        const unsigned be = __ballot_sync(0xffffffffu, eq);
        if (hi) st_hi[fh + __popc(bh & lt)] = int32_t(i + e);
        if (eq) st_eq[fe + __popc(be & lt)] = int32_t(i + e);
        fh += __popc(bh);
        fe += __popc(be);
      }
      if (fh > kStageCap - 128) flush(st_hi, fh, &cnt[0], orow, k);
      if (fe > kStageCap - 128) flush(st_eq, fe, &cnt[1], crow, a.cand_cap);
      v0 = v1;
      v1 = v2;
    }
    if (fh > 0) flush(st_hi, fh, &cnt[0], orow, k);
    if (fe > 0) flush(st_eq, fe, &cnt[1], crow, a.cand_cap);
  }
  __threadfence();  // this thread's output and candidate writes, before the ticket
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    sm.last = atomicAdd(&cnt[2], 1) == int(gridDim.x) - 1;
  }
  __syncthreads();
  if (!sm.last) return;
  __threadfence();

  // ---- the last CTA: the row's selection into sm.sel ----
  auto key_of = [&](int64_t i, uint32_t u) -> uint64_t {
    const int32_t idx = klist != nullptr ? __ldg(klist + i) : int32_t(i);
    return (uint64_t(u) << 32) | uint64_t(~uint32_t(idx));
  };
  // Unsorted rows of contiguous keys keep the positions the scan wrote (they
  // are the key indices); otherwise the row is gathered, converted, sorted.
  const bool gather = a.sorted || klist != nullptr;
  if (gather) {
    for (int j = tid; j < above; j += kT) {
      const int32_t i = __ldcg(orow + j);
      sm.sel[j] = key_of(i, __ldcg(lrow + i));
    }
  }
  if (need > 0) {
    const int ncand = *reinterpret_cast<volatile int*>(&cnt[1]);
    const bool in_smem = ncand <= kDecodeSmemCand && !(a.experiment & 12);
    const bool in_list = ncand <= a.cand_cap && !(a.experiment & 8);
    if (in_smem) {
      for (int j = tid; j < ncand; j += kT) {
        const int32_t i = __ldcg(crow + j);
        sm.cand[j] = key_of(i, __ldcg(lrow + i));
      }
      __syncthreads();
    }
    // Visits every candidate key once (zeros elsewhere), warp-uniformly.
    auto for_each = [&](auto&& f) {
      if (in_smem) {
        for (int j0 = 0; j0 < ncand; j0 += kT) {
          const int j = j0 + tid;
          f(j < ncand ? sm.cand[j] : 0ull);
        }
      } else if (in_list) {
        for (int j0 = 0; j0 < ncand; j0 += kT) {
          const int j = j0 + tid;
          uint64_t x = 0;
          if (j < ncand) {
            const int32_t i = __ldcg(crow + j);
            x = key_of(i, __ldcg(lrow + i));
          }
          f(x);
        }
      } else {
        // More candidates than the list holds (ties): the whole row again.
        for (int64_t i0 = 0; i0 < nrows; i0 += kT) {
          const int64_t i = i0 + tid;
          uint64_t x = 0;
          if (i < nrows) {
            const uint32_t u = __ldcg(lrow + i);
            if (u != 0 && int(u >> kDecodeBinShift) == tau) x = key_of(i, u);
          }
          f(x);
        }
      }
    };
    const uint64_t T = topk::RadixSelectKth<true>(for_each, need, sm.sc);
    for_each([&](uint64_t x) {
      const bool keep = x != 0 && x >= T;
      const int slot = topk::WarpAppendSlot(keep, &sm.sc.write_pos);
      if (keep && slot < need) {
        if (gather) {
          sm.sel[above + slot] = x;
        } else {
          orow[above + slot] = topk::CandidateIndex(x);
        }
      }
    });
  }
  __syncthreads();
  if (gather && a.sorted && m > 1) {
    const int n2 = topk::NextPow2(m);
    for (int j = m + tid; j < n2; j += kT) sm.sel[j] = 0ull;
    __syncthreads();
    topk::BitonicSortDesc(sm.sel, n2);
  }
  for (int j = gather ? tid : m + tid; j < k; j += kT) {
    orow[j] = j < m ? topk::CandidateIndex(sm.sel[j]) : -1;
  }
}

}  // namespace

template <int kSt>
int64_t DecodeScoreSmemBytes() { return int64_t(sizeof(ScoreSmem<kSt>)) + 1024; }
int64_t DecodeTopkSmemBytes() { return int64_t(sizeof(TopkSmem)); }

cudaError_t LaunchDecode(const Args& a, const DecodeSelectPlan& d, int num_seqs,
                         uint8_t* ws, cudaStream_t stream) {
  // Dynamic shared memory of both kernels, set once per process (as select_kernel*.cuh).
  static const cudaError_t attr_score = cudaFuncSetAttribute(
      DecodeScoreKernel<kStages, kDecodeScoreCtasPerSm>,
      cudaFuncAttributeMaxDynamicSharedMemorySize, int(DecodeScoreSmemBytes<kStages>()));
  static const cudaError_t attr_deep = cudaFuncSetAttribute(
      DecodeScoreKernel<kStagesDeep, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      int(DecodeScoreSmemBytes<kStagesDeep>()));
  if (attr_deep != cudaSuccess) return attr_deep;
  static const cudaError_t attr_topk = cudaFuncSetAttribute(
      DecodeTopkKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(DecodeTopkSmemBytes()));
  if (attr_score != cudaSuccess) return attr_score;
  if (attr_topk != cudaSuccess) return attr_topk;
  const bool score = !(a.experiment & 2), select = !(a.experiment & 1);
  // Histograms and counters (top-k alone keeps the histograms of the last scoring).
  const size_t zoff = score ? d.hist_offset : d.counters_offset;
  const size_t zbytes = score ? d.zero_bytes : size_t(num_seqs) * kDecodeCounters * 4;
  cudaError_t e = cudaMemsetAsync(ws + zoff, 0, zbytes, stream);
  if (e != cudaSuccess) return e;
  if (score) {
    const dim3 grid(unsigned(d.score_ctas), unsigned(num_seqs));
    if (a.experiment & 16) {
      DecodeScoreKernel<kStagesDeep, 2><<<grid, kDecodeScoreThreads,
                                          size_t(DecodeScoreSmemBytes<kStagesDeep>()), stream>>>(a);
    } else {
      DecodeScoreKernel<kStages, kDecodeScoreCtasPerSm><<<
          grid, kDecodeScoreThreads, size_t(DecodeScoreSmemBytes<kStages>()), stream>>>(a);
    }
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  if (select) {
    DecodeTopkKernel<<<dim3(unsigned(d.topk_ctas), unsigned(num_seqs)), kDecodeTopkThreads,
                       size_t(DecodeTopkSmemBytes()), stream>>>(a);
    e = cudaGetLastError();
  }
  return e;
}

}  // namespace decode_internal

bool DecodeShaped(const SelectParams& p) {
  return p.use_wgmma && p.rows_per_query == 64 && p.heads == 64 &&
         p.queries.max_queries_per_seq <= 1 && !p.key_list_per_query &&
         p.topk >= 1 && p.topk <= kSelectMaxTopk && p.num_splits == 0 &&
         (p.head_list == nullptr || p.masked_heads > 0);
}

bool UseDecodePath(const SelectParams& p) {
  if (p.kernel_version == 3) return true;
  return p.kernel_version == 0 && p.experiment == 0 && DecodeShaped(p);
}

cudaError_t PlanDecodeSelectLaunch(const SelectParams& p, int num_sms, SelectPlan* plan,
                                   const char** error) {
  if (!DecodeShaped(p)) {
    if (error != nullptr) {
      *error = "kernel_version 3 (decode path) needs wgmma, heads == rows_per_query == 64, one "
               "query per sequence, per-sequence key lists, topk <= 2048, no forced splits, "
               "no head_list unless masked";
    }
    return cudaErrorInvalidValue;
  }
  DecodePlanInput in;
  in.num_seqs = p.queries.num_seqs;
  in.max_rows = p.key_list != nullptr ? p.max_key_list_len : p.queries.max_context;
  in.num_sms = num_sms;
  SelectPlan sp;
  if (!PlanDecodeSelect(in, &sp.decode, error)) return cudaErrorInvalidValue;
  sp.rows_per_cta = 64;
  sp.queries_per_cta = 1;
  sp.groups_per_seq = 1;
  sp.splits = 1;
  sp.keys_per_split = sp.decode.row_stride;
  sp.lists_offset = sp.lists_bytes = sp.counts_offset = sp.counts_bytes = 0;
  sp.workspace_bytes = sp.decode.workspace_bytes;
  *plan = sp;
  return cudaSuccess;
}

cudaError_t LaunchDecodeSelect(const SelectParams& p, const SelectPlan& plan, void* workspace,
                               cudaStream_t stream, const char** error) {
  const DecodeSelectPlan& d = plan.decode;
  if (!d.enabled || !UseDecodePath(p) || !DecodeShaped(p) || plan.workspace_bytes < d.workspace_bytes ||
      d.row_stride < (p.key_list != nullptr ? p.max_key_list_len : p.queries.max_context)) {
    if (error != nullptr) *error = "plan does not match these parameters (call PlanSelectLaunch)";
    return cudaErrorInvalidValue;
  }
  if (p.queries.num_queries == 0) return cudaSuccess;
  uint8_t* ws = static_cast<uint8_t*>(workspace);
  decode_internal::Args a{};
  CopySharedSelectArgs(p, &a);
  a.topk = p.topk;
  a.sorted = p.sorted ? 1 : 0;
  a.experiment = p.kernel_version == 3 ? p.experiment : 0;
  a.row_stride = d.row_stride;
  a.rows_per_cta = d.rows_per_cta;
  a.topk_rows_per_cta = d.topk_rows_per_cta;
  a.cand_cap = d.cand_cap;
  a.logits = reinterpret_cast<uint32_t*>(ws + d.logits_offset);
  a.cand = reinterpret_cast<int32_t*>(ws + d.cand_offset);
  a.hist = reinterpret_cast<uint32_t*>(ws + d.hist_offset);
  a.counters = reinterpret_cast<int32_t*>(ws + d.counters_offset);
  a.out = p.out;
  return decode_internal::LaunchDecode(a, d, p.queries.num_seqs, ws, stream);
}

}  // namespace pd::kernels::cuda
