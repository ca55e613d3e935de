// Small vectorisable building blocks of the CPU kernels: dot products and
// branch-free decoders of the weight/cache number formats into fp32. Written as
// plain loops that GCC vectorises at -O3 -march=x86-64-v3 -fopenmp-simd (no
// intrinsics). Every decoder is bit-exact with the scalar converters of
// kernels/numeric.h (tested in ops_test.cc).
#ifndef PD_KERNELS_CPU_INTERNAL_VEC_H_
#define PD_KERNELS_CPU_INTERNAL_VEC_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/numeric.h"
#include "kernels/tensor.h"

namespace pd::kernels::cpu::internal {

// sum_i a[i] * b[i] in fp32 with 32 independent partial sums (4 AVX2 vectors),
// combined pairwise at the end.
inline float Dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[32] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
#pragma omp simd
    for (int j = 0; j < 32; ++j) acc[j] += a[i + j] * b[i + j];
  }
  for (int j = 0; j < 16; ++j) acc[j] += acc[j + 16];
  for (; i + 8 <= n; i += 8) {
#pragma omp simd
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += a[i] * b[i];
  for (int j = 0; j < 8; ++j) acc[j] += acc[j + 8];
  return ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + tail;
}

// out[c] = sum_i a[i] * b_c[i] for the 4 vectors b_c = b + c * ldb: one pass
// over a, four dot products.
inline void Dot4(const float* __restrict a, const float* __restrict b, int64_t ldb, int64_t n,
                 float* out) {
  const float* b0 = b;
  const float* b1 = b + ldb;
  const float* b2 = b + 2 * ldb;
  const float* b3 = b + 3 * ldb;
  float s0[8] = {}, s1[8] = {}, s2[8] = {}, s3[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
#pragma omp simd
    for (int j = 0; j < 8; ++j) {
      const float av = a[i + j];
      s0[j] += av * b0[i + j];
      s1[j] += av * b1[i + j];
      s2[j] += av * b2[i + j];
      s3[j] += av * b3[i + j];
    }
  }
  float t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; i < n; ++i) {
    t0 += a[i] * b0[i];
    t1 += a[i] * b1[i];
    t2 += a[i] * b2[i];
    t3 += a[i] * b3[i];
  }
  auto hsum = [](const float* s) {
    return ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
  };
  out[0] = hsum(s0) + t0;
  out[1] = hsum(s1) + t1;
  out[2] = hsum(s2) + t2;
  out[3] = hsum(s3) + t3;
}

// The decoders below select with integer masks (no ternaries on floats): GCC
// does not if-convert floating selects under -ftrapping-math, and a loop with
// control flow is not vectorised.

// out[i] = Fp8E4M3ToFloat(q[i]) * scale (bit-exact with the scalar decoder,
// NaN codes included; the product is one fp32 multiply).
inline void DecodeFp8(const uint8_t* __restrict q, int64_t n, float scale, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = q[i];
    const uint32_t mag = v & 0x7fu;
    const uint32_t is_sub = 0u - uint32_t(mag < 8u);      // exponent field 0
    const uint32_t is_nan = 0u - uint32_t(mag == 0x7fu);  // the NaN code
    // Normal codes: exponent rebias 7 -> 127 is +120 in the exponent field. A
    // subnormal code m * 2^-9 is decoded as the normal (1 + m/8) * 2^-6 minus
    // 2^-6 (exact by Sterbenz).
    uint32_t bits = ((mag | (is_sub & 8u)) << 20) + (120u << 23);
    bits = (bits & ~is_nan) | (0x7fc00000u & is_nan);
    float f;
    std::memcpy(&f, &bits, 4);
    const uint32_t off_bits = is_sub & 0x3c800000u;  // 2^-6 or +0
    float off;
    std::memcpy(&off, &off_bits, 4);
    f -= off;
    uint32_t fb;
    std::memcpy(&fb, &f, 4);
    fb |= (v & 0x80u) << 24;
    std::memcpy(&f, &fb, 4);
    out[i] = f * scale;
  }
}

// out[i] = Bf16ToFloat(b[i]).
inline void DecodeBf16(const uint16_t* __restrict b, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = uint32_t(b[i]) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    out[i] = f;
  }
}

// out[i] = Fp16ToFloat(h[i]) (IEEE half; subnormals, infinities and NaNs kept).
inline void DecodeF16(const uint16_t* __restrict h, int64_t n, float* __restrict out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = h[i];
    const uint32_t mag = v & 0x7fffu;
    const uint32_t is_sub = 0u - uint32_t(mag < 0x400u);    // exponent field 0
    const uint32_t is_inf = 0u - uint32_t(mag >= 0x7c00u);  // Inf/NaN: exponent all ones
    // Normal: exponent rebias 15 -> 127 is +112. Subnormal m * 2^-24 is the
    // normal (1 + m/1024) * 2^-14 minus 2^-14 (exact).
    uint32_t bits = ((mag | (is_sub & 0x400u)) << 13) + (112u << 23);
    bits = (bits & ~is_inf) | (((mag << 13) | 0x7f800000u) & is_inf);
    float f;
    std::memcpy(&f, &bits, 4);
    const uint32_t off_bits = is_sub & 0x38800000u;  // 2^-14 or +0
    float off;
    std::memcpy(&off, &off_bits, 4);
    f -= off;
    uint32_t fb;
    std::memcpy(&fb, &f, 4);
    fb |= (v & 0x8000u) << 16;
    std::memcpy(&f, &fb, 4);
    out[i] = f;
  }
}

// q[i] = FloatToFp8E4M3(x[i] / scale) (bit-exact with the scalar encoder:
// round-to-nearest-even, saturation to +-448, NaN -> 0x7f), branch-free.
inline void EncodeFp8(const float* __restrict x, int64_t n, float scale,
                      uint8_t* __restrict q) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i] / scale;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    const uint32_t sign = (u >> 24) & 0x80u;
    const uint32_t a = u & 0x7fffffffu;
    // Normal range (|v| >= 2^-6): round the mantissa to 3 bits, nearest-even,
    // letting a carry ripple into the exponent; rebias 127 -> 7 (120 << 3).
    const uint32_t t = (a + 0x7ffffu + ((a >> 20) & 1u)) >> 20;
    const uint32_t normal = (t > 960u + 0x7eu ? 0x7eu : t - 960u);
    // Subnormal range: multiples of 2^-9; |v| * 512 < 8.5 is rounded to
    // nearest-even by adding and subtracting 2^23 (8 is the smallest normal).
    float av;
    std::memcpy(&av, &a, 4);
    const float rq = (av * 512.0f + 8388608.0f) - 8388608.0f;
    const uint32_t sub = uint32_t(int32_t(rq));
    const uint32_t is_sub = 0u - uint32_t(a < 0x3c800000u);
    const uint32_t is_nan = 0u - uint32_t(a > 0x7f800000u);
    uint32_t code = (sub & is_sub) | (normal & ~is_sub);
    code = ((sign | code) & ~is_nan) | (0x7fu & is_nan);
    q[i] = uint8_t(code);
  }
}

// exp(x) in fp32, branch-free so that loops calling it vectorise: Cody-Waite
// range reduction x = n ln2 + r, |r| <= ln2/2, Cephes' degree-7 minimax
// polynomial, then scaling by 2^n. Max error about 1 ulp over the normal range
// (ops_test Vec.FastExpWithinTwoUlp); results below FLT_MIN (x < -87.34, -inf)
// are 0, x > 88.72 gives +inf, NaN stays NaN.
__attribute__((always_inline)) inline float FastExp(float x) {
  auto as_bits = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  };
  auto as_float = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  const uint32_t under = 0u - uint32_t(x < -87.33654f);
  const uint32_t over = 0u - uint32_t(x > 88.72283f);
  const uint32_t nan = 0u - uint32_t(x != x);
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kn = x * 1.44269504088896341f + kMagic;
  const float n = kn - kMagic;
  float r = x - n * 0.693359375f;  // ln2 = 0.693359375 - 2.12194440e-4 (+ tiny)
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  int32_t ni = int32_t(as_bits(kn) - as_bits(kMagic));
  ni = ni < -126 ? -126 : (ni > 128 ? 128 : ni);
  // 2^n as two factors, so that n = 128 (x near 88.72) stays representable.
  const float h1 = as_float(uint32_t((ni >> 1) + 127) << 23);
  const float h2 = as_float(uint32_t(ni - (ni >> 1) + 127) << 23);
  uint32_t bits = as_bits(p * h1 * h2);
  bits = (bits & ~(under | over)) | (over & 0x7f800000u) | (nan & 0x7fc00000u);
  return as_float(bits);
}

// x[i] = exp(x[i] - shift) for i < n; returns the sum of the results.
inline float ExpShiftSum(float* x, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = FastExp(x[i] - shift);
    sum += x[i];
  }
  return sum;
}

// out[j] = w.Get(r, c0 + j) for j < n: one row segment of a weight view in fp32,
// for every floating dtype (FP8 with the whole-tensor block scales at the
// view's row0/col0 offset).
inline void ConvertRow(const WeightView& w, int64_t r, int64_t c0, int64_t n, float* out) {
  const int64_t base = r * w.ld + c0;
  switch (w.dtype) {
    case DType::kF32:
      std::memcpy(out, static_cast<const float*>(w.data) + base, size_t(n) * 4);
      return;
    case DType::kBF16:
      DecodeBf16(static_cast<const uint16_t*>(w.data) + base, n, out);
      return;
    case DType::kF16:
      DecodeF16(static_cast<const uint16_t*>(w.data) + base, n, out);
      return;
    case DType::kFP8E4M3: {
      const uint8_t* q = static_cast<const uint8_t*>(w.data) + base;
      const float* srow = w.scale + ((w.row0 + r) / w.block) * w.scale_ld;
      int64_t j = 0;
      while (j < n) {
        const int64_t gc = w.col0 + c0 + j;  // column in the whole tensor
        const int64_t end = std::min<int64_t>(n, j + (w.block - gc % w.block));
        DecodeFp8(q + j, end - j, srow[gc / w.block], out + j);
        j = end;
      }
      return;
    }
    default:
      return;  // non-floating dtypes are rejected by the callers' checks
  }
}

}  // namespace pd::kernels::cpu::internal

#endif  // PD_KERNELS_CPU_INTERNAL_VEC_H_
