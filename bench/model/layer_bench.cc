// One DeepSeek-V3.2-shaped MoE layer end to end on the GPU backend
// (kernels::cuda::GpuForwardEngine): ms per layer by stage (CUDA events), dense
// DSA vs MISA selection, at a long context.
//   prefill: one chunk of Q queries at the end of a C-token context (the first
//            C - Q tokens' KV already in the cache as random valid records);
//   decode:  batches of B requests, one token each, every request at C - 1.
// Weights: random, generated on the device (FP8 e4m3 with ue8m0 128x128 block
// scales for the projections and experts, bf16 for the router, the indexer's
// weights_proj and W_kvb), V3.2 shapes: hidden 7168, 128 heads, q_lora 1536,
// kv_lora 512, 256 routed experts (8 active) + 1 shared, inter 2048; indexer
// 64 x 128, top-2048; MISA h = 8, B = 1024. Prints a table; --json writes JSON.
//
// Usage: layer_bench [--json FILE] [--context C] [--chunk Q] [--batches 32,128]
//                    [--runs N] [--gemm auto,bf16] [--quick]
// --gemm: the engines to run: auto (FP8 block-scaled GEMMs when the cuBLASLt
// self-test enables them, else bf16) and/or bf16 (FP8 weights dequantised).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/cuda/model/gpu_forward.h"
#include "kernels/ops.h"

namespace pd::bench {
namespace {

namespace kc = kernels::cuda;
using kernels::DType;
using kernels::WeightView;

[[noreturn]] void Die(const std::string& what) {
  std::fprintf(stderr, "layer_bench: %s\n", what.c_str());
  std::exit(2);
}

WeightView View(DType t, int64_t rows, int64_t cols) {
  WeightView v;
  v.dtype = t;
  v.rows = rows;
  v.cols = cols;
  v.ld = cols;
  return v;
}

struct Shapes {
  int hidden = 7168, heads = 128, q_lora = 1536, kv_lora = 512, nope = 128, rope = 64, v = 128;
  int experts = 256, topk_experts = 8, moe_inter = 2048, index_heads = 64, index_dim = 128;
  int64_t vocab = 129280;
};

kc::GpuModelWeights MakeLayer(const Shapes& s) {
  kc::GpuModelWeights w;
  kc::GpuModelDims& d = w.dims;
  d.vocab_size = s.vocab;
  d.hidden_size = s.hidden;
  d.num_layers = 1;
  d.heads = s.heads;
  d.q_lora_rank = s.q_lora;
  d.kv_lora_rank = s.kv_lora;
  d.qk_nope_head_dim = s.nope;
  d.qk_rope_head_dim = s.rope;
  d.v_head_dim = s.v;
  d.n_routed_experts = s.experts;
  d.experts_per_tok = s.topk_experts;
  d.n_group = 8;
  d.topk_group = 4;
  d.norm_topk_prob = true;
  d.routed_scaling_factor = 2.5f;
  kernels::YarnParams yarn;
  yarn.dim = s.rope;
  d.inv_freq = kernels::YarnInvFreq(yarn);
  d.softmax_scale = kernels::YarnSoftmaxScale(s.nope + s.rope, yarn);
  d.index_heads = s.index_heads;
  d.index_head_dim = s.index_dim;
  d.selection.mode = kernels::SelectionMode::kDense;
  d.selection.heads = s.index_heads;
  d.selection.head_dim = s.index_dim;
  d.selection.topk = 2048;
  d.selection.misa_heads = 8;
  d.selection.misa_block = 1024;
  d.layout.kv_lora_rank = s.kv_lora;
  d.layout.rope_dim = s.rope;
  d.layout.index_head_dim = s.index_dim;
  d.layout.summary_block = 1024;
  w.embed = View(DType::kBF16, s.vocab, s.hidden);
  w.lm_head = View(DType::kBF16, s.vocab, s.hidden);
  w.final_norm.assign(size_t(s.hidden), 1.0f);
  kc::GpuLayerWeights L;
  const auto fp8 = DType::kFP8E4M3;
  L.attn_norm.assign(size_t(s.hidden), 1.0f);
  L.q_a = View(fp8, s.q_lora, s.hidden);
  L.q_a_norm.assign(size_t(s.q_lora), 1.0f);
  L.q_b = View(fp8, int64_t(s.heads) * (s.nope + s.rope), s.q_lora);
  L.kv_a = View(fp8, s.kv_lora + s.rope, s.hidden);
  L.kv_a_norm.assign(size_t(s.kv_lora), 1.0f);
  L.kv_b = View(fp8, int64_t(s.heads) * (s.nope + s.v), s.kv_lora);
  L.o = View(fp8, s.hidden, int64_t(s.heads) * s.v);
  L.idx_wq_b = View(fp8, int64_t(s.index_heads) * s.index_dim, s.q_lora);
  L.idx_wk = View(fp8, s.index_dim, s.hidden);
  L.idx_k_norm_w.assign(size_t(s.index_dim), 1.0f);
  L.idx_k_norm_b.assign(size_t(s.index_dim), 0.0f);
  L.idx_weights_proj = View(DType::kBF16, s.index_heads, s.hidden);
  L.ffn_norm.assign(size_t(s.hidden), 1.0f);
  L.moe = true;
  L.router = View(DType::kBF16, s.experts, s.hidden);
  L.router_bias.assign(size_t(s.experts), 0.0f);
  const kc::GpuFfnWeights e{View(fp8, s.moe_inter, s.hidden), View(fp8, s.moe_inter, s.hidden),
                            View(fp8, s.hidden, s.moe_inter)};
  L.experts.assign(size_t(s.experts), e);
  L.shared = e;
  w.layers.push_back(L);
  return w;
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Result {
  std::string gemm, kase, mode;
  int64_t tokens = 0, context = 0;
  double attn_proj = 0, indexer_prep = 0, selection = 0, attention = 0, ffn = 0, layer = 0,
         embed_lm = 0, wall = 0;  // ms, medians
  int runs = 0;
};

}  // namespace
}  // namespace pd::bench

int main(int argc, char** argv) {
  using namespace pd::bench;
  std::string json;
  int64_t context = 131072, chunk = 8192;
  std::vector<int> batches = {32, 128};
  std::vector<std::string> gemms = {"auto", "bf16"};
  int runs = 5;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value after " + a);
      return argv[++i];
    };
    if (a == "--json") {
      json = next();
    } else if (a == "--context") {
      context = std::atoll(next().c_str());
    } else if (a == "--chunk") {
      chunk = std::atoll(next().c_str());
    } else if (a == "--runs") {
      runs = std::atoi(next().c_str());
    } else if (a == "--batches") {
      batches.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');) batches.push_back(std::atoi(t.c_str()));
    } else if (a == "--gemm") {
      gemms.clear();
      std::stringstream ss(next());
      for (std::string t; std::getline(ss, t, ',');) {
        if (t != "auto" && t != "bf16") Die("--gemm takes auto and/or bf16");
        gemms.push_back(t);
      }
    } else if (a == "--quick") {
      context = 16384;
      chunk = 2048;
      batches = {8};
      runs = 2;
    } else {
      Die("unknown argument " + a + " (see the comment at the top of layer_bench.cc)");
    }
  }
  if (context < 2 || chunk < 1 || chunk >= context || runs < 1) Die("need 1 <= chunk < context, runs >= 1");
  if (kc::CudaDeviceCount() < 1) Die("no CUDA device");
  const std::string device = kc::CudaDeviceDescription();
  std::printf("device: %s\n", device.c_str());

  const Shapes shapes;
  const kc::GpuModelWeights weights = MakeLayer(shapes);
  const pd::kernels::KvLayout layout = weights.dims.layout;
  int max_batch = 1;
  for (int b : batches) max_batch = std::max(max_batch, b);
  const int seqs = 1 + max_batch;  // sequence 0: prefill; 1..B: decode
  const int64_t pages_per_seq = pd::kernels::NumPages(context);
  const int64_t num_pages = pages_per_seq * seqs;
  const int64_t max_blocks = pd::kernels::CeilDiv(context, layout.summary_block);
  auto align = [](size_t v) { return (v + 4095) / 4096 * 4096; };
  const size_t mla = align(size_t(num_pages) * layout.MlaPageBytes());
  const size_t idx = align(size_t(num_pages) * layout.IndexPageBytes());
  const size_t sums = align(size_t(seqs) * size_t(max_blocks) * layout.SummaryBytes());
  std::string err;
  uint8_t* arena_mem = static_cast<uint8_t*>(kc::DeviceAllocZeroed(mla + idx + sums, &err));
  if (arena_mem == nullptr) Die("KV arena: " + err);
  kc::GpuKvArena arena;
  arena.layout = layout;
  arena.mla_pools = {arena_mem};
  arena.index_pools = {arena_mem + mla};
  arena.summaries = {reinterpret_cast<float*>(arena_mem + mla + idx)};
  arena.max_sequences = seqs;
  arena.max_blocks = max_blocks;
  arena.num_pages = num_pages;
  std::printf("KV arena: %d sequences x %lld tokens, %.2f GB\n", seqs, (long long)context,
              double(mla + idx + sums) / 1e9);

  std::vector<std::vector<int32_t>> tables(static_cast<size_t>(seqs));
  for (int s = 0; s < seqs; ++s) {
    tables[size_t(s)].resize(size_t(pages_per_seq));
    for (int64_t p = 0; p < pages_per_seq; ++p) tables[size_t(s)][size_t(p)] = int32_t(s * pages_per_seq + p);
  }
  auto segment = [&](int s, int64_t start, int64_t n) {
    kc::GpuSegment g;
    g.kv_seq = s;
    g.start_pos = start;
    g.num_tokens = n;
    g.page_table = tables[size_t(s)].data();
    g.num_pages = pages_per_seq;
    return g;
  };
  // The contexts: sequence 0 up to context - chunk, the decode sequences up to context - 1.
  std::vector<kc::GpuSegment> fill = {segment(0, context - chunk, 0)};
  for (int s = 1; s < seqs; ++s) fill.push_back(segment(s, context - 1, 0));
  auto t0 = std::chrono::steady_clock::now();
  if (!kc::FillRandomKv(arena, 0, 1, fill, 7, &err)) Die(err);
  std::printf("random KV for %d sequences in %.2f s\n", seqs,
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  std::mt19937 rng(5);
  std::vector<Result> results;
  std::vector<std::string> describes;
  std::unique_ptr<kc::GpuForwardEngine> engine;
  std::string gemm_name;
  auto run_case = [&](const std::string& kase, pd::kernels::SelectionMode mode, const kc::GpuBatch& proto) {
    if (!engine->SetSelectionMode(mode, &err)) Die(err);
    Result r;
    r.gemm = gemm_name;
    r.kase = kase;
    r.mode = pd::kernels::SelectionModeName(mode);
    r.tokens = proto.num_tokens;
    r.context = context;
    r.runs = runs;
    std::vector<double> ap, ip, se, at, ff, layer, el, wall;
    std::vector<int32_t> tokens(size_t(proto.num_tokens));
    std::vector<float> logits(proto.logit_rows.size() * size_t(shapes.vocab));
    for (int it = -1; it < runs; ++it) {  // it == -1: warm-up
      for (auto& t : tokens) t = int32_t(rng() % uint32_t(shapes.vocab));  // fresh inputs
      kc::GpuBatch b = proto;
      b.tokens = tokens.data();
      engine->ResetStageTimes();
      const auto w0 = std::chrono::steady_clock::now();
      if (!engine->Forward(b, logits.data(), nullptr, nullptr, &err)) Die(kase + ": " + err);
      const double wall_ms = std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count() * 1e3;
      if (it < 0) continue;
      const kc::GpuStageTimes& t = engine->stage_times();
      ap.push_back(t.attn_proj * 1e3);
      ip.push_back(t.indexer_prep * 1e3);
      se.push_back(t.selection * 1e3);
      at.push_back(t.attention * 1e3);
      ff.push_back(t.ffn * 1e3);
      layer.push_back((t.attn_proj + t.indexer_prep + t.selection + t.attention + t.ffn) * 1e3);
      el.push_back((t.embed + t.lm_head) * 1e3);
      wall.push_back(wall_ms);
    }
    r.attn_proj = Median(ap);
    r.indexer_prep = Median(ip);
    r.selection = Median(se);
    r.attention = Median(at);
    r.ffn = Median(ff);
    r.layer = Median(layer);
    r.embed_lm = Median(el);
    r.wall = Median(wall);
    results.push_back(r);
    std::printf("  %-5s %-24s %-6s layer %9.3f ms (proj %.3f, idx prep %.3f, select %.3f, attn %.3f, ffn %.3f)\n",
                gemm_name.c_str(), kase.c_str(), r.mode.c_str(), r.layer, r.attn_proj, r.indexer_prep,
                r.selection, r.attention, r.ffn);
    std::fflush(stdout);
  };

  for (const std::string& g : gemms) {
    gemm_name = g;
    kc::GpuEngineOptions opt;
    opt.random_weights = true;
    opt.seed = 2026;
    opt.stage_timing = true;
    opt.gemm = g == "bf16" ? kc::GemmPrecision::kBf16 : kc::GemmPrecision::kAuto;
    engine.reset();
    t0 = std::chrono::steady_clock::now();
    engine = kc::GpuForwardEngine::Create(weights, arena, opt, &err);
    if (engine == nullptr) Die("engine: " + err);
    std::printf("engine (%s) ready in %.1f s: %s\n", g.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
                engine->Describe().c_str());
    for (auto mode : {pd::kernels::SelectionMode::kDense, pd::kernels::SelectionMode::kMisa}) {
      kc::GpuBatch b;
      b.num_tokens = chunk;
      b.segments = {segment(0, context - chunk, chunk)};
      b.logit_rows = {chunk - 1};
      run_case("prefill " + std::to_string(chunk) + " @" + std::to_string(context), mode, b);
      for (int bs : batches) {
        kc::GpuBatch d;
        d.num_tokens = bs;
        for (int s = 1; s <= bs; ++s) {
          d.segments.push_back(segment(s, context - 1, 1));
          d.logit_rows.push_back(s - 1);
        }
        run_case("decode batch " + std::to_string(bs) + " @" + std::to_string(context), mode, d);
      }
    }
    describes.push_back(g + ": " + engine->Describe());
  }

  std::printf("\nOne V3.2 MoE layer, ms (median of %d runs, CUDA events; layer = the five stages):\n", runs);
  std::printf("| GEMMs | case | selection | layer | attn proj | indexer prep | selection | attention | ffn (MoE) | embed+lm_head | host wall |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Result& r : results) {
    std::printf("| %s | %s | %s | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f |\n", r.gemm.c_str(), r.kase.c_str(),
                r.mode.c_str(), r.layer, r.attn_proj, r.indexer_prep, r.selection, r.attention, r.ffn,
                r.embed_lm, r.wall);
  }
  std::string describe;
  for (const std::string& d : describes) describe += (describe.empty() ? "" : " || ") + d;
  if (!json.empty()) {
    FILE* f = std::fopen(json.c_str(), "w");
    if (f == nullptr) Die("cannot write " + json);
    std::fprintf(f, "{\n  \"device\": \"%s\",\n  \"engine\": \"", device.c_str());
    for (char c : describe) {
      if (c == '"' || c == '\\') std::fputc('\\', f);
      std::fputc(c, f);
    }
    std::fprintf(f, "\",\n  \"context\": %lld,\n  \"runs\": %d,\n  \"results\": [\n", (long long)context, runs);
    for (size_t i = 0; i < results.size(); ++i) {
      const Result& r = results[i];
      std::fprintf(f,
                   "    {\"gemm\": \"%s\", \"case\": \"%s\", \"selection\": \"%s\", \"tokens\": %lld, \"layer_ms\": %.4f, "
                   "\"attn_proj_ms\": %.4f, \"indexer_prep_ms\": %.4f, \"selection_ms\": %.4f, "
                   "\"attention_ms\": %.4f, \"ffn_ms\": %.4f, \"embed_lm_head_ms\": %.4f, \"wall_ms\": %.4f}%s\n",
                   r.gemm.c_str(), r.kase.c_str(), r.mode.c_str(), (long long)r.tokens, r.layer, r.attn_proj, r.indexer_prep,
                   r.selection, r.attention, r.ffn, r.embed_lm, r.wall, i + 1 < results.size() ? "," : "");
    }
    std::fprintf(f, "  ]\n}\n");
    std::fclose(f);
    std::printf("wrote %s\n", json.c_str());
  }
  std::printf("engines after the runs: %s\n", describe.c_str());
  engine.reset();
  kc::DeviceFree(arena_mem);
  return 0;
}
