#include "model/model_dir.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace pd::model {

absl::Status ApplyOverrides(const ConfigOverrides& o, ModelConfig* c) {
  if (o.selection_mode) c->selection_mode = *o.selection_mode;
  if (o.misa_topk_heads) c->misa_topk_heads = *o.misa_topk_heads;
  if (o.misa_k_block_size) c->misa_k_block_size = *o.misa_k_block_size;
  if (o.misa_stage1_topk) c->misa_stage1_topk = *o.misa_stage1_topk;
  if (o.index_topk) c->index_topk = *o.index_topk;
  if (o.hisa_block_size) c->hisa_block_size = *o.hisa_block_size;
  if (o.hisa_topk_blocks) c->hisa_topk_blocks = *o.hisa_topk_blocks;
  return ValidateConfig(*c);
}

absl::StatusOr<ModelDirectory> OpenModelDirectory(const std::string& dir,
                                                  const ConfigOverrides& overrides) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("model directory ", dir, " does not exist"));
  }
  PD_ASSIGN_OR_RETURN(ModelConfig config, LoadConfig(dir + "/config.json"));
  PD_RETURN_IF_ERROR(Annotate(ApplyOverrides(overrides, &config), "config overrides"));
  PD_ASSIGN_OR_RETURN(auto weights, LoadWeights(dir, config));
  ModelDirectory out;
  out.weights = std::shared_ptr<const ModelWeights>(std::move(weights));
  std::string tok = dir + "/tokenizer.json";
  if (std::filesystem::exists(tok, ec)) {
    PD_ASSIGN_OR_RETURN(out.tokenizer, Tokenizer::Load(tok));
  }
  return out;
}

}  // namespace pd::model
