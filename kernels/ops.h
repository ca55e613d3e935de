// Dense model operations, CPU reference backend (also the production CPU
// backend). All activations are fp32, row-major. Functions that take a
// ThreadPool* split their work across it (nullptr = run inline).
// Contracts are exact: the CUDA backend is tested against these.
#ifndef PD_KERNELS_OPS_H_
#define PD_KERNELS_OPS_H_

#include <cstdint>
#include <vector>

#include "kernels/cpu/parallel.h"
#include "kernels/tensor.h"

namespace pd::kernels {

// YaRN rotary embedding parameters (DeepSeek's precompute_freqs_cis).
struct YarnParams {
  int dim = 64;                    // rotary dims (qk_rope_head_dim)
  float theta = 10000.0f;
  bool yarn = true;                // false: plain RoPE (inv_freq unscaled)
  float factor = 40.0f;
  int64_t original_max_position = 4096;
  float beta_fast = 32.0f;
  float beta_slow = 1.0f;
};

// inv_freq[i], i < dim/2, after YaRN's ramp between the correction range:
//   f_i = theta^(-2i/dim); low/high = correction range of (beta_fast, beta_slow);
//   smooth = 1 - clamp((i - low) / (high - low), 0, 1); f = f/factor*(1-smooth) + f*smooth.
std::vector<float> YarnInvFreq(const YarnParams& p);

// The attention softmax scale: head_dim^-0.5 * mscale^2 with mscale =
// 0.1 * mscale_coef * ln(factor) + 1 when YaRN is on (1 otherwise).
float YarnSoftmaxScale(int qk_head_dim, const YarnParams& p, float mscale_coef = 1.0f);

namespace cpu {

// y[m, n] = sum_k x[m, k] * W[n, k]. x: [m, w.cols]; y: [m, w.rows]. Any weight dtype.
// Batch invariant (also MatMulXW): row i of y is bit-identical whatever m, the
// other rows of x and the pool, so prefill and decode agree exactly.
void Linear(const float* x, int64_t m, const WeightView& w, float* y, ThreadPool* pool);

// y[m, n] = sum_k x[m, k] * W[k, n]. x: [m, w.rows]; y: [m, w.cols].
void MatMulXW(const float* x, int64_t m, const WeightView& w, float* y, ThreadPool* pool);

// y = x / sqrt(mean(x^2) + eps) * gamma, per row of n. In place allowed (y == x).
void RmsNorm(const float* x, int64_t m, int64_t n, const float* gamma, float eps, float* y);

// y = (x - mean) / sqrt(var + eps) * gamma + beta (biased variance). In place allowed.
void LayerNorm(const float* x, int64_t m, int64_t n, const float* gamma, const float* beta,
               float eps, float* y);

// Rotates `dim` values of each (token, head) vector in place by angle
// positions[t] * inv_freq[i]. Vector (t, h) starts at x + t*token_stride + h*head_stride.
// interleaved: pairs (2i, 2i+1) (MLA); otherwise pairs (i, i + dim/2) (the indexer).
void ApplyRope(float* x, int64_t tokens, int64_t heads, int64_t token_stride,
               int64_t head_stride, const int64_t* positions, const float* inv_freq, int dim,
               bool interleaved);

// In-place fast Walsh-Hadamard transform (Sylvester order) of each row of n
// (a power of two), times `scale` (n^-0.5 makes it orthonormal).
void Hadamard(float* x, int64_t rows, int n, float scale);

// Per-group FP8 e4m3 quantisation: for each row and each group of `group`
// consecutive values, scale = Fp8Scale(amax, ue8m0), q = e4m3(x / scale).
// q: [rows, n]; scales: [rows, ceil(n / group)].
void QuantizeFp8(const float* x, int64_t rows, int64_t n, int group, bool ue8m0, uint8_t* q,
                 float* scales);

// out[i] = silu(gate[i]) * up[i].
void SiluMul(const float* gate, const float* up, int64_t n, float* out);

// In-place softmax over rows of n (max-subtracted).
void Softmax(float* x, int64_t rows, int64_t n);

// DeepSeek-V3 MoE router ("noaux_tc"): s = sigmoid(logits); selection score
// s + bias; groups of E/n_group experts scored by the sum of their top-2
// selection scores; the top `topk_group` groups kept; top `topk` experts among
// them (ties: lower index). weights = s[chosen] / sum(s[chosen]) (when
// norm_topk) * route_scale. logits: [m, E]; idx, weights: [m, topk].
void MoeRoute(const float* logits, const float* bias, int64_t m, int experts, int n_group,
              int topk_group, int topk, bool norm_topk, float route_scale, int32_t* idx,
              float* weights);

// Top-k of scores[0, n): writes min(k, n) indices, sorted by score descending,
// ties broken by lower index, then -1 up to k. NaN scores rank last. Returns the
// number of valid indices.
int TopK(const float* scores, int64_t n, int k, int32_t* out);

}  // namespace cpu
}  // namespace pd::kernels

#endif  // PD_KERNELS_OPS_H_
