#include "model/forward.h"

#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "model/checkpoint_writer.h"
#include "model/generator.h"
#include "model/model_dir.h"
#include "model/selection_report.h"

namespace pd::model {
namespace {

// A random tiny checkpoint shared by the tests (written once).
class ForwardTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(::testing::TempDir() + "/forward_test_tiny");
    std::filesystem::remove_all(*dir_);
    std::filesystem::create_directories(*dir_);
    auto cfg = PresetConfig("tiny");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    ASSERT_TRUE(WriteRandomCheckpoint(*dir_, *cfg, 1234).ok());
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }

  struct Instance {
    std::shared_ptr<const ModelWeights> weights;
    std::unique_ptr<kvcache::KvCache> cache;
    std::unique_ptr<Model> model;
  };

  static Instance Make(const ConfigOverrides& o, int64_t max_tokens = 1024, int max_seqs = 4) {
    Instance in;
    auto dir = OpenModelDirectory(*dir_, o);
    EXPECT_TRUE(dir.ok()) << dir.status();
    in.weights = dir->weights;
    in.cache = std::move(*kvcache::KvCache::Create(CacheOptionsFor(in.weights->config, max_tokens, max_seqs)));
    in.model = std::move(*CreateCpuModel(in.weights, in.cache.get()));
    return in;
  }

  static std::vector<int32_t> RandomTokens(int n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(rng() % 256);
    return t;
  }

  static std::vector<float> PrefillAll(Instance& in, const std::vector<int32_t>& toks, int64_t chunk) {
    auto seq = in.cache->CreateSequence();
    EXPECT_TRUE(seq.ok());
    EXPECT_TRUE(in.cache->Reserve(*seq, int64_t(toks.size())).ok());
    std::vector<float> all;
    for (size_t off = 0; off < toks.size(); off += size_t(chunk)) {
      size_t n = std::min(toks.size() - off, size_t(chunk));
      ForwardBatch b;
      b.tokens.assign(toks.begin() + off, toks.begin() + off + n);
      b.segments.push_back({*seq, int64_t(off), int64_t(n)});
      b.logits = ForwardBatch::Logits::kAll;
      auto l = in.model->Forward(b);
      EXPECT_TRUE(l.ok()) << l.status();
      all.insert(all.end(), l->begin(), l->end());
    }
    return all;
  }

  static std::vector<float> DecodeAll(Instance& in, const std::vector<int32_t>& toks) {
    auto seq = in.cache->CreateSequence();
    EXPECT_TRUE(seq.ok());
    EXPECT_TRUE(in.cache->Reserve(*seq, int64_t(toks.size())).ok());
    std::vector<float> all;
    for (size_t i = 0; i < toks.size(); ++i) {
      ForwardBatch b;
      b.tokens = {toks[i]};
      b.segments.push_back({*seq, int64_t(i), 1});
      auto l = in.model->Forward(b);
      EXPECT_TRUE(l.ok()) << l.status();
      all.insert(all.end(), l->begin(), l->end());
    }
    return all;
  }

  // max |a - b| / max |b|
  static double RelMaxDiff(const std::vector<float>& a, const std::vector<float>& b) {
    EXPECT_EQ(a.size(), b.size());
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      EXPECT_TRUE(std::isfinite(a[i]));
      num = std::max(num, double(std::fabs(a[i] - b[i])));
      den = std::max(den, double(std::fabs(b[i])));
    }
    return num / den;
  }

  static std::string* dir_;
};
std::string* ForwardTest::dir_ = nullptr;

// Tolerance for prefill-vs-decode: zero. Every CPU kernel is batch invariant
// (a row's arithmetic never depends on the other rows, the chunk or the thread
// count: see kernels/ops.h Linear), so a token's logits are bit-identical
// whether it is prefilled in a chunk or decoded alone. Any difference is a bug.
constexpr double kPrefillDecodeTol = 0.0;

TEST_F(ForwardTest, PrefillLogitsEqualIncrementalDecodeDense) {
  ConfigOverrides o;
  o.selection_mode = kernels::SelectionMode::kDense;
  Instance in = Make(o);
  // 300 tokens: beyond top-k (256), so selection is sparse, and across pages.
  auto toks = RandomTokens(300, 1);
  auto prefill = PrefillAll(in, toks, 128);
  auto decode = DecodeAll(in, toks);
  EXPECT_LE(RelMaxDiff(prefill, decode), kPrefillDecodeTol);
}

TEST_F(ForwardTest, PrefillLogitsEqualIncrementalDecodeMisaAllHeads) {
  ConfigOverrides o;
  o.selection_mode = kernels::SelectionMode::kMisa;
  o.misa_topk_heads = 8;  // h = H: MISA selects what DSA selects
  o.misa_k_block_size = 64;
  Instance in = Make(o);
  auto toks = RandomTokens(300, 2);
  EXPECT_LE(RelMaxDiff(PrefillAll(in, toks, 100), DecodeAll(in, toks)), kPrefillDecodeTol);
}

TEST_F(ForwardTest, ChunkSizeDoesNotChangeLogits) {
  ConfigOverrides o;
  o.selection_mode = kernels::SelectionMode::kDense;
  Instance in = Make(o);
  auto toks = RandomTokens(280, 3);
  EXPECT_LE(RelMaxDiff(PrefillAll(in, toks, 280), PrefillAll(in, toks, 37)), kPrefillDecodeTol);
}

TEST_F(ForwardTest, BatchedDecodeEqualsSeparateDecode) {
  Instance in = Make({});
  auto a = RandomTokens(90, 4), b = RandomTokens(70, 5);
  // Separate.
  auto la = DecodeAll(in, a);
  auto lb = DecodeAll(in, b);
  // Together: a's and b's tokens interleaved in two-segment batches once both run.
  auto sa = *in.cache->CreateSequence(), sb = *in.cache->CreateSequence();
  ASSERT_TRUE(in.cache->Reserve(sa, 90).ok());
  ASSERT_TRUE(in.cache->Reserve(sb, 70).ok());
  std::vector<float> ja, jb;
  const int64_t vocab = in.weights->config.vocab_size;
  for (int i = 0; i < 90; ++i) {
    ForwardBatch batch;
    batch.tokens.push_back(a[size_t(i)]);
    batch.segments.push_back({sa, i, 1});
    if (i < 70) {
      batch.tokens.push_back(b[size_t(i)]);
      batch.segments.push_back({sb, i, 1});
    }
    auto l = in.model->Forward(batch);
    ASSERT_TRUE(l.ok()) << l.status();
    ja.insert(ja.end(), l->begin(), l->begin() + vocab);
    if (i < 70) jb.insert(jb.end(), l->begin() + vocab, l->end());
  }
  EXPECT_LE(RelMaxDiff(ja, la), kPrefillDecodeTol);
  EXPECT_LE(RelMaxDiff(jb, lb), kPrefillDecodeTol);
}

TEST_F(ForwardTest, SeededGenerationIsDeterministic) {
  Instance in = Make({});
  auto prompt = RandomTokens(40, 6);
  GenerateOptions opts;
  opts.max_new_tokens = 24;
  opts.stop_at_eos = false;
  opts.sampling.temperature = 0.9f;
  opts.sampling.top_p = 0.95f;
  opts.sampling.seed = 77;
  auto r1 = Generate(*in.model, prompt, opts);
  auto r2 = Generate(*in.model, prompt, opts);
  ASSERT_TRUE(r1.ok() && r2.ok());
  EXPECT_EQ(r1->tokens.size(), 24u);
  EXPECT_EQ(r1->tokens, r2->tokens);
  opts.sampling.seed = 78;
  auto r3 = Generate(*in.model, prompt, opts);
  ASSERT_TRUE(r3.ok());
  EXPECT_NE(r1->tokens, r3->tokens);  // 24 draws from a 258-token vocab: collision is negligible
  // Every sequence was released.
  EXPECT_EQ(in.cache->live_sequences(), 0);
}

TEST_F(ForwardTest, GreedyGenerationMatchesManualArgmax) {
  Instance in = Make({});
  auto prompt = RandomTokens(20, 7);
  GenerateOptions opts;
  opts.max_new_tokens = 5;
  opts.stop_at_eos = false;
  opts.sampling.temperature = 0;
  auto r = Generate(*in.model, prompt, opts);
  ASSERT_TRUE(r.ok());
  // Recompute by hand: prefill + argmax loop.
  auto seq = *in.cache->CreateSequence();
  ASSERT_TRUE(in.cache->Reserve(seq, 25).ok());
  auto logits = *Prefill(*in.model, seq, prompt, 8);
  for (int i = 0; i < 5; ++i) {
    int32_t best = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
    EXPECT_EQ(best, r->tokens[size_t(i)]) << "step " << i;
    ForwardBatch b;
    b.tokens = {best};
    b.segments.push_back({seq, in.cache->Length(seq), 1});
    logits = *in.model->Forward(b);
  }
}

TEST_F(ForwardTest, BadBatchesAreRejectedWithoutSideEffects) {
  Instance in = Make({});
  auto seq = *in.cache->CreateSequence();
  ASSERT_TRUE(in.cache->Reserve(seq, 64).ok());
  ForwardBatch b;
  b.tokens = {1, 2, 300};  // 300 is outside the 258-token vocabulary
  b.segments.push_back({seq, 0, 3});
  auto r = in.model->Forward(b);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("vocabulary"), std::string::npos);
  b.tokens = {1, 2, 3};
  b.segments = {{seq, 5, 3}};  // position gap
  EXPECT_EQ(in.model->Forward(b).status().code(), absl::StatusCode::kInvalidArgument);
  b.tokens.assign(65, 1);
  b.segments = {{seq, 0, 65}};  // beyond the reserved 64
  EXPECT_EQ(in.model->Forward(b).status().code(), absl::StatusCode::kInvalidArgument);
  b.tokens = {1, 2};
  b.segments = {{seq, 0, 1}, {seq, 1, 1}};  // one sequence twice
  EXPECT_EQ(in.model->Forward(b).status().code(), absl::StatusCode::kInvalidArgument);
  ForwardBatch empty;
  EXPECT_EQ(in.model->Forward(empty).status().code(), absl::StatusCode::kInvalidArgument);
  b.segments = {{seq + 1, 0, 2}};  // not a live sequence
  EXPECT_EQ(in.model->Forward(b).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(in.cache->Length(seq), 0);
  // And the model still serves a good batch afterwards.
  b.segments = {{seq, 0, 2}};
  EXPECT_TRUE(in.model->Forward(b).ok());
  EXPECT_EQ(in.cache->Length(seq), 2);
}

TEST_F(ForwardTest, SelectionReportRecallIsOneForExactModes) {
  ConfigOverrides o;
  o.misa_topk_heads = 8;     // h = H
  o.misa_stage1_topk = 1024; // C >= L for a 600-token prompt
  o.misa_k_block_size = 64;
  Instance in = Make(o);
  auto prompt = RandomTokens(600, 8);
  std::vector<kernels::SelectionMode> modes = {kernels::SelectionMode::kMisa,
                                               kernels::SelectionMode::kMisaDagger};
  auto rep = RunSelectionReport(*in.model, prompt, 256, modes);
  ASSERT_TRUE(rep.ok()) << rep.status();
  ASSERT_EQ(rep->layers.size(), 4u);
  for (const auto& l : rep->layers) {
    EXPECT_EQ(l.queries, 600);
    for (const auto& m : l.modes) EXPECT_DOUBLE_EQ(m.Recall(l.queries), 1.0) << l.layer;
  }
}

TEST_F(ForwardTest, SelectionReportMisaWithFewHeadsLosesSomeRecall) {
  ConfigOverrides o;
  o.misa_topk_heads = 2;
  o.misa_k_block_size = 64;
  Instance in = Make(o);
  auto prompt = RandomTokens(700, 9);
  std::vector<kernels::SelectionMode> modes = {kernels::SelectionMode::kMisa};
  auto rep = RunSelectionReport(*in.model, prompt, 350, modes);
  ASSERT_TRUE(rep.ok());
  double sum = 0;
  for (const auto& l : rep->layers) sum += l.modes[0].Recall(l.queries);
  double mean = sum / double(rep->layers.size());
  // Queries with fewer than top-k visible tokens select everything (recall 1);
  // the rest lose some: strictly between.
  EXPECT_GT(mean, 0.2);
  EXPECT_LT(mean, 1.0);
}

TEST(SelectionRecallTest, CountsIntersection) {
  std::vector<int32_t> d = {5, 3, 9, -1}, s = {3, 4, 9, 5};
  EXPECT_DOUBLE_EQ(SelectionRecall(s, d), 1.0);
  s = {3, 4, 8, -1};
  EXPECT_DOUBLE_EQ(SelectionRecall(s, d), 1.0 / 3.0);
  std::vector<int32_t> none = {-1, -1};
  EXPECT_DOUBLE_EQ(SelectionRecall(s, none), 1.0);
}

}  // namespace
}  // namespace pd::model
