#include "model/gpu_model.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/cuda/model/gpu_forward.h"
#include "kernels/ops.h"

namespace pd::model {
namespace {

namespace kc = kernels::cuda;

class DeviceAllocator final : public kvcache::Allocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError("zero-byte KV arena");
    if (kc::CudaDeviceCount() < 1) {
      return absl::FailedPreconditionError("no CUDA device for a device KV arena");
    }
    std::string err;
    void* p = kc::DeviceAllocZeroed(bytes, &err);
    if (p == nullptr) {
      return absl::ResourceExhaustedError(
          absl::StrCat("device allocation of ", bytes, " bytes for the KV arena failed: ", err));
    }
    return p;
  }
  void Free(void* p, size_t /*bytes*/) override { kc::DeviceFree(p); }
  bool on_device() const override { return true; }
};

kc::GpuFfnWeights Ffn(const FfnWeights& f) { return {f.gate, f.up, f.down}; }

kc::GpuModelWeights Describe(const ModelWeights& w) {
  const ModelConfig& c = w.config;
  kc::GpuModelWeights g;
  kc::GpuModelDims& d = g.dims;
  d.vocab_size = c.vocab_size;
  d.hidden_size = c.hidden_size;
  d.num_layers = c.num_hidden_layers;
  d.heads = c.num_attention_heads;
  d.q_lora_rank = c.q_lora_rank;
  d.kv_lora_rank = c.kv_lora_rank;
  d.qk_nope_head_dim = c.qk_nope_head_dim;
  d.qk_rope_head_dim = c.qk_rope_head_dim;
  d.v_head_dim = c.v_head_dim;
  d.n_routed_experts = c.n_routed_experts;
  d.experts_per_tok = c.num_experts_per_tok;
  d.n_group = c.n_group;
  d.topk_group = c.topk_group;
  d.norm_topk_prob = c.norm_topk_prob;
  d.routed_scaling_factor = c.routed_scaling_factor;
  d.rms_norm_eps = c.rms_norm_eps;
  d.inv_freq = kernels::YarnInvFreq(c.rope);
  d.softmax_scale = c.SoftmaxScale();
  d.index_heads = c.index_n_heads;
  d.index_head_dim = c.index_head_dim;
  d.selection = c.Selection();
  d.layout = c.Layout();
  g.embed = w.embed;
  g.final_norm = w.final_norm;
  g.lm_head = w.lm_head;
  g.layers.reserve(w.layers.size());
  for (const LayerWeights& l : w.layers) {
    kc::GpuLayerWeights x;
    x.attn_norm = l.attn_norm;
    x.q_a = l.q_a;
    x.q_a_norm = l.q_a_norm;
    x.q_b = l.q_b;
    x.kv_a = l.kv_a;
    x.kv_a_norm = l.kv_a_norm;
    x.kv_b = l.kv_b;
    x.o = l.o;
    x.idx_wq_b = l.idx_wq_b;
    x.idx_wk = l.idx_wk;
    x.idx_k_norm_w = l.idx_k_norm_w;
    x.idx_k_norm_b = l.idx_k_norm_b;
    x.idx_weights_proj = l.idx_weights_proj;
    x.ffn_norm = l.ffn_norm;
    x.moe = l.moe;
    x.dense = Ffn(l.dense);
    x.router = l.router;
    x.router_bias = l.router_bias;
    for (const FfnWeights& e : l.experts) x.experts.push_back(Ffn(e));
    x.shared = Ffn(l.shared);
    g.layers.push_back(std::move(x));
  }
  return g;
}

// Host copies of one segment's indexer state, for a model::ForwardObserver.
class ObserverAdapter final : public kc::GpuForwardObserver {
 public:
  ObserverAdapter(ForwardObserver* observer, const ForwardBatch& batch, const ModelConfig& config,
                  kvcache::KvCache* cache)
      : observer_(observer), batch_(batch), config_(config), cache_(cache) {}

  void OnIndexerReady(const kc::GpuIndexerState& s) override {
    const Segment& seg = batch_.segments[size_t(s.segment)];
    const int IH = config_.index_n_heads, ID = config_.index_head_dim;
    const kernels::KvLayout layout = cache_->layout();
    q8_.resize(size_t(s.num_queries) * IH * ID);
    w_.resize(size_t(s.num_queries) * IH);
    std::string err;
    bool ok = kc::CopyDeviceToHost(q8_.data(), s.q8, q8_.size(), &err) &&
              kc::CopyDeviceToHost(w_.data(), s.weights, w_.size() * 4, &err);
    // The sequence's key pages, compacted: page i of the copy is its i-th page.
    const std::vector<int32_t> pages = cache_->PageTable(seg.kv_seq);
    const int64_t np = kernels::NumPages(s.num_keys);
    pool_.resize(size_t(np) * layout.IndexPageBytes());
    for (int64_t p = 0; ok && p < np; ++p) {
      ok = kc::CopyDeviceToHost(pool_.data() + size_t(p) * layout.IndexPageBytes(),
                                s.index_pool + size_t(pages[size_t(p)]) * layout.IndexPageBytes(),
                                layout.IndexPageBytes(), &err);
    }
    const int64_t nb = kernels::CeilDiv(s.num_keys, layout.summary_block);
    sums_.resize(size_t(nb) * ID);
    if (ok) ok = kc::CopyDeviceToHost(sums_.data(), s.summaries, sums_.size() * 4, &err);
    if (!ok) {
      LOG(ERROR) << "GPU model observer: " << err;
      return;
    }
    identity_.resize(size_t(np));
    for (int64_t p = 0; p < np; ++p) identity_[size_t(p)] = int32_t(p);
    kernels::IndexerQueries q;
    q.q8 = q8_.data();
    q.weights = w_.data();
    q.positions = s.positions;
    q.num_queries = s.num_queries;
    kernels::IndexKeyCacheView v;
    v.pool = pool_.data();
    v.page_table = identity_.data();
    v.num_tokens = s.num_keys;
    v.summary_sums = sums_.data();
    v.layout = layout;
    observer_->OnIndexerReady(s.layer, seg, q, v);
  }

  void OnLayerWritten(int layer) override { observer_->OnLayerWritten(layer, batch_); }

 private:
  ForwardObserver* observer_;
  const ForwardBatch& batch_;
  const ModelConfig& config_;
  kvcache::KvCache* cache_;
  std::vector<uint8_t> q8_, pool_;
  std::vector<float> w_, sums_;
  std::vector<int32_t> identity_;
};

class GpuModel final : public Model {
 public:
  GpuModel(std::shared_ptr<const ModelWeights> weights, kvcache::KvCache* cache,
           std::unique_ptr<kc::GpuForwardEngine> engine)
      : w_(std::move(weights)), cfg_(w_->config), cache_(cache), engine_(std::move(engine)) {}

  absl::StatusOr<std::vector<float>> Forward(const ForwardBatch& batch,
                                             ForwardObserver* observer) override;
  const ModelConfig& config() const override { return cfg_; }
  kvcache::KvCache* cache() const override { return cache_; }
  ForwardStats stats() const override {
    const kc::GpuStageTimes& t = engine_->stage_times();
    ForwardStats s;
    s.embed = t.embed;
    s.attn_proj = t.attn_proj;
    s.indexer_prep = t.indexer_prep;
    s.selection = t.selection;
    s.attention = t.attention;
    s.ffn = t.ffn;
    s.lm_head = t.lm_head;
    s.tokens = tokens_;
    return s;
  }
  void ResetStats() override {
    engine_->ResetStageTimes();
    tokens_ = 0;
  }
  std::string Describe() const { return engine_->Describe(); }

 private:
  std::shared_ptr<const ModelWeights> w_;
  const ModelConfig& cfg_;
  kvcache::KvCache* cache_;
  std::unique_ptr<kc::GpuForwardEngine> engine_;
  int64_t tokens_ = 0;
};


absl::StatusOr<std::vector<float>> GpuModel::Forward(const ForwardBatch& batch,
                                                     ForwardObserver* observer) {
  PD_RETURN_IF_ERROR(ValidateBatch(batch, cfg_, *cache_));
  kc::GpuBatch gb;
  gb.tokens = batch.tokens.data();
  gb.num_tokens = int64_t(batch.tokens.size());
  std::vector<std::vector<int32_t>> tables;
  tables.reserve(batch.segments.size());
  int64_t row = 0;
  for (const Segment& s : batch.segments) {
    tables.push_back(cache_->PageTable(s.kv_seq));
    kc::GpuSegment g;
    g.kv_seq = s.kv_seq;
    g.start_pos = s.start_pos;
    g.num_tokens = s.num_tokens;
    g.page_table = tables.back().data();
    g.num_pages = int64_t(tables.back().size());
    gb.segments.push_back(g);
    row += s.num_tokens;
    if (batch.logits == ForwardBatch::Logits::kLastOfSegment) gb.logit_rows.push_back(row - 1);
  }
  if (batch.logits == ForwardBatch::Logits::kAll) {
    for (int64_t i = 0; i < gb.num_tokens; ++i) gb.logit_rows.push_back(i);
  }
  std::vector<float> logits(gb.logit_rows.size() * size_t(cfg_.vocab_size));
  std::string err;
  ObserverAdapter adapter(observer, batch, cfg_, cache_);
  if (!engine_->Forward(gb, logits.empty() ? nullptr : logits.data(), nullptr,
                        observer != nullptr ? &adapter : nullptr, &err)) {
    return absl::InternalError(absl::StrCat("GPU forward: ", err));
  }
  for (const Segment& s : batch.segments) {
    PD_RETURN_IF_ERROR(cache_->SetLength(s.kv_seq, s.start_pos + s.num_tokens));
  }
  tokens_ += gb.num_tokens;
  return logits;
}

}  // namespace

std::unique_ptr<kvcache::Allocator> NewDeviceAllocator() { return std::make_unique<DeviceAllocator>(); }

absl::StatusOr<std::unique_ptr<Model>> CreateGpuModel(std::shared_ptr<const ModelWeights> weights,
                                                      kvcache::KvCache* cache,
                                                      const GpuModelOptions& options) {
  if (weights == nullptr || cache == nullptr) return absl::InvalidArgumentError("null weights or cache");
  const ModelConfig& c = weights->config;
  kernels::KvLayout want = c.Layout(), have = cache->layout();
  if (want.kv_lora_rank != have.kv_lora_rank || want.rope_dim != have.rope_dim ||
      want.index_head_dim != have.index_head_dim || want.summary_block != have.summary_block) {
    return absl::InvalidArgumentError("KV cache layout does not match the model config");
  }
  if (cache->options().num_layers != c.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache has ", cache->options().num_layers,
                                                   " layers, the model ", c.num_hidden_layers));
  }
  if (!cache->on_device()) {
    return absl::InvalidArgumentError("the GPU model needs a device KV cache (NewDeviceAllocator)");
  }
  if (c.selection_mode != kernels::SelectionMode::kDense &&
      c.selection_mode != kernels::SelectionMode::kMisa) {
    return absl::UnimplementedError(absl::StrCat("selection mode ", kernels::SelectionModeName(c.selection_mode),
                                                 " is not implemented on the GPU backend (dense and "
                                                 "misa are); use --backend=cpu"));
  }
  if (kc::CudaDeviceCount() < 1) return absl::FailedPreconditionError("no CUDA device");
  kc::GpuKvArena arena;
  arena.layout = cache->layout();
  arena.max_sequences = cache->options().max_sequences;
  arena.max_blocks = cache->max_blocks_per_sequence();
  arena.num_pages = cache->options().num_pages;
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    arena.mla_pools.push_back(cache->MlaPool(l));
    arena.index_pools.push_back(cache->IndexPool(l));
    arena.summaries.push_back(cache->Summaries(l, 0));
  }
  kc::GpuEngineOptions eo;
  eo.gemm = options.bf16_gemms ? kc::GemmPrecision::kBf16 : kc::GemmPrecision::kAuto;
  eo.generic_kernels = options.generic_kernels;
  std::string err;
  auto engine = kc::GpuForwardEngine::Create(Describe(*weights), arena, eo, &err);
  if (engine == nullptr) return absl::InternalError(absl::StrCat("GPU model: ", err));
  return std::unique_ptr<Model>(new GpuModel(std::move(weights), cache, std::move(engine)));
}

absl::StatusOr<std::string> DescribeGpuModel(const Model& model) {
  const auto* g = dynamic_cast<const GpuModel*>(&model);
  if (g == nullptr) return absl::InvalidArgumentError("not a GPU model");
  return g->Describe();
}

}  // namespace pd::model
