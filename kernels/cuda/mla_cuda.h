// CUDA (sm_90a) sparse MLA over the paged FP8 MLA cache (656-byte FlashMLA
// records for the V3.2 shapes): the cache write from the MLA projection and the
// sparse attention in absorbed (MQA) form over the indexer's selected tokens.
// CPU references: cpu::WriteMlaCache and cpu::SparseMlaAttention (kernels/mla.h).
// Pointers are device pointers; launchers take a stream, never allocate, and
// return cudaErrorInvalidValue (message in *error) on bad parameters.
#ifndef PD_KERNELS_CUDA_MLA_CUDA_H_
#define PD_KERNELS_CUDA_MLA_CUDA_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/kv_layout.h"

namespace pd::kernels::cuda {

// One layer's MLA latents for a batch of sequences.
struct MlaCacheBatch {
  const uint8_t* pool = nullptr;         // page p at pool + p * layout.MlaPageBytes()
  const int32_t* page_table = nullptr;   // [num_seqs, page_table_stride]
  int64_t page_table_stride = 0;
  const int64_t* num_tokens = nullptr;   // [num_seqs]; indices >= num_tokens are skipped
  KvLayout layout;                       // kv_lora_rank 512, rope_dim 64
};

// Kernel choice for LaunchSparseMla.
enum class SparseMlaImpl : int {
  kAuto = 0,     // kWgmma
  kWgmma = 1,    // Hopper: warp-specialised gather/dequantise + wgmma, 64 heads per CTA
  kMmaSync = 2,  // the first version: mma.sync m16n8k16, 64 heads per CTA, no pipelining
};

// Sparse attention for T query tokens x H heads (decode: a batch of requests
// with one or more tokens each; prefill: the chunk's tokens), per token t:
//   logit[h, i] = (q_abs[t,h] . c_kv[s_i] + q_pe[t,h] . k_pe[s_i]) * softmax_scale
//   p = softmax over the valid i (indices[t, i] >= 0); out[t,h] = sum_i p_i c_kv[s_i]
// The FP8 records are dequantised to bf16 in shared memory (scales are powers of
// two: exact); q and p are rounded to bf16; products accumulate in fp32 on the
// tensor cores. A token with no valid index gets out = 0 and lse = -inf.
// Every record a CTA gathers is dequantised once and used by its 64 heads.
// q_abs, q_pe and out must be 16-byte aligned.
struct SparseMlaParams {
  MlaCacheBatch cache;
  const float* q_abs = nullptr;          // [T, H, kv_lora_rank] fp32
  const float* q_pe = nullptr;           // [T, H, rope_dim] fp32
  const int32_t* query_seq = nullptr;    // [T] sequence of each token; nullptr = all 0
  const int32_t* indices = nullptr;      // [T, topk] token indices, -1 = none
  int64_t num_queries = 0;               // T (kMmaSync: at most 65535 per launch)
  int heads = 128;                       // H, a multiple of 64
  int topk = 2048;
  float softmax_scale = 1.0f;
  float* out = nullptr;                  // [T, H, kv_lora_rank] fp32
  float* lse = nullptr;                  // optional [T, H] natural-log sum-exp of the scaled logits
  SparseMlaImpl impl = SparseMlaImpl::kAuto;
  // Benchmark-only (kWgmma). 1 = the producer only signals (no gather or
  // dequantisation: the consumers' time), 2 = the consumers only release
  // buffers (the producer's time); results meaningless. 3..6 = explicit
  // schedules (valid results): 3 plain, 4 late P hand-over, 5 L2 prefetch of
  // the next block's records, 6 both (mla_wgmma.cuh, Schedule).
  int experiment = 0;
};
cudaError_t LaunchSparseMla(const SparseMlaParams& p, cudaStream_t stream,
                            const char** error = nullptr);

// cpu::WriteMlaCache for a batch: token t of sequence token_seq[t] at
// positions[t]: c_kv in groups of 128 -> e4m3 with ue8m0 scales, k_pe -> bf16.
struct MlaWriteParams {
  uint8_t* pool = nullptr;
  const int32_t* page_table = nullptr;   // [num_seqs, page_table_stride]
  int64_t page_table_stride = 0;
  KvLayout layout;
  const float* c_kv = nullptr;           // [T, kv_lora_rank]
  const float* k_pe = nullptr;           // [T, rope_dim]
  const int64_t* positions = nullptr;    // [T]
  const int32_t* token_seq = nullptr;    // [T]; nullptr = all sequence 0
  int64_t num_tokens = 0;
};
cudaError_t LaunchWriteMlaCache(const MlaWriteParams& p, cudaStream_t stream,
                                const char** error = nullptr);

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_MLA_CUDA_H_
