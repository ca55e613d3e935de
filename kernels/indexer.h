// The DSA lightning indexer and its sparse selection modes (dense DSA, MISA,
// MISA-dagger, HISA) over the paged FP8 indexer-key cache. CPU reference
// backend; the CUDA kernels (kernels/cuda/) are tested against these functions.
// See ../shared/docs/algorithms.md sections 3-5 for the formulas.
#ifndef PD_KERNELS_INDEXER_H_
#define PD_KERNELS_INDEXER_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "kernels/cpu/parallel.h"
#include "kernels/kv_layout.h"

namespace pd::kernels {

enum class SelectionMode : uint8_t { kDense, kMisa, kMisaDagger, kHisa };

// "dense", "misa", "misa_dagger", "hisa".
const char* SelectionModeName(SelectionMode m);
// Parses the names above; returns false on anything else.
bool ParseSelectionMode(std::string_view s, SelectionMode* out);

struct SelectionConfig {
  SelectionMode mode = SelectionMode::kMisa;
  int heads = 64;                 // H, indexer heads
  int head_dim = 128;             // D
  int topk = 2048;                // tokens selected per query
  int misa_heads = 8;             // h, routed heads per query (misa_topk_heads)
  int misa_block = 1024;          // B, pooled-summary block (misa_k_block_size)
  int dagger_candidates = 8192;   // C, stage-1 candidates (misa_stage1_topk)
  int hisa_block = 128;           // HISA's block size
  int hisa_topk_blocks = 64;      // HISA's kept blocks (first and last always kept)
};

// One sequence's indexer keys for one layer, read-only.
struct IndexKeyCacheView {
  const uint8_t* pool = nullptr;        // layer pool; page p at pool + p * layout.IndexPageBytes()
  const int32_t* page_table = nullptr;  // [NumPages(num_tokens)] page ids
  int64_t num_tokens = 0;               // keys [0, num_tokens) present
  const float* summary_sums = nullptr;  // [CeilDiv(num_tokens, B), D] fp32 block sums (MISA)
  KvLayout layout;                      // layout.summary_block == B
};

// One sequence's indexer keys for one layer, writable.
struct IndexKeyCacheRef {
  uint8_t* pool = nullptr;
  const int32_t* page_table = nullptr;  // must cover every token written
  float* summary_sums = nullptr;        // must cover every block written
  KvLayout layout;
};

// T query tokens of one sequence, already prepared (IndexerPrep).
struct IndexerQueries {
  const uint8_t* q8 = nullptr;          // [T, H, D] e4m3, Hadamard-rotated, one scale per head
  const float* weights = nullptr;       // [T, H]: (x W_proj) * H^-0.5 * q_scale * D^-0.5
  const int64_t* positions = nullptr;   // [T]; query t sees keys [0, positions[t]]
  int64_t num_queries = 0;
};

// Inputs of the fused indexer preparation for T tokens (the GEMM outputs).
struct IndexerPrepInputs {
  const float* q_proj = nullptr;    // [T, H*D]  c_q W_qb_idx^T
  const float* k_proj = nullptr;    // [T, D]    x W_k_idx^T
  const float* w_proj = nullptr;    // [T, H]    x W_proj^T
  const float* ln_gamma = nullptr;  // [D] k_norm weight
  const float* ln_beta = nullptr;   // [D] k_norm bias
  float ln_eps = 1e-6f;
  const int64_t* positions = nullptr;  // [T]
  const float* inv_freq = nullptr;     // [rope_dim/2] (YarnInvFreq)
  int rope_dim = 64;                   // the FIRST rope_dim values of each head rotate (half-split)
  int64_t num_tokens = 0;
};

// Argument checks of the functions below. Each returns "" when the arguments
// are valid, else a message naming the first invalid argument and its value.
// The cpu:: functions run the same checks and, on invalid input, print the
// message to stderr and abort (they return no status).
std::string ValidateIndexerPrep(const IndexerPrepInputs& in, int heads,
                                const IndexKeyCacheRef& cache);
std::string ValidateSelectTokens(const SelectionConfig& cfg, const IndexKeyCacheView& cache,
                                 const IndexerQueries& queries);

namespace cpu {

// The indexer preparation, for T tokens at positions[t]:
//   k = LayerNorm(k_proj); RoPE (half-split) on k[0:rope_dim]; Hadamard * D^-0.5;
//   FP8 quantise (one ue8m0 scale per key) -> written into the key cache at
//   positions[t] (value bytes and scale, page layout of KvLayout).
//   q = q_proj per head; same RoPE / Hadamard; FP8 per head -> q8 [T, H, D] and
//   q_scale; weights[t, j] = w_proj[t, j] * H^-0.5 * q_scale[t, j] * D^-0.5.
// Does NOT touch the summaries (call UpdateSummaries).
void IndexerPrep(const IndexerPrepInputs& in, int heads, const IndexKeyCacheRef& cache,
                 uint8_t* q8, float* weights);

// Adds the dequantised keys of tokens [from, to) to their blocks' sums, in token
// order (so prefill and incremental decode produce identical sums). Blocks
// first touched (token % B == 0) are zeroed before adding.
void UpdateSummaries(const IndexKeyCacheRef& cache, int64_t from, int64_t to);

// Dense DSA logits of one query over keys [0, n):
//   out[s] = k_scale[s] * sum_{j<H} w[j] * ReLU(q8[j] . k8[s])   (heads summed in index order)
void DenseScores(const IndexKeyCacheView& cache, const uint8_t* q8, const float* w, int heads,
                 int64_t n, float* out);

// Same formula restricted to the listed heads (ascending order; listing all H
// heads reproduces DenseScores bit-exactly). keys: optional [n] key indices
// (nullptr = keys 0..n-1).
void RoutedScores(const IndexKeyCacheView& cache, const uint8_t* q8, const float* w,
                  const int32_t* head_list, int num_heads, const int32_t* keys, int64_t n,
                  float* out);

// MISA router for a query at position `pos`: for each head j,
//   r[j] = |w[j]| * sum_{b <= pos / B} ReLU(q8[j] . kbar[b]),  kbar[b] = sum[b] / count[b]
// over the blocks present in the cache (count from cache.num_tokens).
void MisaRouterScores(const IndexKeyCacheView& cache, const uint8_t* q8, const float* w,
                      int heads, int64_t pos, float* r);

// Top-h heads of r (ties: lower index), written in ascending head order.
void MisaActiveHeads(const float* r, int heads, int h, int32_t* active);

// The selection of one mode for T queries: out [T, cfg.topk], each row sorted
// by score descending (ties: lower index), -1 padded; only keys s <= positions[t]
// are candidates and at most min(topk, positions[t]+1) are returned.
//   dense: DenseScores then top-k.
//   misa: router, top-h heads, RoutedScores over all visible keys, top-k.
//   misa_dagger: MISA's routed score, top-C candidates, exact DSA re-score, top-k.
//   hisa: block means (hisa_block) scored by the DSA formula, first and last visible
//         block always kept, top hisa_topk_blocks blocks, exact DSA on their tokens, top-k.
void SelectTokens(const SelectionConfig& cfg, const IndexKeyCacheView& cache,
                  const IndexerQueries& queries, int32_t* out, ThreadPool* pool);

}  // namespace cpu
}  // namespace pd::kernels

#endif  // PD_KERNELS_INDEXER_H_
