// Number formats used by the model and its caches: bf16, FP8 e4m3 (the "fn"
// variant: no infinities, max 448) and ue8m0 power-of-two scales. Host and device.
// Depends on the C++ standard library only (and CUDA when compiled by nvcc).
#ifndef PD_KERNELS_NUMERIC_H_
#define PD_KERNELS_NUMERIC_H_

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PD_HD __host__ __device__ __forceinline__
#else
#define PD_HD inline
#endif

namespace pd::kernels {

inline constexpr float kFp8E4M3Max = 448.0f;
// Quantisation group for the MLA latent (FlashMLA) and the indexer (DeepGEMM).
inline constexpr int kQuantGroup = 128;
// The amax floor used before computing a scale (DeepSeek's act_quant).
inline constexpr float kAmaxFloor = 1e-4f;

PD_HD uint32_t FloatBits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

PD_HD float BitsFloat(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

PD_HD float Bf16ToFloat(uint16_t b) { return BitsFloat(uint32_t(b) << 16); }

// Round-to-nearest-even; NaN stays NaN.
PD_HD uint16_t FloatToBf16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return uint16_t((u + rounding) >> 16);
}

PD_HD float RoundToBf16(float f) { return Bf16ToFloat(FloatToBf16(f)); }

// IEEE half (checkpoints may hold f16 tensors).
PD_HD float Fp16ToFloat(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  if (exp == 0) {
    float v = float(mant) * (1.0f / 16777216.0f);  // mant * 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return BitsFloat(sign | 0x7f800000u | (mant << 13));
  return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));
}

// e4m3fn -> float. 0x7f / 0xff are NaN; everything else is finite.
PD_HD float Fp8E4M3ToFloat(uint8_t v) {
  uint32_t sign = uint32_t(v & 0x80) << 24;
  uint32_t exp = (v >> 3) & 0xf;
  uint32_t mant = v & 0x7;
  if (exp == 0xf && mant == 0x7) return BitsFloat(0x7fc00000u);
  float mag;
  if (exp == 0) {
    mag = float(mant) * 0.001953125f;  // mant * 2^-9
  } else {
    mag = BitsFloat(((exp + 120) << 23) | (mant << 20));  // (1 + m/8) * 2^(e-7)
  }
  return BitsFloat(FloatBits(mag) | sign);
}

// float -> e4m3fn, round-to-nearest-even, saturating to +-448. NaN -> 0x7f.
PD_HD uint8_t FloatToFp8E4M3(float f) {
  uint32_t u = FloatBits(f);
  uint8_t sign = uint8_t((u >> 24) & 0x80);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7f;
  int e = int(a >> 23) - 127;
  if (e < -6) {
    // Subnormal range: multiples of 2^-9. a * 512 is exact; rint is ties-to-even.
    float q = BitsFloat(a) * 512.0f;
    int m = int(rintf(q));  // 0..8; 8 is the smallest normal (code 0x08)
    return uint8_t(sign | m);
  }
  uint32_t mant = a & 0x7fffffu;
  uint32_t m3 = mant >> 20;
  uint32_t rem = mant & 0xfffffu;
  if (rem > 0x80000u || (rem == 0x80000u && (m3 & 1u))) ++m3;
  if (m3 == 8) {
    m3 = 0;
    ++e;
  }
  if (e > 8 || (e == 8 && m3 > 6)) return uint8_t(sign | 0x7e);  // saturate at 448
  return uint8_t(sign | (uint32_t(e + 7) << 3) | m3);
}

// Scale for one quantisation group: max(amax, 1e-4) / 448, rounded UP to a power
// of two when `ue8m0` (so the scale is exactly representable as 2^k, k integer).
PD_HD float Fp8Scale(float amax, bool ue8m0 = true) {
  float s = fmaxf(amax, kAmaxFloor) / kFp8E4M3Max;
  if (!ue8m0) return s;
  // 2^ceil(log2(s)) computed exactly from the bits: s is a positive normal float.
  uint32_t u = FloatBits(s);
  uint32_t exp = u >> 23;
  if ((u & 0x7fffffu) != 0) ++exp;
  return BitsFloat(exp << 23);
}

// True when `s` is a positive power of two (mantissa bits all zero).
PD_HD bool IsPowerOfTwo(float s) {
  uint32_t u = FloatBits(s);
  return s > 0.0f && (u & 0x7fffffu) == 0 && (u >> 23) != 0;
}

}  // namespace pd::kernels

#endif  // PD_KERNELS_NUMERIC_H_
