// Internal CUDA kernels of the GPU model engine (kernels/cuda/model/): the
// dense ops of the forward (embedding, RMSNorm, RoPE, SwiGLU, MoE routing and
// dispatch, activation casts and FP8 quantisation, argmax), random device
// initialisation for benchmarks, a plain fp32 reference GEMM, and "generic"
// versions of the attention and indexer kernels that accept any model
// dimensions (the kernels of kernels/cuda/*.h are built for the DeepSeek-V3.2
// shapes only). Not a public API: gpu_forward.h is.
//
// Conventions: device pointers unless noted, shapes in comments, every
// launcher takes a stream, never allocates and returns the launch's error.
// Contracts mirror the CPU reference (kernels/ops.h, indexer.h, mla.h).
#ifndef PD_KERNELS_CUDA_MODEL_MODEL_KERNELS_H_
#define PD_KERNELS_CUDA_MODEL_MODEL_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/indexer_cuda.h"
#include "kernels/cuda/mla_cuda.h"
#include "kernels/kv_layout.h"

namespace pd::kernels::cuda::internal {

// ---------------------------------------------------------------------------
// Dense ops.

// out[i, :] = table[tokens[i], :] (bf16 -> fp32). table: [vocab, hidden] bf16.
cudaError_t EmbedGather(const uint16_t* table, int64_t hidden, const int32_t* tokens, int64_t n,
                        float* out, cudaStream_t stream);

// y[r, :n] = x[r, :n] / sqrt(mean(x^2) + eps) * gamma (sum of squares in double,
// as cpu::RmsNorm). Row r of x starts at x + r * x_stride, of y at y + r *
// y_stride. In place allowed (y == x, same stride).
cudaError_t RmsNorm(const float* x, int64_t rows, int64_t n, int64_t x_stride, const float* gamma,
                    float eps, float* y, int64_t y_stride, cudaStream_t stream);

// x[r, :] += delta[r, :] (fp32 adds), then y = RmsNorm(x). x, delta, y: [rows, n].
cudaError_t AddRmsNorm(float* x, const float* delta, int64_t rows, int64_t n, const float* gamma,
                       float eps, float* y, cudaStream_t stream);

// x[i] += d[i], i < count.
cudaError_t AddInPlace(float* x, const float* d, int64_t count, cudaStream_t stream);

// dst[i, :width] = src[rows[i], :width]. src rows are src_stride apart.
cudaError_t GatherRows(const float* src, int64_t src_stride, int64_t width, const int32_t* rows,
                       int64_t n, float* dst, cudaStream_t stream);

// Interleaved RoPE (pairs (2i, 2i+1), MLA) in place on `dim` values of each
// (token, head) vector at x + t * token_stride + h * head_stride, angle
// positions[t] * inv_freq[i]; when copy_out is given the rotated vectors are
// also written to copy_out [tokens, heads, dim].
cudaError_t RopeInterleaved(float* x, int64_t tokens, int heads, int64_t token_stride,
                            int64_t head_stride, const int64_t* positions, const float* inv_freq,
                            int dim, float* copy_out, cudaStream_t stream);

// y[i] = bf16(x[i]) (round to nearest even), i < count.
cudaError_t CastToBf16(const float* x, int64_t count, uint16_t* y, cudaStream_t stream);
// y[i] = float(x[i]).
cudaError_t CastBf16ToFloat(const uint16_t* x, int64_t count, float* y, cudaStream_t stream);

// y[i, j] = S(i, j) for i < m, j < n, with S(i, j) = src[j * src_ld + i]
// when transposed, else src[i * src_ld + j]; src fp32 or bf16. y rows y_ld apart.
cudaError_t CopyOut(const void* src, bool src_bf16, bool transposed, int64_t m, int64_t n,
                    int64_t src_ld, float* y, int64_t y_ld, cudaStream_t stream);

// Per-token-group FP8 quantisation of activations for the block-scaled GEMM:
// for row r < m and group g < K/128, s = Fp8Scale(amax, ue8m0) and
// q[r, k] = e4m3(x[r, k] / s). x rows are x_stride apart; q: [m, K].
// Scales (fp32): the rows are split into segments (segment_start[r],
// segment_rows[r], segment_scale_offset[r]; all null = one segment of m rows at
// offset 0); within a segment of `rows` rows starting at row r0 the scale of
// (r, g) is at offset + g * rows + (r - r0) when m_major, else offset +
// (r - r0) * (K/128) + g. K must be a multiple of 128.
struct QuantizeParams {
  const float* x = nullptr;
  int64_t m = 0, k = 0, x_stride = 0;
  uint8_t* q = nullptr;
  float* scales = nullptr;
  bool m_major = true;
  const int32_t* segment_start = nullptr;         // [m]
  const int32_t* segment_rows = nullptr;          // [m]
  const int64_t* segment_scale_offset = nullptr;  // [m]
};
cudaError_t QuantizeFp8Rows(const QuantizeParams& p, cudaStream_t stream);

// out[r, j] = silu(gu[r, j]) * gu[r, inter + j] for r < m, j < inter.
// gu: [m, 2 * inter]; out: [m, inter].
cudaError_t SiluMulRows(const float* gu, int64_t m, int64_t inter, float* out,
                        cudaStream_t stream);

// cpu::MoeRoute for m tokens (experts <= 256, one thread per token).
cudaError_t MoeRoute(const float* logits, const float* bias, int64_t m, int experts, int n_group,
                     int topk_group, int topk, bool norm_topk, float route_scale, int32_t* idx,
                     float* weights, cudaStream_t stream);

// out[t, :] += sum_j weight[t, j] * y[row[t, j], :] for j < k in order (the
// caller lists each token's routes by ascending expert, as cpu forward adds).
cudaError_t MoeCombine(float* out, const float* y, int64_t hidden, const int32_t* route_rows,
                       const float* route_weights, int k, int64_t n, cudaStream_t stream);

// out[r] = argmax of logits[r, :vocab] (ties and NaN: lower index wins; NaN
// never wins over a number).
cudaError_t ArgmaxRows(const float* logits, int64_t rows, int64_t vocab, int32_t* out,
                       cudaStream_t stream);

// ---------------------------------------------------------------------------
// Weights: dequantisation and random initialisation.

// bf16 [rows, cols] (dense) from FP8 codes q [rows, cols] (dense) and block
// scales of the whole tensor: element (r, c) uses
// scales[((row0 + r) / block - scale_row0) * scale_ld + (col0 + c) / block - scale_col0].
struct DequantParams {
  const uint8_t* q = nullptr;
  int64_t rows = 0, cols = 0;
  const float* scales = nullptr;
  int64_t scale_ld = 0, scale_row0 = 0, scale_col0 = 0;
  int64_t row0 = 0, col0 = 0;
  int block = 128;
  uint16_t* out = nullptr;
};
cudaError_t DequantFp8ToBf16(const DequantParams& p, cudaStream_t stream);

// q[i] = e4m3(N(0,1) * value_scale) from a counter-based generator (seed, i).
cudaError_t RandomFp8(uint8_t* q, int64_t count, uint64_t seed, float value_scale,
                      cudaStream_t stream);
// x[i] = bf16(N(0, std)).
cudaError_t RandomBf16(uint16_t* x, int64_t count, uint64_t seed, float std,
                       cudaStream_t stream);
// x[i] = value.
cudaError_t FillFloat(float* x, int64_t count, float value, cudaStream_t stream);

// Random but valid KV records for tokens [0, num_tokens) of one sequence:
// MLA records (e4m3 codes of N(0,1)*16, never NaN; scales 2^-5; k_pe bf16
// N(0,1)) and indexer keys (e4m3 of N(0,1)*64, scale 2^-6). page_table: [pages].
cudaError_t RandomKvRecords(uint8_t* mla_pool, uint8_t* index_pool, const int32_t* page_table,
                            int64_t num_tokens, const KvLayout& layout, uint64_t seed,
                            cudaStream_t stream);

// ---------------------------------------------------------------------------
// Reference GEMM (plain fp32 FMA, tiled): y[i, j] = sum_k x[i, k] * W(j, k) for
// i < m, j < n, where W(j, k) = w[j * w_ld + k] (transposed = false: PyTorch
// Linear) or w[k * w_ld + j] (transposed = true: x . W). The weight is bf16,
// or FP8 with block scales (not transposed only): scale of (j, k) at
// scales[(j / 128) * scale_ld + k / 128]. x rows x_ld apart, y rows y_ld apart.
struct RefGemmParams {
  const float* x = nullptr;
  int64_t m = 0, n = 0, k = 0, x_ld = 0, y_ld = 0;
  const void* w = nullptr;
  bool w_fp8 = false;
  bool transposed = false;
  int64_t w_ld = 0;
  const float* scales = nullptr;
  int64_t scale_ld = 0;
  float* y = nullptr;
};
cudaError_t RefGemm(const RefGemmParams& p, cudaStream_t stream);

// ---------------------------------------------------------------------------
// Generic attention / indexer kernels (any dimensions). Batch conventions as
// kernels/cuda/indexer_cuda.h: sequence b's page table row at page_table + b *
// page_table_stride; token t belongs to sequence token_seq[t].

// cpu::IndexerPrep semantics (same parameters as LaunchIndexerPrep; head_dim a
// power of two <= 1024; rope_dim even, <= head_dim).
cudaError_t IndexerPrepGeneric(const PrepParams& p, cudaStream_t stream);

// cpu::UpdateSummaries for a batch (same parameters as LaunchUpdateSummaries;
// index_head_dim <= 1024).
cudaError_t UpdateSummariesGeneric(const SummaryParams& p, cudaStream_t stream);

// Per query token t (of sequence token_seq[t] holding num_tokens[seq] keys):
// r[j] = |w[t,j]| * sum_{b <= pos/B, b < M} ReLU(q[t,j] . kbar[b]) exactly as
// cpu::MisaRouterScores (fma chain over d, blocks ascending), then the top-h
// heads (ties: lower index) in ascending head order (cpu::MisaActiveHeads).
struct RouterGenericParams {
  const uint8_t* q8 = nullptr;          // [T, H, D]
  const float* weights = nullptr;       // [T, H]
  const int64_t* positions = nullptr;   // [T]
  const int32_t* token_seq = nullptr;   // [T]
  const int64_t* num_tokens = nullptr;  // [S]
  const float* summary_sums = nullptr;  // [S, summary_stride, D]
  int64_t summary_stride = 0;
  int64_t num_queries = 0;
  int heads = 0, head_dim = 0, active_heads = 0, summary_block = 0;
  int32_t* active = nullptr;            // [T, h] out
};
cudaError_t MisaRouterGeneric(const RouterGenericParams& p, cudaStream_t stream);

// Scores of every visible key s <= positions[t] (cpu::RoutedScores, bit-exact:
// dot = fma chain over d of the raw e4m3 values, acc = fma over the listed
// heads ascending of w * ReLU(dot), score = acc * k_scale) into
// logits[t * logits_stride + s]; then the top-k of each row (cpu::TopK order:
// score descending, ties to the lower index, NaN last; -1 padded).
struct SelectGenericParams {
  const uint8_t* q8 = nullptr;          // [T, H, D]
  const float* weights = nullptr;       // [T, H]
  const int64_t* positions = nullptr;   // [T]
  const int32_t* token_seq = nullptr;   // [T]
  const uint8_t* pool = nullptr;        // index-key pool of the layer
  const int32_t* page_table = nullptr;  // [S, page_table_stride]
  int64_t page_table_stride = 0;
  KvLayout layout;
  int64_t num_queries = 0;
  int heads = 0, head_dim = 0;
  const int32_t* head_list = nullptr;   // [T, num_listed] ascending; null = all heads
  int num_listed = 0;
  int64_t max_position = 0;             // host bound on positions[t]
  float* logits = nullptr;              // [T, logits_stride] scratch
  int64_t logits_stride = 0;            // >= max_position + 1
  int topk = 0;                         // <= 2048
  int32_t* out = nullptr;               // [T, topk]
};
cudaError_t SelectGeneric(const SelectGenericParams& p, cudaStream_t stream);

// cpu::WriteMlaCache for a batch (any kv_lora_rank multiple of 128, any rope_dim).
cudaError_t WriteMlaCacheGeneric(const MlaWriteParams& p, cudaStream_t stream);

// cpu::SparseMlaAttention semantics for a batch, fp32 throughout (any
// kv_lora_rank multiple of 128, any rope_dim, topk <= 4096, any head count).
cudaError_t SparseMlaGeneric(const SparseMlaParams& p, cudaStream_t stream);

}  // namespace pd::kernels::cuda::internal

#endif  // PD_KERNELS_CUDA_MODEL_MODEL_KERNELS_H_
