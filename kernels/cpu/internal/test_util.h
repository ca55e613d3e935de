// Test-only helpers shared by the CPU kernel tests (std + POSIX only): random
// data, FP8 block-scaled weight construction and a fork-based death check.
#ifndef PD_KERNELS_CPU_INTERNAL_TEST_UTIL_H_
#define PD_KERNELS_CPU_INTERNAL_TEST_UTIL_H_

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernels/numeric.h"
#include "kernels/tensor.h"

namespace pd::kernels::cpu::testing {

inline std::vector<float> RandomVector(std::mt19937& rng, size_t n, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// A row-major weight [rows, cols] in one dtype, built from fp32 values. FP8
// uses one scale per block x block tile (amax / 448, optionally rounded up to a
// power of two), as DeepSeek's checkpoints do.
struct TestWeight {
  DType dtype = DType::kF32;
  int64_t rows = 0, cols = 0, ld = 0;
  int block = 128;
  std::vector<float> f32;
  std::vector<uint16_t> u16;
  std::vector<uint8_t> u8;
  std::vector<float> scale;  // FP8: [ceil(rows/block), ceil(cols/block)]
  int64_t scale_ld = 0;

  WeightView View() const {
    WeightView v;
    v.dtype = dtype;
    v.rows = rows;
    v.cols = cols;
    v.ld = ld;
    v.block = block;
    switch (dtype) {
      case DType::kF32: v.data = f32.data(); break;
      case DType::kBF16:
      case DType::kF16: v.data = u16.data(); break;
      default:
        v.data = u8.data();
        v.scale = scale.data();
        v.scale_ld = scale_ld;
        break;
    }
    return v;
  }

  // Element (r, c) decoded with the scalar converters of numeric.h (independent
  // of WeightView::Get and of the vectorised decoders).
  float At(int64_t r, int64_t c) const {
    const int64_t i = r * ld + c;
    switch (dtype) {
      case DType::kF32: return f32[size_t(i)];
      case DType::kBF16: return Bf16ToFloat(u16[size_t(i)]);
      case DType::kF16: return Fp16ToFloat(u16[size_t(i)]);
      default:
        return Fp8E4M3ToFloat(u8[size_t(i)]) * scale[size_t((r / block) * scale_ld + c / block)];
    }
  }
};

// IEEE half, round to nearest even (test-only encoder; normal range only).
inline uint16_t FloatToF16ForTest(float f) {
  uint32_t u = FloatBits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  float a = std::fabs(f);
  if (a < 6.103515625e-05f) {  // subnormal half: multiples of 2^-24
    return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
  }
  int e;
  float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
  uint32_t mant = uint32_t(std::nearbyint((m * 2.0f - 1.0f) * 1024.0f));
  int exp = e - 1 + 15;
  if (mant == 1024) {
    mant = 0;
    ++exp;
  }
  return uint16_t(sign | (uint32_t(exp) << 10) | mant);
}

// values: [rows, cols]; the weight's ld is cols + pad (pad columns hold junk).
inline TestWeight MakeWeight(const std::vector<float>& values, int64_t rows, int64_t cols,
                             DType dtype, int64_t pad = 0, bool ue8m0 = false, int block = 128) {
  TestWeight w;
  w.dtype = dtype;
  w.rows = rows;
  w.cols = cols;
  w.ld = cols + pad;
  w.block = block;
  const size_t n = size_t(rows * w.ld);
  auto val = [&](int64_t r, int64_t c) {
    return c < cols ? values[size_t(r * cols + c)] : 1000.0f + float(c);
  };
  switch (dtype) {
    case DType::kF32:
      w.f32.resize(n);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < w.ld; ++c) w.f32[size_t(r * w.ld + c)] = val(r, c);
      break;
    case DType::kBF16:
    case DType::kF16:
      w.u16.resize(n);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < w.ld; ++c)
          w.u16[size_t(r * w.ld + c)] =
              dtype == DType::kBF16 ? FloatToBf16(val(r, c)) : FloatToF16ForTest(val(r, c));
      break;
    default: {
      w.u8.resize(n, 0x55);
      const int64_t br = (rows + block - 1) / block;
      w.scale_ld = (cols + block - 1) / block;
      w.scale.resize(size_t(br * w.scale_ld));
      for (int64_t bi = 0; bi < br; ++bi) {
        for (int64_t bj = 0; bj < w.scale_ld; ++bj) {
          float amax = 0.0f;
          for (int64_t r = bi * block; r < std::min(rows, (bi + 1) * block); ++r)
            for (int64_t c = bj * block; c < std::min(cols, (bj + 1) * block); ++c)
              amax = std::max(amax, std::fabs(values[size_t(r * cols + c)]));
          const float s = Fp8Scale(amax, ue8m0);
          w.scale[size_t(bi * w.scale_ld + bj)] = s;
          for (int64_t r = bi * block; r < std::min(rows, (bi + 1) * block); ++r)
            for (int64_t c = bj * block; c < std::min(cols, (bj + 1) * block); ++c)
              w.u8[size_t(r * w.ld + c)] = FloatToFp8E4M3(values[size_t(r * cols + c)] / s);
        }
      }
    }
  }
  return w;
}

// Runs fn in a forked child with stderr captured. True when the child died of
// SIGABRT and its stderr contains `needle`; *output receives the stderr text.
inline bool DiesWithMessage(const std::function<void()>& fn, const std::string& needle,
                            std::string* output) {
  int fds[2];
  if (pipe(fds) != 0) return false;
  pid_t pid = fork();
  if (pid < 0) return false;
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    fn();
    _exit(0);
  }
  close(fds[1]);
  std::string text;
  char buf[512];
  ssize_t got;
  while ((got = read(fds[0], buf, sizeof buf)) > 0) text.append(buf, size_t(got));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (output) *output = text;
  return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT &&
         text.find(needle) != std::string::npos;
}

}  // namespace pd::kernels::cpu::testing

#endif  // PD_KERNELS_CPU_INTERNAL_TEST_UTIL_H_
