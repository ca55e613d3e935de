#include "model/checkpoint_writer.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "common/status.h"
#include "kernels/numeric.h"
#include "model/safetensors.h"

namespace pd::model {
namespace {

using kernels::DType;

// What a tensor is initialised with.
enum class Init : uint8_t { kNormal, kOnes, kZeros };

struct TensorSpec {
  std::string name;
  DType dtype;            // kFP8E4M3: an e4m3 matrix plus its "_scale_inv" sibling
  std::vector<int64_t> shape;
  Init init = Init::kNormal;
  double stddev = 0.0;    // kNormal only
};

// Standard normal deviates: std::mt19937_64 + Box-Muller in double (the output
// of std::normal_distribution is implementation-defined, this is not).
class NormalSource {
 public:
  explicit NormalSource(uint64_t seed) : rng_(seed) {}

  double Next() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    constexpr double kTwoPi = 6.283185307179586476925286766559;
    const double u1 = double((rng_() >> 11) + 1) * 0x1p-53;  // (0, 1]
    const double u2 = double(rng_() >> 11) * 0x1p-53;        // [0, 1)
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(kTwoPi * u2);
    has_spare_ = true;
    return r * std::cos(kTwoPi * u2);
  }

 private:
  std::mt19937_64 rng_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

uint64_t TensorSeed(const std::string& name, uint64_t seed) {
  return XXH3_64bits_withSeed(name.data(), name.size(), seed);
}

std::vector<TensorSpec> BuildSpecs(const ModelConfig& c) {
  const DType proj = c.fp8_weights ? DType::kFP8E4M3 : DType::kBF16;
  const double out_scale = 1.0 / std::sqrt(2.0 * c.num_hidden_layers);
  auto inv_sqrt = [](int64_t n) { return 1.0 / std::sqrt(double(n)); };
  std::vector<TensorSpec> s;
  auto linear = [&](std::string name, DType dtype, int64_t out, int64_t in, double extra = 1.0) {
    s.push_back({std::move(name), dtype, {out, in}, Init::kNormal, inv_sqrt(in) * extra});
  };
  auto vec = [&](std::string name, DType dtype, int64_t n, Init init, double stddev = 0.0) {
    s.push_back({std::move(name), dtype, {n}, init, stddev});
  };
  auto ffn = [&](const std::string& prefix, int64_t inter) {
    linear(prefix + "gate_proj.weight", proj, inter, c.hidden_size);
    linear(prefix + "up_proj.weight", proj, inter, c.hidden_size);
    linear(prefix + "down_proj.weight", proj, c.hidden_size, inter, out_scale);
  };

  const int64_t hidden = c.hidden_size, heads = c.num_attention_heads;
  s.push_back({"model.embed_tokens.weight", DType::kBF16, {c.vocab_size, hidden}, Init::kNormal,
               1.0});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    vec(p + "input_layernorm.weight", DType::kBF16, hidden, Init::kOnes);
    linear(p + "self_attn.q_a_proj.weight", proj, c.q_lora_rank, hidden);
    vec(p + "self_attn.q_a_layernorm.weight", DType::kBF16, c.q_lora_rank, Init::kOnes);
    linear(p + "self_attn.q_b_proj.weight", proj, heads * c.qk_head_dim(), c.q_lora_rank);
    linear(p + "self_attn.kv_a_proj_with_mqa.weight", proj, c.kv_lora_rank + c.qk_rope_head_dim,
           hidden);
    vec(p + "self_attn.kv_a_layernorm.weight", DType::kBF16, c.kv_lora_rank, Init::kOnes);
    linear(p + "self_attn.kv_b_proj.weight", proj, heads * (c.qk_nope_head_dim + c.v_head_dim),
           c.kv_lora_rank);
    linear(p + "self_attn.o_proj.weight", proj, hidden, heads * c.v_head_dim, out_scale);
    linear(p + "self_attn.indexer.wq_b.weight", proj,
           int64_t(c.index_n_heads) * c.index_head_dim, c.q_lora_rank);
    linear(p + "self_attn.indexer.wk.weight", proj, c.index_head_dim, hidden);
    vec(p + "self_attn.indexer.k_norm.weight", DType::kBF16, c.index_head_dim, Init::kOnes);
    vec(p + "self_attn.indexer.k_norm.bias", DType::kBF16, c.index_head_dim, Init::kZeros);
    linear(p + "self_attn.indexer.weights_proj.weight", DType::kBF16, c.index_n_heads, hidden);
    vec(p + "post_attention_layernorm.weight", DType::kBF16, hidden, Init::kOnes);
    if (!c.IsMoeLayer(l)) {
      ffn(p + "mlp.", c.intermediate_size);
      continue;
    }
    linear(p + "mlp.gate.weight", DType::kBF16, c.n_routed_experts, hidden);
    vec(p + "mlp.gate.e_score_correction_bias", DType::kF32, c.n_routed_experts, Init::kNormal,
        0.1);
    for (int e = 0; e < c.n_routed_experts; ++e) {
      ffn(absl::StrCat(p, "mlp.experts.", e, "."), c.moe_intermediate_size);
    }
    if (c.n_shared_experts > 0) {
      ffn(p + "mlp.shared_experts.", int64_t(c.n_shared_experts) * c.moe_intermediate_size);
    }
  }
  vec("model.norm.weight", DType::kBF16, hidden, Init::kOnes);
  if (!c.tie_word_embeddings) linear("lm_head.weight", DType::kBF16, c.vocab_size, hidden);
  return s;
}

uint64_t SpecBytes(const TensorSpec& t) {
  uint64_t n = kernels::DTypeSize(t.dtype);
  for (int64_t d : t.shape) n *= uint64_t(d);
  return n;
}

template <typename T>
std::span<const uint8_t> AsBytes(const std::vector<T>& v) {
  return {reinterpret_cast<const uint8_t*>(v.data()), v.size() * sizeof(T)};
}

// Vectors and BF16 / F32 matrices, streamed in chunks of whole rows.
absl::Status WritePlain(const TensorSpec& t, uint64_t seed, SafetensorsWriter* w) {
  PD_RETURN_IF_ERROR(w->BeginTensor(t.name, t.dtype, t.shape));
  const int64_t cols = t.shape.size() == 2 ? t.shape[1] : t.shape[0];
  const int64_t rows = t.shape.size() == 2 ? t.shape[0] : 1;
  const int64_t chunk_rows = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(cols, 1));
  NormalSource normal(TensorSeed(t.name, seed));
  auto value = [&]() -> float {
    switch (t.init) {
      case Init::kOnes: return 1.0f;
      case Init::kZeros: return 0.0f;
      case Init::kNormal: break;
    }
    return float(normal.Next() * t.stddev);
  };
  std::vector<uint16_t> half;
  std::vector<float> full;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, rows - r0) * cols;
    if (t.dtype == DType::kBF16) {
      half.resize(size_t(n));
      for (int64_t i = 0; i < n; ++i) half[i] = kernels::FloatToBf16(value());
      PD_RETURN_IF_ERROR(w->Append(AsBytes(half)));
    } else if (t.dtype == DType::kF32) {
      full.resize(size_t(n));
      for (int64_t i = 0; i < n; ++i) full[i] = value();
      PD_RETURN_IF_ERROR(w->Append(AsBytes(full)));
    } else {
      return absl::InternalError(absl::StrCat("WriteRandomCheckpoint: no plain writer for ",
                                              kernels::DTypeName(t.dtype), " tensor ", t.name));
    }
  }
  return w->EndTensor();
}

// An FP8 matrix, one row block at a time, then its "_scale_inv" block scales.
absl::Status WriteFp8(const TensorSpec& t, uint64_t seed, const ModelConfig& c,
                      SafetensorsWriter* w) {
  const int64_t rows = t.shape[0], cols = t.shape[1], b = c.weight_block_size;
  const int64_t srows = (rows + b - 1) / b, scols = (cols + b - 1) / b;
  std::vector<float> scales(size_t(srows * scols));
  std::vector<float> block(size_t(std::min(rows, b) * cols));
  std::vector<uint8_t> q(block.size());
  NormalSource normal(TensorSeed(t.name, seed));
  PD_RETURN_IF_ERROR(w->BeginTensor(t.name, DType::kFP8E4M3, t.shape));
  for (int64_t br = 0; br < srows; ++br) {
    const int64_t nr = std::min(b, rows - br * b);
    for (int64_t i = 0; i < nr * cols; ++i) block[i] = float(normal.Next() * t.stddev);
    for (int64_t bc = 0; bc < scols; ++bc) {
      const int64_t c0 = bc * b, c1 = std::min(cols, c0 + b);
      float amax = 0.0f;
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t j = c0; j < c1; ++j) amax = std::max(amax, std::fabs(block[r * cols + j]));
      }
      const float scale = kernels::Fp8Scale(amax, c.scale_ue8m0);
      scales[br * scols + bc] = scale;
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t j = c0; j < c1; ++j) {
          q[r * cols + j] = kernels::FloatToFp8E4M3(block[r * cols + j] / scale);
        }
      }
    }
    PD_RETURN_IF_ERROR(w->Append(std::span<const uint8_t>(q.data(), size_t(nr * cols))));
  }
  PD_RETURN_IF_ERROR(w->EndTensor());
  return w->Add(t.name + "_scale_inv", DType::kF32, {srows, scols}, AsBytes(scales));
}

}  // namespace

absl::Status WriteRandomCheckpoint(const std::string& dir, const ModelConfig& config,
                                   uint64_t seed, const RandomCheckpointOptions& options) {
  ModelConfig c = config;
  if (options.num_hidden_layers > 0) {
    c.num_hidden_layers = options.num_hidden_layers;
    c.first_k_dense_replace = std::min(c.first_k_dense_replace, c.num_hidden_layers);
  }
  if (options.n_routed_experts > 0) c.n_routed_experts = options.n_routed_experts;
  PD_RETURN_IF_ERROR(Annotate(ValidateConfig(c), "WriteRandomCheckpoint"));

  const std::vector<TensorSpec> specs = BuildSpecs(c);
  for (const TensorSpec& t : specs) {
    if (SpecBytes(t) % 4 != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "WriteRandomCheckpoint: tensor ", t.name, " of shape ", ShapeString(t.shape), " has ",
          SpecBytes(t), " bytes, not a multiple of 4, which would misalign the tensors "
          "after it; use even dimensions"));
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("create directory ", dir, ": ", ec.message()));
  PD_RETURN_IF_ERROR(WriteStringToFile(
      (std::filesystem::path(dir) / "config.json").string(), ConfigToJson(c)));

  SafetensorsWriterOptions wo;
  wo.max_shard_bytes = options.max_shard_bytes;
  PD_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer,
                      SafetensorsWriter::Create(dir, wo));
  for (const TensorSpec& t : specs) {
    if (t.dtype == DType::kFP8E4M3) {
      PD_RETURN_IF_ERROR(WriteFp8(t, seed, c, writer.get()));
    } else {
      PD_RETURN_IF_ERROR(WritePlain(t, seed, writer.get()));
    }
  }
  return writer->Finish().status();
}

}  // namespace pd::model
