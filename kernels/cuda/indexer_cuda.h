// CUDA (sm_90a) kernels of the DSA lightning indexer and its sparse selection
// modes: the fused indexer preparation, pooled-key summaries, the MISA router,
// and the selection kernel (FP8 tensor-core scoring with the top-k fused into
// it: no [queries x keys] logits reach device memory, except on the decode
// path, one query per sequence, which writes [S, K] score bits into the
// workspace and selects with a multi-CTA top-k). The CPU reference
// of every kernel is in kernels/indexer.h (namespace pd::kernels::cpu); the
// formulas are in ../shared/docs/algorithms.md sections 3-5.
//
// Conventions (FlashInfer/FlashMLA style): one plain Params struct per kernel
// family, all pointers are DEVICE pointers with their shape in the comment,
// launchers take an explicit stream, never allocate, and return cudaSuccess or
// cudaErrorInvalidValue (bad parameters; the message is in *error when given)
// or the launch's error. Sizes are host values.
#ifndef PD_KERNELS_CUDA_INDEXER_CUDA_H_
#define PD_KERNELS_CUDA_INDEXER_CUDA_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/cuda/select_plan.h"
#include "kernels/kv_layout.h"

namespace pd::kernels::cuda {

// One layer's indexer keys for a batch of sequences. Keys of sequence b are
// tokens [0, num_tokens[b]) in its page table row.
struct IndexKeyBatch {
  const uint8_t* pool = nullptr;         // layer pool; page p at pool + p * layout.IndexPageBytes()
  const int32_t* page_table = nullptr;   // [num_seqs, page_table_stride] page ids
  int64_t page_table_stride = 0;         // entries per row (>= NumPages(longest sequence))
  const int64_t* num_tokens = nullptr;   // [num_seqs] keys present
  const float* summary_sums = nullptr;   // [num_seqs, summary_stride, D] fp32 block sums (MISA)
  int64_t summary_stride = 0;            // blocks per sequence row of summary_sums
  KvLayout layout;                       // index_head_dim must be 128
};

// Prepared queries of a batch of sequences; the queries of sequence b are the
// rows [query_start[b], query_start[b+1]) of q8 / weights / positions.
struct IndexQueryBatch {
  const uint8_t* q8 = nullptr;           // [T, H, D] e4m3, Hadamard-rotated, one scale per head
  const float* weights = nullptr;        // [T, H] (x W_proj) * H^-0.5 * q_scale * D^-0.5
  const int64_t* positions = nullptr;    // [T]; query t sees keys [0, positions[t]]
  const int32_t* query_start = nullptr;  // [num_seqs + 1], query_start[0] == 0
  int64_t num_queries = 0;               // T
  int num_seqs = 1;
  int64_t max_queries_per_seq = 0;       // host bound (grid size)
  int64_t max_context = 0;               // host bound on num_tokens[b] (grid size)
};

// ---------------------------------------------------------------------------
// Selection: for each query t, the top-k keys s <= positions[t] by
//   I[t, s] = k_scale[s] * sum_{j in heads(t)} w[t, j] * ReLU(q8[t, j] . k8[s])
// where heads(t) is all H heads (dense DSA) or the routed heads head_list[t, :]
// (MISA). Rows of `out` hold min(topk, visible keys) indices then -1, sorted
// by score descending (ties: lower index, the order of cpu::SelectTokens) when
// `sorted`, otherwise as a set in unspecified order.
struct SelectParams {
  IndexKeyBatch keys;
  IndexQueryBatch queries;
  int heads = 64;                        // H (row stride of q8 / weights)
  int head_dim = 128;                    // D, must be 128
  int rows_per_query = 64;               // G: H (dense) or h (MISA); 8, 16, 32 or 64
  const int32_t* head_list = nullptr;    // [T, G] head ids per query; nullptr = heads 0..G-1
  // Masked MISA (for decode, where one query's h rows cannot fill a tile): when
  // > 0, rows_per_query must equal heads, head_list is [T, masked_heads] and the
  // weights of the heads not listed are zeroed, which gives MISA's routed score
  // at the dense kernel's cost.
  int masked_heads = 0;
  const int32_t* key_list = nullptr;     // optional [num_seqs, key_list_stride] candidate keys
  const int32_t* key_list_len = nullptr; //   [num_seqs] valid entries (distinct keys >= 0, any order)
  int64_t key_list_stride = 0;
  int64_t max_key_list_len = 0;          //   host bound (replaces max_context for the split)
  // Key lists per query instead of per sequence: key_list is [T, key_list_stride]
  // and key_list_len [T] (MISA-dagger's and HISA's second stage). Needs
  // rows_per_query == 64 (one query per CTA) and kernel_version 0 or 2.
  bool key_list_per_query = false;
  int topk = 2048;                       // <= 2048; up to 8192 with kernel_version 0 or 2,
                                         // no key list, sorted == false (one split)
  bool sorted = false;
  int num_splits = 0;                    // 0 = choose (PlanSelect)
  bool use_wgmma = true;                 // false: mma.sync m16n8k32 fallback (version 1, same results)
  // 2: permuted columns (in-thread head sums), warp-partitioned lists, lean
  // 32-bit epilogue (select_kernel_v2.cuh); 1: the first kernel
  // (select_kernel.cuh; also the mma.sync path); 0: choose by measurement
  // (2 with wgmma, 1 with mma.sync; docs/perf.md; and the decode path below
  // for decode-shaped launches). 3: the decode path (kernels/cuda/
  // decode_select.cu), which version 0 takes when the launch has one query per
  // sequence (max_queries_per_seq <= 1), rows_per_query == heads == 64 (dense,
  // or masked MISA), contiguous keys or per-sequence key lists, topk <= 2048,
  // wgmma, num_splits == 0 and experiment == 0: a memory-bound wgmma scoring
  // kernel writes ordered fp32 score bits [S, K] into the workspace (4 bytes
  // per key: a decode-only choice, the prefill paths keep the fused top-k),
  // then an exact multi-CTA radix top-k per sequence. Other launches with
  // version 3 are rejected.
  int kernel_version = 0;
  // Benchmark-only knobs of kernel version 2 (0 in production; results are
  // wrong with bits 0-1): bit 0 skips the epilogue (MMA + pipeline alone),
  // bit 1 scores but never inserts a candidate, bit 3 double-buffers the
  // accumulators (MMA of stage n+1 in flight during the epilogue of n; 1 CTA
  // per SM, 4 stages), bit 2 the same with 6 stages, bit 4 turns the
  // threshold seeding off (SelectSeedTopk; it is used with fewer than 64 rows
  // per query), bit 5 seeds from a rank k / (4 kSelectSampleStride) that too
  // few keys beat, so that every seeded query takes the exact fallback (a test
  // of that path), bit 6 branches around a score slot's store code when no
  // lane of the warp passes (round 4's loop; the default is branch-free), bit
  // 7 selects each query's final top-k with the whole CTA, one query at a
  // time (round 4's; the default with fewer than 64 rows per query is one
  // warp per query), bit 8 synchronises the whole CTA at every stage (round
  // 4; the default since round 5 synchronises each warpgroup with itself and
  // the CTA every 4 stages), bit 9 (512) loads the key stages of the full
  // pass over contiguous keys by TMA from one producer lane per warpgroup
  // (round 6 experiment; the default copies them with cp.async in every
  // thread), bit 10 (1024) does the same and splits each stage's MMA of the
  // 128-row tile into two N = 64 halves, the epilogue starting on the first,
  // bit 11 (2048) starts the per-warp final selection (round 7) from a lower
  // bound that no key reaches, so that every query with more than k entries
  // takes its restart from the list's range (a test of that path), bit 12
  // (4096) launches the query groups in ascending order (round 6's; the
  // default since round 7 starts the last, longest ones first).
  // Bits 2-12 give the same results as 0.
  // With kernel_version 3 (the decode path): bit 0 scores only (out is not
  // written), bit 1 runs the top-k alone on the logits and histograms the last
  // launch left in the same workspace, bit 2 selects the last bin's candidates
  // from their global list instead of shared memory, bit 3 from a rescan of
  // the whole logits row, bit 4 scores with 8 pipeline stages and 2 CTAs per
  // SM instead of 5 and 3 (bits 2-4 give the same results as 0).
  int experiment = 0;
  int32_t* out = nullptr;                // [T, topk]
};

// Plans a selection launch; the workspace must be plan.workspace_bytes.
cudaError_t PlanSelectLaunch(const SelectParams& p, SelectPlan* plan, const char** error);
// Runs the selection (scoring + fused top-k; plus the split merge when the plan
// splits the key axis). workspace: device memory of plan.workspace_bytes.
cudaError_t LaunchSelect(const SelectParams& p, const SelectPlan& plan, void* workspace,
                         cudaStream_t stream, const char** error = nullptr);

// ---------------------------------------------------------------------------
// MISA router: r[t, j] = |w[t, j]| * sum_{b <= positions[t] / B, b < M} ReLU(q8[t, j] . kbar[b]),
// kbar[b] = summary_sums[b] / BlockCount(b), M = ceil(num_tokens / B); then the
// top-h heads of r[t, :] (ties: lower index) in ascending head order. The dot
// products run on bf16 tensor cores with kbar split into bf16 hi + lo parts
// (about 16 mantissa bits), accumulated in fp32.
struct RouterParams {
  IndexKeyBatch keys;                    // summary_sums and num_tokens are read
  IndexQueryBatch queries;
  int heads = 64;                        // H, multiple of 16 and <= 64
  int head_dim = 128;                    // must be 128
  int active_heads = 8;                  // h <= H
  int32_t* active = nullptr;             // [T, h] out
  float* scores = nullptr;               // optional [T, H] out: r
};
cudaError_t LaunchMisaRouter(const RouterParams& p, cudaStream_t stream,
                             const char** error = nullptr);

// ---------------------------------------------------------------------------
// Pooled-summary block filter (decode: MISA's heads + HISA's token cut): for each
// sequence, block scores bs[b] = sum_{j in heads(q)} w[q, j] * ReLU(q8[q, j] . kbar[b])
// maximised over the sequence's queries q, over the visible blocks; keeps the
// first and the last visible block and the best others, keep_blocks in all,
// and writes their keys (ascending) as a key list for SelectParams.
struct BlockFilterParams {
  IndexKeyBatch keys;
  IndexQueryBatch queries;
  int heads = 64;
  int head_dim = 128;
  int rows_per_query = 8;                // heads used per query
  const int32_t* head_list = nullptr;    // [T, rows_per_query]; nullptr = heads 0..rows-1
  int keep_blocks = 8;                   // blocks kept per sequence (<= 1024)
  int32_t* key_list = nullptr;           // [num_seqs, key_list_stride] out
  int32_t* key_list_len = nullptr;       // [num_seqs] out
  int64_t key_list_stride = 0;           // >= keep_blocks * B
};
cudaError_t LaunchBlockFilter(const BlockFilterParams& p, cudaStream_t stream,
                              const char** error = nullptr);

// ---------------------------------------------------------------------------
// HISA's block filter for prefill (cpu::SelectTokens, mode hisa, first half):
// per query t, block scores over its visible blocks b <= positions[t] / hisa_block,
//   bs[b] = sum_{j < 64} w[t, j] * ReLU(q8[t, j] . mean_b),  mean_b = block_sums[b] / BlockCount(b),
// (bf16 hi + lo tensor cores, fp32 accumulation); keeps the first and the last
// visible block and the best others (score descending, ties: lower block),
// keep_blocks in all (both ends even when keep_blocks < 2), and writes the
// kept blocks' keys, ascending, as query t's key list.
struct HisaBlockParams {
  IndexQueryBatch queries;
  const int64_t* num_tokens = nullptr;   // [num_seqs] keys present
  const float* block_sums = nullptr;     // [num_seqs, block_stride, 128] fp32 sums of the
                                         // dequantised keys per hisa_block tokens
  int64_t block_stride = 0;
  // Optional [num_seqs, block_stride, 128] bf16 hi / lo parts of the block
  // means (LaunchBlockMeansBf16); when null every CTA derives them from
  // block_sums (the same values, more work per CTA).
  const uint16_t* means_hi = nullptr;
  const uint16_t* means_lo = nullptr;
  int heads = 64;                        // must be 64
  int head_dim = 128;                    // must be 128
  int hisa_block = 128;
  int keep_blocks = 64;
  int32_t* key_list = nullptr;           // [T, key_list_stride] out
  int32_t* key_list_len = nullptr;       // [T] out
  int64_t key_list_stride = 0;           // >= keep_blocks * hisa_block
};
cudaError_t LaunchHisaBlocks(const HisaBlockParams& p, cudaStream_t stream,
                             const char** error = nullptr);
// hi[b] = bf16(m), lo[b] = bf16(m - hi) of the block means m = sums[b] / BlockCount(b)
// (zero past num_tokens), per sequence: [num_seqs, block_stride, 128].
cudaError_t LaunchBlockMeansBf16(const float* sums, int64_t block_stride, const int64_t* num_tokens,
                                int num_seqs, int block, uint16_t* hi, uint16_t* lo,
                                cudaStream_t stream, const char** error = nullptr);

// ---------------------------------------------------------------------------
// Two-stage prefill selections (cpu::SelectTokens modes misa_dagger and hisa):
//   MISA-dagger: top-C keys by the routed score (SelectParams with the routed
//     heads, topk = C), then the exact DSA score of those C keys with all H
//     heads (per-query key lists), top-k.
//   HISA: 128-token block sums (LaunchUpdateSummaries), LaunchHisaBlocks, then
//     the exact DSA score of the kept blocks' keys with all H heads, top-k.
// Needs H = 64 (the second stage takes one 64-head query per CTA). Rows of
// `out` as SelectParams (set or sorted).
enum class TwoStageMode { kMisaDagger, kHisa };
struct TwoStageParams {
  TwoStageMode mode = TwoStageMode::kMisaDagger;
  IndexKeyBatch keys;
  IndexQueryBatch queries;
  int heads = 64;
  int head_dim = 128;
  int topk = 2048;                       // <= 2048
  bool sorted = false;
  int misa_heads = 8;                    // h (MISA-dagger)
  const int32_t* head_list = nullptr;    // [T, misa_heads] routed heads (LaunchMisaRouter)
  int dagger_candidates = 8192;          // C, in [topk, 8192]
  int hisa_block = 128;
  int hisa_topk_blocks = 64;
  int32_t* out = nullptr;                // [T, topk]
};
struct TwoStagePlan {
  SelectPlan stage1;                     // MISA-dagger's routed top-C
  SelectPlan stage2;                     // exact re-score of the per-query key lists
  int64_t list_stride = 0;               // key-list entries per query
  int64_t block_stride = 0;              // HISA block sums per sequence
  size_t list_offset = 0, len_offset = 0, sums_offset = 0, zeros_offset = 0, select_offset = 0;
  size_t means_offset = 0;               // HISA bf16 hi then lo block means
  size_t workspace_bytes = 0;
};
cudaError_t PlanTwoStageLaunch(const TwoStageParams& p, TwoStagePlan* plan, const char** error);
cudaError_t LaunchTwoStage(const TwoStageParams& p, const TwoStagePlan& plan, void* workspace,
                           cudaStream_t stream, const char** error = nullptr);

// ---------------------------------------------------------------------------
// Fused indexer preparation (cpu::IndexerPrep): per token t of sequence
// token_seq[t], k = LayerNorm(k_proj[t]); half-split RoPE on the first rope_dim
// values; Hadamard * D^-0.5; FP8 e4m3 with a ue8m0 scale -> the key cache at
// positions[t]. Each query head likewise (no LayerNorm) -> q8 and
// weights[t, j] = w_proj[t, j] * H^-0.5 * q_scale[t, j] * D^-0.5.
struct PrepParams {
  const float* q_proj = nullptr;         // [T, H*D]
  const float* k_proj = nullptr;         // [T, D]
  const float* w_proj = nullptr;         // [T, H]
  const float* ln_gamma = nullptr;       // [D]
  const float* ln_beta = nullptr;        // [D]
  float ln_eps = 1e-6f;
  const int64_t* positions = nullptr;    // [T], distinct within a sequence (one writer per slot)
  const int32_t* token_seq = nullptr;    // [T] sequence of each token; nullptr = all sequence 0
  const float* inv_freq = nullptr;       // [rope_dim / 2]
  int rope_dim = 64;                     // even, <= D
  int64_t num_tokens = 0;                // T
  int heads = 64;
  int head_dim = 128;                    // must be 128
  uint8_t* pool = nullptr;               // key pool (written)
  const int32_t* page_table = nullptr;   // [num_seqs, page_table_stride]
  int64_t page_table_stride = 0;
  KvLayout layout;
  uint8_t* q8 = nullptr;                 // [T, H, D] out
  float* weights = nullptr;              // [T, H] out
};
cudaError_t LaunchIndexerPrep(const PrepParams& p, cudaStream_t stream,
                              const char** error = nullptr);

// cpu::UpdateSummaries for a batch: sequence b adds its keys [from[b], to[b]) to
// its block sums in token order (blocks first touched are zeroed first), so a
// prefill and a series of single-token decode updates give identical sums.
struct SummaryParams {
  const uint8_t* pool = nullptr;
  const int32_t* page_table = nullptr;   // [num_seqs, page_table_stride]
  int64_t page_table_stride = 0;
  float* summary_sums = nullptr;         // [num_seqs, summary_stride, D]
  int64_t summary_stride = 0;
  const int64_t* from = nullptr;         // [num_seqs]
  const int64_t* to = nullptr;           // [num_seqs]
  int num_seqs = 1;
  int64_t max_blocks_touched = 1;        // host bound on blocks any [from, to) touches
  KvLayout layout;
};
cudaError_t LaunchUpdateSummaries(const SummaryParams& p, cudaStream_t stream,
                                  const char** error = nullptr);

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_INDEXER_CUDA_H_
