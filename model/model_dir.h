// Opening a model directory (Hugging Face layout) with command-line overrides.
#ifndef PD_MODEL_MODEL_DIR_H_
#define PD_MODEL_MODEL_DIR_H_

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "model/config.h"
#include "model/tokenizer.h"
#include "model/weights.h"

namespace pd::model {

// Values that replace config.json's (unset = keep the file's).
struct ConfigOverrides {
  std::optional<kernels::SelectionMode> selection_mode;
  std::optional<int> misa_topk_heads;
  std::optional<int> misa_k_block_size;
  std::optional<int> misa_stage1_topk;
  std::optional<int> index_topk;
  std::optional<int> hisa_block_size;
  std::optional<int> hisa_topk_blocks;
};

// Applies the overrides and re-validates (InvalidArgument naming the field).
absl::Status ApplyOverrides(const ConfigOverrides& o, ModelConfig* config);

struct ModelDirectory {
  std::shared_ptr<const ModelWeights> weights;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the directory has no tokenizer.json
};

// Loads dir/config.json (+ overrides), the weights and, if present, dir/tokenizer.json.
absl::StatusOr<ModelDirectory> OpenModelDirectory(const std::string& dir,
                                                  const ConfigOverrides& overrides = {});

}  // namespace pd::model

#endif  // PD_MODEL_MODEL_DIR_H_
