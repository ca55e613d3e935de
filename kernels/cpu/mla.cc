// MLA cache write/read and sparse absorbed-form attention, CPU backend
// (kernels/mla.h).
#include "kernels/mla.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/cpu/internal/check.h"
#include "kernels/cpu/internal/vec.h"
#include "kernels/numeric.h"

namespace pd::kernels::cpu {
namespace {

using internal::DecodeBf16;
using internal::DecodeFp8;
using internal::Dot;
using internal::Dot4;
using internal::EncodeFp8;
using internal::ExpShiftSum;

void CheckLayout(const char* fn, const KvLayout& l) {
  PD_KCHECK(l.kv_lora_rank > 0 && l.kv_lora_rank % kQuantGroup == 0,
            "%s: kv_lora_rank (%d) must be a positive multiple of %d", fn, l.kv_lora_rank,
            kQuantGroup);
  PD_KCHECK(l.rope_dim >= 0, "%s: negative rope_dim %d", fn, l.rope_dim);
}

// Byte address of token s's record (Byte: uint8_t or const uint8_t).
template <typename Byte>
inline Byte* Record(Byte* pool, const int32_t* page_table, const KvLayout& l, int64_t s) {
  const int32_t page = page_table[s / kPageTokens];
  return pool + size_t(page) * l.MlaPageBytes() + size_t(s % kPageTokens) * l.MlaTokenBytes();
}

// Decodes one record into dst[0, r) = c_kv and dst[r, r + rope) = k_pe.
inline void DecodeRecord(const uint8_t* rec, const KvLayout& l, float* dst) {
  const int r = l.kv_lora_rank;
  const int groups = l.MlaScaleCount();
  for (int g = 0; g < groups; ++g) {
    float s;
    std::memcpy(&s, rec + l.MlaScaleOffset() + 4 * size_t(g), 4);
    DecodeFp8(rec + size_t(g) * kQuantGroup, kQuantGroup, s, dst + g * kQuantGroup);
  }
  uint16_t pe[512];
  const uint8_t* pe_bytes = rec + l.MlaRopeOffset();
  for (int d0 = 0; d0 < l.rope_dim; d0 += 512) {
    const int cnt = std::min(512, l.rope_dim - d0);
    std::memcpy(pe, pe_bytes + 2 * size_t(d0), 2 * size_t(cnt));
    DecodeBf16(pe, cnt, dst + r + d0);
  }
}

// Tokens dequantised per online-softmax step.
constexpr int kChunk = 32;

struct AttnScratch {
  std::vector<float> kv;      // [kChunk, r + rope]
  std::vector<float> q;       // [G, r + rope]: q_abs | q_pe per head
  std::vector<float> acc;     // [G, r]
  std::vector<float> logits;  // [G, kChunk]
  std::vector<float> mx;      // [G]
  std::vector<float> sum;     // [G]
};

}  // namespace

void WriteMlaCache(const MlaCacheRef& cache, const float* c_kv, const float* k_pe,
                   const int64_t* positions, int64_t num_tokens) {
  const KvLayout& l = cache.layout;
  CheckLayout("WriteMlaCache", l);
  if (num_tokens <= 0) return;
  PD_KCHECK(cache.pool != nullptr && cache.page_table != nullptr,
            "WriteMlaCache: null pool or page table");
  const int r = l.kv_lora_rank;
  const int rope = l.rope_dim;
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t pos = positions[t];
    PD_KCHECK(pos >= 0, "WriteMlaCache: token %lld has negative position %lld",
              static_cast<long long>(t), static_cast<long long>(pos));
    PD_KCHECK(cache.page_table[pos / kPageTokens] >= 0,
              "WriteMlaCache: position %lld maps to an unassigned page",
              static_cast<long long>(pos));
    uint8_t* rec = Record(cache.pool, cache.page_table, l, pos);
    const float* x = c_kv + t * r;
    for (int g = 0; g < l.MlaScaleCount(); ++g) {
      const float* xg = x + g * kQuantGroup;
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int i = 0; i < kQuantGroup; ++i) amax = std::max(amax, std::fabs(xg[i]));
      const float s = Fp8Scale(amax, /*ue8m0=*/true);
      EncodeFp8(xg, kQuantGroup, s, rec + g * kQuantGroup);
      std::memcpy(rec + l.MlaScaleOffset() + 4 * size_t(g), &s, 4);
    }
    const float* pe = k_pe + t * rope;
    uint8_t* pe_bytes = rec + l.MlaRopeOffset();
    for (int i = 0; i < rope; ++i) {
      const uint16_t b = FloatToBf16(pe[i]);
      std::memcpy(pe_bytes + 2 * size_t(i), &b, 2);
    }
  }
}

void ReadMlaToken(const MlaCacheView& cache, int64_t s, float* c_kv, float* k_pe) {
  const KvLayout& l = cache.layout;
  CheckLayout("ReadMlaToken", l);
  PD_KCHECK(s >= 0 && s < cache.num_tokens, "ReadMlaToken: token %lld outside [0, %lld)",
            static_cast<long long>(s), static_cast<long long>(cache.num_tokens));
  PD_KCHECK(cache.pool != nullptr && cache.page_table != nullptr,
            "ReadMlaToken: null cache pool or page table");
  const uint8_t* rec = Record(cache.pool, cache.page_table, l, s);
  for (int g = 0; g < l.MlaScaleCount(); ++g) {
    float sc;
    std::memcpy(&sc, rec + l.MlaScaleOffset() + 4 * size_t(g), 4);
    DecodeFp8(rec + size_t(g) * kQuantGroup, kQuantGroup, sc, c_kv + g * kQuantGroup);
  }
  for (int i = 0; i < l.rope_dim; ++i) {
    uint16_t b;
    std::memcpy(&b, rec + l.MlaRopeOffset() + 2 * size_t(i), 2);
    k_pe[i] = Bf16ToFloat(b);
  }
}

void SparseMlaAttention(const MlaCacheView& cache, const float* q_abs, const float* q_pe,
                        int64_t num_queries, int heads, const int32_t* indices, int topk,
                        float softmax_scale, float* out, float* lse, ThreadPool* pool) {
  const KvLayout& l = cache.layout;
  CheckLayout("SparseMlaAttention", l);
  PD_KCHECK(heads > 0, "SparseMlaAttention: heads must be positive, got %d", heads);
  PD_KCHECK(topk >= 0, "SparseMlaAttention: negative topk %d", topk);
  if (num_queries <= 0) return;
  PD_KCHECK(q_abs != nullptr && q_pe != nullptr && indices != nullptr && out != nullptr,
            "SparseMlaAttention: null q_abs, q_pe, indices or out");
  PD_KCHECK(topk == 0 || (cache.pool != nullptr && cache.page_table != nullptr),
            "SparseMlaAttention: null cache pool or page table");
  const int r = l.kv_lora_rank;
  const int rope = l.rope_dim;
  const int width = r + rope;

  // Work units: (query, group of heads). All heads of a query share one unit
  // (one dequantisation per token) unless there are too few queries to keep
  // the pool busy.
  const int threads = pool ? pool->num_threads() : 1;
  int groups = 1;
  if (threads > 1 && num_queries < 4 * threads) {
    groups = int(std::min<int64_t>(heads, CeilDiv(4 * threads, num_queries)));
  }
  const int per_group = int(CeilDiv(heads, groups));
  groups = int(CeilDiv(heads, per_group));

  const size_t record_bytes = l.MlaTokenBytes();
  ParallelFor(pool, num_queries * groups, 1, [&](int64_t begin, int64_t end) {
    thread_local AttnScratch s;
    s.kv.resize(size_t(kChunk) * width);
    s.q.resize(size_t(per_group) * width);
    s.acc.resize(size_t(per_group) * r);
    s.logits.resize(size_t(per_group) * kChunk);
    s.mx.resize(size_t(per_group));
    s.sum.resize(size_t(per_group));
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t t = unit / groups;
      const int h0 = int(unit % groups) * per_group;
      const int nh = std::min(per_group, heads - h0);
      for (int g = 0; g < nh; ++g) {
        const int64_t qh = t * heads + h0 + g;
        std::memcpy(s.q.data() + size_t(g) * width, q_abs + qh * r, size_t(r) * 4);
        std::memcpy(s.q.data() + size_t(g) * width + r, q_pe + qh * rope, size_t(rope) * 4);
      }
      std::fill(s.acc.begin(), s.acc.begin() + int64_t(nh) * r, 0.0f);
      float* mxp = s.mx.data();    // running max of each head's scaled logits
      float* sump = s.sum.data();  // running sum of exp(logit - max)
      for (int g = 0; g < nh; ++g) {
        mxp[g] = -std::numeric_limits<float>::infinity();
        sump[g] = 0.0f;
      }
      const int32_t* idx = indices + t * topk;
      // Collects the next (up to kChunk) valid records from slot i on and
      // prefetches them: the records are scattered over the pool, and the
      // prefetch of chunk k+1 overlaps the work on chunk k.
      int i = 0;
      auto gather = [&](const uint8_t** recs) {
        int n = 0;
        for (; i < topk && n < kChunk; ++i) {
          const int32_t tok = idx[i];
          if (tok < 0) continue;
          PD_KCHECK(tok < cache.num_tokens,
                    "SparseMlaAttention: query %lld index %d = %d outside the cache's %lld "
                    "tokens",
                    static_cast<long long>(t), i, tok, static_cast<long long>(cache.num_tokens));
          const uint8_t* rec = Record(cache.pool, cache.page_table, l, tok);
          for (size_t off = 0; off < record_bytes; off += 64) __builtin_prefetch(rec + off);
          recs[n++] = rec;
        }
        return n;
      };
      const uint8_t* cur[kChunk];
      const uint8_t* next[kChunk];
      int n = gather(cur);
      while (n > 0) {
        const int n_next = gather(next);
        for (int c = 0; c < n; ++c) DecodeRecord(cur[c], l, s.kv.data() + size_t(c) * width);
        for (int g = 0; g < nh; ++g) {
          const float* qg = s.q.data() + size_t(g) * width;
          float* lg = s.logits.data() + size_t(g) * kChunk;
          int c = 0;
          for (; c + 4 <= n; c += 4) Dot4(qg, s.kv.data() + size_t(c) * width, width, width, lg + c);
          for (; c < n; ++c) lg[c] = Dot(qg, s.kv.data() + size_t(c) * width, width);
          float cmax = -std::numeric_limits<float>::infinity();
          for (c = 0; c < n; ++c) {
            lg[c] *= softmax_scale;
            cmax = std::max(cmax, lg[c]);
          }
          const float new_max = std::max(mxp[g], cmax);
          float* __restrict acc = s.acc.data() + size_t(g) * r;
          if (new_max > mxp[g]) {
            const float f = std::exp(mxp[g] - new_max);  // 0 on the first chunk
            sump[g] *= f;
#pragma omp simd
            for (int d = 0; d < r; ++d) acc[d] *= f;
            mxp[g] = new_max;
          }
          sump[g] += ExpShiftSum(lg, n, new_max);
          // acc += sum_c p_c * c_kv[c], four tokens per pass over acc.
          const float* kv = s.kv.data();
          for (c = 0; c + 4 <= n; c += 4) {
            const float p0 = lg[c], p1 = lg[c + 1], p2 = lg[c + 2], p3 = lg[c + 3];
            const float* __restrict k0 = kv + size_t(c) * width;
            const float* __restrict k1 = k0 + width;
            const float* __restrict k2 = k1 + width;
            const float* __restrict k3 = k2 + width;
#pragma omp simd
            for (int d = 0; d < r; ++d) acc[d] += p0 * k0[d] + p1 * k1[d] + p2 * k2[d] + p3 * k3[d];
          }
          for (; c < n; ++c) {
            const float p = lg[c];
            const float* __restrict kc = kv + size_t(c) * width;
#pragma omp simd
            for (int d = 0; d < r; ++d) acc[d] += p * kc[d];
          }
        }
        std::copy(next, next + n_next, cur);
        n = n_next;
      }
      for (int g = 0; g < nh; ++g) {
        const int64_t qh = t * heads + h0 + g;
        float* o = out + qh * r;
        if (sump[g] > 0.0f) {
          const float inv = 1.0f / sump[g];
          const float* acc = s.acc.data() + size_t(g) * r;
#pragma omp simd
          for (int d = 0; d < r; ++d) o[d] = acc[d] * inv;
          if (lse) lse[qh] = mxp[g] + std::log(sump[g]);
        } else {
          std::fill(o, o + r, 0.0f);
          if (lse) lse[qh] = -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

}  // namespace pd::kernels::cpu
