// The GPU forward engine (gpu_forward.h). Host code: uploads the weights,
// owns the stream, cuBLASLt and scratch, and sequences the kernels of
// kernels/cuda (tuned V3.2 shapes) and kernels/cuda/model (generic shapes).
#include "kernels/cuda/model/gpu_forward.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <numeric>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "kernels/cuda/indexer_cuda.h"
#include "kernels/cuda/mla_cuda.h"
#include "kernels/cuda/model/gemm.h"
#include "kernels/cuda/model/model_kernels.h"
#include "kernels/numeric.h"

namespace pd::kernels::cuda {
namespace {

using internal::DeviceMatrix;
using internal::Gemm;
using internal::GemmInput;

#define PD_CUDA_TRY(expr, what)                                         \
  do {                                                                  \
    const cudaError_t pd_e_ = (expr);                                   \
    if (pd_e_ != cudaSuccess) {                                         \
      *error = std::string(what) + ": " + cudaGetErrorString(pd_e_);    \
      return false;                                                     \
    }                                                                   \
  } while (0)

// A kernel launcher of kernels/cuda/*.h (error code + message).
#define PD_LAUNCH_TRY(expr, what)                                                   \
  do {                                                                              \
    const char* pd_why_ = nullptr;                                                  \
    const cudaError_t pd_e_ = (expr);                                               \
    if (pd_e_ != cudaSuccess) {                                                     \
      *error = std::string(what) + ": " +                                           \
               (pd_why_ != nullptr ? pd_why_ : cudaGetErrorString(pd_e_));          \
      return false;                                                                 \
    }                                                                               \
  } while (0)

// A growable device allocation (no copy on growth).
class DevBuf {
 public:
  DevBuf() = default;
  ~DevBuf() { Free(); }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p_(std::exchange(o.p_, nullptr)), cap_(std::exchange(o.cap_, 0)) {}

  cudaError_t Ensure(size_t bytes) {
    if (bytes <= cap_ && p_ != nullptr) return cudaSuccess;
    Free();
    const size_t n = std::max<size_t>(bytes, 256);
    const cudaError_t e = cudaMalloc(&p_, n);
    if (e != cudaSuccess) {
      p_ = nullptr;
      return e;
    }
    cap_ = n;
    return cudaSuccess;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }

 private:
  void Free() {
    if (p_ != nullptr) cudaFree(p_);
    p_ = nullptr;
    cap_ = 0;
  }
  void* p_ = nullptr;
  size_t cap_ = 0;
};

enum Stage { kEmbed = 0, kAttnProj, kIndexerPrep, kSelection, kAttention, kFfn, kLmHead };

struct DeviceFfn {
  DeviceMatrix gate_up;  // [2 * inter, hidden]: gate rows then up rows
  DeviceMatrix down;     // [hidden, inter]
  int64_t inter = 0;
};

struct DeviceLayer {
  float* attn_norm = nullptr;
  DeviceMatrix q_a, q_b, kv_a, o, idx_wq_b, idx_wk, idx_wproj;
  float* q_a_norm = nullptr;
  float* kv_a_norm = nullptr;
  const uint16_t* kv_b = nullptr;  // bf16 [H * (nope + v), r]
  float* k_norm_w = nullptr;
  float* k_norm_b = nullptr;
  float* ffn_norm = nullptr;
  bool moe = false;
  DeviceFfn dense, shared;
  bool has_shared = false;
  std::vector<DeviceFfn> experts;
  DeviceMatrix router;
  float* router_bias = nullptr;
};

// Staging of one GEMM input: bf16 copy, FP8 codes and scales.
struct Staging {
  DevBuf bf16, fp8, scales;
};

// Row segments of the MoE experts for the FP8 quantiser.
struct Segments {
  const int32_t* start = nullptr;
  const int32_t* rows = nullptr;
  const int64_t* scale_offset = nullptr;
  int64_t scale_floats = 0;  // total scale buffer size
};

bool IsFp8(const WeightView& v) { return v.dtype == DType::kFP8E4M3; }

std::string Shape(const WeightView& v) {
  std::string s = "[";
  s += std::to_string(v.rows);
  s += ", ";
  s += std::to_string(v.cols);
  s += "]";
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------
// Device memory helpers.

namespace {
std::mutex g_alloc_mu;
std::unordered_map<void*, void*>& AllocBases() {
  static auto* m = new std::unordered_map<void*, void*>();
  return *m;
}
}  // namespace

int CudaDeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string CudaDeviceDescription() {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    cudaGetLastError();
    return "no CUDA device";
  }
  int driver = 0, runtime = 0, clock_khz = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0);
  std::ostringstream s;
  s << prop.name << ", " << prop.multiProcessorCount << " SMs, "
    << (prop.totalGlobalMem >> 20) << " MiB, SM clock " << clock_khz / 1000 << " MHz, sm_"
    << prop.major << prop.minor << ", driver " << driver / 1000 << "." << (driver % 1000) / 10
    << ", runtime " << runtime / 1000 << "." << (runtime % 1000) / 10;
  return s.str();
}

void* DeviceAllocZeroed(size_t bytes, std::string* error) {
  constexpr size_t kAlign = 4096;
  void* base = nullptr;
  cudaError_t e = cudaMalloc(&base, bytes + kAlign);
  if (e != cudaSuccess) {
    if (error) *error = "cudaMalloc(" + std::to_string(bytes) + " bytes): " + cudaGetErrorString(e);
    cudaGetLastError();
    return nullptr;
  }
  void* p = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(base) + kAlign - 1) & ~uintptr_t(kAlign - 1));
  e = cudaMemset(p, 0, bytes);
  if (e == cudaSuccess) e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    if (error) *error = std::string("cudaMemset: ") + cudaGetErrorString(e);
    cudaFree(base);
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(g_alloc_mu);
  AllocBases()[p] = base;
  return p;
}

void DeviceFree(void* p) {
  if (p == nullptr) return;
  void* base = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_alloc_mu);
    auto it = AllocBases().find(p);
    if (it == AllocBases().end()) return;
    base = it->second;
    AllocBases().erase(it);
  }
  cudaFree(base);
}

bool CopyDeviceToHost(void* dst, const void* src, size_t bytes, std::string* error) {
  cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess && bytes > 0) e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    if (error) *error = std::string("device to host copy: ") + cudaGetErrorString(e);
    return false;
  }
  return true;
}

// ---------------------------------------------------------------------------

class GpuForwardEngine::Impl {
 public:
  ~Impl() {
    for (cudaEvent_t ev : events_) cudaEventDestroy(ev);
    gemm_.reset();
    owned_.clear();
    scratch_.clear();
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  bool Init(const GpuModelWeights& w, const GpuKvArena& arena, const GpuEngineOptions& options,
            std::string* error);
  bool Forward(const GpuBatch& batch, float* logits, int32_t* argmax, GpuForwardObserver* observer,
               std::string* error);
  bool SetMode(SelectionMode mode, std::string* error);
  std::string Describe() const;

  GpuStageTimes times_;

 private:
  // --- set-up ---
  bool Validate(const GpuModelWeights& w, std::string* error) const;
  bool UploadVector(const std::vector<float>& v, size_t expect, const char* name, float** out,
                    std::string* error);
  bool UploadMatrix(const std::vector<const WeightView*>& parts, bool allow_fp8, const char* name,
                    DeviceMatrix* out, std::string* error);
  bool UploadFfn(const GpuFfnWeights& f, const char* name, DeviceFfn* out, std::string* error);
  void* Own(size_t bytes, std::string* error);

  // --- forward pieces ---
  DevBuf& Buf(const char* name) { return scratch_[name]; }
  template <typename T>
  bool Ensure(const char* name, int64_t count, T** out, std::string* error) {
    DevBuf& b = Buf(name);
    const cudaError_t e = b.Ensure(size_t(std::max<int64_t>(count, 1)) * sizeof(T));
    if (e != cudaSuccess) {
      *error = std::string("scratch ") + name + " (" + std::to_string(count) + " x " +
               std::to_string(sizeof(T)) + " bytes): " + cudaGetErrorString(e);
      return false;
    }
    *out = b.as<T>();
    return true;
  }
  template <typename T>
  bool Upload(const char* name, const std::vector<T>& host, T** out, std::string* error) {
    if (!Ensure(name, int64_t(host.size()), out, error)) return false;
    if (!host.empty()) {
      PD_CUDA_TRY(cudaMemcpyAsync(*out, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice,
                                  stream_),
                  std::string("upload ") + name);
    }
    return true;
  }
  // Prepares x [m, K] (rows ld apart) for GEMMs with weights of the given kinds.
  bool Prepare(Staging& st, const float* x, int64_t m, int64_t k, int64_t ld, bool need_bf16,
               bool need_fp8, const Segments* seg, GemmInput* in, std::string* error);
  bool Linear(const DeviceMatrix& w, const GemmInput& in, float* y, std::string* error) {
    return gemm_->Linear(w, in, y, w.rows, stream_, error);
  }
  bool DenseFfn(const DeviceFfn& f, const GemmInput& in_h, int64_t n, float* out,
                std::string* error);
  bool MoeFfn(const DeviceLayer& L, const float* h, const GemmInput& in_h, int64_t n, float* out,
              std::string* error);
  bool Attention(int layer, const GpuBatch& batch, int64_t n, GpuForwardObserver* observer,
                 std::string* error);
  bool Selection(int layer, int64_t n, std::string* error);
  void Mark(Stage s);
  bool StartTiming(std::string* error);
  bool FinishTiming(std::string* error);

  GpuModelDims d_;
  GpuEngineOptions opt_;
  GpuKvArena arena_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<Gemm> gemm_;
  std::string fp8_report_;
  std::vector<DevBuf> owned_;  // weights
  std::unordered_map<std::string, DevBuf> scratch_;
  Staging st_h_, st_cq_, st_x_;
  const uint16_t* embed_ = nullptr;
  float* final_norm_ = nullptr;
  DeviceMatrix lm_head_;
  float* inv_freq_ = nullptr;
  std::vector<DeviceLayer> layers_;
  uint64_t seed_counter_ = 0;
  int fp8_matrices_ = 0, bf16_matrices_ = 0, dequantised_matrices_ = 0;
  bool fast_prep_ = false, fast_summaries_ = false, fast_select_ = false, fast_router_ = false,
       fast_mla_ = false, fast_mla_write_ = false;

  // Per-forward metadata (internal token order: segments sorted by kv_seq).
  int num_seqs_ = 0;  // max kv_seq + 1
  int64_t pt_stride_ = 1;
  int64_t max_q_per_seq_ = 0, max_context_ = 0, max_position_ = 0, max_blocks_touched_ = 1;
  std::vector<int64_t> h_positions_;
  std::vector<int> seg_order_;       // internal segment order -> batch segment index
  std::vector<int64_t> seg_row0_;    // batch segment index -> first internal row
  int64_t* d_positions_ = nullptr;
  int32_t* d_token_seq_ = nullptr;
  int32_t* d_page_table_ = nullptr;
  int64_t* d_num_tokens_ = nullptr;
  int32_t* d_query_start_ = nullptr;
  int64_t* d_from_ = nullptr;
  int64_t* d_to_ = nullptr;

  // Activations of the current forward.
  float *x_ = nullptr, *h_ = nullptr, *delta_ = nullptr;
  float *cq_ = nullptr, *q_ = nullptr, *kv_ = nullptr, *ckv_ = nullptr, *kpe_ = nullptr;
  float *q_abs_ = nullptr, *q_pe_ = nullptr, *lat_ = nullptr, *o_ = nullptr;
  uint16_t *q_bf16_ = nullptr, *lat_bf16_ = nullptr;
  float *iq_ = nullptr, *ik_ = nullptr, *iw_ = nullptr, *iweights_ = nullptr;
  uint8_t* q8_ = nullptr;
  int32_t *active_ = nullptr, *indices_ = nullptr;

  std::vector<cudaEvent_t> events_;
  std::vector<std::pair<int, int>> marks_;  // (event index, stage)
  size_t next_event_ = 0;
};

// ---------------------------------------------------------------------------
// Set-up.

void* GpuForwardEngine::Impl::Own(size_t bytes, std::string* error) {
  owned_.emplace_back();
  const cudaError_t e = owned_.back().Ensure(bytes);
  if (e != cudaSuccess) {
    *error = "weight allocation of " + std::to_string(bytes) + " bytes: " + cudaGetErrorString(e);
    return nullptr;
  }
  return owned_.back().as<void>();
}

bool GpuForwardEngine::Impl::Validate(const GpuModelWeights& w, std::string* error) const {
  const GpuModelDims& d = w.dims;
  auto bad = [&](const std::string& m) {
    *error = "GPU model: " + m;
    return false;
  };
  if (d.vocab_size < 1 || d.hidden_size < 1 || d.num_layers < 1 || d.heads < 1) {
    return bad("vocab_size, hidden_size, num_layers and heads must be positive");
  }
  if (d.kv_lora_rank < 128 || d.kv_lora_rank % 128 != 0) {
    return bad("kv_lora_rank must be a positive multiple of 128, got " + std::to_string(d.kv_lora_rank));
  }
  if (d.qk_rope_head_dim < 2 || d.qk_rope_head_dim % 2 != 0 ||
      int(d.inv_freq.size()) != d.qk_rope_head_dim / 2) {
    return bad("qk_rope_head_dim must be even and inv_freq must hold qk_rope_head_dim / 2 values");
  }
  const int ID = d.index_head_dim;
  if (ID < 32 || ID > 1024 || (ID & (ID - 1)) != 0) {
    return bad("index_head_dim must be a power of two in [32, 1024], got " + std::to_string(ID));
  }
  if (d.qk_rope_head_dim > ID) return bad("qk_rope_head_dim exceeds index_head_dim");
  if (d.index_heads < 1 || d.index_heads > 1024) return bad("index_heads must be in [1, 1024]");
  const SelectionConfig& s = d.selection;
  if (s.mode != SelectionMode::kDense && s.mode != SelectionMode::kMisa) {
    return bad(std::string("selection mode ") + SelectionModeName(s.mode) +
               " is not implemented on the GPU backend (dense and misa are; use the CPU backend)");
  }
  if (s.topk < 1 || s.topk > 2048) return bad("index_topk must be in [1, 2048] on the GPU backend");
  if (s.heads != d.index_heads || s.head_dim != ID) return bad("selection heads/head_dim differ from the indexer's");
  if (s.misa_heads < 1 || s.misa_heads > d.index_heads) return bad("misa_topk_heads must be in [1, index_heads]");
  if (s.misa_block < 1) return bad("misa_k_block_size must be >= 1");
  const KvLayout& l = d.layout;
  if (l.kv_lora_rank != d.kv_lora_rank || l.rope_dim != d.qk_rope_head_dim ||
      l.index_head_dim != ID || l.summary_block != s.misa_block) {
    return bad("KV layout does not match the model dimensions");
  }
  if (int(w.layers.size()) != d.num_layers) return bad("layer count differs from num_layers");
  if (d.n_routed_experts > 256) return bad("more than 256 routed experts");
  auto shape = [&](const WeightView& v, int64_t rows, int64_t cols, const std::string& name) {
    if (v.rows != rows || v.cols != cols) {
      *error = "GPU model: " + name + " has shape " + Shape(v) + ", expected [" +
               std::to_string(rows) + ", " + std::to_string(cols) + "]";
      return false;
    }
    if (!opt_.random_weights && v.data == nullptr) {
      *error = "GPU model: " + name + " has no data";
      return false;
    }
    if (IsFp8(v) && !opt_.random_weights && v.scale == nullptr) {
      *error = "GPU model: FP8 weight " + name + " has no block scales";
      return false;
    }
    return true;
  };
  const int64_t H = d.heads, hid = d.hidden_size, qk = d.qk_nope_head_dim + d.qk_rope_head_dim;
  if (!shape(w.embed, d.vocab_size, hid, "embed") || !shape(w.lm_head, d.vocab_size, hid, "lm_head")) return false;
  if (int64_t(w.final_norm.size()) != hid) return bad("final_norm size");
  for (int i = 0; i < d.num_layers; ++i) {
    const GpuLayerWeights& L = w.layers[size_t(i)];
    const std::string p = "layer " + std::to_string(i) + " ";
    if (!shape(L.q_a, d.q_lora_rank, hid, p + "q_a_proj") ||
        !shape(L.q_b, H * qk, d.q_lora_rank, p + "q_b_proj") ||
        !shape(L.kv_a, d.kv_lora_rank + d.qk_rope_head_dim, hid, p + "kv_a_proj_with_mqa") ||
        !shape(L.kv_b, H * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank, p + "kv_b_proj") ||
        !shape(L.o, hid, H * d.v_head_dim, p + "o_proj") ||
        !shape(L.idx_wq_b, int64_t(d.index_heads) * ID, d.q_lora_rank, p + "indexer.wq_b") ||
        !shape(L.idx_wk, ID, hid, p + "indexer.wk") ||
        !shape(L.idx_weights_proj, d.index_heads, hid, p + "indexer.weights_proj")) {
      return false;
    }
    if (int64_t(L.attn_norm.size()) != hid || int64_t(L.ffn_norm.size()) != hid ||
        int(L.q_a_norm.size()) != d.q_lora_rank || int(L.kv_a_norm.size()) != d.kv_lora_rank ||
        int(L.idx_k_norm_w.size()) != ID || int(L.idx_k_norm_b.size()) != ID) {
      return bad(p + "norm vector of the wrong size");
    }
    auto ffn = [&](const GpuFfnWeights& f, const std::string& name) {
      const int64_t inter = f.gate.rows;
      return shape(f.gate, inter, hid, name + ".gate_proj") &&
             shape(f.up, inter, hid, name + ".up_proj") &&
             shape(f.down, hid, inter, name + ".down_proj");
    };
    if (L.moe) {
      if (int(L.experts.size()) != d.n_routed_experts) return bad(p + "expert count");
      if (d.experts_per_tok < 1 || d.experts_per_tok > d.n_routed_experts ||
          d.n_group < 1 || d.n_routed_experts % d.n_group != 0 ||
          (d.n_group > 1 && (d.topk_group < 1 || d.topk_group > d.n_group))) {
        return bad("MoE routing fields (experts_per_tok, n_group, topk_group)");
      }
      if (!shape(L.router, d.n_routed_experts, hid, p + "mlp.gate")) return false;
      if (!L.router_bias.empty() && int(L.router_bias.size()) != d.n_routed_experts) {
        return bad(p + "e_score_correction_bias size");
      }
      for (size_t e = 0; e < L.experts.size(); ++e) {
        if (!ffn(L.experts[e], p + "expert " + std::to_string(e))) return false;
      }
      if (L.shared.gate.rows > 0 && !ffn(L.shared, p + "shared_experts")) return false;
    } else if (!ffn(L.dense, p + "mlp")) {
      return false;
    }
  }
  return true;
}

bool GpuForwardEngine::Impl::UploadVector(const std::vector<float>& v, size_t expect,
                                          const char* name, float** out, std::string* error) {
  if (v.size() != expect) {
    *error = std::string("GPU model: ") + name + " has " + std::to_string(v.size()) +
             " values, expected " + std::to_string(expect);
    return false;
  }
  void* p = Own(std::max<size_t>(v.size(), 1) * sizeof(float), error);
  if (p == nullptr) return false;
  if (!v.empty()) PD_CUDA_TRY(cudaMemcpy(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice), name);
  *out = static_cast<float*>(p);
  return true;
}

bool GpuForwardEngine::Impl::UploadMatrix(const std::vector<const WeightView*>& parts,
                                          bool allow_fp8, const char* name, DeviceMatrix* out,
                                          std::string* error) {
  const int64_t cols = parts[0]->cols;
  int64_t rows = 0;
  bool all_fp8 = true;
  for (const WeightView* p : parts) {
    if (p->cols != cols) {
      *error = std::string("GPU model: stacked parts of ") + name + " differ in columns";
      return false;
    }
    rows += p->rows;
    all_fp8 = all_fp8 && IsFp8(*p);
    switch (p->dtype) {
      case DType::kF32: case DType::kBF16: case DType::kF16: case DType::kFP8E4M3: break;
      default:
        *error = std::string("GPU model: ") + name + " has unsupported dtype " + DTypeName(p->dtype);
        return false;
    }
  }
  // FP8 kept as FP8 when cuBLASLt's block-scaled GEMM can take it.
  bool fp8 = allow_fp8 && all_fp8 && opt_.gemm == GemmPrecision::kAuto && gemm_->fp8_ok() &&
             cols % 512 == 0;
  for (size_t i = 0; fp8 && i < parts.size(); ++i) {
    const WeightView& p = *parts[i];
    const bool aligned = opt_.random_weights ||
                         (p.block == 128 && p.row0 % 128 == 0 && p.col0 % 128 == 0);
    fp8 = aligned && p.rows % 16 == 0 && (i + 1 == parts.size() || p.rows % 128 == 0);
  }
  out->rows = rows;
  out->cols = cols;
  out->ld = cols;
  if (fp8) {
    const int64_t kb = cols / 128, rb = (rows + 127) / 128;
    out->kind = DeviceMatrix::Kind::kFp8;
    out->scale_ld = kb;
    uint8_t* data = static_cast<uint8_t*>(Own(size_t(rows * cols), error));
    float* scales = static_cast<float*>(Own(size_t(rb * kb) * sizeof(float), error));
    if (data == nullptr || scales == nullptr) return false;
    int64_t r0 = 0;
    for (const WeightView* pv : parts) {
      const WeightView& p = *pv;
      if (opt_.random_weights) {
        const float std = 1.0f / std::sqrt(float(cols));
        const float s = Fp8Scale(4.0f * std, true);
        PD_CUDA_TRY(internal::RandomFp8(data + r0 * cols, p.rows * cols, opt_.seed * 1000003u + ++seed_counter_,
                                        std / s, stream_), name);
        PD_CUDA_TRY(internal::FillFloat(scales + (r0 / 128) * kb, ((p.rows + 127) / 128) * kb, s, stream_), name);
      } else {
        PD_CUDA_TRY(cudaMemcpy2D(data + r0 * cols, size_t(cols), p.data, size_t(p.ld), size_t(cols),
                                 size_t(p.rows), cudaMemcpyHostToDevice),
                    name);
        const int64_t prb = (p.rows + 127) / 128;
        std::vector<float> s(size_t(prb * kb));
        for (int64_t i = 0; i < prb; ++i) {
          for (int64_t j = 0; j < kb; ++j) {
            s[size_t(i * kb + j)] = p.scale[(p.row0 / 128 + i) * p.scale_ld + p.col0 / 128 + j];
          }
        }
        PD_CUDA_TRY(cudaMemcpy(scales + (r0 / 128) * kb, s.data(), s.size() * sizeof(float),
                               cudaMemcpyHostToDevice),
                    name);
      }
      r0 += p.rows;
    }
    out->data = data;
    out->scales = scales;
    ++fp8_matrices_;
    PD_CUDA_TRY(cudaStreamSynchronize(stream_), name);
    return true;
  }
  // bf16.
  out->kind = DeviceMatrix::Kind::kBf16;
  uint16_t* data = static_cast<uint16_t*>(Own(size_t(rows * cols) * 2, error));
  if (data == nullptr) return false;
  int64_t r0 = 0;
  bool dequantised = false;
  for (const WeightView* pv : parts) {
    const WeightView& p = *pv;
    uint16_t* dst = data + r0 * cols;
    if (opt_.random_weights) {
      const float std = 1.0f / std::sqrt(float(cols));
      PD_CUDA_TRY(internal::RandomBf16(dst, p.rows * cols, opt_.seed * 1000003u + ++seed_counter_, std, stream_),
                  name);
    } else if (p.dtype == DType::kBF16) {
      PD_CUDA_TRY(cudaMemcpy2D(dst, size_t(cols) * 2, p.data, size_t(p.ld) * 2, size_t(cols) * 2,
                               size_t(p.rows), cudaMemcpyHostToDevice),
                  name);
    } else if (p.dtype == DType::kFP8E4M3) {
      // Codes and the covering block-scale sub-grid, dequantised on the device.
      dequantised = true;
      DevBuf codes, sc;
      const int64_t sr0 = p.row0 / p.block, sr1 = (p.row0 + p.rows - 1) / p.block;
      const int64_t sc0 = p.col0 / p.block, sc1 = (p.col0 + cols - 1) / p.block;
      const int64_t sw = sc1 - sc0 + 1;
      std::vector<float> s(size_t((sr1 - sr0 + 1) * sw));
      for (int64_t i = sr0; i <= sr1; ++i) {
        for (int64_t j = sc0; j <= sc1; ++j) s[size_t((i - sr0) * sw + (j - sc0))] = p.scale[i * p.scale_ld + j];
      }
      PD_CUDA_TRY(codes.Ensure(size_t(p.rows * cols)), name);
      PD_CUDA_TRY(sc.Ensure(s.size() * sizeof(float)), name);
      PD_CUDA_TRY(cudaMemcpy2D(codes.as<void>(), size_t(cols), p.data, size_t(p.ld), size_t(cols),
                               size_t(p.rows), cudaMemcpyHostToDevice),
                  name);
      PD_CUDA_TRY(cudaMemcpy(sc.as<void>(), s.data(), s.size() * sizeof(float), cudaMemcpyHostToDevice), name);
      internal::DequantParams dp;
      dp.q = codes.as<uint8_t>();
      dp.rows = p.rows;
      dp.cols = cols;
      dp.scales = sc.as<float>();
      dp.scale_ld = sw;
      dp.scale_row0 = sr0;
      dp.scale_col0 = sc0;
      dp.row0 = p.row0;
      dp.col0 = p.col0;
      dp.block = p.block;
      dp.out = dst;
      PD_CUDA_TRY(internal::DequantFp8ToBf16(dp, stream_), name);
      PD_CUDA_TRY(cudaStreamSynchronize(stream_), name);  // before codes/sc are freed
    } else {
      std::vector<uint16_t> host(size_t(p.rows * cols));
      for (int64_t r = 0; r < p.rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) host[size_t(r * cols + c)] = FloatToBf16(p.Get(r, c));
      }
      PD_CUDA_TRY(cudaMemcpy(dst, host.data(), host.size() * 2, cudaMemcpyHostToDevice), name);
    }
    r0 += p.rows;
  }
  out->data = data;
  ++bf16_matrices_;
  if (dequantised) ++dequantised_matrices_;
  PD_CUDA_TRY(cudaStreamSynchronize(stream_), name);
  return true;
}

bool GpuForwardEngine::Impl::UploadFfn(const GpuFfnWeights& f, const char* name, DeviceFfn* out,
                                       std::string* error) {
  out->inter = f.gate.rows;
  return UploadMatrix({&f.gate, &f.up}, true, name, &out->gate_up, error) &&
         UploadMatrix({&f.down}, true, name, &out->down, error);
}

bool GpuForwardEngine::Impl::Init(const GpuModelWeights& w, const GpuKvArena& arena,
                                  const GpuEngineOptions& options, std::string* error) {
  opt_ = options;
  d_ = w.dims;
  arena_ = arena;
  if (CudaDeviceCount() < 1) {
    *error = "GPU model: no CUDA device";
    return false;
  }
  if (!Validate(w, error)) return false;
  if (int(arena.mla_pools.size()) != d_.num_layers || int(arena.index_pools.size()) != d_.num_layers ||
      int(arena.summaries.size()) != d_.num_layers) {
    *error = "GPU model: the KV arena has " + std::to_string(arena.mla_pools.size()) +
             " layers, the model " + std::to_string(d_.num_layers);
    return false;
  }
  const KvLayout& al = arena.layout;
  if (al.kv_lora_rank != d_.layout.kv_lora_rank || al.rope_dim != d_.layout.rope_dim ||
      al.index_head_dim != d_.layout.index_head_dim || al.summary_block != d_.layout.summary_block) {
    *error = "GPU model: KV arena layout does not match the model";
    return false;
  }
  PD_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  gemm_ = std::make_unique<Gemm>();
  if (!gemm_->Init(error)) return false;
  bool any_fp8 = opt_.random_weights;
  for (const GpuLayerWeights& L : w.layers) any_fp8 = any_fp8 || IsFp8(L.q_a) || IsFp8(L.o);
  if (opt_.gemm == GemmPrecision::kAuto && any_fp8) {
    if (!gemm_->SelfTest(stream_, &fp8_report_, error)) return false;
  } else {
    fp8_report_ = opt_.gemm == GemmPrecision::kBf16 ? "FP8 GEMMs off (bf16 requested)"
                                                    : "no FP8 weights";
  }

  // Weights.
  DeviceMatrix embed;
  if (!UploadMatrix({&w.embed}, false, "embed", &embed, error)) return false;
  embed_ = static_cast<const uint16_t*>(embed.data);
  if (!UploadMatrix({&w.lm_head}, true, "lm_head", &lm_head_, error)) return false;
  if (!UploadVector(w.final_norm, size_t(d_.hidden_size), "final_norm", &final_norm_, error)) return false;
  if (!UploadVector(d_.inv_freq, d_.inv_freq.size(), "inv_freq", &inv_freq_, error)) return false;
  const size_t hid = size_t(d_.hidden_size), ID = size_t(d_.index_head_dim);
  layers_.resize(size_t(d_.num_layers));
  for (int i = 0; i < d_.num_layers; ++i) {
    const GpuLayerWeights& L = w.layers[size_t(i)];
    DeviceLayer& D = layers_[size_t(i)];
    DeviceMatrix kv_b;
    if (!UploadVector(L.attn_norm, hid, "attn_norm", &D.attn_norm, error) ||
        !UploadVector(L.q_a_norm, size_t(d_.q_lora_rank), "q_a_norm", &D.q_a_norm, error) ||
        !UploadVector(L.kv_a_norm, size_t(d_.kv_lora_rank), "kv_a_norm", &D.kv_a_norm, error) ||
        !UploadVector(L.idx_k_norm_w, ID, "k_norm.weight", &D.k_norm_w, error) ||
        !UploadVector(L.idx_k_norm_b, ID, "k_norm.bias", &D.k_norm_b, error) ||
        !UploadVector(L.ffn_norm, hid, "ffn_norm", &D.ffn_norm, error) ||
        !UploadMatrix({&L.q_a}, true, "q_a_proj", &D.q_a, error) ||
        !UploadMatrix({&L.q_b}, true, "q_b_proj", &D.q_b, error) ||
        !UploadMatrix({&L.kv_a}, true, "kv_a_proj_with_mqa", &D.kv_a, error) ||
        !UploadMatrix({&L.kv_b}, false, "kv_b_proj", &kv_b, error) ||
        !UploadMatrix({&L.o}, true, "o_proj", &D.o, error) ||
        !UploadMatrix({&L.idx_wq_b}, true, "indexer.wq_b", &D.idx_wq_b, error) ||
        !UploadMatrix({&L.idx_wk}, true, "indexer.wk", &D.idx_wk, error) ||
        !UploadMatrix({&L.idx_weights_proj}, true, "indexer.weights_proj", &D.idx_wproj, error)) {
      return false;
    }
    D.kv_b = static_cast<const uint16_t*>(kv_b.data);
    D.moe = L.moe;
    if (L.moe) {
      if (!UploadMatrix({&L.router}, false, "mlp.gate", &D.router, error)) return false;
      if (!L.router_bias.empty() &&
          !UploadVector(L.router_bias, L.router_bias.size(), "e_score_correction_bias", &D.router_bias, error)) {
        return false;
      }
      D.experts.resize(L.experts.size());
      for (size_t e = 0; e < L.experts.size(); ++e) {
        if (!UploadFfn(L.experts[e], "expert", &D.experts[e], error)) return false;
      }
      D.has_shared = L.shared.gate.rows > 0;
      if (D.has_shared && !UploadFfn(L.shared, "shared_experts", &D.shared, error)) return false;
    } else if (!UploadFfn(L.dense, "mlp", &D.dense, error)) {
      return false;
    }
  }

  // Kernel paths.
  const bool g = opt_.generic_kernels;
  const int IH = d_.index_heads;
  const bool id128 = d_.index_head_dim == 128;
  fast_prep_ = !g && id128 && d_.qk_rope_head_dim % 8 == 0;
  fast_summaries_ = !g && id128;
  fast_select_ = !g && id128 && (IH == 16 || IH == 32 || IH == 64);
  fast_router_ = fast_select_;
  fast_mla_write_ = !g && d_.kv_lora_rank == 512 && d_.qk_rope_head_dim == 64;
  fast_mla_ = fast_mla_write_ && d_.heads % 64 == 0;
  PD_CUDA_TRY(cudaDeviceSynchronize(), "upload");
  return true;
}

bool GpuForwardEngine::Impl::SetMode(SelectionMode mode, std::string* error) {
  if (mode != SelectionMode::kDense && mode != SelectionMode::kMisa) {
    *error = std::string("selection mode ") + SelectionModeName(mode) +
             " is not implemented on the GPU backend (dense and misa are)";
    return false;
  }
  d_.selection.mode = mode;
  return true;
}

std::string GpuForwardEngine::Impl::Describe() const {
  std::ostringstream s;
  s << "GEMM weights: " << fp8_matrices_ << " FP8 block-scaled (cuBLASLt), " << bf16_matrices_
    << " bf16 (" << dequantised_matrices_ << " of them dequantised from FP8); " << fp8_report_
    << "; GEMM calls: " << gemm_->lt_calls() << " cuBLASLt, " << gemm_->fallback_calls()
    << " fallback";
  if (gemm_->fallback_calls() > 0) s << " (last reason: " << gemm_->last_fallback_reason() << ")";
  s << "; kernels: prep " << (fast_prep_ ? "tuned" : "generic") << ", summaries "
    << (fast_summaries_ ? "tuned" : "generic") << ", selection "
    << (fast_select_ ? "tuned" : "generic") << ", MLA write "
    << (fast_mla_write_ ? "tuned" : "generic") << ", sparse MLA "
    << (fast_mla_ ? "tuned" : "generic") << "; selection mode " << SelectionModeName(d_.selection.mode);
  return s.str();
}

// ---------------------------------------------------------------------------
// Timing.

bool GpuForwardEngine::Impl::StartTiming(std::string* error) {
  marks_.clear();
  next_event_ = 0;
  if (!opt_.stage_timing) return true;
  if (events_.empty()) {
    events_.resize(1);
    PD_CUDA_TRY(cudaEventCreate(&events_[0]), "cudaEventCreate");
  }
  PD_CUDA_TRY(cudaEventRecord(events_[0], stream_), "cudaEventRecord");
  next_event_ = 1;
  return true;
}

void GpuForwardEngine::Impl::Mark(Stage s) {
  if (!opt_.stage_timing) return;
  if (next_event_ >= events_.size()) {
    cudaEvent_t ev;
    if (cudaEventCreate(&ev) != cudaSuccess) return;
    events_.push_back(ev);
  }
  cudaEventRecord(events_[next_event_], stream_);
  marks_.emplace_back(int(next_event_), int(s));
  ++next_event_;
}

bool GpuForwardEngine::Impl::FinishTiming(std::string* error) {
  if (!opt_.stage_timing) return true;
  double* acc[] = {&times_.embed, &times_.attn_proj, &times_.indexer_prep, &times_.selection,
                   &times_.attention, &times_.ffn, &times_.lm_head};
  int prev = 0;
  for (const auto& [ev, stage] : marks_) {
    float ms = 0.0f;
    PD_CUDA_TRY(cudaEventElapsedTime(&ms, events_[size_t(prev)], events_[size_t(ev)]), "cudaEventElapsedTime");
    *acc[stage] += double(ms) * 1e-3;
    prev = ev;
  }
  return true;
}

// ---------------------------------------------------------------------------
// Forward.

bool GpuForwardEngine::Impl::Prepare(Staging& st, const float* x, int64_t m, int64_t k, int64_t ld,
                                     bool need_bf16, bool need_fp8, const Segments* seg,
                                     GemmInput* in, std::string* error) {
  *in = GemmInput();
  in->f32 = x;
  in->m = m;
  in->k = k;
  in->f32_ld = ld;
  if (m <= 0) return true;
  if (need_bf16) {
    PD_CUDA_TRY(st.bf16.Ensure(size_t(m * k) * 2), "bf16 staging");
    if (ld == k) {
      PD_CUDA_TRY(internal::CastToBf16(x, m * k, st.bf16.as<uint16_t>(), stream_), "cast to bf16");
    } else {
      for (int64_t r = 0; r < m; ++r) {  // strided input (rare): row by row
        PD_CUDA_TRY(internal::CastToBf16(x + r * ld, k, st.bf16.as<uint16_t>() + r * k, stream_), "cast");
      }
    }
    in->bf16 = st.bf16.as<uint16_t>();
  }
  if (need_fp8 && gemm_->fp8_ok() && k % 128 == 0) {
    const int64_t scale_floats = seg != nullptr ? seg->scale_floats : m * (k / 128);
    PD_CUDA_TRY(st.fp8.Ensure(size_t(m * k)), "fp8 staging");
    PD_CUDA_TRY(st.scales.Ensure(size_t(scale_floats) * 4), "fp8 scale staging");
    internal::QuantizeParams qp;
    qp.x = x;
    qp.m = m;
    qp.k = k;
    qp.x_stride = ld;
    qp.q = st.fp8.as<uint8_t>();
    qp.scales = st.scales.as<float>();
    qp.m_major = gemm_->act_scales_m_major();
    if (seg != nullptr) {
      qp.segment_start = seg->start;
      qp.segment_rows = seg->rows;
      qp.segment_scale_offset = seg->scale_offset;
    }
    PD_CUDA_TRY(internal::QuantizeFp8Rows(qp, stream_), "FP8 activation quantisation");
    in->fp8 = st.fp8.as<uint8_t>();
    in->fp8_scales = st.scales.as<float>();
  }
  return true;
}

bool GpuForwardEngine::Impl::DenseFfn(const DeviceFfn& f, const GemmInput& in_h, int64_t n,
                                      float* out, std::string* error) {
  float *gu, *act;
  if (!Ensure("ffn_gu", n * 2 * f.inter, &gu, error) || !Ensure("ffn_act", n * f.inter, &act, error)) return false;
  if (!Linear(f.gate_up, in_h, gu, error)) return false;
  PD_CUDA_TRY(internal::SiluMulRows(gu, n, f.inter, act, stream_), "SwiGLU");
  GemmInput in_a;
  const bool fp8 = f.down.kind == DeviceMatrix::Kind::kFp8;
  if (!Prepare(st_x_, act, n, f.inter, f.inter, !fp8, fp8, nullptr, &in_a, error)) return false;
  return Linear(f.down, in_a, out, error);
}

bool GpuForwardEngine::Impl::MoeFfn(const DeviceLayer& L, const float* h, const GemmInput& in_h,
                                    int64_t n, float* out, std::string* error) {
  const int E = d_.n_routed_experts, K = d_.experts_per_tok;
  const int64_t hid = d_.hidden_size;
  float *logits, *wts;
  int32_t* idx;
  if (!Ensure("moe_logits", n * E, &logits, error) || !Ensure("moe_idx", n * K, &idx, error) ||
      !Ensure("moe_w", n * K, &wts, error)) {
    return false;
  }
  if (!Linear(L.router, in_h, logits, error)) return false;
  PD_CUDA_TRY(internal::MoeRoute(logits, L.router_bias, n, E, d_.n_group, d_.topk_group, K,
                                 d_.norm_topk_prob, d_.routed_scaling_factor, idx, wts, stream_),
              "MoE routing");
  if (L.has_shared) {
    if (!DenseFfn(L.shared, in_h, n, out, error)) return false;
  } else {
    PD_CUDA_TRY(cudaMemsetAsync(out, 0, size_t(n * hid) * 4, stream_), "memset");
  }
  // Dispatch on the host: expert-major rows (token order within an expert).
  std::vector<int32_t> h_idx(size_t(n * K));
  std::vector<float> h_w(size_t(n * K));
  PD_CUDA_TRY(cudaMemcpyAsync(h_idx.data(), idx, h_idx.size() * 4, cudaMemcpyDeviceToHost, stream_), "routes");
  PD_CUDA_TRY(cudaMemcpyAsync(h_w.data(), wts, h_w.size() * 4, cudaMemcpyDeviceToHost, stream_), "routes");
  PD_CUDA_TRY(cudaStreamSynchronize(stream_), "routes");
  std::vector<int64_t> count(size_t(E), 0), off(size_t(E) + 1, 0);
  for (int32_t e : h_idx) {
    if (e < 0 || e >= E) {
      *error = "MoE routing produced expert " + std::to_string(e);
      return false;
    }
    ++count[size_t(e)];
  }
  for (int e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + count[size_t(e)];
  const int64_t rows = n * K;
  const DeviceFfn& f0 = L.experts[0];
  const int64_t inter = f0.inter;
  std::vector<int64_t> soff_h(static_cast<size_t>(E)), soff_i(static_cast<size_t>(E));
  int64_t tot_h = 0, tot_i = 0;
  for (int e = 0; e < E; ++e) {
    soff_h[size_t(e)] = tot_h;
    soff_i[size_t(e)] = tot_i;
    tot_h += (count[size_t(e)] * (hid / 128) + 63) / 64 * 64;
    tot_i += (count[size_t(e)] * (inter / 128) + 63) / 64 * 64;
  }
  std::vector<int32_t> perm(static_cast<size_t>(rows)), seg_start(static_cast<size_t>(rows)), seg_rows(static_cast<size_t>(rows));
  std::vector<int64_t> seg_off_h(static_cast<size_t>(rows)), seg_off_i(static_cast<size_t>(rows));
  std::vector<int32_t> comb_rows(static_cast<size_t>(rows));
  std::vector<float> comb_w(static_cast<size_t>(rows));
  std::vector<int64_t> fill(size_t(E), 0);
  for (int64_t t = 0; t < n; ++t) {
    // This token's routes by ascending expert (the CPU backend adds them so).
    std::vector<std::pair<int32_t, float>> routes;
    for (int j = 0; j < K; ++j) routes.emplace_back(h_idx[size_t(t * K + j)], h_w[size_t(t * K + j)]);
    std::sort(routes.begin(), routes.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    for (int j = 0; j < K; ++j) {
      const int32_t e = routes[size_t(j)].first;
      const int64_t row = off[size_t(e)] + fill[size_t(e)]++;
      perm[size_t(row)] = int32_t(t);
      seg_start[size_t(row)] = int32_t(off[size_t(e)]);
      seg_rows[size_t(row)] = int32_t(count[size_t(e)]);
      seg_off_h[size_t(row)] = soff_h[size_t(e)];
      seg_off_i[size_t(row)] = soff_i[size_t(e)];
      comb_rows[size_t(t * K + j)] = int32_t(row);
      comb_w[size_t(t * K + j)] = routes[size_t(j)].second;
    }
  }
  int32_t *d_perm, *d_seg_start, *d_seg_rows, *d_comb_rows;
  int64_t *d_off_h, *d_off_i;
  float *d_comb_w, *xin, *gux, *actx, *yout;
  if (!Upload("moe_perm", perm, &d_perm, error) || !Upload("moe_seg_start", seg_start, &d_seg_start, error) ||
      !Upload("moe_seg_rows", seg_rows, &d_seg_rows, error) ||
      !Upload("moe_seg_off_h", seg_off_h, &d_off_h, error) ||
      !Upload("moe_seg_off_i", seg_off_i, &d_off_i, error) ||
      !Upload("moe_comb_rows", comb_rows, &d_comb_rows, error) ||
      !Upload("moe_comb_w", comb_w, &d_comb_w, error) || !Ensure("moe_xin", rows * hid, &xin, error) ||
      !Ensure("moe_gux", rows * 2 * inter, &gux, error) || !Ensure("moe_actx", rows * inter, &actx, error) ||
      !Ensure("moe_yout", rows * hid, &yout, error)) {
    return false;
  }
  PD_CUDA_TRY(internal::GatherRows(h, hid, hid, d_perm, rows, xin, stream_), "MoE gather");
  const bool fp8_gu = f0.gate_up.kind == DeviceMatrix::Kind::kFp8;
  const bool fp8_dn = f0.down.kind == DeviceMatrix::Kind::kFp8;
  Segments sh{d_seg_start, d_seg_rows, d_off_h, tot_h}, si{d_seg_start, d_seg_rows, d_off_i, tot_i};
  GemmInput all;
  if (!Prepare(st_x_, xin, rows, hid, hid, !fp8_gu, fp8_gu, &sh, &all, error)) return false;
  for (int e = 0; e < E; ++e) {
    const int64_t c = count[size_t(e)];
    if (c == 0) continue;
    GemmInput in;
    in.f32 = xin + off[size_t(e)] * hid;
    in.m = c;
    in.k = hid;
    in.f32_ld = hid;
    if (all.bf16 != nullptr) in.bf16 = all.bf16 + off[size_t(e)] * hid;
    if (all.fp8 != nullptr) {
      in.fp8 = all.fp8 + off[size_t(e)] * hid;
      in.fp8_scales = all.fp8_scales + soff_h[size_t(e)];
    }
    if (!Linear(L.experts[size_t(e)].gate_up, in, gux + off[size_t(e)] * 2 * inter, error)) return false;
  }
  PD_CUDA_TRY(internal::SiluMulRows(gux, rows, inter, actx, stream_), "SwiGLU");
  if (!Prepare(st_x_, actx, rows, inter, inter, !fp8_dn, fp8_dn, &si, &all, error)) return false;
  for (int e = 0; e < E; ++e) {
    const int64_t c = count[size_t(e)];
    if (c == 0) continue;
    GemmInput in;
    in.f32 = actx + off[size_t(e)] * inter;
    in.m = c;
    in.k = inter;
    in.f32_ld = inter;
    if (all.bf16 != nullptr) in.bf16 = all.bf16 + off[size_t(e)] * inter;
    if (all.fp8 != nullptr) {
      in.fp8 = all.fp8 + off[size_t(e)] * inter;
      in.fp8_scales = all.fp8_scales + soff_i[size_t(e)];
    }
    if (!Linear(L.experts[size_t(e)].down, in, yout + off[size_t(e)] * hid, error)) return false;
  }
  PD_CUDA_TRY(internal::MoeCombine(out, yout, hid, d_comb_rows, d_comb_w, K, n, stream_), "MoE combine");
  return true;
}

bool GpuForwardEngine::Impl::Selection(int layer, int64_t n, std::string* error) {
  const SelectionConfig& sc = d_.selection;
  const int IH = d_.index_heads, ID = d_.index_head_dim, h = sc.misa_heads;
  const bool misa = sc.mode == SelectionMode::kMisa;
  IndexKeyBatch keys;
  keys.pool = arena_.index_pools[size_t(layer)];
  keys.page_table = d_page_table_;
  keys.page_table_stride = pt_stride_;
  keys.num_tokens = d_num_tokens_;
  keys.summary_sums = arena_.summaries[size_t(layer)];
  keys.summary_stride = arena_.max_blocks;
  keys.layout = d_.layout;
  IndexQueryBatch queries;
  queries.q8 = q8_;
  queries.weights = iweights_;
  queries.positions = d_positions_;
  queries.query_start = d_query_start_;
  queries.num_queries = n;
  queries.num_seqs = num_seqs_;
  queries.max_queries_per_seq = max_q_per_seq_;
  queries.max_context = max_context_;
  if (misa) {
    if (!Ensure("active", n * h, &active_, error)) return false;
    if (fast_router_ && IH % 16 == 0 && IH <= 64) {
      RouterParams rp;
      rp.keys = keys;
      rp.queries = queries;
      rp.heads = IH;
      rp.head_dim = ID;
      rp.active_heads = h;
      rp.active = active_;
      PD_LAUNCH_TRY(LaunchMisaRouter(rp, stream_, &pd_why_), "MISA router");
    } else {
      internal::RouterGenericParams rp;
      rp.q8 = q8_;
      rp.weights = iweights_;
      rp.positions = d_positions_;
      rp.token_seq = d_token_seq_;
      rp.num_tokens = d_num_tokens_;
      rp.summary_sums = arena_.summaries[size_t(layer)];
      rp.summary_stride = arena_.max_blocks;
      rp.num_queries = n;
      rp.heads = IH;
      rp.head_dim = ID;
      rp.active_heads = h;
      rp.summary_block = d_.layout.summary_block;
      rp.active = active_;
      PD_CUDA_TRY(internal::MisaRouterGeneric(rp, stream_), "MISA router (generic)");
    }
  }
  const bool masked = misa && max_q_per_seq_ <= 2;  // decode: the dense tile, unrouted weights zeroed
  const int rows = misa ? (masked ? IH : h) : IH;
  if (fast_select_ && (rows == 8 || rows == 16 || rows == 32 || rows == 64)) {
    SelectParams p;
    p.keys = keys;
    p.queries = queries;
    p.heads = IH;
    p.head_dim = ID;
    p.rows_per_query = rows;
    p.head_list = misa ? active_ : nullptr;
    p.masked_heads = masked ? h : 0;
    p.topk = sc.topk;
    p.sorted = false;
    p.out = indices_;
    SelectPlan plan;
    PD_LAUNCH_TRY(PlanSelectLaunch(p, &plan, &pd_why_), "selection plan");
    uint8_t* ws;
    if (!Ensure("select_ws", int64_t(plan.workspace_bytes), &ws, error)) return false;
    PD_LAUNCH_TRY(LaunchSelect(p, plan, ws, stream_, &pd_why_), "selection");
    return true;
  }
  float* logits;
  const int64_t stride = max_position_ + 1;
  if (!Ensure("select_logits", std::min<int64_t>(n, 65535) * stride, &logits, error)) return false;
  for (int64_t q0 = 0; q0 < n; q0 += 65535) {
    const int64_t nq = std::min<int64_t>(65535, n - q0);
    internal::SelectGenericParams p;
    p.q8 = q8_ + q0 * IH * ID;
    p.weights = iweights_ + q0 * IH;
    p.positions = d_positions_ + q0;
    p.token_seq = d_token_seq_ + q0;
    p.pool = arena_.index_pools[size_t(layer)];
    p.page_table = d_page_table_;
    p.page_table_stride = pt_stride_;
    p.layout = d_.layout;
    p.num_queries = nq;
    p.heads = IH;
    p.head_dim = ID;
    p.head_list = misa ? active_ + q0 * h : nullptr;
    p.num_listed = misa ? h : 0;
    p.max_position = max_position_;
    p.logits = logits;
    p.logits_stride = stride;
    p.topk = sc.topk;
    p.out = indices_ + q0 * sc.topk;
    PD_CUDA_TRY(internal::SelectGeneric(p, stream_), "selection (generic)");
  }
  return true;
}

bool GpuForwardEngine::Impl::Attention(int layer, const GpuBatch& batch, int64_t n,
                                       GpuForwardObserver* observer, std::string* error) {
  const DeviceLayer& L = layers_[size_t(layer)];
  const int64_t H = d_.heads, nope = d_.qk_nope_head_dim, rope = d_.qk_rope_head_dim,
                vdim = d_.v_head_dim, qk = nope + rope, r = d_.kv_lora_rank;
  const int64_t IH = d_.index_heads, ID = d_.index_head_dim, hid = d_.hidden_size;
  const float eps = d_.rms_norm_eps;
  auto is8 = [](const DeviceMatrix& m) { return m.kind == DeviceMatrix::Kind::kFp8; };

  // --- MLA projections ---
  GemmInput in_h, in_cq;
  const bool h8 = is8(L.q_a) || is8(L.kv_a) || is8(L.idx_wk) || is8(L.idx_wproj);
  const bool h16 = !is8(L.q_a) || !is8(L.kv_a) || !is8(L.idx_wk) || !is8(L.idx_wproj);
  if (!Prepare(st_h_, h_, n, hid, hid, h16, h8, nullptr, &in_h, error)) return false;
  if (!Linear(L.q_a, in_h, cq_, error)) return false;
  PD_CUDA_TRY(internal::RmsNorm(cq_, n, d_.q_lora_rank, d_.q_lora_rank, L.q_a_norm, eps, cq_,
                                d_.q_lora_rank, stream_), "q_a_layernorm");
  const bool c8 = is8(L.q_b) || is8(L.idx_wq_b), c16 = !is8(L.q_b) || !is8(L.idx_wq_b);
  if (!Prepare(st_cq_, cq_, n, d_.q_lora_rank, d_.q_lora_rank, c16, c8, nullptr, &in_cq, error)) return false;
  if (!Linear(L.q_b, in_cq, q_, error)) return false;
  PD_CUDA_TRY(internal::RopeInterleaved(q_ + nope, n, int(H), H * qk, qk, d_positions_, inv_freq_,
                                        int(rope), q_pe_, stream_), "RoPE q");
  if (!Linear(L.kv_a, in_h, kv_, error)) return false;
  PD_CUDA_TRY(internal::RmsNorm(kv_, n, r, r + rope, L.kv_a_norm, eps, ckv_, r, stream_), "kv_a_layernorm");
  PD_CUDA_TRY(internal::RopeInterleaved(kv_ + r, n, 1, r + rope, rope, d_positions_, inv_freq_,
                                        int(rope), kpe_, stream_), "RoPE k");
  // Absorb W_kvb's K part: q_abs[t, h] = W_K[h]^T q_nope[t, h] (batched over heads).
  PD_CUDA_TRY(internal::CastToBf16(q_, n * H * qk, q_bf16_, stream_), "cast q");
  if (!gemm_->BatchedBf16(false, r, n, nope, L.kv_b, r, (nope + vdim) * r, q_bf16_, q_, H * qk, qk,
                          q_abs_, H * r, r, int(H), stream_, error)) {
    return false;
  }
  Mark(kAttnProj);

  // --- Indexer projections, KV writes, prep, summaries ---
  if (!Linear(L.idx_wq_b, in_cq, iq_, error) || !Linear(L.idx_wk, in_h, ik_, error) ||
      !Linear(L.idx_wproj, in_h, iw_, error)) {
    return false;
  }
  MlaWriteParams mw;
  mw.pool = arena_.mla_pools[size_t(layer)];
  mw.page_table = d_page_table_;
  mw.page_table_stride = pt_stride_;
  mw.layout = d_.layout;
  mw.c_kv = ckv_;
  mw.k_pe = kpe_;
  mw.positions = d_positions_;
  mw.token_seq = d_token_seq_;
  mw.num_tokens = n;
  if (fast_mla_write_) {
    PD_LAUNCH_TRY(LaunchWriteMlaCache(mw, stream_, &pd_why_), "MLA cache write");
  } else {
    PD_CUDA_TRY(internal::WriteMlaCacheGeneric(mw, stream_), "MLA cache write (generic)");
  }
  PrepParams pp;
  pp.q_proj = iq_;
  pp.k_proj = ik_;
  pp.w_proj = iw_;
  pp.ln_gamma = L.k_norm_w;
  pp.ln_beta = L.k_norm_b;
  pp.ln_eps = 1e-6f;
  pp.positions = d_positions_;
  pp.token_seq = d_token_seq_;
  pp.inv_freq = inv_freq_;
  pp.rope_dim = int(rope);
  pp.num_tokens = n;
  pp.heads = int(IH);
  pp.head_dim = int(ID);
  pp.pool = arena_.index_pools[size_t(layer)];
  pp.page_table = d_page_table_;
  pp.page_table_stride = pt_stride_;
  pp.layout = d_.layout;
  pp.q8 = q8_;
  pp.weights = iweights_;
  if (fast_prep_) {
    PD_LAUNCH_TRY(LaunchIndexerPrep(pp, stream_, &pd_why_), "indexer prep");
  } else {
    PD_CUDA_TRY(internal::IndexerPrepGeneric(pp, stream_), "indexer prep (generic)");
  }
  SummaryParams sp;
  sp.pool = arena_.index_pools[size_t(layer)];
  sp.page_table = d_page_table_;
  sp.page_table_stride = pt_stride_;
  sp.summary_sums = arena_.summaries[size_t(layer)];
  sp.summary_stride = arena_.max_blocks;
  sp.from = d_from_;
  sp.to = d_to_;
  sp.num_seqs = num_seqs_;
  sp.max_blocks_touched = max_blocks_touched_;
  sp.layout = d_.layout;
  if (fast_summaries_) {
    PD_LAUNCH_TRY(LaunchUpdateSummaries(sp, stream_, &pd_why_), "summaries");
  } else {
    PD_CUDA_TRY(internal::UpdateSummariesGeneric(sp, stream_), "summaries (generic)");
  }
  Mark(kIndexerPrep);
  if (observer != nullptr) {
    PD_CUDA_TRY(cudaStreamSynchronize(stream_), "indexer observer");
    for (size_t s = 0; s < batch.segments.size(); ++s) {
      const GpuSegment& seg = batch.segments[s];
      const int64_t row0 = seg_row0_[s];
      GpuIndexerState st;
      st.layer = layer;
      st.segment = int(s);
      st.num_queries = seg.num_tokens;
      st.q8 = q8_ + row0 * IH * ID;
      st.weights = iweights_ + row0 * IH;
      st.positions = h_positions_.data() + row0;
      st.index_pool = arena_.index_pools[size_t(layer)];
      st.summaries = arena_.summaries[size_t(layer)] + int64_t(seg.kv_seq) * arena_.max_blocks * ID;
      st.num_keys = seg.start_pos + seg.num_tokens;
      observer->OnIndexerReady(st);
    }
    Mark(kIndexerPrep);
  }

  // --- Selection ---
  if (!Selection(layer, n, error)) return false;
  Mark(kSelection);

  // --- Sparse MLA ---
  for (int64_t q0 = 0; q0 < n; q0 += 65535) {
    const int64_t nq = std::min<int64_t>(65535, n - q0);
    SparseMlaParams ap;
    ap.cache.pool = arena_.mla_pools[size_t(layer)];
    ap.cache.page_table = d_page_table_;
    ap.cache.page_table_stride = pt_stride_;
    ap.cache.num_tokens = d_num_tokens_;
    ap.cache.layout = d_.layout;
    ap.q_abs = q_abs_ + q0 * H * r;
    ap.q_pe = q_pe_ + q0 * H * rope;
    ap.query_seq = d_token_seq_ + q0;
    ap.indices = indices_ + q0 * d_.selection.topk;
    ap.num_queries = nq;
    ap.heads = int(H);
    ap.topk = d_.selection.topk;
    ap.softmax_scale = d_.softmax_scale;
    ap.out = lat_ + q0 * H * r;
    if (fast_mla_) {
      PD_LAUNCH_TRY(LaunchSparseMla(ap, stream_, &pd_why_), "sparse MLA");
    } else {
      PD_CUDA_TRY(internal::SparseMlaGeneric(ap, stream_), "sparse MLA (generic)");
    }
  }
  Mark(kAttention);
  if (observer != nullptr) {
    PD_CUDA_TRY(cudaStreamSynchronize(stream_), "layer observer");
    observer->OnLayerWritten(layer);
    Mark(kAttention);
  }

  // --- W_kvb's V part per head, then o_proj ---
  PD_CUDA_TRY(internal::CastToBf16(lat_, n * H * r, lat_bf16_, stream_), "cast latents");
  if (!gemm_->BatchedBf16(true, vdim, n, r, L.kv_b + nope * r, r, (nope + vdim) * r, lat_bf16_, lat_,
                          H * r, r, o_, H * vdim, vdim, int(H), stream_, error)) {
    return false;
  }
  GemmInput in_o;
  const bool o8 = is8(L.o);
  if (!Prepare(st_x_, o_, n, H * vdim, H * vdim, !o8, o8, nullptr, &in_o, error)) return false;
  if (!Linear(L.o, in_o, delta_, error)) return false;
  Mark(kAttnProj);
  return true;
}

bool GpuForwardEngine::Impl::Forward(const GpuBatch& batch, float* logits, int32_t* argmax,
                                     GpuForwardObserver* observer, std::string* error) {
  const int64_t n = batch.num_tokens;
  // --- validation (nothing is written on failure) ---
  if (batch.segments.empty() || n <= 0 || batch.tokens == nullptr) {
    *error = "empty batch";
    return false;
  }
  int64_t total = 0;
  int max_seq = -1;
  std::vector<char> seen(size_t(std::max(arena_.max_sequences, 1)), 0);
  const int64_t pool_pages = arena_.num_pages;
  for (size_t i = 0; i < batch.segments.size(); ++i) {
    const GpuSegment& s = batch.segments[i];
    const std::string p = "segment " + std::to_string(i) + ": ";
    if (s.kv_seq < 0 || s.kv_seq >= arena_.max_sequences) {
      *error = p + "kv_seq " + std::to_string(s.kv_seq) + " outside [0, " + std::to_string(arena_.max_sequences) + ")";
      return false;
    }
    if (seen[size_t(s.kv_seq)]) {
      *error = p + "sequence " + std::to_string(s.kv_seq) + " appears twice";
      return false;
    }
    seen[size_t(s.kv_seq)] = 1;
    if (s.num_tokens <= 0 || s.start_pos < 0) {
      *error = p + "needs tokens and a non-negative start position";
      return false;
    }
    const int64_t end = s.start_pos + s.num_tokens;
    if (s.page_table == nullptr || s.num_pages < NumPages(end)) {
      *error = p + "page table covers " + std::to_string(s.num_pages) + " pages, " +
               std::to_string(NumPages(end)) + " needed";
      return false;
    }
    for (int64_t pg = 0; pg < NumPages(end); ++pg) {
      if (s.page_table[pg] < 0 || (pool_pages > 0 && s.page_table[pg] >= pool_pages)) {
        *error = p + "page " + std::to_string(s.page_table[pg]) + " outside the pool";
        return false;
      }
    }
    if (CeilDiv(end, d_.layout.summary_block) > arena_.max_blocks) {
      *error = p + "position " + std::to_string(end) + " exceeds the summary region";
      return false;
    }
    total += s.num_tokens;
    max_seq = std::max(max_seq, int(s.kv_seq));
  }
  if (total != n) {
    *error = "segments cover " + std::to_string(total) + " tokens but the batch has " + std::to_string(n);
    return false;
  }
  for (int64_t i = 0; i < n; ++i) {
    if (batch.tokens[i] < 0 || batch.tokens[i] >= d_.vocab_size) {
      *error = "token " + std::to_string(batch.tokens[i]) + " at index " + std::to_string(i) +
               " is outside the vocabulary";
      return false;
    }
  }
  for (int64_t r : batch.logit_rows) {
    if (r < 0 || r >= n) {
      *error = "logit row " + std::to_string(r) + " outside the batch";
      return false;
    }
  }

  // --- metadata in the internal order (segments by ascending kv_seq) ---
  const size_t S = batch.segments.size();
  seg_order_.resize(S);
  std::iota(seg_order_.begin(), seg_order_.end(), 0);
  std::sort(seg_order_.begin(), seg_order_.end(), [&](int a, int b) {
    return batch.segments[size_t(a)].kv_seq < batch.segments[size_t(b)].kv_seq;
  });
  std::vector<int64_t> batch_row0(S, 0);
  for (size_t i = 1; i < S; ++i) batch_row0[i] = batch_row0[i - 1] + batch.segments[i - 1].num_tokens;
  num_seqs_ = max_seq + 1;
  pt_stride_ = 1;
  max_q_per_seq_ = 0;
  max_context_ = 0;
  max_position_ = 0;
  max_blocks_touched_ = 1;
  for (const GpuSegment& s : batch.segments) {
    const int64_t end = s.start_pos + s.num_tokens;
    pt_stride_ = std::max(pt_stride_, NumPages(end));
    max_q_per_seq_ = std::max(max_q_per_seq_, s.num_tokens);
    max_context_ = std::max(max_context_, end);
    max_position_ = std::max(max_position_, end - 1);
    const int B = d_.layout.summary_block;
    max_blocks_touched_ = std::max(max_blocks_touched_, (end - 1) / B - s.start_pos / B + 1);
  }
  std::vector<int32_t> tokens(static_cast<size_t>(n)), token_seq(static_cast<size_t>(n)), page_table(size_t(num_seqs_) * size_t(pt_stride_), 0);
  std::vector<int64_t> num_tokens(size_t(num_seqs_), 0), from(size_t(num_seqs_), 0), to(size_t(num_seqs_), 0);
  std::vector<int32_t> query_start(size_t(num_seqs_) + 1, 0);
  h_positions_.resize(static_cast<size_t>(n));
  seg_row0_.assign(S, 0);
  std::vector<int64_t> row_map(static_cast<size_t>(n));  // batch row -> internal row
  int64_t row = 0;
  for (int si : seg_order_) {
    const GpuSegment& s = batch.segments[size_t(si)];
    seg_row0_[size_t(si)] = row;
    for (int64_t i = 0; i < s.num_tokens; ++i) {
      tokens[size_t(row + i)] = batch.tokens[batch_row0[size_t(si)] + i];
      token_seq[size_t(row + i)] = s.kv_seq;
      h_positions_[size_t(row + i)] = s.start_pos + i;
      row_map[size_t(batch_row0[size_t(si)] + i)] = row + i;
    }
    row += s.num_tokens;
    const int64_t end = s.start_pos + s.num_tokens;
    std::copy(s.page_table, s.page_table + NumPages(end), page_table.begin() + int64_t(s.kv_seq) * pt_stride_);
    num_tokens[size_t(s.kv_seq)] = end;
    from[size_t(s.kv_seq)] = s.start_pos;
    to[size_t(s.kv_seq)] = end;
    query_start[size_t(s.kv_seq) + 1] = int32_t(s.num_tokens);
  }
  for (int b = 0; b < num_seqs_; ++b) query_start[size_t(b) + 1] += query_start[size_t(b)];
  std::vector<int32_t> lrows;
  for (int64_t r : batch.logit_rows) lrows.push_back(int32_t(row_map[size_t(r)]));
  const int64_t R = int64_t(lrows.size());

  int32_t *d_tokens, *d_lrows;
  if (!Upload("tokens", tokens, &d_tokens, error) || !Upload("token_seq", token_seq, &d_token_seq_, error) ||
      !Upload("positions", h_positions_, &d_positions_, error) ||
      !Upload("page_table", page_table, &d_page_table_, error) ||
      !Upload("num_tokens", num_tokens, &d_num_tokens_, error) ||
      !Upload("query_start", query_start, &d_query_start_, error) ||
      !Upload("from", from, &d_from_, error) || !Upload("to", to, &d_to_, error) ||
      !Upload("logit_rows", lrows, &d_lrows, error)) {
    return false;
  }

  // --- activations ---
  const int64_t hid = d_.hidden_size, H = d_.heads, r = d_.kv_lora_rank,
                rope = d_.qk_rope_head_dim, qk = d_.qk_nope_head_dim + rope, IH = d_.index_heads,
                ID = d_.index_head_dim;
  if (!Ensure("x", n * hid, &x_, error) || !Ensure("h", n * hid, &h_, error) ||
      !Ensure("delta", n * hid, &delta_, error) || !Ensure("cq", n * d_.q_lora_rank, &cq_, error) ||
      !Ensure("q", n * H * qk, &q_, error) || !Ensure("kv", n * (r + rope), &kv_, error) ||
      !Ensure("ckv", n * r, &ckv_, error) || !Ensure("kpe", n * rope, &kpe_, error) ||
      !Ensure("q_abs", n * H * r, &q_abs_, error) || !Ensure("q_pe", n * H * rope, &q_pe_, error) ||
      !Ensure("q_bf16", n * H * qk, &q_bf16_, error) || !Ensure("lat", n * H * r, &lat_, error) ||
      !Ensure("lat_bf16", n * H * r, &lat_bf16_, error) ||
      !Ensure("o", n * H * d_.v_head_dim, &o_, error) || !Ensure("iq", n * IH * ID, &iq_, error) ||
      !Ensure("ik", n * ID, &ik_, error) || !Ensure("iw", n * IH, &iw_, error) ||
      !Ensure("q8", n * IH * ID, &q8_, error) || !Ensure("iweights", n * IH, &iweights_, error) ||
      !Ensure("indices", n * d_.selection.topk, &indices_, error)) {
    return false;
  }

  if (!StartTiming(error)) return false;
  PD_CUDA_TRY(internal::EmbedGather(embed_, hid, d_tokens, n, x_, stream_), "embedding");
  Mark(kEmbed);
  for (int layer = 0; layer < d_.num_layers; ++layer) {
    const DeviceLayer& L = layers_[size_t(layer)];
    if (layer == 0) {
      PD_CUDA_TRY(internal::RmsNorm(x_, n, hid, hid, L.attn_norm, d_.rms_norm_eps, h_, hid, stream_), "attn norm");
    } else {
      PD_CUDA_TRY(internal::AddRmsNorm(x_, delta_, n, hid, L.attn_norm, d_.rms_norm_eps, h_, stream_), "attn norm");
    }
    if (!Attention(layer, batch, n, observer, error)) return false;
    PD_CUDA_TRY(internal::AddRmsNorm(x_, delta_, n, hid, L.ffn_norm, d_.rms_norm_eps, h_, stream_), "ffn norm");
    GemmInput in_h;
    auto is8 = [](const DeviceMatrix& m) { return m.kind == DeviceMatrix::Kind::kFp8; };
    if (L.moe) {
      const bool s8 = L.has_shared && is8(L.shared.gate_up);
      if (!Prepare(st_h_, h_, n, hid, hid, true, s8, nullptr, &in_h, error)) return false;
      if (!MoeFfn(L, h_, in_h, n, delta_, error)) return false;
    } else {
      const bool f8 = is8(L.dense.gate_up);
      if (!Prepare(st_h_, h_, n, hid, hid, !f8, f8, nullptr, &in_h, error)) return false;
      if (!DenseFfn(L.dense, in_h, n, delta_, error)) return false;
    }
    Mark(kFfn);
  }
  PD_CUDA_TRY(internal::AddInPlace(x_, delta_, n * hid, stream_), "residual");
  float *sel = nullptr, *d_logits = nullptr;
  int32_t* d_argmax = nullptr;
  if (R > 0 && (logits != nullptr || argmax != nullptr)) {
    if (!Ensure("sel", R * hid, &sel, error) || !Ensure("logits", R * d_.vocab_size, &d_logits, error) ||
        !Ensure("argmax", R, &d_argmax, error)) {
      return false;
    }
    PD_CUDA_TRY(internal::GatherRows(x_, hid, hid, d_lrows, R, sel, stream_), "gather rows");
    PD_CUDA_TRY(internal::RmsNorm(sel, R, hid, hid, final_norm_, d_.rms_norm_eps, sel, hid, stream_), "final norm");
    GemmInput in_s;
    const bool l8 = lm_head_.kind == DeviceMatrix::Kind::kFp8;
    if (!Prepare(st_x_, sel, R, hid, hid, !l8, l8, nullptr, &in_s, error)) return false;
    if (!Linear(lm_head_, in_s, d_logits, error)) return false;
    if (argmax != nullptr) {
      PD_CUDA_TRY(internal::ArgmaxRows(d_logits, R, d_.vocab_size, d_argmax, stream_), "argmax");
    }
    Mark(kLmHead);
    if (logits != nullptr) {
      PD_CUDA_TRY(cudaMemcpyAsync(logits, d_logits, size_t(R * d_.vocab_size) * 4, cudaMemcpyDeviceToHost, stream_),
                  "logits to host");
    }
    if (argmax != nullptr) {
      PD_CUDA_TRY(cudaMemcpyAsync(argmax, d_argmax, size_t(R) * 4, cudaMemcpyDeviceToHost, stream_), "argmax to host");
    }
  }
  PD_CUDA_TRY(cudaStreamSynchronize(stream_), "forward");
  if (!FinishTiming(error)) return false;
  ++times_.forwards;
  return true;
}

// ---------------------------------------------------------------------------

GpuForwardEngine::GpuForwardEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuForwardEngine::~GpuForwardEngine() = default;

std::unique_ptr<GpuForwardEngine> GpuForwardEngine::Create(const GpuModelWeights& weights,
                                                           const GpuKvArena& arena,
                                                           const GpuEngineOptions& options,
                                                           std::string* error) {
  auto impl = std::make_unique<Impl>();
  if (!impl->Init(weights, arena, options, error)) return nullptr;
  return std::unique_ptr<GpuForwardEngine>(new GpuForwardEngine(std::move(impl)));
}

bool GpuForwardEngine::Forward(const GpuBatch& batch, float* logits, int32_t* argmax,
                               GpuForwardObserver* observer, std::string* error) {
  return impl_->Forward(batch, logits, argmax, observer, error);
}

bool GpuForwardEngine::SetSelectionMode(SelectionMode mode, std::string* error) {
  return impl_->SetMode(mode, error);
}

const GpuStageTimes& GpuForwardEngine::stage_times() const { return impl_->times_; }
void GpuForwardEngine::ResetStageTimes() { impl_->times_ = GpuStageTimes(); }
std::string GpuForwardEngine::Describe() const { return impl_->Describe(); }

bool FillRandomKv(const GpuKvArena& arena, int layer_begin, int layer_end,
                  const std::vector<GpuSegment>& sequences, uint64_t seed, std::string* error) {
  if (layer_begin < 0 || layer_end > int(arena.mla_pools.size()) || layer_begin > layer_end) {
    *error = "FillRandomKv: layer range outside the arena";
    return false;
  }
  int max_seq = -1;
  int64_t stride = 1, blocks = 1;
  for (const GpuSegment& s : sequences) {
    if (s.kv_seq < 0 || s.kv_seq >= arena.max_sequences || s.num_pages < NumPages(s.start_pos)) {
      *error = "FillRandomKv: bad sequence " + std::to_string(s.kv_seq);
      return false;
    }
    max_seq = std::max(max_seq, int(s.kv_seq));
    stride = std::max(stride, NumPages(s.start_pos));
    blocks = std::max(blocks, CeilDiv(s.start_pos, arena.layout.summary_block));
  }
  if (max_seq < 0) return true;
  const int S = max_seq + 1;
  std::vector<int32_t> pt(size_t(S) * size_t(stride), 0);
  std::vector<int64_t> from(size_t(S), 0), to(size_t(S), 0);
  for (const GpuSegment& s : sequences) {
    std::copy(s.page_table, s.page_table + NumPages(s.start_pos), pt.begin() + int64_t(s.kv_seq) * stride);
    to[size_t(s.kv_seq)] = s.start_pos;
  }
  DevBuf d_pt, d_from, d_to;
  PD_CUDA_TRY(d_pt.Ensure(pt.size() * 4), "FillRandomKv");
  PD_CUDA_TRY(d_from.Ensure(size_t(S) * 8), "FillRandomKv");
  PD_CUDA_TRY(d_to.Ensure(size_t(S) * 8), "FillRandomKv");
  PD_CUDA_TRY(cudaMemcpy(d_pt.as<void>(), pt.data(), pt.size() * 4, cudaMemcpyHostToDevice), "FillRandomKv");
  PD_CUDA_TRY(cudaMemcpy(d_from.as<void>(), from.data(), size_t(S) * 8, cudaMemcpyHostToDevice), "FillRandomKv");
  PD_CUDA_TRY(cudaMemcpy(d_to.as<void>(), to.data(), size_t(S) * 8, cudaMemcpyHostToDevice), "FillRandomKv");
  for (int layer = layer_begin; layer < layer_end; ++layer) {
    for (const GpuSegment& s : sequences) {
      PD_CUDA_TRY(internal::RandomKvRecords(arena.mla_pools[size_t(layer)], arena.index_pools[size_t(layer)],
                                            d_pt.as<int32_t>() + int64_t(s.kv_seq) * stride, s.start_pos,
                                            arena.layout, seed * 7919u + uint64_t(layer) * 131u + uint64_t(s.kv_seq),
                                            nullptr),
                  "FillRandomKv records");
    }
    SummaryParams sp;
    sp.pool = arena.index_pools[size_t(layer)];
    sp.page_table = d_pt.as<int32_t>();
    sp.page_table_stride = stride;
    sp.summary_sums = arena.summaries[size_t(layer)];
    sp.summary_stride = arena.max_blocks;
    sp.from = d_from.as<int64_t>();
    sp.to = d_to.as<int64_t>();
    sp.num_seqs = S;
    sp.max_blocks_touched = blocks;
    sp.layout = arena.layout;
    if (arena.layout.index_head_dim == 128) {
      const char* why = nullptr;
      const cudaError_t e = LaunchUpdateSummaries(sp, nullptr, &why);
      if (e != cudaSuccess) {
        *error = std::string("FillRandomKv summaries: ") + (why ? why : cudaGetErrorString(e));
        return false;
      }
    } else {
      PD_CUDA_TRY(internal::UpdateSummariesGeneric(sp, nullptr), "FillRandomKv summaries");
    }
  }
  PD_CUDA_TRY(cudaDeviceSynchronize(), "FillRandomKv");
  return true;
}

}  // namespace pd::kernels::cuda
