// The DeepSeek-V3.2 + MISA forward pass over the paged KV cache.
#ifndef PD_MODEL_FORWARD_H_
#define PD_MODEL_FORWARD_H_

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/indexer.h"
#include "kvcache/kv_cache.h"
#include "model/weights.h"

namespace pd::model {

// A run of consecutive tokens of one sequence: positions [start_pos,
// start_pos + num_tokens). start_pos must equal the sequence's cached length.
struct Segment {
  int32_t kv_seq = -1;
  int64_t start_pos = 0;
  int64_t num_tokens = 0;
};

// One forward call: any mix of prefill chunks and decode tokens (one segment
// per sequence). tokens holds every segment's tokens, concatenated in order.
struct ForwardBatch {
  std::vector<int32_t> tokens;
  std::vector<Segment> segments;
  enum class Logits { kNone, kLastOfSegment, kAll } logits = Logits::kLastOfSegment;
};

// Wall time per stage, summed over layers and calls (seconds).
struct ForwardStats {
  double embed = 0, attn_proj = 0, indexer_prep = 0, selection = 0, attention = 0, ffn = 0,
         lm_head = 0;
  int64_t tokens = 0;
  double Total() const {
    return embed + attn_proj + indexer_prep + selection + attention + ffn + lm_head;
  }
};

// Hooks into a forward pass (e.g. the prefill node streams each layer's KV
// as soon as it is written; selection-report compares modes). Called on the
// forward's thread; must not call back into the model.
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  // The indexer state of one segment at `layer`, after its keys, summaries
  // and queries are prepared and before selection.
  virtual void OnIndexerReady(int layer, const Segment& segment,
                              const kernels::IndexerQueries& queries,
                              const kernels::IndexKeyCacheView& keys) {}
  // Every object of `layer` (MLA latents, indexer keys, summaries) is written
  // for every segment of the batch.
  virtual void OnLayerWritten(int layer, const ForwardBatch& batch) {}
};

// A model instance on one backend. Not thread-safe: one Forward at a time.
class Model {
 public:
  virtual ~Model() = default;
  // Runs the batch, writing its KV into the cache, advancing each sequence's
  // cached length, and returning logits [rows, vocab] (rows: one per segment or
  // one per token, per batch.logits). InvalidArgument for a bad batch (token id
  // out of range, position gap, capacity not reserved), with nothing written.
  virtual absl::StatusOr<std::vector<float>> Forward(const ForwardBatch& batch,
                                                     ForwardObserver* observer = nullptr) = 0;
  virtual const ModelConfig& config() const = 0;
  virtual kvcache::KvCache* cache() const = 0;
  virtual ForwardStats stats() const = 0;
  virtual void ResetStats() = 0;
};

// The CPU backend: fp32 activations, weights read in their checkpoint dtype,
// threads from kernels::cpu::ThreadPool::Default(). The cache must have the
// model's layout (config.Layout()) and layer count.
absl::StatusOr<std::unique_ptr<Model>> CreateCpuModel(std::shared_ptr<const ModelWeights> weights,
                                                      kvcache::KvCache* cache);

// The checks every backend applies before running a batch: at least one
// segment, each non-empty, one segment per live sequence, starting at its
// cached length, within its reserved capacity and max_position_embeddings;
// segments covering exactly the batch's tokens; token ids inside the
// vocabulary. InvalidArgument naming the segment or token otherwise.
absl::Status ValidateBatch(const ForwardBatch& batch, const ModelConfig& config,
                           const kvcache::KvCache& cache);

// Options sizing a KV cache for a model.
kvcache::KvCacheOptions CacheOptionsFor(const ModelConfig& config, int64_t max_tokens_per_sequence,
                                        int max_sequences);

}  // namespace pd::model

#endif  // PD_MODEL_FORWARD_H_
