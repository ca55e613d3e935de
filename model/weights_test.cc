#include "model/weights.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "kernels/numeric.h"
#include "model/checkpoint_writer.h"
#include "model/safetensors.h"

namespace pd::model {
namespace {

using kernels::DType;
using kernels::WeightView;
using ::testing::HasSubstr;

class WeightsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    root_ = absl::StrCat(::testing::TempDir(), "/wt_", info->name(), "_", ::getpid());
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
    absl::StatusOr<ModelConfig> tiny = PresetConfig("tiny");
    ASSERT_TRUE(tiny.ok());
    tiny_ = *tiny;
  }
  void TearDown() override { std::filesystem::remove_all(root_); }

  // Writes the tiny model into root_/name with small shards; returns the dir.
  std::string WriteTiny(const std::string& name, uint64_t seed, const ModelConfig* config = nullptr,
                        RandomCheckpointOptions options = {}) {
    const std::string dir = root_ + "/" + name;
    if (options.max_shard_bytes == RandomCheckpointOptions().max_shard_bytes) {
      options.max_shard_bytes = 1 << 20;
    }
    absl::Status s = WriteRandomCheckpoint(dir, config ? *config : tiny_, seed, options);
    EXPECT_TRUE(s.ok()) << s;
    return dir;
  }

  std::string root_;
  ModelConfig tiny_;
};

std::vector<std::string> ShardFiles(const std::string& dir) {
  std::vector<std::string> v;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::string n = e.path().filename().string();
    if (n.rfind("model-", 0) == 0 && n.size() > 12 &&
        n.compare(n.size() - 12, 12, ".safetensors") == 0) {
      v.push_back(n);
    }
  }
  std::sort(v.begin(), v.end());
  return v;
}

std::string ReadAll(const std::string& path) {
  absl::StatusOr<std::string> s = ReadFileToString(path);
  EXPECT_TRUE(s.ok()) << s.status();
  return s.ok() ? *s : std::string();
}

// Every (name, view) and (name, vector) of a loaded model, enumerated by hand
// from the Hugging Face names.
struct Named {
  std::vector<std::pair<std::string, const WeightView*>> matrices;
  std::vector<std::pair<std::string, const std::vector<float>*>> vectors;
};

Named Enumerate(const ModelWeights& w) {
  Named n;
  const ModelConfig& c = w.config;
  n.matrices.push_back({"model.embed_tokens.weight", &w.embed});
  if (!c.tie_word_embeddings) n.matrices.push_back({"lm_head.weight", &w.lm_head});
  n.vectors.push_back({"model.norm.weight", &w.final_norm});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = w.layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    auto ffn = [&](const std::string& q, const FfnWeights& f) {
      n.matrices.push_back({q + "gate_proj.weight", &f.gate});
      n.matrices.push_back({q + "up_proj.weight", &f.up});
      n.matrices.push_back({q + "down_proj.weight", &f.down});
    };
    n.vectors.push_back({p + "input_layernorm.weight", &L.attn_norm});
    n.matrices.push_back({p + "self_attn.q_a_proj.weight", &L.q_a});
    n.vectors.push_back({p + "self_attn.q_a_layernorm.weight", &L.q_a_norm});
    n.matrices.push_back({p + "self_attn.q_b_proj.weight", &L.q_b});
    n.matrices.push_back({p + "self_attn.kv_a_proj_with_mqa.weight", &L.kv_a});
    n.vectors.push_back({p + "self_attn.kv_a_layernorm.weight", &L.kv_a_norm});
    n.matrices.push_back({p + "self_attn.kv_b_proj.weight", &L.kv_b});
    n.matrices.push_back({p + "self_attn.o_proj.weight", &L.o});
    n.matrices.push_back({p + "self_attn.indexer.wq_b.weight", &L.idx_wq_b});
    n.matrices.push_back({p + "self_attn.indexer.wk.weight", &L.idx_wk});
    n.vectors.push_back({p + "self_attn.indexer.k_norm.weight", &L.idx_k_norm_w});
    n.vectors.push_back({p + "self_attn.indexer.k_norm.bias", &L.idx_k_norm_b});
    n.matrices.push_back({p + "self_attn.indexer.weights_proj.weight", &L.idx_weights_proj});
    n.vectors.push_back({p + "post_attention_layernorm.weight", &L.ffn_norm});
    if (!L.moe) {
      ffn(p + "mlp.", L.dense);
      continue;
    }
    n.matrices.push_back({p + "mlp.gate.weight", &L.router});
    n.vectors.push_back({p + "mlp.gate.e_score_correction_bias", &L.router_bias});
    for (size_t e = 0; e < L.experts.size(); ++e) {
      ffn(absl::StrCat(p, "mlp.experts.", e, "."), L.experts[e]);
    }
    if (c.n_shared_experts > 0) ffn(p + "mlp.shared_experts.", L.shared);
  }
  return n;
}

float DecodeElement(const TensorInfo& t, int64_t i) {
  const uint8_t* p = t.bytes.data();
  switch (t.dtype) {
    case DType::kF32: {
      float f;
      std::memcpy(&f, p + 4 * i, 4);
      return f;
    }
    case DType::kBF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return kernels::Bf16ToFloat(h);
    }
    case DType::kF16: {
      uint16_t h;
      std::memcpy(&h, p + 2 * i, 2);
      return kernels::Fp16ToFloat(h);
    }
    default: ADD_FAILURE() << "unexpected dtype"; return 0;
  }
}

double StdDev(const WeightView& w) {
  double s = 0, s2 = 0;
  const double n = double(w.rows) * double(w.cols);
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t c = 0; c < w.cols; ++c) {
      double v = w.Get(r, c);
      s += v;
      s2 += v * v;
    }
  }
  return std::sqrt(s2 / n - (s / n) * (s / n));
}

TEST_F(WeightsTest, RandomTinyCheckpointLoadsByteForByte) {
  const std::string dir = WriteTiny("ckpt", 42);
  const std::vector<std::string> shards = ShardFiles(dir);
  ASSERT_GE(shards.size(), 3u);
  for (size_t i = 0; i < shards.size(); ++i) {
    EXPECT_EQ(shards[i], absl::StrCat("model-0000", i + 1, "-of-0000", shards.size(),
                                      ".safetensors"));
  }
  EXPECT_TRUE(std::filesystem::exists(dir + "/model.safetensors.index.json"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/tokenizer.json"));

  absl::StatusOr<ModelConfig> config = LoadConfig(dir + "/config.json");
  ASSERT_TRUE(config.ok()) << config.status();
  EXPECT_EQ(ConfigToJson(*config), ConfigToJson(tiny_));
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadWeights(dir, *config);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelWeights& mw = **w;
  ASSERT_EQ(mw.layers.size(), 4u);
  EXPECT_FALSE(mw.layers[0].moe);
  EXPECT_TRUE(mw.layers[1].moe);
  EXPECT_EQ(mw.layers[1].experts.size(), 8u);
  EXPECT_EQ(mw.fingerprint.size(), 32u);

  // An independent mapping of the same files to compare against.
  absl::StatusOr<std::unique_ptr<SafetensorsCheckpoint>> ref = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ref.ok()) << ref.status();
  const Named named = Enumerate(mw);
  // Every tensor of the checkpoint is used: matrices, their FP8 scales, vectors.
  size_t fp8 = 0;
  for (const auto& [name, v] : named.matrices) fp8 += v->dtype == DType::kFP8E4M3;
  EXPECT_EQ((*ref)->tensors().size(), named.matrices.size() + named.vectors.size() + fp8);
  // Tiny: per layer 7 attention projections FP8 + 7 scales + weights_proj + 6
  // norm vectors; dense FFN 3 + 3; MoE (8 routed + 1 shared) * 3 * 2 + gate + bias.
  EXPECT_EQ((*ref)->tensors().size(), 3u + 4 * 21 + 1 * 6 + 3 * (9 * 3 * 2 + 2));

  for (const auto& [name, v] : named.matrices) {
    SCOPED_TRACE(name);
    const TensorInfo* t = (*ref)->Find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(v->dtype, t->dtype);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{v->rows, v->cols}));
    EXPECT_EQ(v->ld, v->cols);
    const size_t bytes = size_t(v->rows * v->cols) * kernels::DTypeSize(v->dtype);
    ASSERT_EQ(bytes, t->bytes.size());
    EXPECT_EQ(std::memcmp(v->data, t->bytes.data(), bytes), 0);
    // Zero-copy: the view points into the model's own mapping.
    const TensorInfo* own = mw.checkpoint->Find(name);
    ASSERT_NE(own, nullptr);
    EXPECT_EQ(v->data, own->bytes.data());
    if (v->dtype == DType::kFP8E4M3) {
      const TensorInfo* s = (*ref)->Find(name + "_scale_inv");
      ASSERT_NE(s, nullptr);
      EXPECT_EQ(s->dtype, DType::kF32);
      EXPECT_EQ(s->shape, (std::vector<int64_t>{(v->rows + 127) / 128, (v->cols + 127) / 128}));
      EXPECT_EQ(v->scale, reinterpret_cast<const float*>(
                              mw.checkpoint->Find(name + "_scale_inv")->bytes.data()));
      EXPECT_EQ(v->scale_ld, (v->cols + 127) / 128);
      EXPECT_EQ(v->block, 128);
      EXPECT_EQ(std::memcmp(v->scale, s->bytes.data(), s->bytes.size()), 0);
    } else {
      EXPECT_EQ(v->scale, nullptr);
    }
  }
  for (const auto& [name, vec] : named.vectors) {
    SCOPED_TRACE(name);
    const TensorInfo* t = (*ref)->Find(name);
    ASSERT_NE(t, nullptr);
    ASSERT_EQ(t->shape.size(), 1u);
    ASSERT_EQ(int64_t(vec->size()), t->shape[0]);
    for (int64_t i = 0; i < t->shape[0]; ++i) ASSERT_EQ((*vec)[i], DecodeElement(*t, i)) << i;
  }

  // Hugging Face DeepSeek-V3.2 dtypes.
  auto dtype = [&](const std::string& n) { return (*ref)->Find(n)->dtype; };
  EXPECT_EQ(dtype("model.embed_tokens.weight"), DType::kBF16);
  EXPECT_EQ(dtype("lm_head.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.norm.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.0.self_attn.q_a_proj.weight"), DType::kFP8E4M3);
  EXPECT_EQ(dtype("model.layers.0.self_attn.indexer.wq_b.weight"), DType::kFP8E4M3);
  EXPECT_EQ(dtype("model.layers.0.self_attn.indexer.wk.weight"), DType::kFP8E4M3);
  EXPECT_EQ(dtype("model.layers.0.self_attn.indexer.weights_proj.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.0.self_attn.indexer.k_norm.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.0.self_attn.indexer.k_norm.bias"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.0.mlp.down_proj.weight"), DType::kFP8E4M3);
  EXPECT_EQ(dtype("model.layers.1.mlp.gate.weight"), DType::kBF16);
  EXPECT_EQ(dtype("model.layers.1.mlp.gate.e_score_correction_bias"), DType::kF32);
  EXPECT_EQ(dtype("model.layers.1.mlp.experts.7.down_proj.weight"), DType::kFP8E4M3);
  EXPECT_EQ(dtype("model.layers.1.mlp.shared_experts.up_proj.weight"), DType::kFP8E4M3);
  // kv_a has 160 rows: a partial second row block of scales.
  EXPECT_EQ((*ref)->Find("model.layers.2.self_attn.kv_a_proj_with_mqa.weight_scale_inv")->shape,
            (std::vector<int64_t>{2, 2}));
}

TEST_F(WeightsTest, RandomInitialisationFollowsTheRecipe) {
  const std::string dir = WriteTiny("ckpt", 7);
  absl::StatusOr<std::unique_ptr<ModelWeights>> w = LoadWeights(dir, tiny_);
  ASSERT_TRUE(w.ok()) << w.status();
  const ModelWeights& mw = **w;
  const double layer_scale = 1.0 / std::sqrt(2.0 * 4);
  struct Case {
    const char* what;
    const WeightView* v;
    double std;
  };
  const LayerWeights& L1 = mw.layers[1];
  const std::vector<Case> cases = {
      {"embed", &mw.embed, 1.0},
      {"lm_head", &mw.lm_head, 1.0 / 16},
      {"q_a", &mw.layers[0].q_a, 1.0 / 16},
      {"q_b", &mw.layers[0].q_b, 1.0 / std::sqrt(128.0)},
      {"kv_b", &mw.layers[0].kv_b, 1.0 / std::sqrt(128.0)},
      {"o_proj", &mw.layers[2].o, layer_scale / std::sqrt(128.0)},
      {"idx_wq_b", &mw.layers[3].idx_wq_b, 1.0 / std::sqrt(128.0)},
      {"idx_weights_proj", &mw.layers[0].idx_weights_proj, 1.0 / 16},
      {"dense down", &mw.layers[0].dense.down, layer_scale / std::sqrt(512.0)},
      {"router", &L1.router, 1.0 / 16},
      {"expert up", &L1.experts[3].up, 1.0 / 16},
      {"expert down", &L1.experts[3].down, layer_scale / std::sqrt(128.0)},
      {"shared down", &L1.shared.down, layer_scale / std::sqrt(128.0)},
  };
  for (const Case& c : cases) {
    // >= 2048 samples each: the sample std is within ~3% of the true one; bf16
    // and e4m3 rounding add < 2%.
    EXPECT_NEAR(StdDev(*c.v), c.std, 0.06 * c.std) << c.what;
  }
  for (const LayerWeights& L : mw.layers) {
    for (float x : L.attn_norm) ASSERT_EQ(x, 1.0f);
    for (float x : L.ffn_norm) ASSERT_EQ(x, 1.0f);
    for (float x : L.q_a_norm) ASSERT_EQ(x, 1.0f);
    for (float x : L.kv_a_norm) ASSERT_EQ(x, 1.0f);
    for (float x : L.idx_k_norm_w) ASSERT_EQ(x, 1.0f);
    for (float x : L.idx_k_norm_b) ASSERT_EQ(x, 0.0f);
  }
  for (float x : mw.final_norm) ASSERT_EQ(x, 1.0f);
  // e_score_correction_bias: N(0, 0.01), 3 layers x 8 values.
  double s2 = 0;
  for (int l = 1; l < 4; ++l) {
    for (float x : mw.layers[l].router_bias) s2 += double(x) * x;
  }
  EXPECT_NEAR(std::sqrt(s2 / 24), 0.1, 0.05);

  // FP8 blocks: power-of-two scales chosen from the block's amax, so the largest
  // |e4m3| value of every block lies in (224, 448].
  for (const WeightView* v : {&mw.layers[0].q_a, &mw.layers[2].kv_a, &L1.experts[0].down,
                              &mw.layers[3].idx_wk}) {
    const int64_t sr = (v->rows + 127) / 128, sc = (v->cols + 127) / 128;
    for (int64_t br = 0; br < sr; ++br) {
      for (int64_t bc = 0; bc < sc; ++bc) {
        const float scale = v->scale[br * v->scale_ld + bc];
        ASSERT_TRUE(kernels::IsPowerOfTwo(scale)) << scale;
        float qmax = 0;
        for (int64_t r = br * 128; r < std::min(v->rows, br * 128 + 128); ++r) {
          for (int64_t c = bc * 128; c < std::min(v->cols, bc * 128 + 128); ++c) {
            uint8_t q = static_cast<const uint8_t*>(v->data)[r * v->ld + c];
            qmax = std::max(qmax, std::fabs(kernels::Fp8E4M3ToFloat(q)));
          }
        }
        EXPECT_GE(qmax, 224.0f);  // (224, 232) rounds down to 224 in e4m3
        EXPECT_LE(qmax, 448.0f);
      }
    }
  }

  // Numerically sane: an embedding row through q_a keeps unit scale, and the
  // lm_head logits of a unit-RMS hidden state are spread (std ~ 1), not equal.
  std::vector<float> x(256);
  double xs = 0;
  for (int i = 0; i < 256; ++i) {
    x[i] = mw.embed.Get(65, i);
    xs += double(x[i]) * x[i];
  }
  const float rms = float(std::sqrt(xs / 256));
  for (float& v : x) v /= rms;
  double ys = 0;
  for (int64_t r = 0; r < mw.layers[0].q_a.rows; ++r) {
    double y = 0;
    for (int i = 0; i < 256; ++i) y += mw.layers[0].q_a.Get(r, i) * x[i];
    ys += y * y;
  }
  EXPECT_NEAR(std::sqrt(ys / 128), 1.0, 0.25);
  double ls = 0, lmin = 1e9, lmax = -1e9;
  for (int64_t r = 0; r < 258; ++r) {
    double y = 0;
    for (int i = 0; i < 256; ++i) y += mw.lm_head.Get(r, i) * x[i];
    ls += y * y;
    lmin = std::min(lmin, y);
    lmax = std::max(lmax, y);
  }
  EXPECT_NEAR(std::sqrt(ls / 258), 1.0, 0.25);
  EXPECT_GT(lmax - lmin, 2.0);
}

TEST_F(WeightsTest, WriterIsDeterministicForASeed) {
  const std::string a = WriteTiny("a", 123), b = WriteTiny("b", 123), c = WriteTiny("c", 124);
  const std::vector<std::string> sa = ShardFiles(a), sb = ShardFiles(b);
  ASSERT_EQ(sa, sb);
  for (const std::string& f : sa) EXPECT_EQ(ReadAll(a + "/" + f), ReadAll(b + "/" + f)) << f;
  EXPECT_EQ(ReadAll(a + "/model.safetensors.index.json"),
            ReadAll(b + "/model.safetensors.index.json"));
  auto wa = LoadWeights(a, tiny_), wb = LoadWeights(b, tiny_), wc = LoadWeights(c, tiny_);
  ASSERT_TRUE(wa.ok() && wb.ok() && wc.ok());
  EXPECT_EQ((*wa)->fingerprint, (*wb)->fingerprint);
  EXPECT_NE((*wa)->fingerprint, (*wc)->fingerprint);
  // Another seed changes random tensors but not the constant ones.
  auto ra = SafetensorsCheckpoint::Open(a), rc = SafetensorsCheckpoint::Open(c);
  ASSERT_TRUE(ra.ok() && rc.ok());
  auto same = [&](const std::string& n) {
    std::span<const uint8_t> x = (*ra)->Find(n)->bytes, y = (*rc)->Find(n)->bytes;
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size()) == 0;
  };
  EXPECT_FALSE(same("model.layers.0.self_attn.q_a_proj.weight"));
  EXPECT_FALSE(same("model.embed_tokens.weight"));
  EXPECT_TRUE(same("model.layers.0.input_layernorm.weight"));

  // Overrides: fewer layers and more experts; the tensors both share are equal.
  RandomCheckpointOptions o;
  o.num_hidden_layers = 2;
  o.n_routed_experts = 16;
  const std::string d = WriteTiny("d", 123, nullptr, o);
  absl::StatusOr<ModelConfig> dc = LoadConfig(d + "/config.json");
  ASSERT_TRUE(dc.ok()) << dc.status();
  EXPECT_EQ(dc->num_hidden_layers, 2);
  EXPECT_EQ(dc->n_routed_experts, 16);
  auto wd = LoadWeights(d, *dc);
  ASSERT_TRUE(wd.ok()) << wd.status();
  EXPECT_EQ((*wd)->layers[1].experts.size(), 16u);
  auto rd = SafetensorsCheckpoint::Open(d);
  ASSERT_TRUE(rd.ok());
  EXPECT_EQ((*rd)->Find("model.layers.2.input_layernorm.weight"), nullptr);
  for (const char* n : {"model.embed_tokens.weight", "model.layers.1.mlp.experts.3.up_proj.weight",
                        "model.layers.0.self_attn.q_a_proj.weight"}) {
    std::span<const uint8_t> x = (*ra)->Find(n)->bytes, y = (*rd)->Find(n)->bytes;
    ASSERT_EQ(x.size(), y.size()) << n;
    EXPECT_EQ(std::memcmp(x.data(), y.data(), x.size()), 0) << n;
  }
}

// Flips one byte of `tensor` in its shard file.
void FlipByte(const std::string& dir, const std::string& tensor, size_t offset) {
  auto ck = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ck.ok());
  const TensorInfo* t = (*ck)->Find(tensor);
  ASSERT_NE(t, nullptr);
  const size_t pos = size_t(t->bytes.data() - (*ck)->shard_bytes(t->shard).data()) + offset;
  std::fstream f((*ck)->shard_path(t->shard), std::ios::binary | std::ios::in | std::ios::out);
  f.seekg(std::streamoff(pos));
  char c;
  f.get(c);
  f.seekp(std::streamoff(pos));
  f.put(char(c ^ 1));
  ASSERT_TRUE(f.good());
}

TEST_F(WeightsTest, FingerprintStableAndSensitive) {
  const std::string dir = WriteTiny("ckpt", 5);
  auto w1 = LoadWeights(dir, tiny_);
  auto w2 = LoadWeights(dir, tiny_);
  ASSERT_TRUE(w1.ok() && w2.ok());
  const std::string fp = (*w1)->fingerprint;
  EXPECT_EQ(fp.find_first_not_of("0123456789abcdef"), std::string::npos);
  EXPECT_EQ((*w2)->fingerprint, fp);
  w1->reset();
  w2->reset();
  // The config is part of it.
  ModelConfig other = tiny_;
  other.selection_mode = kernels::SelectionMode::kHisa;
  auto w3 = LoadWeights(dir, other);
  ASSERT_TRUE(w3.ok());
  EXPECT_NE((*w3)->fingerprint, fp);
  w3->reset();
  // One byte of one tensor.
  FlipByte(dir, "model.layers.3.mlp.experts.5.gate_proj.weight", 1000);
  auto w4 = LoadWeights(dir, tiny_);
  ASSERT_TRUE(w4.ok());
  EXPECT_NE((*w4)->fingerprint, fp);
  FlipByte(dir, "model.layers.3.mlp.experts.5.gate_proj.weight", 1000);  // undo
  auto w5 = LoadWeights(dir, tiny_);
  ASSERT_TRUE(w5.ok());
  EXPECT_EQ((*w5)->fingerprint, fp);
}

// Copies `src` to `dst` tensor by tensor, letting `edit` change a tensor's
// dtype, shape or bytes, or drop it (return false); `extra` adds tensors.
using Edit = std::function<bool(const std::string& name, DType* dtype,
                                std::vector<int64_t>* shape, std::vector<uint8_t>* bytes)>;
void Rewrite(const std::string& src, const std::string& dst, const Edit& edit,
             const std::vector<std::pair<std::string, std::vector<int64_t>>>& extra = {}) {
  auto ck = SafetensorsCheckpoint::Open(src);
  ASSERT_TRUE(ck.ok()) << ck.status();
  SafetensorsWriterOptions o;
  o.max_shard_bytes = 1 << 20;
  auto w = SafetensorsWriter::Create(dst, o);
  ASSERT_TRUE(w.ok());
  // Keep the source order (file order) so alignment is preserved.
  std::vector<const TensorInfo*> order;
  for (const auto& [n, t] : (*ck)->tensors()) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](const TensorInfo* a, const TensorInfo* b) {
    return a->shard != b->shard ? a->shard < b->shard : a->bytes.data() < b->bytes.data();
  });
  for (const TensorInfo* t : order) {
    DType dtype = t->dtype;
    std::vector<int64_t> shape = t->shape;
    std::vector<uint8_t> bytes(t->bytes.begin(), t->bytes.end());
    if (!edit(t->name, &dtype, &shape, &bytes)) continue;
    absl::Status s = (*w)->Add(t->name, dtype, shape, bytes);
    ASSERT_TRUE(s.ok()) << s;
  }
  for (const auto& [name, shape] : extra) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    ASSERT_TRUE((*w)->Add(name, DType::kF32, shape, std::vector<uint8_t>(4 * n)).ok());
  }
  ASSERT_TRUE((*w)->Finish().ok());
}

// The shard file holding `tensor` in `dir`.
std::string ShardOf(const std::string& dir, const std::string& tensor) {
  auto ck = SafetensorsCheckpoint::Open(dir);
  EXPECT_TRUE(ck.ok());
  const TensorInfo* t = (*ck)->Find(tensor);
  EXPECT_NE(t, nullptr) << tensor;
  return t ? (*ck)->ShardFileName(t->shard) : "";
}

TEST_F(WeightsTest, SpecificErrorsNameFileAndTensor) {
  const std::string good = WriteTiny("good", 9);
  int n = 0;
  auto load = [&](const Edit& edit) {
    const std::string dir = absl::StrCat(root_, "/bad", n++);
    Rewrite(good, dir, edit);
    return std::make_pair(dir, LoadWeights(dir, tiny_).status());
  };

  {  // wrong shape
    const std::string name = "model.layers.3.self_attn.kv_b_proj.weight";
    auto [dir, s] = load([&](const std::string& t, DType*, std::vector<int64_t>* shape, auto*) {
      if (t == name) *shape = {128, 256};
      return true;
    });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(s.message(), absl::StrCat(ShardOf(dir, name), ": tensor ", name,
                                        " has shape [128, 256], expected [256, 128]"));
  }
  {  // wrong dtype of a matrix
    const std::string name = "model.layers.0.self_attn.q_a_proj.weight";
    auto [dir, s] = load([&](const std::string& t, DType* d, auto*, std::vector<uint8_t>* b) {
      if (t == name) {
        *d = DType::kI32;
        b->assign(b->size() * 4, 0);
      }
      return true;
    });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat(ShardOf(dir, name), ": tensor ", name,
                                                    " has dtype I32")));
  }
  {  // wrong dtype of a vector (FP8 norms are not allowed)
    const std::string name = "model.layers.2.post_attention_layernorm.weight";
    auto [dir, s] = load([&](const std::string& t, DType* d, auto*, std::vector<uint8_t>* b) {
      if (t == name) {
        *d = DType::kFP8E4M3;
        b->resize(b->size() / 2);
      }
      return true;
    });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat(ShardOf(dir, name), ": tensor ", name,
                                                    " has dtype F8_E4M3, expected one of BF16")));
  }
  {  // missing FP8 scale
    const std::string name = "model.layers.1.mlp.experts.3.up_proj.weight";
    auto [dir, s] = load([&](const std::string& t, auto*, auto*, auto*) {
      return t != name + "_scale_inv";
    });
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(s.message(), HasSubstr(absl::StrCat(ShardOf(dir, name), ": tensor ", name)));
    EXPECT_THAT(s.message(), HasSubstr(name + "_scale_inv"));
  }
  {  // FP8 scale of the wrong dtype / shape
    const std::string name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv";
    auto [dir, s] = load([&](const std::string& t, DType* d, auto*, auto*) {
      if (t == name) *d = DType::kI32;
      return true;
    });
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(s.message(), absl::StrCat(ShardOf(dir, name), ": tensor ", name,
                                        " has dtype I32, expected F32"));
    auto [dir2, s2] = load([&](const std::string& t, auto*, std::vector<int64_t>* shape, auto*) {
      if (t == name) *shape = {1, 4};
      return true;
    });
    EXPECT_EQ(s2.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(s2.message(), absl::StrCat(ShardOf(dir2, name), ": tensor ", name,
                                         " has shape [1, 4], expected [2, 2]"));
  }
  {  // missing tensor
    const std::string name = "model.layers.2.mlp.gate.e_score_correction_bias";
    auto [dir, s] = load([&](const std::string& t, auto*, auto*, auto*) { return t != name; });
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(s.message(), absl::StrCat(dir, "/model.safetensors.index.json: tensor ", name,
                                        " not found"));
  }
  {  // truncated shard
    const std::string dir = absl::StrCat(root_, "/trunc");
    std::filesystem::copy(good, dir);
    const std::string shard = dir + "/" + ShardFiles(dir).back();
    std::filesystem::resize_file(shard, std::filesystem::file_size(shard) - 1);
    absl::Status s = LoadWeights(dir, tiny_).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss);
    EXPECT_THAT(s.message(), HasSubstr(shard));
    EXPECT_THAT(s.message(), HasSubstr("truncated: tensor"));
  }
  // An invalid config is refused before any file is read.
  ModelConfig bad = tiny_;
  bad.kv_lora_rank = 100;
  absl::Status s = LoadWeights(good, bad).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'kv_lora_rank'"));
}

TEST_F(WeightsTest, IgnoresExtraTensorsAndAcceptsOtherFloatTypes) {
  const std::string good = WriteTiny("good", 3);
  const std::string dir = root_ + "/mixed";
  // Matrices stored as F16 / F32 and norms as F32 load too; the MTP-style layer
  // beyond num_hidden_layers and unknown tensors are ignored.
  const std::string f16 = "model.layers.0.self_attn.indexer.weights_proj.weight";
  const std::string f32 = "model.layers.1.mlp.gate.weight";
  const std::string norm = "model.layers.3.input_layernorm.weight";
  std::vector<float> norm_values;
  Rewrite(good, dir,
          [&](const std::string& t, DType* d, auto*, std::vector<uint8_t>* b) {
            if (t != f16 && t != f32 && t != norm) return true;
            const size_t n = b->size() / 2;
            std::vector<uint8_t> out(t == f16 ? 2 * n : 4 * n);
            for (size_t i = 0; i < n; ++i) {
              uint16_t h;
              std::memcpy(&h, b->data() + 2 * i, 2);
              float v = kernels::Bf16ToFloat(h);
              if (t == norm) {
                v = 0.5f + float(i);
                norm_values.push_back(v);
              }
              if (t == f16) {
                // bf16 -> f16 exactly for these small normal values: use the
                // f32 bits' sign/exponent/mantissa (values are in f16 range).
                uint32_t u;
                std::memcpy(&u, &v, 4);
                int e = int((u >> 23) & 0xff) - 127 + 15;
                uint16_t f = uint16_t(((u >> 16) & 0x8000) |
                                      (e > 0 ? (uint32_t(e) << 10) | ((u >> 13) & 0x3ff) : 0));
                std::memcpy(out.data() + 2 * i, &f, 2);
              } else {
                std::memcpy(out.data() + 4 * i, &v, 4);
              }
            }
            *d = t == f16 ? DType::kF16 : DType::kF32;
            *b = std::move(out);
            return true;
          },
          {{"model.layers.4.self_attn.q_a_proj.weight", {128, 256}},
           {"model.layers.0.self_attn.unknown.weight", {2, 2}},
           {"model.layers.4.eh_proj.weight", {2, 4}}});
  auto w = LoadWeights(dir, tiny_);
  ASSERT_TRUE(w.ok()) << w.status();
  auto ref = LoadWeights(good, tiny_);
  ASSERT_TRUE(ref.ok());
  const WeightView& a = (*w)->layers[0].idx_weights_proj;
  const WeightView& b = (*ref)->layers[0].idx_weights_proj;
  EXPECT_EQ(a.dtype, DType::kF16);
  EXPECT_EQ((*w)->layers[1].router.dtype, DType::kF32);
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int64_t c = 0; c < a.cols; ++c) {
      ASSERT_NEAR(a.Get(r, c), b.Get(r, c), 1e-4) << r << " " << c;  // f16 subnormals flush
      ASSERT_EQ((*w)->layers[1].router.Get(r % 8, c), (*ref)->layers[1].router.Get(r % 8, c));
    }
  }
  EXPECT_EQ((*w)->layers[3].attn_norm, norm_values);
}

TEST_F(WeightsTest, Bf16AndTiedCheckpoints) {
  ModelConfig c = tiny_;
  c.fp8_weights = false;
  c.tie_word_embeddings = true;
  const std::string dir = WriteTiny("bf16", 11, &c);
  auto ck = SafetensorsCheckpoint::Open(dir);
  ASSERT_TRUE(ck.ok());
  EXPECT_EQ((*ck)->Find("lm_head.weight"), nullptr);
  for (const auto& [name, t] : (*ck)->tensors()) {
    EXPECT_EQ(name.find("_scale_inv"), std::string::npos) << name;
    if (t.shape.size() == 2) {
      EXPECT_EQ(t.dtype, DType::kBF16) << name;
    }
  }
  absl::StatusOr<ModelConfig> lc = LoadConfig(dir + "/config.json");
  ASSERT_TRUE(lc.ok());
  EXPECT_FALSE(lc->fp8_weights);
  EXPECT_TRUE(lc->tie_word_embeddings);
  auto w = LoadWeights(dir, *lc);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->lm_head.data, (*w)->embed.data);
  EXPECT_EQ((*w)->layers[0].q_a.dtype, DType::kBF16);
  EXPECT_EQ((*w)->layers[0].q_a.scale, nullptr);
  EXPECT_NEAR(StdDev((*w)->layers[0].q_a), 1.0 / 16, 0.06 / 16);

  // Odd dimensions would misalign the tensors that follow: refused.
  ModelConfig odd = c;
  odd.hidden_size = 255;
  absl::Status s = WriteRandomCheckpoint(root_ + "/odd", odd, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("multiple of 4"));
}

}  // namespace
}  // namespace pd::model
