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
  // kWgmmaPair where heads is a multiple of 128 and experiment is 0 (over the
  // FP8 records even if bf16_rows is set: faster, same result; its default is
  // the persistent pair kernel with CTA-scope buffer waits, experiment 13),
  // else kWgmma.
  kAuto = 0,
  kWgmma = 1,    // Hopper: warp-specialised gather/dequantise + wgmma, 64 heads per CTA
  kMmaSync = 2,  // the first version: mma.sync m16n8k16, 64 heads per CTA, no pipelining
  // kWgmma with the two CTAs of a token's 64-head blocks 2k, 2k+1 in a cluster
  // of 2 sharing each block's gather and dequantisation (each CTA gathers half
  // the tokens and writes both CTAs' shared memory); heads a multiple of 128;
  // with bf16_rows each CTA copies half of every block's rows into both CTAs.
  kWgmmaPair = 3,
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
  // Optional, for prefill (kWgmma, kWgmmaPair; kAuto uses them only where it
  // picks kWgmma): the sequences' latents up-converted to bf16 rows by
  // LaunchUpconvertMlaCache; token i of sequence s is row bf16_row_start[s] + i.
  // The kernel then copies these 1152-byte rows (kWgmma: cp.async; kWgmmaPair:
  // through registers into both CTAs) instead of gathering and dequantising
  // the 656-byte records (the cache's num_tokens still bounds the indices).
  // Measured no faster than the FP8 records (docs/perf.md). 16-byte aligned.
  const uint16_t* bf16_rows = nullptr;      // [rows, kv_lora_rank + rope_dim] bf16
  const int64_t* bf16_row_start = nullptr;  // [num_seqs]; nullptr = every sequence at row 0
  // Benchmark-only (kWgmma: 0-10; kWgmmaPair: 0-25; kAuto with a non-zero
  // experiment means kWgmma); 0 = the default schedule. Timing only (results
  // meaningless): 1 / 9 = the producer only signals (no gather or
  // dequantisation: the consumers' time), 2 / 10 = the consumers only release
  // buffers (the producer's time), with the default / the named + prefetch
  // schedule (kWgmmaPair: 1 / 2 of the round-2 pair kernel, experiment 5's).
  // Explicit kWgmma schedules (valid results; mla_wgmma.cuh, Schedule): 3
  // plain (mbarriers; the default), 4 late P hand-over, 5 L2 prefetch, 6 named
  // barriers, 7 named + prefetch, 8 named + prefetch + late. kWgmmaPair (valid
  // results unless marked timing only): 3 the producer issues block 0's gather
  // before the Q staging ("early"), 4 L2 prefetch of the records (bf16 rows:
  // the rows) ahead of their loads, 5 = 3 + 4, all three with the round-1
  // hand-over (st.shared::cluster, proxy fences, cluster-scope release /
  // acquire); 6 the st.async hand-over alone, 7 st.async + early + prefetch, 8
  // timing only: 5's producer alone, 9 = 7 persistent (as many clusters as
  // fit, each looping over token pairs), 10 timing only: 7's producer alone,
  // 11 = 5 with CTA-scope buffer waits and releases, 12 timing only: 11's
  // producer alone, 13 = 11 persistent (the FP8 default, experiment 0, since
  // round 3), 14 = 5 with the seesaw consumers (each consumer warpgroup owns
  // half of O and computes S and the softmax of every other block), 15 = 11
  // with the seesaw consumers, 16 timing only: the seesaw consumers alone, 17
  // = 11 with the split producer (one group of producer warps per buffer, next
  // loads after the publish), 18 timing only: its producer alone, 19 = 11 with
  // the next block's loads issued after the publish, 20 timing only: its
  // producer alone, 21 = 19 persistent, 22 = 19 with the overlapped WG0 (Q K^T
  // and softmax of block b+1 during the P V of block b), 23 timing only: those
  // consumers alone, 24 = 22 persistent, 25 = 17 with the overlapped WG0
  // (14-25 measured slower than 13: docs/perf.md). With bf16_rows: 0, and with
  // kWgmmaPair also 2, 4 (= 0: the round-1 hand-over with the prefetch), 7
  // (st.async + prefetch) and 9 (7 persistent).
  int experiment = 0;
};
cudaError_t LaunchSparseMla(const SparseMlaParams& p, cudaStream_t stream,
                            const char** error = nullptr);

// Up-converts every token of the cache's sequences to a bf16 row (c_kv | k_pe,
// 576 values; exact: e4m3 times a power-of-two scale fits bf16) for the bf16
// prefill path of LaunchSparseMla: token i of sequence s -> row
// row_start[s] + i. One warp per token.
struct MlaUpconvertParams {
  MlaCacheBatch cache;
  int num_seqs = 1;
  const int64_t* row_start = nullptr;  // [num_seqs]; nullptr = 0 for every sequence
  int64_t max_tokens = 0;              // >= every num_tokens[s] (sizes the grid)
  uint16_t* rows = nullptr;            // [rows, kv_lora_rank + rope_dim] bf16, 16-byte aligned
};
cudaError_t LaunchUpconvertMlaCache(const MlaUpconvertParams& p, cudaStream_t stream,
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
