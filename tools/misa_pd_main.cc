// misa-pd: the command-line entry point (monolithic generation, selection
// reports, random checkpoints, model info). The daemons have their own mains.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/mapped_file.h"
#include "common/status.h"
#include "kernels/cpu/parallel.h"
#include "model/checkpoint_writer.h"
#include "model/forward.h"
#include "model/generator.h"
#if defined(PD_MODEL_HAVE_GPU)
#include "model/gpu_model.h"
#endif
#include "model/model_dir.h"
#include "model/selection_report.h"
#include "model/tokenizer.h"

ABSL_FLAG(std::string, model, "", "model directory (config.json, safetensors shards, tokenizer.json)");
ABSL_FLAG(std::string, prompt, "", "generate: prompt text (encoded with the model's tokenizer.json)");
ABSL_FLAG(std::string, token_ids, "", "generate: prompt as comma-separated token ids (instead of --prompt)");
ABSL_FLAG(int64_t, random_prompt, 0, "generate: use a random prompt of this many tokens (seeded by --seed)");
ABSL_FLAG(bool, add_bos, true, "generate: prepend the BOS token (config bos_token_id) to --prompt");
ABSL_FLAG(int64_t, max_new_tokens, 32, "generate: tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "generate: sampling temperature (0 = greedy)");
ABSL_FLAG(double, top_p, 1.0, "generate: nucleus sampling mass (1 = off)");
ABSL_FLAG(int32_t, top_k, 0, "generate: top-k sampling (0 = off)");
ABSL_FLAG(uint64_t, seed, 0, "generate: sampler seed; write-checkpoint: weight seed; "
                             "selection-report: random prompt seed");
ABSL_FLAG(bool, ignore_eos, false, "generate: keep going after EOS");
ABSL_FLAG(int64_t, prefill_chunk, 2048, "tokens per prefill forward call");
ABSL_FLAG(std::string, selection_mode, "", "override config: dense | misa | misa_dagger | hisa");
ABSL_FLAG(int32_t, misa_topk_heads, 0, "override config misa_topk_heads (h) when > 0");
ABSL_FLAG(int32_t, misa_k_block_size, 0, "override config misa_k_block_size (B) when > 0");
ABSL_FLAG(int32_t, misa_stage1_topk, 0, "override config misa_stage1_topk (C) when > 0");
ABSL_FLAG(int32_t, index_topk, 0, "override config index_topk when > 0");
ABSL_FLAG(int64_t, prompt_tokens, 4096, "selection-report: random prompt length (when no --prompt)");
ABSL_FLAG(std::string, compare, "", "selection-report: modes compared with dense (comma-separated; "
                                    "default: the configured mode)");
ABSL_FLAG(std::string, json, "", "selection-report: also write the report as JSON to this file");
ABSL_FLAG(std::string, preset, "tiny", "write-checkpoint: tiny | v32");
ABSL_FLAG(std::string, out, "", "write-checkpoint: output directory");
ABSL_FLAG(int32_t, layers, 0, "write-checkpoint: override num_hidden_layers when > 0");
ABSL_FLAG(int32_t, experts, 0, "write-checkpoint: override n_routed_experts when > 0");
ABSL_FLAG(int64_t, shard_mb, 4096, "write-checkpoint: maximum shard size in MiB");
ABSL_FLAG(int32_t, threads, 0, "CPU backend threads (0 = all cores; or PD_CPU_THREADS)");
ABSL_FLAG(std::string, backend, "cpu", "generate, selection-report: cpu | gpu (the GPU backend needs a "
                                       "CUDA build and device)");

namespace pd {
namespace {

constexpr char kUsage[] = R"(misa-pd: DeepSeek-V3.2 + MISA sparse attention, monolithic tools.

Usage: misa-pd <command> [flags]

Commands:
  generate           Run the model on a prompt and print the generated tokens and text.
                       --model DIR (--prompt TEXT | --token_ids 1,2,3 | --random_prompt N)
                       [--max_new_tokens N] [--temperature T --top_p P --top_k K --seed S]
                       [--selection_mode M] [--prefill_chunk N] [--backend cpu|gpu]
  selection-report   Per layer: recall of the selection mode against dense DSA, and its time.
                       --model DIR [--prompt TEXT | --prompt_tokens N --seed S]
                       [--selection_mode M] [--compare misa,misa_dagger,hisa] [--json FILE]
                       [--backend cpu|gpu]
  write-checkpoint   Write a randomly initialised checkpoint in the Hugging Face DeepSeek-V3.2
                     layout (plus a byte-level tokenizer.json for the tiny preset).
                       --preset tiny|v32 --out DIR [--seed S] [--layers N --experts E --shard_mb M]
  info               Print a model directory's configuration and fingerprint.
                       --model DIR
  help               This text. `misa-pd --help` lists every flag.
)";

absl::StatusOr<model::ConfigOverrides> OverridesFromFlags() {
  model::ConfigOverrides o;
  std::string mode = absl::GetFlag(FLAGS_selection_mode);
  if (!mode.empty()) {
    kernels::SelectionMode m;
    if (!kernels::ParseSelectionMode(mode, &m)) {
      return absl::InvalidArgumentError(absl::StrCat("--selection_mode: unknown mode '", mode,
                                                     "' (dense, misa, misa_dagger, hisa)"));
    }
    o.selection_mode = m;
  }
  if (int v = absl::GetFlag(FLAGS_misa_topk_heads); v > 0) o.misa_topk_heads = v;
  if (int v = absl::GetFlag(FLAGS_misa_k_block_size); v > 0) o.misa_k_block_size = v;
  if (int v = absl::GetFlag(FLAGS_misa_stage1_topk); v > 0) o.misa_stage1_topk = v;
  if (int v = absl::GetFlag(FLAGS_index_topk); v > 0) o.index_topk = v;
  return o;
}

absl::StatusOr<std::vector<int32_t>> ParseTokenIds(const std::string& s) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(s, ',', absl::SkipWhitespace())) {
    int32_t v;
    if (!absl::SimpleAtoi(part, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--token_ids: '", part, "' is not an integer"));
    }
    ids.push_back(v);
  }
  if (ids.empty()) return absl::InvalidArgumentError("--token_ids is empty");
  return ids;
}

// Reads the prompt from --token_ids or --prompt (+ BOS). Needs the model's
// config for BOS and the tokenizer for text.
absl::StatusOr<std::vector<int32_t>> PromptFromFlags(const model::ModelConfig& config,
                                                     const model::Tokenizer* tokenizer) {
  std::string ids = absl::GetFlag(FLAGS_token_ids), text = absl::GetFlag(FLAGS_prompt);
  if (!ids.empty() && !text.empty()) return absl::InvalidArgumentError("give --prompt or --token_ids, not both");
  if (!ids.empty()) return ParseTokenIds(ids);
  if (text.empty()) return absl::InvalidArgumentError("--prompt TEXT or --token_ids IDS is required");
  if (tokenizer == nullptr) {
    return absl::FailedPreconditionError("the model directory has no tokenizer.json; use --token_ids");
  }
  std::vector<int32_t> out;
  if (absl::GetFlag(FLAGS_add_bos)) out.push_back(int32_t(config.bos_token_id));
  PD_ASSIGN_OR_RETURN(std::vector<int32_t> enc, tokenizer->Encode(text));
  out.insert(out.end(), enc.begin(), enc.end());
  return out;
}

std::string JoinIds(const std::vector<int32_t>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size(); ++i) absl::StrAppend(&s, i ? "," : "", ids[i]);
  return s;
}

// BOS followed by n-1 random ids other than BOS/EOS, from `seed`.
std::vector<int32_t> RandomPrompt(const model::ModelConfig& cfg, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> prompt = {int32_t(cfg.bos_token_id)};
  while (int64_t(prompt.size()) < n) {
    int32_t t = int32_t(rng() % uint64_t(cfg.vocab_size));
    if (t != cfg.bos_token_id && t != cfg.eos_token_id) prompt.push_back(t);
  }
  return prompt;
}

// The model on the backend named by --backend, with a KV cache of its kind.
struct Backend {
  std::unique_ptr<kvcache::KvCache> cache;
  std::unique_ptr<model::Model> model;
};

absl::StatusOr<Backend> MakeBackend(std::shared_ptr<const model::ModelWeights> weights,
                                    int64_t max_tokens) {
  const std::string name = absl::GetFlag(FLAGS_backend);
  Backend b;
  const kvcache::KvCacheOptions opts = model::CacheOptionsFor(weights->config, max_tokens, 1);
  if (name == "cpu") {
    PD_ASSIGN_OR_RETURN(b.cache, kvcache::KvCache::Create(opts));
    PD_ASSIGN_OR_RETURN(b.model, model::CreateCpuModel(weights, b.cache.get()));
    return b;
  }
  if (name == "gpu") {
#if defined(PD_MODEL_HAVE_GPU)
    PD_ASSIGN_OR_RETURN(b.cache, kvcache::KvCache::Create(opts, model::NewDeviceAllocator()));
    PD_ASSIGN_OR_RETURN(b.model, model::CreateGpuModel(weights, b.cache.get()));
    PD_ASSIGN_OR_RETURN(std::string desc, model::DescribeGpuModel(*b.model));
    std::printf("gpu backend: %s\n", desc.c_str());
    return b;
#else
    return absl::FailedPreconditionError(
        "--backend=gpu: this misa-pd was built without CUDA (nvcc not found at configure time)");
#endif
  }
  return absl::InvalidArgumentError(absl::StrCat("--backend must be cpu or gpu, got '", name, "'"));
}

absl::Status RunGenerate() {
  const int64_t max_new = absl::GetFlag(FLAGS_max_new_tokens);
  PD_ASSIGN_OR_RETURN(model::ConfigOverrides overrides, OverridesFromFlags());
  std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model DIR is required");
  PD_ASSIGN_OR_RETURN(model::ModelDirectory dir, model::OpenModelDirectory(path, overrides));
  const model::ModelConfig& cfg = dir.weights->config;
  std::vector<int32_t> prompt;
  if (int64_t n = absl::GetFlag(FLAGS_random_prompt); n > 0) {
    prompt = RandomPrompt(cfg, n, absl::GetFlag(FLAGS_seed));
  } else {
    PD_ASSIGN_OR_RETURN(prompt, PromptFromFlags(cfg, dir.tokenizer.get()));
  }
  PD_ASSIGN_OR_RETURN(Backend backend,
                      MakeBackend(dir.weights, int64_t(prompt.size()) + std::max<int64_t>(max_new, 1)));
  auto& m = backend.model;

  model::GenerateOptions opts;
  opts.max_new_tokens = max_new;
  opts.prefill_chunk = absl::GetFlag(FLAGS_prefill_chunk);
  opts.stop_at_eos = !absl::GetFlag(FLAGS_ignore_eos);
  opts.sampling.temperature = float(absl::GetFlag(FLAGS_temperature));
  opts.sampling.top_p = float(absl::GetFlag(FLAGS_top_p));
  opts.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  opts.sampling.seed = absl::GetFlag(FLAGS_seed);

  std::printf("model: %s (%s, %d layers, selection %s)\nprompt: %zu tokens\n", path.c_str(),
              cfg.model_type.c_str(), cfg.num_hidden_layers,
              kernels::SelectionModeName(cfg.selection_mode), prompt.size());
  std::optional<model::StreamingDetokenizer> detok;
  if (dir.tokenizer) detok.emplace(*dir.tokenizer, /*skip_special=*/true);
  std::string text;
  absl::Status stream_status;
  std::printf("text: ");
  std::fflush(stdout);
  PD_ASSIGN_OR_RETURN(model::GenerateResult r,
                      model::Generate(*m, prompt, opts, [&](int32_t tok) {
                        if (detok) {
                          auto piece = detok->Add(tok);
                          if (!piece.ok()) {
                            stream_status = piece.status();
                            return false;
                          }
                          std::fputs(piece->c_str(), stdout);
                          std::fflush(stdout);
                          text += *piece;
                        }
                        return true;
                      }));
  PD_RETURN_IF_ERROR(stream_status);
  std::printf("\ntokens: %s\n", JoinIds(r.tokens).c_str());
  const double decode_tps = r.tokens.size() > 1 ? double(r.tokens.size() - 1) / r.decode_seconds : 0;
  std::printf("finish: %s | prefill %.3f s (%.0f tok/s) | decode %zu tokens in %.3f s (%.1f tok/s)\n",
              r.finish_reason.c_str(), r.prefill_seconds,
              r.prefill_seconds > 0 ? double(prompt.size()) / r.prefill_seconds : 0.0,
              r.tokens.size() ? r.tokens.size() - 1 : 0, r.decode_seconds, decode_tps);
  model::ForwardStats s = m->stats();
  std::printf("time by stage (s): embed %.3f attn_proj %.3f indexer_prep %.3f selection %.3f "
              "attention %.3f ffn %.3f lm_head %.3f\n",
              s.embed, s.attn_proj, s.indexer_prep, s.selection, s.attention, s.ffn, s.lm_head);
  return absl::OkStatus();
}

absl::Status RunSelectionReport() {
  PD_ASSIGN_OR_RETURN(model::ConfigOverrides overrides, OverridesFromFlags());
  std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model DIR is required");
  PD_ASSIGN_OR_RETURN(model::ModelDirectory dir, model::OpenModelDirectory(path, overrides));
  const model::ModelConfig& cfg = dir.weights->config;
  std::vector<int32_t> prompt;
  if (!absl::GetFlag(FLAGS_prompt).empty() || !absl::GetFlag(FLAGS_token_ids).empty()) {
    PD_ASSIGN_OR_RETURN(prompt, PromptFromFlags(cfg, dir.tokenizer.get()));
  } else {
    const int64_t n = absl::GetFlag(FLAGS_prompt_tokens);
    if (n <= 0) return absl::InvalidArgumentError("--prompt_tokens must be positive");
    prompt = RandomPrompt(cfg, n, absl::GetFlag(FLAGS_seed));
  }
  std::vector<kernels::SelectionMode> modes;
  std::string compare = absl::GetFlag(FLAGS_compare);
  if (compare.empty()) {
    modes.push_back(cfg.selection_mode);
  } else {
    for (absl::string_view name : absl::StrSplit(compare, ',', absl::SkipWhitespace())) {
      kernels::SelectionMode m;
      if (!kernels::ParseSelectionMode(std::string_view(name.data(), name.size()), &m)) {
        return absl::InvalidArgumentError(absl::StrCat("--compare: unknown mode '", name, "'"));
      }
      modes.push_back(m);
    }
  }
  PD_ASSIGN_OR_RETURN(Backend backend, MakeBackend(dir.weights, int64_t(prompt.size())));
  auto& m = backend.model;
  std::printf("selection-report: %zu prompt tokens, %d layers, H=%d heads, top-%d, forward mode %s, "
              "h=%d, B=%d, C=%d, %d threads\n",
              prompt.size(), cfg.num_hidden_layers, cfg.index_n_heads, cfg.index_topk,
              kernels::SelectionModeName(cfg.selection_mode), cfg.misa_topk_heads, cfg.misa_k_block_size,
              cfg.misa_stage1_topk, kernels::cpu::ThreadPool::Default()->num_threads());
  PD_ASSIGN_OR_RETURN(model::SelectionReport report,
                      model::RunSelectionReport(*m, prompt, absl::GetFlag(FLAGS_prefill_chunk), modes));
  std::fputs(report.ToTable().c_str(), stdout);
  if (std::string json = absl::GetFlag(FLAGS_json); !json.empty()) {
    PD_RETURN_IF_ERROR(WriteStringToFile(json, report.ToJson()));
    std::printf("wrote %s\n", json.c_str());
  }
  return absl::OkStatus();
}

absl::Status RunWriteCheckpoint() {
  std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) return absl::InvalidArgumentError("--out DIR is required");
  PD_ASSIGN_OR_RETURN(model::ModelConfig cfg, model::PresetConfig(absl::GetFlag(FLAGS_preset)));
  PD_ASSIGN_OR_RETURN(model::ConfigOverrides overrides, OverridesFromFlags());
  PD_RETURN_IF_ERROR(model::ApplyOverrides(overrides, &cfg));
  model::RandomCheckpointOptions opts;
  opts.max_shard_bytes = uint64_t(std::max<int64_t>(1, absl::GetFlag(FLAGS_shard_mb))) << 20;
  opts.num_hidden_layers = absl::GetFlag(FLAGS_layers);
  opts.n_routed_experts = absl::GetFlag(FLAGS_experts);
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out, ": ", ec.message()));
  auto t0 = std::chrono::steady_clock::now();
  PD_RETURN_IF_ERROR(model::WriteRandomCheckpoint(out, cfg, absl::GetFlag(FLAGS_seed), opts));
  if (cfg.vocab_size == 258) {
    PD_RETURN_IF_ERROR(model::WriteByteLevelTokenizer(out + "/tokenizer.json"));
  } else {
    std::printf("note: no tokenizer.json written (vocab %lld is not the byte-level 258); use --token_ids\n",
                static_cast<long long>(cfg.vocab_size));
  }
  std::printf("wrote %s checkpoint to %s in %.1f s\n", absl::GetFlag(FLAGS_preset).c_str(), out.c_str(),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return absl::OkStatus();
}

absl::Status RunInfo() {
  std::string path = absl::GetFlag(FLAGS_model);
  if (path.empty()) return absl::InvalidArgumentError("--model DIR is required");
  PD_ASSIGN_OR_RETURN(model::ConfigOverrides overrides, OverridesFromFlags());
  PD_ASSIGN_OR_RETURN(model::ModelDirectory dir, model::OpenModelDirectory(path, overrides));
  std::fputs(model::ConfigToJson(dir.weights->config).c_str(), stdout);
  std::printf("\nfingerprint: %s\ntokenizer: %s\nKV bytes per token per layer: %zu\n",
              dir.weights->fingerprint.c_str(),
              dir.tokenizer ? absl::StrCat(dir.tokenizer->vocab_size(), " tokens").c_str() : "none",
              dir.weights->config.Layout().TokenBytes());
  return absl::OkStatus();
}

}  // namespace
}  // namespace pd

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(pd::kUsage);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  pd::InitLogging(argv[0]);
  if (int t = absl::GetFlag(FLAGS_threads); t > 0) setenv("PD_CPU_THREADS", std::to_string(t).c_str(), 1);
  if (args.size() < 2 || std::string(args[1]) == "help") {
    std::fputs(pd::kUsage, args.size() < 2 ? stderr : stdout);
    return args.size() < 2 ? 2 : 0;
  }
  if (args.size() > 2) {
    std::fprintf(stderr, "misa-pd: unexpected argument '%s' (flags are --name=value)\n", args[2]);
    return 2;
  }
  std::string cmd = args[1];
  absl::Status st;
  if (cmd == "generate") st = pd::RunGenerate();
  else if (cmd == "selection-report") st = pd::RunSelectionReport();
  else if (cmd == "write-checkpoint") st = pd::RunWriteCheckpoint();
  else if (cmd == "info") st = pd::RunInfo();
  else {
    std::fprintf(stderr, "misa-pd: unknown command '%s'\n\n%s", cmd.c_str(), pd::kUsage);
    return 2;
  }
  if (!st.ok()) {
    std::fprintf(stderr, "misa-pd %s: %s\n", cmd.c_str(), st.ToString().c_str());
    return 1;
  }
  return 0;
}
