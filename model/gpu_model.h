// The GPU backend of model::Model: the whole forward on one CUDA GPU through
// kernels::cuda::GpuForwardEngine (kernels/cuda/model/gpu_forward.h, which
// documents the numerics). Built only when CUDA is available (the pd_model
// target then defines PD_MODEL_HAVE_GPU=1).
#ifndef PD_MODEL_GPU_MODEL_H_
#define PD_MODEL_GPU_MODEL_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvcache/kv_cache.h"
#include "model/forward.h"
#include "model/weights.h"

namespace pd::model {

// Zero-filled device memory (cudaMalloc, 4096-byte aligned) for a KvCache on
// the GPU. Allocate fails with ResourceExhausted naming the size.
std::unique_ptr<kvcache::Allocator> NewDeviceAllocator();

struct GpuModelOptions {
  // Every GEMM in bf16 (FP8 checkpoint weights dequantised at load); default:
  // FP8 block-scaled GEMMs where the checkpoint is FP8 and the shape allows.
  bool bf16_gemms = false;
  // The generic attention/indexer kernels even where the tuned V3.2 ones apply.
  bool generic_kernels = false;
};

// The GPU backend. The cache must be a device cache (NewDeviceAllocator) with
// the model's layout and layer count. Selection modes dense and misa run on the
// GPU; misa_dagger and hisa give Unimplemented. FailedPrecondition without a
// CUDA device; Internal for CUDA/cuBLASLt failures (message from the engine).
// The returned model's stats() are GPU times by stage (CUDA events).
absl::StatusOr<std::unique_ptr<Model>> CreateGpuModel(std::shared_ptr<const ModelWeights> weights,
                                                      kvcache::KvCache* cache,
                                                      const GpuModelOptions& options = {});

// The engine's description (GEMM paths, FP8 self-test, kernels in use) of a
// model made by CreateGpuModel; InvalidArgument for other models.
absl::StatusOr<std::string> DescribeGpuModel(const Model& model);

}  // namespace pd::model

#endif  // PD_MODEL_GPU_MODEL_H_
