#include "model/forward.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/mla.h"
#include "kernels/ops.h"

namespace pd::model {
namespace {

using kernels::WeightView;
namespace kc = kernels::cpu;

class StageTimer {
 public:
  explicit StageTimer(double* acc) : acc_(acc), t0_(std::chrono::steady_clock::now()) {}
  ~StageTimer() {
    *acc_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }

 private:
  double* acc_;
  std::chrono::steady_clock::time_point t0_;
};

// Copies columns [col, col + width) of a [rows, ld] matrix into a dense [rows, width].
void CopyColumns(const float* src, int64_t rows, int64_t ld, int64_t col, int64_t width,
                 float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + r * width, src + r * ld + col, sizeof(float) * size_t(width));
  }
}

class CpuModel final : public Model {
 public:
  CpuModel(std::shared_ptr<const ModelWeights> weights, kvcache::KvCache* cache)
      : w_(std::move(weights)),
        cfg_(w_->config),
        cache_(cache),
        pool_(kc::ThreadPool::Default()),
        inv_freq_(kernels::YarnInvFreq(cfg_.rope)),
        softmax_scale_(cfg_.SoftmaxScale()),
        selection_(cfg_.Selection()) {}

  absl::StatusOr<std::vector<float>> Forward(const ForwardBatch& batch,
                                             ForwardObserver* observer) override;
  const ModelConfig& config() const override { return cfg_; }
  kvcache::KvCache* cache() const override { return cache_; }
  ForwardStats stats() const override { return stats_; }
  void ResetStats() override { stats_ = ForwardStats{}; }

 private:
  void Attention(int layer, const ForwardBatch& batch, const std::vector<int64_t>& positions,
                 const float* h, float* out, ForwardObserver* observer);
  void Ffn(const LayerWeights& lw, const float* h, int64_t n, float* out);
  void DenseFfn(const FfnWeights& f, const float* h, int64_t n, float* out);

  std::shared_ptr<const ModelWeights> w_;
  const ModelConfig& cfg_;
  kvcache::KvCache* cache_;
  kc::ThreadPool* pool_;
  std::vector<float> inv_freq_;
  float softmax_scale_;
  kernels::SelectionConfig selection_;
  ForwardStats stats_;
};

absl::StatusOr<std::vector<float>> CpuModel::Forward(const ForwardBatch& batch,
                                                     ForwardObserver* observer) {
  PD_RETURN_IF_ERROR(ValidateBatch(batch, cfg_, *cache_));
  const int64_t n = int64_t(batch.tokens.size());
  const int hidden = cfg_.hidden_size;
  std::vector<int64_t> positions(static_cast<size_t>(n));
  {
    int64_t r = 0;
    for (const Segment& s : batch.segments) {
      for (int64_t i = 0; i < s.num_tokens; ++i) positions[size_t(r++)] = s.start_pos + i;
    }
  }
  stats_.tokens += n;

  std::vector<float> x(size_t(n * hidden));
  {
    StageTimer t(&stats_.embed);
    kc::ParallelFor(pool_, n, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        for (int c = 0; c < hidden; ++c) x[size_t(i * hidden + c)] = w_->embed.Get(batch.tokens[size_t(i)], c);
      }
    });
  }

  std::vector<float> h(x.size()), delta(x.size());
  for (int layer = 0; layer < cfg_.num_hidden_layers; ++layer) {
    const LayerWeights& lw = w_->layers[size_t(layer)];
    kc::RmsNorm(x.data(), n, hidden, lw.attn_norm.data(), cfg_.rms_norm_eps, h.data());
    Attention(layer, batch, positions, h.data(), delta.data(), observer);
    for (size_t i = 0; i < x.size(); ++i) x[i] += delta[i];
    if (observer) observer->OnLayerWritten(layer, batch);

    StageTimer t(&stats_.ffn);
    kc::RmsNorm(x.data(), n, hidden, lw.ffn_norm.data(), cfg_.rms_norm_eps, h.data());
    Ffn(lw, h.data(), n, delta.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += delta[i];
  }

  // Cached lengths advance only once every layer has been written.
  for (const Segment& s : batch.segments) {
    PD_RETURN_IF_ERROR(cache_->SetLength(s.kv_seq, s.start_pos + s.num_tokens));
  }

  StageTimer t(&stats_.lm_head);
  std::vector<int64_t> rows;
  if (batch.logits == ForwardBatch::Logits::kAll) {
    for (int64_t i = 0; i < n; ++i) rows.push_back(i);
  } else if (batch.logits == ForwardBatch::Logits::kLastOfSegment) {
    int64_t r = 0;
    for (const Segment& s : batch.segments) {
      r += s.num_tokens;
      rows.push_back(r - 1);
    }
  }
  std::vector<float> sel(rows.size() * size_t(hidden));
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(&sel[i * size_t(hidden)], &x[size_t(rows[i] * hidden)], sizeof(float) * size_t(hidden));
  }
  kc::RmsNorm(sel.data(), int64_t(rows.size()), hidden, w_->final_norm.data(), cfg_.rms_norm_eps,
              sel.data());
  std::vector<float> logits(rows.size() * size_t(cfg_.vocab_size));
  if (!rows.empty()) kc::Linear(sel.data(), int64_t(rows.size()), w_->lm_head, logits.data(), pool_);
  return logits;
}

void CpuModel::Attention(int layer, const ForwardBatch& batch,
                         const std::vector<int64_t>& positions, const float* h, float* out,
                         ForwardObserver* observer) {
  const LayerWeights& lw = w_->layers[size_t(layer)];
  const int64_t n = int64_t(batch.tokens.size());
  const int heads = cfg_.num_attention_heads;
  const int nope = cfg_.qk_nope_head_dim, rope = cfg_.qk_rope_head_dim, vdim = cfg_.v_head_dim;
  const int qk = nope + rope;
  const int r = cfg_.kv_lora_rank;
  const int ih = cfg_.index_n_heads, id = cfg_.index_head_dim;

  std::vector<float> cq(size_t(n * cfg_.q_lora_rank)), q(size_t(n * heads * qk));
  std::vector<float> kv(size_t(n * (r + rope))), ckv(size_t(n * r)), kpe(size_t(n * rope));
  std::vector<float> q_abs(size_t(n * heads * r)), q_pe(size_t(n * heads * rope));
  {
    StageTimer t(&stats_.attn_proj);
    kc::Linear(h, n, lw.q_a, cq.data(), pool_);
    kc::RmsNorm(cq.data(), n, cfg_.q_lora_rank, lw.q_a_norm.data(), cfg_.rms_norm_eps, cq.data());
    kc::Linear(cq.data(), n, lw.q_b, q.data(), pool_);
    kc::ApplyRope(q.data() + nope, n, heads, int64_t(heads) * qk, qk, positions.data(),
                  inv_freq_.data(), rope, /*interleaved=*/true);
    kc::Linear(h, n, lw.kv_a, kv.data(), pool_);
    CopyColumns(kv.data(), n, r + rope, 0, r, ckv.data());
    CopyColumns(kv.data(), n, r + rope, r, rope, kpe.data());
    kc::RmsNorm(ckv.data(), n, r, lw.kv_a_norm.data(), cfg_.rms_norm_eps, ckv.data());
    kc::ApplyRope(kpe.data(), n, 1, rope, rope, positions.data(), inv_freq_.data(), rope,
                  /*interleaved=*/true);
    // Absorb W_kvb's K part into the query: q_abs[t,h] = W_K[h]^T q_nope[t,h].
    std::vector<float> qn(size_t(n * nope)), qa(size_t(n * r));
    for (int hh = 0; hh < heads; ++hh) {
      CopyColumns(q.data(), n, int64_t(heads) * qk, int64_t(hh) * qk, nope, qn.data());
      kc::MatMulXW(qn.data(), n, lw.kv_b.Rows(int64_t(hh) * (nope + vdim), nope), qa.data(), pool_);
      for (int64_t t = 0; t < n; ++t) {
        std::memcpy(&q_abs[size_t((t * heads + hh) * r)], &qa[size_t(t * r)], sizeof(float) * size_t(r));
        std::memcpy(&q_pe[size_t((t * heads + hh) * rope)], &q[size_t(t * heads * qk + hh * qk + nope)],
                    sizeof(float) * size_t(rope));
      }
    }
  }

  // Indexer projections (whole batch), then per segment: cache writes, prep, selection.
  std::vector<float> iq(size_t(n * ih * id)), ik(size_t(n * id)), iw(size_t(n * ih));
  std::vector<uint8_t> q8(size_t(n * ih * id));
  std::vector<float> weights(size_t(n * ih));
  {
    StageTimer t(&stats_.indexer_prep);
    kc::Linear(cq.data(), n, lw.idx_wq_b, iq.data(), pool_);
    kc::Linear(h, n, lw.idx_wk, ik.data(), pool_);
    kc::Linear(h, n, lw.idx_weights_proj, iw.data(), pool_);
  }
  std::vector<int32_t> indices(size_t(n * selection_.topk));
  int64_t row = 0;
  for (const Segment& s : batch.segments) {
    const int64_t* pos = positions.data() + row;
    kernels::IndexerQueries queries;
    kernels::IndexKeyCacheView keys;
    {
      StageTimer t(&stats_.indexer_prep);
      kc::WriteMlaCache(cache_->MlaRef(s.kv_seq, layer), ckv.data() + row * r, kpe.data() + row * rope,
                        pos, s.num_tokens);
      kernels::IndexerPrepInputs in;
      in.q_proj = iq.data() + row * ih * id;
      in.k_proj = ik.data() + row * id;
      in.w_proj = iw.data() + row * ih;
      in.ln_gamma = lw.idx_k_norm_w.data();
      in.ln_beta = lw.idx_k_norm_b.data();
      in.ln_eps = 1e-6f;
      in.positions = pos;
      in.inv_freq = inv_freq_.data();
      in.rope_dim = rope;
      in.num_tokens = s.num_tokens;
      auto ref = cache_->IndexRef(s.kv_seq, layer);
      kc::IndexerPrep(in, ih, ref, q8.data() + row * ih * id, weights.data() + row * ih);
      kc::UpdateSummaries(ref, s.start_pos, s.start_pos + s.num_tokens);
      queries.q8 = q8.data() + row * ih * id;
      queries.weights = weights.data() + row * ih;
      queries.positions = pos;
      queries.num_queries = s.num_tokens;
      keys = cache_->IndexView(s.kv_seq, layer, s.start_pos + s.num_tokens);
    }
    if (observer) observer->OnIndexerReady(layer, s, queries, keys);
    {
      StageTimer t(&stats_.selection);
      kc::SelectTokens(selection_, keys, queries, indices.data() + row * selection_.topk, pool_);
    }
    row += s.num_tokens;
  }

  std::vector<float> lat(size_t(n * heads * r));
  {
    StageTimer t(&stats_.attention);
    row = 0;
    for (const Segment& s : batch.segments) {
      auto view = cache_->MlaView(s.kv_seq, layer, s.start_pos + s.num_tokens);
      kc::SparseMlaAttention(view, q_abs.data() + row * heads * r, q_pe.data() + row * heads * rope,
                             s.num_tokens, heads, indices.data() + row * selection_.topk,
                             selection_.topk, softmax_scale_, lat.data() + row * heads * r, nullptr,
                             pool_);
      row += s.num_tokens;
    }
  }
  {
    StageTimer t(&stats_.attn_proj);
    // Apply W_kvb's V part per head, then W_o.
    std::vector<float> la(size_t(n * r)), ov(size_t(n * vdim)), o(size_t(n * heads * vdim));
    for (int hh = 0; hh < heads; ++hh) {
      CopyColumns(lat.data(), n, int64_t(heads) * r, int64_t(hh) * r, r, la.data());
      kc::Linear(la.data(), n, lw.kv_b.Rows(int64_t(hh) * (nope + vdim) + nope, vdim), ov.data(), pool_);
      for (int64_t t = 0; t < n; ++t) {
        std::memcpy(&o[size_t((t * heads + hh) * vdim)], &ov[size_t(t * vdim)], sizeof(float) * size_t(vdim));
      }
    }
    kc::Linear(o.data(), n, lw.o, out, pool_);
  }
}

void CpuModel::DenseFfn(const FfnWeights& f, const float* h, int64_t n, float* out) {
  const int64_t inter = f.gate.rows;
  std::vector<float> g(size_t(n * inter)), u(size_t(n * inter));
  kc::Linear(h, n, f.gate, g.data(), pool_);
  kc::Linear(h, n, f.up, u.data(), pool_);
  kc::SiluMul(g.data(), u.data(), n * inter, g.data());
  kc::Linear(g.data(), n, f.down, out, pool_);
}

void CpuModel::Ffn(const LayerWeights& lw, const float* h, int64_t n, float* out) {
  const int hidden = cfg_.hidden_size;
  if (!lw.moe) {
    DenseFfn(lw.dense, h, n, out);
    return;
  }
  const int experts = cfg_.n_routed_experts, k = cfg_.num_experts_per_tok;
  std::vector<float> logits(size_t(n * experts));
  kc::Linear(h, n, lw.router, logits.data(), pool_);
  std::vector<int32_t> idx(size_t(n * k));
  std::vector<float> wts(size_t(n * k));
  kc::MoeRoute(logits.data(), lw.router_bias.data(), n, experts, cfg_.n_group, cfg_.topk_group, k,
               cfg_.norm_topk_prob, cfg_.routed_scaling_factor, idx.data(), wts.data());
  // Shared expert over every token, then each routed expert over its tokens.
  DenseFfn(lw.shared, h, n, out);
  std::vector<std::vector<std::pair<int64_t, float>>> routed(static_cast<size_t>(experts));
  for (int64_t t = 0; t < n; ++t) {
    for (int j = 0; j < k; ++j) routed[size_t(idx[size_t(t * k + j)])].push_back({t, wts[size_t(t * k + j)]});
  }
  std::vector<float> xin, yout;
  for (int e = 0; e < experts; ++e) {
    const auto& list = routed[size_t(e)];
    if (list.empty()) continue;
    const int64_t m = int64_t(list.size());
    xin.resize(size_t(m * hidden));
    yout.resize(size_t(m * hidden));
    for (int64_t i = 0; i < m; ++i) {
      std::memcpy(&xin[size_t(i * hidden)], h + list[size_t(i)].first * hidden, sizeof(float) * size_t(hidden));
    }
    DenseFfn(lw.experts[size_t(e)], xin.data(), m, yout.data());
    for (int64_t i = 0; i < m; ++i) {
      float wgt = list[size_t(i)].second;
      float* dst = out + list[size_t(i)].first * hidden;
      const float* src = &yout[size_t(i * hidden)];
      for (int c = 0; c < hidden; ++c) dst[c] += wgt * src[c];
    }
  }
}

}  // namespace

absl::Status ValidateBatch(const ForwardBatch& batch, const ModelConfig& cfg,
                           const kvcache::KvCache& cache) {
  if (batch.segments.empty()) return absl::InvalidArgumentError("batch has no segments");
  int64_t total = 0;
  for (size_t i = 0; i < batch.segments.size(); ++i) {
    const Segment& s = batch.segments[i];
    if (s.num_tokens <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, " has no tokens"));
    }
    for (size_t j = 0; j < i; ++j) {
      if (batch.segments[j].kv_seq == s.kv_seq) {
        return absl::InvalidArgumentError(
            absl::StrCat("sequence ", s.kv_seq, " appears in two segments of one batch"));
      }
    }
    if (!cache.IsLive(s.kv_seq)) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, ": no live KV sequence ", s.kv_seq));
    }
    const int64_t len = cache.Length(s.kv_seq);
    if (s.start_pos != len) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, ": start position ", s.start_pos,
                                                     " but sequence ", s.kv_seq, " holds ", len,
                                                     " tokens"));
    }
    if (s.start_pos + s.num_tokens > cache.Capacity(s.kv_seq)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "segment ", i, ": positions up to ", s.start_pos + s.num_tokens, " exceed the ",
          cache.Capacity(s.kv_seq), " tokens reserved for sequence ", s.kv_seq));
    }
    if (s.start_pos + s.num_tokens > cfg.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("segment ", i, ": position ",
                                                     s.start_pos + s.num_tokens,
                                                     " exceeds max_position_embeddings ",
                                                     cfg.max_position_embeddings));
    }
    total += s.num_tokens;
  }
  if (total != int64_t(batch.tokens.size())) {
    return absl::InvalidArgumentError(absl::StrCat("segments cover ", total, " tokens but the batch has ",
                                                   batch.tokens.size()));
  }
  for (size_t i = 0; i < batch.tokens.size(); ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= cfg.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("token ", batch.tokens[i], " at index ", i,
                                                     " is outside the vocabulary [0, ",
                                                     cfg.vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Model>> CreateCpuModel(std::shared_ptr<const ModelWeights> weights,
                                                      kvcache::KvCache* cache) {
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
  if (cache->on_device()) return absl::InvalidArgumentError("the CPU model needs a host KV cache");
  return std::unique_ptr<Model>(new CpuModel(std::move(weights), cache));
}

kvcache::KvCacheOptions CacheOptionsFor(const ModelConfig& config, int64_t max_tokens_per_sequence,
                                        int max_sequences) {
  kvcache::KvCacheOptions o;
  o.layout = config.Layout();
  o.num_layers = config.num_hidden_layers;
  o.max_sequences = max_sequences;
  o.max_tokens_per_sequence = max_tokens_per_sequence;
  o.num_pages = kernels::NumPages(max_tokens_per_sequence) * max_sequences;
  return o;
}

}  // namespace pd::model
