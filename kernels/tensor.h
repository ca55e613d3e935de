// Element types and read-only weight views shared by the CPU and CUDA backends.
#ifndef PD_KERNELS_TENSOR_H_
#define PD_KERNELS_TENSOR_H_

#include <cstddef>
#include <cstdint>

#include "kernels/numeric.h"

namespace pd::kernels {

enum class DType : uint8_t { kF32, kBF16, kF16, kFP8E4M3, kI32, kI64, kU8 };

PD_HD size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
    case DType::kFP8E4M3: return 1;
    case DType::kI32: return 4;
    case DType::kI64: return 8;
    case DType::kU8: return 1;
  }
  return 0;
}

// Safetensors spelling: "F32", "BF16", "F16", "F8_E4M3", "I32", "I64", "U8".
const char* DTypeName(DType t);

// A read-only view of a row-major 2-D weight [rows, cols] (PyTorch Linear layout
// is [out_features, in_features]). FP8 weights carry the fp32 block scales of the
// WHOLE tensor they came from (the checkpoint's `weight_scale_inv`,
// [ceil(R/block), ceil(C/block)]) and this view's offset in it, so a row slice of
// an FP8 weight dequantises with the right scales.
struct WeightView {
  const void* data = nullptr;  // element (0, 0) of this view
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0;
  int64_t ld = 0;  // elements between consecutive rows

  const float* scale = nullptr;  // FP8 only: whole-tensor block scales
  int64_t scale_ld = 0;          // columns of the scale grid
  int64_t row0 = 0, col0 = 0;    // this view's offset in the whole tensor
  int block = 128;

  // Dequantised element (r, c) of this view.
  PD_HD float Get(int64_t r, int64_t c) const {
    const int64_t i = r * ld + c;
    switch (dtype) {
      case DType::kF32: return static_cast<const float*>(data)[i];
      case DType::kBF16: return Bf16ToFloat(static_cast<const uint16_t*>(data)[i]);
      case DType::kF16: return Fp16ToFloat(static_cast<const uint16_t*>(data)[i]);
      case DType::kFP8E4M3: {
        float s = scale[((row0 + r) / block) * scale_ld + (col0 + c) / block];
        return Fp8E4M3ToFloat(static_cast<const uint8_t*>(data)[i]) * s;
      }
      default: return 0.0f;
    }
  }

  // Rows [begin, begin + count) of this view.
  PD_HD WeightView Rows(int64_t begin, int64_t count) const {
    WeightView v = *this;
    v.data = static_cast<const uint8_t*>(data) + begin * ld * int64_t(DTypeSize(dtype));
    v.rows = count;
    v.row0 = row0 + begin;
    return v;
  }
};

// A dense fp32 view (convenience for tests and derived weights).
inline WeightView F32View(const float* data, int64_t rows, int64_t cols) {
  WeightView v;
  v.data = data;
  v.dtype = DType::kF32;
  v.rows = rows;
  v.cols = cols;
  v.ld = cols;
  return v;
}

}  // namespace pd::kernels

#endif  // PD_KERNELS_TENSOR_H_
