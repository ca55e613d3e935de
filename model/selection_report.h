// Per-layer recall and time of sparse-selection modes against dense DSA,
// measured on a real prefill (misa-pd selection-report).
#ifndef PD_MODEL_SELECTION_REPORT_H_
#define PD_MODEL_SELECTION_REPORT_H_

#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/indexer.h"
#include "model/forward.h"

namespace pd::model {

struct ModeLayerStats {
  kernels::SelectionMode mode;
  double recall_sum = 0;    // sum over queries of |S ∩ S_dsa| / |S_dsa|
  double seconds = 0;       // selection time (all chunks)
  double Recall(int64_t queries) const { return queries ? recall_sum / double(queries) : 0; }
};

struct LayerReport {
  int layer = 0;
  int64_t queries = 0;
  double dense_seconds = 0;
  std::vector<ModeLayerStats> modes;  // in the order requested
};

struct SelectionReport {
  std::vector<LayerReport> layers;
  double prefill_seconds = 0;  // the whole prefill, selections for the report included
  std::string ToTable() const;
  std::string ToJson() const;
};

// Recall of one query's selection against dense: |S ∩ D| / |D| over the valid
// (>= 0) entries of `dense`; 1 when dense selects nothing.
double SelectionRecall(std::span<const int32_t> selected, std::span<const int32_t> dense);

// Prefills `prompt` (chunks of `chunk`) on a fresh sequence; at every layer
// and chunk, runs dense selection and each of `modes` on the same prepared
// indexer state, timing them and accumulating recall vs dense. The model's own
// forward keeps using its configured mode.
absl::StatusOr<SelectionReport> RunSelectionReport(Model& model, std::span<const int32_t> prompt,
                                                   int64_t chunk,
                                                   std::span<const kernels::SelectionMode> modes);

}  // namespace pd::model

#endif  // PD_MODEL_SELECTION_REPORT_H_
