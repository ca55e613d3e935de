#include "model/selection_report.h"

#include <algorithm>
#include <chrono>
#include <unordered_set>

#include "absl/strings/str_format.h"
#include "common/status.h"
#include "model/generator.h"

namespace pd::model {
namespace {

class ReportObserver final : public ForwardObserver {
 public:
  ReportObserver(const ModelConfig& config, std::span<const kernels::SelectionMode> modes)
      : base_(config.Selection()), modes_(modes.begin(), modes.end()) {
    report_.layers.resize(size_t(config.num_hidden_layers));
    for (int l = 0; l < config.num_hidden_layers; ++l) {
      report_.layers[size_t(l)].layer = l;
      for (auto m : modes_) report_.layers[size_t(l)].modes.push_back(ModeLayerStats{m});
    }
  }

  void OnIndexerReady(int layer, const Segment& segment, const kernels::IndexerQueries& queries,
                      const kernels::IndexKeyCacheView& keys) override {
    const int64_t t = queries.num_queries;
    const int k = base_.topk;
    LayerReport& lr = report_.layers[size_t(layer)];
    lr.queries += t;
    dense_.resize(size_t(t * k));
    sel_.resize(size_t(t * k));
    kernels::SelectionConfig cfg = base_;
    cfg.mode = kernels::SelectionMode::kDense;
    lr.dense_seconds += Timed([&] {
      kernels::cpu::SelectTokens(cfg, keys, queries, dense_.data(), kernels::cpu::ThreadPool::Default());
    });
    for (ModeLayerStats& ms : lr.modes) {
      cfg.mode = ms.mode;
      ms.seconds += Timed([&] {
        kernels::cpu::SelectTokens(cfg, keys, queries, sel_.data(), kernels::cpu::ThreadPool::Default());
      });
      for (int64_t q = 0; q < t; ++q) {
        ms.recall_sum += SelectionRecall({&sel_[size_t(q * k)], size_t(k)}, {&dense_[size_t(q * k)], size_t(k)});
      }
    }
  }

  SelectionReport& report() { return report_; }

 private:
  template <typename F>
  static double Timed(F&& f) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  kernels::SelectionConfig base_;
  std::vector<kernels::SelectionMode> modes_;
  SelectionReport report_;
  std::vector<int32_t> dense_, sel_;
};

}  // namespace

double SelectionRecall(std::span<const int32_t> selected, std::span<const int32_t> dense) {
  std::unordered_set<int32_t> d;
  for (int32_t i : dense) {
    if (i >= 0) d.insert(i);
  }
  if (d.empty()) return 1.0;
  size_t hit = 0;
  std::unordered_set<int32_t> seen;
  for (int32_t i : selected) {
    if (i >= 0 && d.count(i) && seen.insert(i).second) ++hit;
  }
  return double(hit) / double(d.size());
}

absl::StatusOr<SelectionReport> RunSelectionReport(Model& model, std::span<const int32_t> prompt,
                                                   int64_t chunk,
                                                   std::span<const kernels::SelectionMode> modes) {
  PD_ASSIGN_OR_RETURN(kvcache::ScopedSequence seq,
                      kvcache::ScopedSequence::Create(model.cache(), int64_t(prompt.size())));
  ReportObserver observer(model.config(), modes);
  auto t0 = std::chrono::steady_clock::now();
  PD_RETURN_IF_ERROR(Prefill(model, seq.id(), prompt, chunk, &observer).status());
  SelectionReport report = std::move(observer.report());
  report.prefill_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

std::string SelectionReport::ToTable() const {
  std::string out = absl::StrFormat("%-6s %8s %10s", "layer", "queries", "dense_ms");
  if (!layers.empty()) {
    for (const auto& m : layers[0].modes) {
      const char* n = kernels::SelectionModeName(m.mode);
      out += absl::StrFormat(" %12s %9s %8s", absl::StrCat(n, "_ms"), "recall", "speedup");
    }
  }
  out += "\n";
  std::vector<double> rsum(layers.empty() ? 0 : layers[0].modes.size()), tsum(rsum.size());
  double dsum = 0;
  int64_t qsum = 0;
  for (const auto& l : layers) {
    out += absl::StrFormat("%-6d %8d %10.2f", l.layer, l.queries, l.dense_seconds * 1e3);
    for (size_t i = 0; i < l.modes.size(); ++i) {
      const auto& m = l.modes[i];
      out += absl::StrFormat(" %12.2f %9.4f %7.2fx", m.seconds * 1e3, m.Recall(l.queries),
                             m.seconds > 0 ? l.dense_seconds / m.seconds : 0.0);
      rsum[i] += m.recall_sum;
      tsum[i] += m.seconds;
    }
    dsum += l.dense_seconds;
    qsum += l.queries;
    out += "\n";
  }
  out += absl::StrFormat("%-6s %8d %10.2f", "all", qsum, dsum * 1e3);
  for (size_t i = 0; i < rsum.size(); ++i) {
    out += absl::StrFormat(" %12.2f %9.4f %7.2fx", tsum[i] * 1e3, qsum ? rsum[i] / double(qsum) : 0.0,
                           tsum[i] > 0 ? dsum / tsum[i] : 0.0);
  }
  out += absl::StrFormat("\nprefill (with report selections): %.2f s\n", prefill_seconds);
  return out;
}

std::string SelectionReport::ToJson() const {
  std::string out = absl::StrFormat("{\"prefill_seconds\": %.6f, \"layers\": [", prefill_seconds);
  for (size_t li = 0; li < layers.size(); ++li) {
    const auto& l = layers[li];
    out += absl::StrFormat("%s{\"layer\": %d, \"queries\": %d, \"dense_ms\": %.4f, \"modes\": [",
                           li ? ", " : "", l.layer, l.queries, l.dense_seconds * 1e3);
    for (size_t i = 0; i < l.modes.size(); ++i) {
      out += absl::StrFormat("%s{\"mode\": \"%s\", \"ms\": %.4f, \"recall\": %.6f}", i ? ", " : "",
                             kernels::SelectionModeName(l.modes[i].mode), l.modes[i].seconds * 1e3,
                             l.modes[i].Recall(l.queries));
    }
    out += "]}";
  }
  out += "]}\n";
  return out;
}

}  // namespace pd::model
