// The GPU backend against the CPU backend on random checkpoints (CTest label
// "gpu"; skipped without a CUDA device):
//   - the tiny preset (generic GPU kernels, bf16 GEMMs since its FP8 shapes are
//     too small for the block-scaled path), dense and MISA, prompts longer than
//     top-k so selection is sparse;
//   - a 2-layer model with DeepSeek-V3.2 attention shapes (64 heads, latent 512,
//     rope 64, indexer 64 x 128): the tuned kernels of kernels/cuda with bf16
//     GEMMs, the generic kernels, and FP8 block-scaled GEMMs;
//   - prefill vs chunked prefill vs token-by-token decode on the GPU; a mixed
//     batch of two sequences; greedy generation; bad batches; the
//     selection-report observer.
// Tolerances (stated per test): the GPU rounds GEMM inputs to bf16 (or FP8
// e4m3 with 1x128 scales) where the CPU uses fp32, so logits are compared by
// relative L2 over all rows and by top-1 agreement per row, separately for
// prompts within top-k and beyond it (see kBf16Bounds).
#include "model/gpu_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>

#include "kernels/cuda/model/gpu_forward.h"
#include "model/checkpoint_writer.h"
#include "model/generator.h"
#include "model/model_dir.h"
#include "model/selection_report.h"

namespace pd::model {
namespace {

bool HaveGpu() { return kernels::cuda::CudaDeviceCount() > 0; }

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

struct Instance {
  std::shared_ptr<const ModelWeights> weights;
  std::unique_ptr<kvcache::KvCache> cache;
  std::unique_ptr<Model> model;
};

// A tiny-preset variant with the DeepSeek-V3.2 attention and indexer shapes.
ModelConfig V32AttentionConfig() {
  ModelConfig c = *PresetConfig("tiny");
  c.hidden_size = 512;
  c.num_hidden_layers = 2;
  c.first_k_dense_replace = 1;
  c.intermediate_size = 512;
  c.moe_intermediate_size = 512;
  c.num_attention_heads = 64;
  c.q_lora_rank = 512;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.rope.dim = 64;
  c.v_head_dim = 128;
  c.index_n_heads = 64;
  c.index_head_dim = 128;
  c.index_topk = 256;
  c.misa_topk_heads = 8;
  c.misa_k_block_size = 256;
  return c;
}

class GpuModelTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    tiny_ = new std::string(::testing::TempDir() + "/gpu_model_test_tiny");
    v32_ = new std::string(::testing::TempDir() + "/gpu_model_test_v32attn");
    for (const std::string* d : {tiny_, v32_}) {
      std::filesystem::remove_all(*d);
      std::filesystem::create_directories(*d);
    }
    ASSERT_TRUE(WriteRandomCheckpoint(*tiny_, *PresetConfig("tiny"), 4321).ok());
    ASSERT_TRUE(WriteRandomCheckpoint(*v32_, V32AttentionConfig(), 99).ok());
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*tiny_);
    std::filesystem::remove_all(*v32_);
    delete tiny_;
    delete v32_;
  }

  static Instance MakeCpu(const std::string& dir, const ConfigOverrides& o, int64_t max_tokens = 1024,
                          int max_seqs = 4) {
    Instance in;
    auto md = OpenModelDirectory(dir, o);
    EXPECT_TRUE(md.ok()) << md.status();
    in.weights = md->weights;
    in.cache = std::move(*kvcache::KvCache::Create(CacheOptionsFor(in.weights->config, max_tokens, max_seqs)));
    in.model = std::move(*CreateCpuModel(in.weights, in.cache.get()));
    return in;
  }

  static Instance MakeGpu(const std::string& dir, const ConfigOverrides& o, const GpuModelOptions& g = {},
                          int64_t max_tokens = 1024, int max_seqs = 4) {
    Instance in;
    auto md = OpenModelDirectory(dir, o);
    EXPECT_TRUE(md.ok()) << md.status();
    in.weights = md->weights;
    auto cache = kvcache::KvCache::Create(CacheOptionsFor(in.weights->config, max_tokens, max_seqs),
                                          NewDeviceAllocator());
    EXPECT_TRUE(cache.ok()) << cache.status();
    in.cache = std::move(*cache);
    auto m = CreateGpuModel(in.weights, in.cache.get(), g);
    EXPECT_TRUE(m.ok()) << m.status();
    if (m.ok()) {
      in.model = std::move(*m);
      std::printf("  [%s] %s\n", dir.substr(dir.rfind('/') + 1).c_str(), DescribeGpuModel(*in.model)->c_str());
    }
    return in;
  }

  static std::vector<int32_t> RandomTokens(int n, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = int32_t(rng() % 256);
    return t;
  }

  // Prefills `toks` on a new sequence in chunks, returning every row's logits.
  static std::vector<float> PrefillAll(Instance& in, const std::vector<int32_t>& toks, int64_t chunk) {
    auto seq = in.cache->CreateSequence();
    EXPECT_TRUE(seq.ok());
    EXPECT_TRUE(in.cache->Reserve(*seq, int64_t(toks.size())).ok());
    std::vector<float> all;
    for (size_t off = 0; off < toks.size(); off += size_t(chunk)) {
      const size_t n = std::min(toks.size() - off, size_t(chunk));
      ForwardBatch b;
      b.tokens.assign(toks.begin() + int64_t(off), toks.begin() + int64_t(off + n));
      b.segments.push_back({*seq, int64_t(off), int64_t(n)});
      b.logits = ForwardBatch::Logits::kAll;
      auto l = in.model->Forward(b);
      EXPECT_TRUE(l.ok()) << l.status();
      if (l.ok()) all.insert(all.end(), l->begin(), l->end());
    }
    EXPECT_TRUE(in.cache->Release(*seq).ok());
    return all;
  }

  struct Agreement {
    double rel_l2 = 0;   // ||gpu - cpu|| / ||cpu|| over every row
    double top1 = 0;     // fraction of rows with the same argmax
    double worst_row = 0;
  };

  static Agreement Compare(const std::vector<float>& gpu, const std::vector<float>& cpu, int64_t vocab) {
    Agreement a;
    EXPECT_EQ(gpu.size(), cpu.size());
    if (gpu.size() != cpu.size() || cpu.empty()) return a;
    double num = 0, den = 0;
    int64_t same = 0;
    const int64_t rows = int64_t(cpu.size()) / vocab;
    for (int64_t r = 0; r < rows; ++r) {
      double rn = 0, rd = 0;
      int64_t ag = 0, ac = 0;
      for (int64_t v = 0; v < vocab; ++v) {
        const double g = gpu[size_t(r * vocab + v)], c = cpu[size_t(r * vocab + v)];
        EXPECT_TRUE(std::isfinite(g));
        rn += (g - c) * (g - c);
        rd += c * c;
        if (g > gpu[size_t(r * vocab + ag)]) ag = v;
        if (c > cpu[size_t(r * vocab + ac)]) ac = v;
      }
      num += rn;
      den += rd;
      a.worst_row = std::max(a.worst_row, std::sqrt(rn / std::max(rd, 1e-30)));
      same += ag == ac;
    }
    a.rel_l2 = std::sqrt(num / std::max(den, 1e-30));
    a.top1 = double(same) / double(rows);
    return a;
  }

  static std::string* tiny_;
  static std::string* v32_;
};
std::string* GpuModelTest::tiny_ = nullptr;
std::string* GpuModelTest::v32_ = nullptr;

// The bounds, and why they are loose. Measured on an H200 (run 2 of this
// work, 2026-11-22): GPU vs CPU relative L2 3.4e-2 to 5.9e-2 with bf16 GEMMs
// and 0.100 to 0.108 with FP8 GEMMs, top-1 agreement 0.917 to 0.995, the worst
// single row 0.35 to 0.50 -- for prompts within top-k (every key selected) as
// well as beyond it. And the GPU against itself, the same tokens in one
// prefill, in chunks of 37 or one by one: up to 5.5e-2 (top-1 >= 0.961),
// although every kernel involved is exact or within ~1e-7 of its CPU
// reference in isolation (kernels_cuda_model_test) and a batch of two decodes
// equals the two decoded alone to 2.8e-7. A ~1e-7 change in a GEMM's
// summation order can only become a 4% difference through discrete choices:
// the MoE router's top-k experts (and, beyond top-k, the indexer's top-k),
// whose near-ties are frequent in these random models; the rows whose routing
// flips carry the error (inference: MoeRoutingIsTheAmplifier below checks it
// by removing the choice). A wrong position, page, cache record, head or
// expert gives relative errors of order 1 and top-1 agreement near 1/258,
// far outside every bound here.
struct Bounds {
  double rel_dense, top1_dense;    // prompt <= top-k
  double rel_sparse, top1_sparse;  // prompt > top-k
};
constexpr Bounds kBf16Bounds{8e-2, 0.9, 8e-2, 0.9};
constexpr Bounds kFp8Bounds{0.15, 0.85, 0.15, 0.85};

// Tiny preset: bf16 GEMMs and the generic kernels; 200 tokens (top-k is 256)
// and 300 tokens in chunks of 128 (MISA blocks of 256).
TEST_F(GpuModelTest, TinyLogitsMatchCpuDenseAndMisa) {
  SKIP_WITHOUT_GPU();
  for (auto mode : {kernels::SelectionMode::kDense, kernels::SelectionMode::kMisa}) {
    ConfigOverrides o;
    o.selection_mode = mode;
    Instance cpu = MakeCpu(*tiny_, o);
    Instance gpu = MakeGpu(*tiny_, o);
    ASSERT_NE(gpu.model, nullptr);
    for (int len : {200, 300}) {
      const auto toks = RandomTokens(len, 11);
      const Agreement a = Compare(PrefillAll(gpu, toks, 128), PrefillAll(cpu, toks, 128),
                                  cpu.weights->config.vocab_size);
      std::printf("  tiny %s, %d tokens: rel L2 %.3e, worst row %.3e, top-1 agreement %.3f\n",
                  kernels::SelectionModeName(mode), len, a.rel_l2, a.worst_row, a.top1);
      const bool dense = len <= 256;
      EXPECT_LT(a.rel_l2, dense ? kBf16Bounds.rel_dense : kBf16Bounds.rel_sparse) << len;
      EXPECT_GE(a.top1, dense ? kBf16Bounds.top1_dense : kBf16Bounds.top1_sparse) << len;
    }
  }
}

// V3.2 attention shapes (top-k 256, B 256), 200 and 300 tokens: the tuned
// kernels with bf16 GEMMs, the generic kernels with bf16 GEMMs, and the tuned
// kernels with FP8 block-scaled GEMMs (activations quantised to e4m3 per 1x128
// group, as DeepSeek's inference does, against the CPU's fp32 activations;
// when the FP8 path is disabled by its self-test this variant runs bf16).
TEST_F(GpuModelTest, V32AttentionShapesMatchCpu) {
  SKIP_WITHOUT_GPU();
  for (auto mode : {kernels::SelectionMode::kDense, kernels::SelectionMode::kMisa}) {
    ConfigOverrides o;
    o.selection_mode = mode;
    Instance cpu = MakeCpu(*v32_, o);
    const int64_t vocab = cpu.weights->config.vocab_size;
    std::vector<std::vector<float>> ref;
    for (int len : {200, 300}) ref.push_back(PrefillAll(cpu, RandomTokens(len, 12), 150));
    struct Variant {
      const char* name;
      GpuModelOptions opt;
      Bounds bounds;
    };
    GpuModelOptions tuned_bf16, generic_bf16, fp8;
    tuned_bf16.bf16_gemms = true;
    generic_bf16.bf16_gemms = true;
    generic_bf16.generic_kernels = true;
    for (const Variant& v : {Variant{"tuned kernels, bf16 GEMMs", tuned_bf16, kBf16Bounds},
                             Variant{"generic kernels, bf16 GEMMs", generic_bf16, kBf16Bounds},
                             Variant{"tuned kernels, FP8 GEMMs", fp8, kFp8Bounds}}) {
      Instance gpu = MakeGpu(*v32_, o, v.opt);
      ASSERT_NE(gpu.model, nullptr);
      int i = 0;
      for (int len : {200, 300}) {
        const Agreement a = Compare(PrefillAll(gpu, RandomTokens(len, 12), 150), ref[size_t(i++)], vocab);
        std::printf("  v32-attention %s, %s, %d tokens: rel L2 %.3e, worst row %.3e, top-1 %.3f\n",
                    kernels::SelectionModeName(mode), v.name, len, a.rel_l2, a.worst_row, a.top1);
        const bool dense = len <= 256;
        EXPECT_LT(a.rel_l2, dense ? v.bounds.rel_dense : v.bounds.rel_sparse) << v.name << " " << len;
        EXPECT_GE(a.top1, dense ? v.bounds.top1_dense : v.bounds.top1_sparse) << v.name << " " << len;
      }
    }
  }
}

// On the GPU: one prefill, chunked prefill and token-by-token decode differ by
// GEMM summation order across batch sizes, amplified by routing flips (see
// above): relative L2 < 8e-2 and top-1 agreement >= 93%.
TEST_F(GpuModelTest, PrefillChunksAndDecodeAgree) {
  SKIP_WITHOUT_GPU();
  for (const std::string* dir : {tiny_, v32_}) {
    ConfigOverrides o;
    o.selection_mode = kernels::SelectionMode::kMisa;
    Instance gpu = MakeGpu(*dir, o);
    ASSERT_NE(gpu.model, nullptr);
    const int64_t vocab = gpu.weights->config.vocab_size;
    for (int len : {200, 280}) {
      const auto toks = RandomTokens(len, 13);
      const auto whole = PrefillAll(gpu, toks, len);
      const auto chunked = PrefillAll(gpu, toks, 37);
      const auto decoded = PrefillAll(gpu, toks, 1);
      const Agreement a = Compare(chunked, whole, vocab), b = Compare(decoded, whole, vocab);
      std::printf("  %s GPU, %d tokens: chunked vs whole rel L2 %.3e (top-1 %.3f), decode vs whole %.3e "
                  "(top-1 %.3f)\n",
                  dir == tiny_ ? "tiny" : "v32-attention", len, a.rel_l2, a.top1, b.rel_l2, b.top1);
      EXPECT_LT(a.rel_l2, 8e-2) << len;
      EXPECT_LT(b.rel_l2, 8e-2) << len;
      EXPECT_GE(a.top1, 0.93) << len;
      EXPECT_GE(b.top1, 0.93) << len;
    }
  }
}

// The amplifier check: the tiny model with every expert active (no expert
// choice) and prompts within top-k (no token choice) has no discrete decision
// left, so the GPU's bf16 rounding shows as a small smooth error. Measured on
// an H200 (2026-11-22): GPU vs CPU relative L2 9.7e-3 (worst row 1.7e-2, four
// to five times below the routed model's 3.4e-2..4.4e-2), top-1 0.970 (the
// random model's logits are flat: margins between the top two are often
// within 1%); GPU prefill vs decode 4.3e-4. Bounds: relative L2 < 1.5e-2,
// top-1 >= 0.95, prefill vs decode < 1e-3.
TEST_F(GpuModelTest, MoeRoutingIsTheAmplifier) {
  SKIP_WITHOUT_GPU();
  const std::string dir = ::testing::TempDir() + "/gpu_model_test_allexperts";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  ModelConfig c = *PresetConfig("tiny");
  c.n_group = 1;
  c.topk_group = 1;
  c.num_experts_per_tok = c.n_routed_experts;
  ASSERT_TRUE(WriteRandomCheckpoint(dir, c, 4321).ok());
  Instance cpu = MakeCpu(dir, {});
  Instance gpu = MakeGpu(dir, {});
  ASSERT_NE(gpu.model, nullptr);
  const int64_t vocab = cpu.weights->config.vocab_size;
  const auto toks = RandomTokens(200, 11);
  const auto g = PrefillAll(gpu, toks, 128);
  const Agreement a = Compare(g, PrefillAll(cpu, toks, 128), vocab);
  const Agreement b = Compare(PrefillAll(gpu, toks, 1), g, vocab);
  std::printf("  all experts active, 200 tokens: GPU vs CPU rel L2 %.3e (worst row %.3e, top-1 %.3f); "
              "GPU decode vs prefill %.3e\n", a.rel_l2, a.worst_row, a.top1, b.rel_l2);
  EXPECT_LT(a.rel_l2, 1.5e-2);
  EXPECT_GE(a.top1, 0.95);
  EXPECT_LT(b.rel_l2, 1e-3);
  std::filesystem::remove_all(dir);
}

// Two sequences decoded in one batch (segments listed in descending sequence
// id) equal each decoded alone.
TEST_F(GpuModelTest, BatchedDecodeEqualsSeparate) {
  SKIP_WITHOUT_GPU();
  Instance gpu = MakeGpu(*tiny_, {});
  ASSERT_NE(gpu.model, nullptr);
  const int64_t vocab = gpu.weights->config.vocab_size;
  const auto pa = RandomTokens(70, 21), pb = RandomTokens(130, 22);
  auto sa = *gpu.cache->CreateSequence(), sb = *gpu.cache->CreateSequence();
  ASSERT_TRUE(gpu.cache->Reserve(sa, 80).ok() && gpu.cache->Reserve(sb, 140).ok());
  ASSERT_TRUE(Prefill(*gpu.model, sa, pa, 64).ok());
  ASSERT_TRUE(Prefill(*gpu.model, sb, pb, 64).ok());
  ForwardBatch both;
  both.tokens = {5, 9};
  both.segments = {{sb, 130, 1}, {sa, 70, 1}};
  auto lb = gpu.model->Forward(both);
  ASSERT_TRUE(lb.ok()) << lb.status();
  // Separately, on fresh sequences with the same history.
  auto sa2 = *gpu.cache->CreateSequence(), sb2 = *gpu.cache->CreateSequence();
  ASSERT_TRUE(gpu.cache->Reserve(sa2, 80).ok() && gpu.cache->Reserve(sb2, 140).ok());
  ASSERT_TRUE(Prefill(*gpu.model, sa2, pa, 64).ok());
  ASSERT_TRUE(Prefill(*gpu.model, sb2, pb, 64).ok());
  ForwardBatch one;
  one.tokens = {5};
  one.segments = {{sb2, 130, 1}};
  auto l1 = gpu.model->Forward(one);
  one.tokens = {9};
  one.segments = {{sa2, 70, 1}};
  auto l2 = gpu.model->Forward(one);
  ASSERT_TRUE(l1.ok() && l2.ok());
  std::vector<float> sep = *l1;
  sep.insert(sep.end(), l2->begin(), l2->end());
  const Agreement a = Compare(*lb, sep, vocab);
  std::printf("  batched vs separate decode: rel L2 %.3e\n", a.rel_l2);
  EXPECT_LT(a.rel_l2, 1e-3);
  EXPECT_EQ(a.top1, 1.0);
}

// Greedy generation on the GPU: Generate equals a manual argmax loop on the GPU,
// and every GPU choice is (near-)optimal for the CPU backend given the same
// history: its CPU logit is within 2% of the CPU logits' range of the CPU's best.
TEST_F(GpuModelTest, GreedyGenerationAgreesWithCpu) {
  SKIP_WITHOUT_GPU();
  Instance gpu = MakeGpu(*tiny_, {});
  Instance cpu = MakeCpu(*tiny_, {});
  ASSERT_NE(gpu.model, nullptr);
  const auto prompt = RandomTokens(40, 31);
  GenerateOptions opts;
  opts.max_new_tokens = 8;
  opts.stop_at_eos = false;
  opts.sampling.temperature = 0;
  auto r = Generate(*gpu.model, prompt, opts);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->tokens.size(), 8u);
  auto gs = *gpu.cache->CreateSequence(), cs = *cpu.cache->CreateSequence();
  ASSERT_TRUE(gpu.cache->Reserve(gs, 48).ok() && cpu.cache->Reserve(cs, 48).ok());
  auto gl = *Prefill(*gpu.model, gs, prompt, 16);
  auto cl = *Prefill(*cpu.model, cs, prompt, 16);
  int exact = 0;
  for (int i = 0; i < 8; ++i) {
    const int32_t g = int32_t(std::max_element(gl.begin(), gl.end()) - gl.begin());
    const int32_t c = int32_t(std::max_element(cl.begin(), cl.end()) - cl.begin());
    EXPECT_EQ(g, r->tokens[size_t(i)]) << "step " << i;
    const float range = *std::max_element(cl.begin(), cl.end()) - *std::min_element(cl.begin(), cl.end());
    EXPECT_LE(cl[size_t(c)] - cl[size_t(g)], 0.02f * range) << "step " << i;
    exact += g == c;
    ForwardBatch b;
    b.tokens = {g};  // both backends continue with the GPU's token
    b.segments = {{gs, gpu.cache->Length(gs), 1}};
    gl = *gpu.model->Forward(b);
    b.segments = {{cs, cpu.cache->Length(cs), 1}};
    cl = *cpu.model->Forward(b);
  }
  std::printf("  greedy: %d of 8 GPU tokens are the CPU's argmax\n", exact);
  EXPECT_GE(exact, 6);
}

TEST_F(GpuModelTest, RejectsBadInputWithoutSideEffects) {
  SKIP_WITHOUT_GPU();
  Instance gpu = MakeGpu(*tiny_, {});
  ASSERT_NE(gpu.model, nullptr);
  auto seq = *gpu.cache->CreateSequence();
  ASSERT_TRUE(gpu.cache->Reserve(seq, 64).ok());
  ForwardBatch b;
  b.tokens = {1, 2, 300};
  b.segments.push_back({seq, 0, 3});
  auto r = gpu.model->Forward(b);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("vocabulary"), std::string::npos);
  b.tokens = {1, 2, 3};
  b.segments = {{seq, 5, 3}};
  EXPECT_EQ(gpu.model->Forward(b).status().code(), absl::StatusCode::kInvalidArgument);
  b.tokens.assign(65, 1);
  b.segments = {{seq, 0, 65}};
  EXPECT_EQ(gpu.model->Forward(b).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gpu.cache->Length(seq), 0);
  b.tokens = {1, 2};
  b.segments = {{seq, 0, 2}};
  EXPECT_TRUE(gpu.model->Forward(b).ok());
  EXPECT_EQ(gpu.cache->Length(seq), 2);

  // A host cache, and modes the GPU backend does not implement.
  auto md = OpenModelDirectory(*tiny_, {});
  ASSERT_TRUE(md.ok());
  auto host = *kvcache::KvCache::Create(CacheOptionsFor(md->weights->config, 64, 1));
  EXPECT_EQ(CreateGpuModel(md->weights, host.get()).status().code(), absl::StatusCode::kInvalidArgument);
  ConfigOverrides o;
  o.selection_mode = kernels::SelectionMode::kHisa;
  auto mh = OpenModelDirectory(*tiny_, o);
  ASSERT_TRUE(mh.ok());
  auto dev = *kvcache::KvCache::Create(CacheOptionsFor(mh->weights->config, 64, 1), NewDeviceAllocator());
  auto st = CreateGpuModel(mh->weights, dev.get()).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("hisa"), std::string::npos) << st;
}

// selection-report on the GPU backend: the observer gets host copies of the
// GPU's indexer state; dense against itself has recall 1.
TEST_F(GpuModelTest, SelectionReportRunsOnGpuState) {
  SKIP_WITHOUT_GPU();
  Instance gpu = MakeGpu(*tiny_, {}, {}, 512, 1);
  ASSERT_NE(gpu.model, nullptr);
  const auto toks = RandomTokens(300, 41);
  const std::vector<kernels::SelectionMode> modes = {kernels::SelectionMode::kDense,
                                                     kernels::SelectionMode::kMisa};
  auto rep = RunSelectionReport(*gpu.model, toks, 128, modes);
  ASSERT_TRUE(rep.ok()) << rep.status();
  ASSERT_EQ(rep->layers.size(), size_t(gpu.weights->config.num_hidden_layers));
  for (const LayerReport& l : rep->layers) {
    EXPECT_EQ(l.queries, 300);
    EXPECT_DOUBLE_EQ(l.modes[0].Recall(l.queries), 1.0);
    EXPECT_GT(l.modes[1].Recall(l.queries), 0.0);
  }
}

}  // namespace
}  // namespace pd::model
