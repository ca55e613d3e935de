#include "kernels/numeric.h"

#include <cmath>
#include <random>

#include "kernels/kv_layout.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels {
namespace {

TEST(Fp8, RoundTripsEveryCode) {
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(Fp8E4M3ToFloat(uint8_t(c))));
      continue;
    }
    float v = Fp8E4M3ToFloat(uint8_t(c));
    uint8_t back = FloatToFp8E4M3(v);
    // +0 and -0 both map back to themselves.
    EXPECT_EQ(int(back), c) << "value " << v;
  }
  EXPECT_EQ(Fp8E4M3ToFloat(0x7e), 448.0f);
  EXPECT_EQ(Fp8E4M3ToFloat(0x01), 0.001953125f);  // smallest subnormal 2^-9
  EXPECT_EQ(Fp8E4M3ToFloat(0x08), 0.015625f);     // smallest normal 2^-6
}

TEST(Fp8, SaturatesAndRoundsToNearestEven) {
  EXPECT_EQ(int(FloatToFp8E4M3(1e6f)), 0x7e);
  EXPECT_EQ(int(FloatToFp8E4M3(-1e6f)), 0xfe);
  EXPECT_EQ(int(FloatToFp8E4M3(std::nanf(""))), 0x7f);
  // 1.0625 lies halfway between 1.0 (mantissa 0, even) and 1.125: rounds to 1.0.
  EXPECT_EQ(Fp8E4M3ToFloat(FloatToFp8E4M3(1.0625f)), 1.0f);
  // 1.1875 lies halfway between 1.125 (odd) and 1.25 (even): rounds to 1.25.
  EXPECT_EQ(Fp8E4M3ToFloat(FloatToFp8E4M3(1.1875f)), 1.25f);
}

TEST(Fp8, ErrorWithinHalfUlp) {
  // e4m3 has 3 mantissa bits: relative error <= 2^-4 for normals; absolute
  // error <= 2^-10 (half the subnormal step) below 2^-6.
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-448.f, 448.f);
  for (int i = 0; i < 200000; ++i) {
    float x = u(rng) * (i % 3 == 0 ? 1e-3f : 1.0f);
    float y = Fp8E4M3ToFloat(FloatToFp8E4M3(x));
    float bound = std::fabs(x) >= 0.015625f ? std::fabs(x) * 0.0625f : 0.0009765625f;
    ASSERT_LE(std::fabs(x - y), bound) << "x=" << x << " y=" << y;
  }
}

TEST(Ue8m0, ScalesArePowersOfTwoAndCover) {
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> e(-20.f, 20.f);
  for (int i = 0; i < 10000; ++i) {
    float amax = std::exp2(e(rng));
    float s = Fp8Scale(amax, true);
    ASSERT_TRUE(IsPowerOfTwo(s)) << s;
    ASSERT_GE(s * kFp8E4M3Max, std::fmax(amax, kAmaxFloor));  // no overflow after scaling
    ASSERT_LT(s * kFp8E4M3Max * 0.5f, std::fmax(amax, kAmaxFloor));  // smallest such power
  }
  EXPECT_EQ(Fp8Scale(448.f, true), 1.0f);
  EXPECT_EQ(Fp8Scale(0.f, true), Fp8Scale(kAmaxFloor, true));
}

TEST(Bf16, RoundToNearestEven) {
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.0f)), 1.0f);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.00390625f)), 1.0f);
  EXPECT_EQ(Bf16ToFloat(FloatToBf16(1.01171875f)), 1.015625f);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  EXPECT_EQ(Fp16ToFloat(0x3c00), 1.0f);
  EXPECT_EQ(Fp16ToFloat(0xc000), -2.0f);
  EXPECT_EQ(Fp16ToFloat(0x0001), std::ldexp(1.0f, -24));
}

TEST(KvLayout, V32RecordSizes) {
  KvLayout l;  // defaults are the DeepSeek-V3.2 shapes
  EXPECT_EQ(l.MlaTokenBytes(), 656u);
  EXPECT_EQ(l.MlaScaleOffset(), 512u);
  EXPECT_EQ(l.MlaRopeOffset(), 528u);
  EXPECT_EQ(l.IndexKeyTokenBytes(), 132u);
  EXPECT_EQ(l.IndexPageBytes(), 64u * 132u);
  EXPECT_EQ(l.IndexScaleOffset(0), 8192u);
  EXPECT_EQ(l.TokenBytes(), 788u);
  EXPECT_EQ(BlockCount(2500, 2, 1024), 452);
  EXPECT_EQ(BlockCount(2500, 3, 1024), 0);
}

}  // namespace
}  // namespace pd::kernels
