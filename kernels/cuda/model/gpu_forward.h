// The DeepSeek-V3.2 + MISA forward pass on one CUDA GPU (sm_90a): the GPU
// backend's engine. Plain C++ (no CUDA types) so that model/ can include it;
// CUDA stays inside kernels/.
//
// Data flow (the CPU backend's, model/forward.cc): embedding -> per layer
// [RMSNorm -> MLA projections (q_a, q_b, kv_a; YaRN RoPE; W_kvb's K part
// absorbed into the query) -> indexer (wq_b, wk, weights_proj; fused prep into
// the FP8 key cache; pooled summaries) -> selection (dense DSA or MISA) ->
// sparse MLA over the FP8 latent cache -> W_kvb's V part -> o_proj ->
// residual -> RMSNorm -> dense SwiGLU FFN or MoE (sigmoid router with groups,
// shared expert + routed experts) -> residual] -> final RMSNorm -> LM head.
//
// Numerics: activations between ops are fp32. GEMM inputs are cast to bf16
// for bf16 weights, or quantised to FP8 e4m3 with one ue8m0 scale per 1x128
// group for FP8 weights; every GEMM accumulates and writes fp32. FP8
// checkpoint weights stay FP8 with their 128x128 block scales (cuBLASLt
// block-scaled GEMM) when the shape allows it (cols a multiple of 512 via the
// 128-column scale blocks in groups of 4, rows a multiple of 16, 128-aligned
// views) and the engine's start-up self-test of the cuBLASLt FP8 path passes;
// otherwise they are dequantised to bf16 on the device at upload (Describe()
// says which). W_kvb is always bf16 (the absorbed per-head products are
// batched bf16 GEMMs, as DeepSeek's inference code dequantises it too).
// Selection: dense and MISA; MISA-dagger and HISA are CPU-only for now.
// Attention and indexer kernels: the tuned kernels of kernels/cuda/*.h for
// the V3.2 shapes (kv_lora_rank 512, rope 64, heads % 64 == 0, index head dim
// 128, index heads 16/32/64), generic kernels of kernels/cuda/model for any
// other shape (and on request).
#ifndef PD_KERNELS_CUDA_MODEL_GPU_FORWARD_H_
#define PD_KERNELS_CUDA_MODEL_GPU_FORWARD_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/indexer.h"
#include "kernels/kv_layout.h"
#include "kernels/tensor.h"

namespace pd::kernels::cuda {

// ---------------------------------------------------------------------------
// Device memory for code outside kernels/ (the KV arena's allocator).

// Number of usable CUDA devices (0 without a driver or device).
int CudaDeviceCount();
// Device 0's name, SM count, memory, SM clock and the driver/runtime versions.
std::string CudaDeviceDescription();
// `bytes` of device memory (cudaMalloc: 256-byte aligned; 4096-byte aligned
// when bytes >= 4096 is NOT promised by CUDA, so the allocation is padded and
// aligned here), zero-filled. nullptr and *error set on failure.
void* DeviceAllocZeroed(size_t bytes, std::string* error);
// Frees memory from DeviceAllocZeroed (nullptr is a no-op).
void DeviceFree(void* p);
// Synchronous device -> host copy (waits for all prior work on the device).
bool CopyDeviceToHost(void* dst, const void* src, size_t bytes, std::string* error);

// ---------------------------------------------------------------------------
// Model description (mirrors model::ModelConfig / model::ModelWeights with
// kernel types only).

struct GpuModelDims {
  int64_t vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int heads = 0;  // MLA heads
  int q_lora_rank = 0, kv_lora_rank = 0;
  int qk_nope_head_dim = 0, qk_rope_head_dim = 0, v_head_dim = 0;
  int n_routed_experts = 0, experts_per_tok = 0, n_group = 1, topk_group = 1;
  bool norm_topk_prob = true;
  float routed_scaling_factor = 1.0f;
  float rms_norm_eps = 1e-6f;
  std::vector<float> inv_freq;  // [qk_rope_head_dim / 2] (kernels::YarnInvFreq)
  float softmax_scale = 1.0f;   // ModelConfig::SoftmaxScale()
  int index_heads = 0, index_head_dim = 0;
  SelectionConfig selection;    // ModelConfig::Selection()
  KvLayout layout;              // ModelConfig::Layout()
};

struct GpuFfnWeights {
  WeightView gate, up, down;  // [inter, hidden], [inter, hidden], [hidden, inter]
};

// Host views of one layer's weights (the names of model::LayerWeights).
struct GpuLayerWeights {
  std::vector<float> attn_norm;
  WeightView q_a;
  std::vector<float> q_a_norm;
  WeightView q_b, kv_a;
  std::vector<float> kv_a_norm;
  WeightView kv_b, o;
  WeightView idx_wq_b, idx_wk;
  std::vector<float> idx_k_norm_w, idx_k_norm_b;
  WeightView idx_weights_proj;
  std::vector<float> ffn_norm;
  bool moe = false;
  GpuFfnWeights dense;
  WeightView router;
  std::vector<float> router_bias;  // empty: no bias
  std::vector<GpuFfnWeights> experts;
  GpuFfnWeights shared;
};

struct GpuModelWeights {
  GpuModelDims dims;
  WeightView embed;  // [vocab, hidden]
  std::vector<float> final_norm;
  WeightView lm_head;  // [vocab, hidden]
  std::vector<GpuLayerWeights> layers;
};

// The device KV arena (a kvcache::KvCache allocated with DeviceAllocZeroed):
// per layer the MLA page pool, the indexer-key page pool and the summary
// region [max_sequences, max_blocks, index_head_dim] fp32.
struct GpuKvArena {
  KvLayout layout;
  std::vector<uint8_t*> mla_pools;
  std::vector<uint8_t*> index_pools;
  std::vector<float*> summaries;
  int max_sequences = 0;
  int64_t max_blocks = 0;  // summary blocks per sequence
  int64_t num_pages = 0;   // pages per layer pool (page ids must be below; 0 = unchecked)
};

// A run of consecutive tokens of one KV sequence (positions [start_pos,
// start_pos + num_tokens)); the sequence's keys [0, start_pos) are already in
// the arena. page_table (host) lists the sequence's pages, at least
// NumPages(start_pos + num_tokens) of them.
struct GpuSegment {
  int32_t kv_seq = -1;
  int64_t start_pos = 0;
  int64_t num_tokens = 0;
  const int32_t* page_table = nullptr;
  int64_t num_pages = 0;
};

struct GpuBatch {
  const int32_t* tokens = nullptr;  // host, every segment's tokens in order
  int64_t num_tokens = 0;
  std::vector<GpuSegment> segments;  // at most one per kv_seq
  std::vector<int64_t> logit_rows;   // token rows whose logits are returned
};

enum class GemmPrecision : uint8_t {
  kAuto,  // FP8 block-scaled where the checkpoint is FP8 and the shape allows, else bf16
  kBf16,  // every weight as bf16 (FP8 dequantised at upload)
};

struct GpuEngineOptions {
  GemmPrecision gemm = GemmPrecision::kAuto;
  // Use the generic attention/indexer kernels even where the tuned ones apply.
  bool generic_kernels = false;
  // Record CUDA events between stages (stage_times()).
  bool stage_timing = true;
  // Benchmarks: ignore the views' data pointers and generate every weight on
  // the device: values N(0, 1/cols), FP8 views as e4m3 codes with one ue8m0
  // scale per 128x128 block, others bf16. Dtypes and shapes come from the views.
  bool random_weights = false;
  uint64_t seed = 0;
};

// GPU time by stage, summed over forwards (seconds; CUDA events).
struct GpuStageTimes {
  double embed = 0, attn_proj = 0, indexer_prep = 0, selection = 0, attention = 0, ffn = 0,
         lm_head = 0;
  int64_t forwards = 0;
  double Total() const {
    return embed + attn_proj + indexer_prep + selection + attention + ffn + lm_head;
  }
};

// The indexer state of one segment at one layer (device pointers unless
// noted), valid during the callback.
struct GpuIndexerState {
  int layer = 0;
  int segment = 0;
  int64_t num_queries = 0;
  const uint8_t* q8 = nullptr;          // [T, IH, ID]
  const float* weights = nullptr;       // [T, IH]
  const int64_t* positions = nullptr;   // host [T]
  const uint8_t* index_pool = nullptr;  // the layer's key pool
  const float* summaries = nullptr;     // this sequence's [max_blocks, ID]
  int64_t num_keys = 0;                 // keys present after this segment
};

// Hooks called on the forward's thread with the device idle.
class GpuForwardObserver {
 public:
  virtual ~GpuForwardObserver() = default;
  virtual void OnIndexerReady(const GpuIndexerState& state) {}
  // Every KV object of `layer` is written for every segment.
  virtual void OnLayerWritten(int layer) {}
};

// Not thread-safe: one Forward at a time. Owns its CUDA stream, cuBLASLt handle,
// device weights and scratch (scratch grows with the largest batch seen).
class GpuForwardEngine {
 public:
  // Validates the description (names the offending field), runs the FP8 GEMM
  // self-test, uploads (or generates) the weights. nullptr and *error on failure.
  static std::unique_ptr<GpuForwardEngine> Create(const GpuModelWeights& weights,
                                                  const GpuKvArena& arena,
                                                  const GpuEngineOptions& options,
                                                  std::string* error);
  ~GpuForwardEngine();
  GpuForwardEngine(const GpuForwardEngine&) = delete;
  GpuForwardEngine& operator=(const GpuForwardEngine&) = delete;

  // Runs the batch: writes its KV into the arena and, when logits != nullptr,
  // the fp32 logits of batch.logit_rows to logits [rows, vocab] (host); when
  // argmax != nullptr, the greedy token of each row (ties: lower id) computed
  // on the device. Returns false with *error for a bad batch (nothing is
  // written then) or a CUDA failure.
  bool Forward(const GpuBatch& batch, float* logits, int32_t* argmax,
               GpuForwardObserver* observer, std::string* error);

  // Switches the selection mode (dense or misa); false for others.
  bool SetSelectionMode(SelectionMode mode, std::string* error);

  const GpuStageTimes& stage_times() const;
  void ResetStageTimes();
  // Which GEMM and attention paths are in use, the FP8 self-test result, and
  // how many GEMMs fell back to the plain kernel.
  std::string Describe() const;

  class Impl;

 private:
  explicit GpuForwardEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Benchmarks: fills tokens [0, seg.start_pos) of each sequence in layers
// [layer_begin, layer_end) with random valid records (MLA latents, indexer
// keys) and computes their pooled summaries.
bool FillRandomKv(const GpuKvArena& arena, int layer_begin, int layer_end,
                  const std::vector<GpuSegment>& sequences, uint64_t seed, std::string* error);

}  // namespace pd::kernels::cuda

#endif  // PD_KERNELS_CUDA_MODEL_GPU_FORWARD_H_
