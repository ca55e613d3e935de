// Multi-head latent attention over the paged FP8 MLA cache (656-byte FlashMLA
// records for the V3.2 shapes): cache write and sparse attention in absorbed
// (MQA) form. CPU reference backend.
#ifndef PD_KERNELS_MLA_H_
#define PD_KERNELS_MLA_H_

#include <cstdint>

#include "kernels/cpu/parallel.h"
#include "kernels/kv_layout.h"

namespace pd::kernels {

// One sequence's MLA latents for one layer.
struct MlaCacheView {
  const uint8_t* pool = nullptr;        // page p at pool + p * layout.MlaPageBytes()
  const int32_t* page_table = nullptr;  // [NumPages(num_tokens)]
  int64_t num_tokens = 0;
  KvLayout layout;
};

struct MlaCacheRef {
  uint8_t* pool = nullptr;
  const int32_t* page_table = nullptr;
  KvLayout layout;
};

namespace cpu {

// Writes T tokens at positions[t]: c_kv [T, r] quantised to e4m3 in groups of
// 128 with ue8m0 scales, k_pe [T, rope] rounded to bf16.
void WriteMlaCache(const MlaCacheRef& cache, const float* c_kv, const float* k_pe,
                   const int64_t* positions, int64_t num_tokens);

// Dequantised token s: c_kv [r], k_pe [rope].
void ReadMlaToken(const MlaCacheView& cache, int64_t s, float* c_kv, float* k_pe);

// Sparse attention in absorbed form for T queries x Hm heads:
//   logit[t,h,i] = (q_abs[t,h] . c_kv[s_i] + q_pe[t,h] . k_pe[s_i]) * softmax_scale
//   p = softmax over the valid i (indices[t, i] >= 0); out[t,h] = sum_i p_i c_kv[s_i].
// q_abs: [T, Hm, r]; q_pe: [T, Hm, rope]; indices: [T, topk]; out: [T, Hm, r];
// lse (optional): [T, Hm] natural-log sum-exp of the scaled logits. A query with no
// valid index gets out = 0 and lse = -inf.
void SparseMlaAttention(const MlaCacheView& cache, const float* q_abs, const float* q_pe,
                        int64_t num_queries, int heads, const int32_t* indices, int topk,
                        float softmax_scale, float* out, float* lse, ThreadPool* pool);

}  // namespace cpu
}  // namespace pd::kernels

#endif  // PD_KERNELS_MLA_H_
