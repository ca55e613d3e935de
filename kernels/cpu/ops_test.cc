// Tests of the dense CPU kernels (kernels/ops.h) against independent
// double-precision references. Set PD_BENCH=1 to run the Bench.* timings.
#include "kernels/ops.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numbers>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/cpu/internal/test_util.h"
#include "kernels/cpu/internal/vec.h"
#include "kernels/numeric.h"
#include "kernels/testing/minitest.h"

namespace pd::kernels::cpu {
namespace {

using testing::DiesWithMessage;
using testing::MakeWeight;
using testing::RandomVector;
using testing::TestWeight;

constexpr double kU = 1.0 / 16777216.0;  // fp32 unit roundoff 2^-24

// ---------------------------------------------------------------------------
// Vectorised decoders: bit-exact with the scalar converters of numeric.h.
// ---------------------------------------------------------------------------
TEST(Decode, Fp8MatchesScalarForEveryCode) {
  std::vector<uint8_t> codes(256);
  std::iota(codes.begin(), codes.end(), 0);
  for (float scale : {1.0f, 0.0078125f, 3.0f}) {
    std::vector<float> out(256);
    internal::DecodeFp8(codes.data(), 256, scale, out.data());
    for (int c = 0; c < 256; ++c) {
      const float want = Fp8E4M3ToFloat(uint8_t(c)) * scale;
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(out[size_t(c)])) << "code " << c;
      } else {
        EXPECT_EQ(FloatBits(out[size_t(c)]), FloatBits(want)) << "code " << c << " scale " << scale;
      }
    }
  }
}

TEST(Encode, Fp8MatchesScalarEncoder) {
  // Every e4m3 value, the midpoints between neighbours (ties-to-even) and their
  // float neighbours, random magnitudes from 2^-30 to 2^12, and specials.
  std::vector<float> x;
  for (int c = 0; c < 0x7e; ++c) {
    const float v = Fp8E4M3ToFloat(uint8_t(c)), w = Fp8E4M3ToFloat(uint8_t(c + 1));
    const float mid = (v + w) / 2;
    for (float y : {v, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      x.push_back(y);
      x.push_back(-y);
    }
  }
  std::mt19937 rng(19);
  std::uniform_real_distribution<float> e(-30.0f, 12.0f);
  for (int i = 0; i < 200000; ++i) x.push_back((i & 1 ? -1.0f : 1.0f) * std::exp2(e(rng)));
  const float inf = std::numeric_limits<float>::infinity();
  for (float y : {inf, -inf, std::nanf(""), 464.0f, 480.0f, 1e30f, 0.0f, -0.0f, 1e-30f})
    x.push_back(y);
  for (float scale : {1.0f, 0.25f, 3.0f}) {
    std::vector<uint8_t> q(x.size());
    internal::EncodeFp8(x.data(), int64_t(x.size()), scale, q.data());
    for (size_t i = 0; i < x.size(); ++i) {
      ASSERT_EQ(int(q[i]), int(FloatToFp8E4M3(x[i] / scale))) << "x = " << x[i] << " scale " << scale;
    }
  }
}

TEST(Decode, F16AndBf16MatchScalarForEveryCode) {
  std::vector<uint16_t> codes(65536);
  std::iota(codes.begin(), codes.end(), 0);
  std::vector<float> out(65536);
  internal::DecodeF16(codes.data(), 65536, out.data());
  int bad = 0;
  for (int c = 0; c < 65536; ++c) {
    const float want = Fp16ToFloat(uint16_t(c));
    const bool ok = std::isnan(want) ? std::isnan(out[size_t(c)])
                                     : FloatBits(out[size_t(c)]) == FloatBits(want);
    if (!ok && ++bad < 5) {
      EXPECT_TRUE(ok) << "f16 code " << c << ": " << out[size_t(c)] << " vs " << want;
    }
  }
  EXPECT_EQ(bad, 0);
  internal::DecodeBf16(codes.data(), 65536, out.data());
  for (int c = 0; c < 65536; ++c) {
    ASSERT_EQ(FloatBits(out[size_t(c)]), uint32_t(c) << 16) << "bf16 code " << c;
  }
}

TEST(Vec, FastExpWithinTwoUlp) {
  // Against exp in double over [-90, 89] and the special values; 2 ulp of the
  // correctly rounded result (measured max is about 1.02).
  std::mt19937 rng(18);
  std::uniform_real_distribution<float> u(-90.0f, 89.0f);
  std::vector<float> x(1 << 20);
  for (float& v : x) v = u(rng);
  const float specials[] = {0.0f, -0.0f, 1e-8f, -1e-8f, 88.72283f, -87.33654f, 1.0f, -1.0f};
  std::copy(std::begin(specials), std::end(specials), x.begin());
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = internal::FastExp(x[i]);
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double want = std::exp(double(x[i]));
    if (want < 1.1754943508222875e-38) {  // below FLT_MIN: flushed to zero
      ASSERT_EQ(y[i], 0.0f) << x[i];
      continue;
    }
    if (want > 3.4028234663852886e38) {
      ASSERT_TRUE(std::isinf(y[i])) << x[i];
      continue;
    }
    const double ulp = std::ldexp(1.0, std::ilogb(float(want)) - 23);
    worst = std::max(worst, std::fabs(y[i] - want) / ulp);
    ASSERT_LE(std::fabs(y[i] - want), 2 * ulp) << "x = " << x[i];
  }
  std::printf("  max error %.3f ulp\n", worst);
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(internal::FastExp(-inf), 0.0f);
  EXPECT_TRUE(std::isinf(internal::FastExp(inf)));
  EXPECT_TRUE(std::isnan(internal::FastExp(std::nanf(""))));
  EXPECT_EQ(internal::FastExp(-1e30f), 0.0f);
  EXPECT_EQ(internal::FastExp(0.0f), 1.0f);
  // The vectorised loop gives the same values as the scalar calls.
  std::vector<float> z(x.begin(), x.begin() + 1000);
  const float sum = internal::ExpShiftSum(z.data(), 1000, 90.0f);
  double want_sum = 0;
  for (int i = 0; i < 1000; ++i) {
    ASSERT_EQ(FloatBits(z[size_t(i)]), FloatBits(internal::FastExp(x[size_t(i)] - 90.0f))) << i;
    want_sum += z[size_t(i)];
  }
  EXPECT_NEAR(sum, want_sum, 1e-5 * want_sum);
}

// ---------------------------------------------------------------------------
// YaRN.
// ---------------------------------------------------------------------------
// Direct double transcription of DeepSeek's precompute_freqs_cis.
std::vector<double> YarnReference(const YarnParams& p) {
  const int half = p.dim / 2;
  std::vector<double> f(static_cast<size_t>(half));
  for (int i = 0; i < half; ++i) f[size_t(i)] = 1.0 / std::pow(double(p.theta), 2.0 * i / p.dim);
  if (!p.yarn) return f;
  auto corr = [&](double rot) {
    return p.dim * std::log(double(p.original_max_position) / (rot * 2 * std::numbers::pi)) /
           (2 * std::log(double(p.theta)));
  };
  double low = std::max(std::floor(corr(p.beta_fast)), 0.0);
  double high = std::min(std::ceil(corr(p.beta_slow)), double(p.dim - 1));
  if (low == high) high += 0.001;
  for (int i = 0; i < half; ++i) {
    double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
    double smooth = 1 - ramp;
    f[size_t(i)] = f[size_t(i)] / p.factor * (1 - smooth) + f[size_t(i)] * smooth;
  }
  return f;
}

TEST(Yarn, InvFreqMatchesDoubleReference) {
  // fp32 pow + a handful of fp32 operations: relative error well below 1e-6.
  std::vector<YarnParams> cases;
  cases.push_back(YarnParams{});  // DeepSeek-V3.2: dim 64, factor 40, 4096, 32/1
  YarnParams tiny;
  tiny.dim = 32;
  cases.push_back(tiny);
  YarnParams other;
  other.dim = 128;
  other.theta = 50000.0f;
  other.factor = 8.0f;
  other.original_max_position = 8192;
  cases.push_back(other);
  YarnParams collapsed;  // low == high after clamping: the +0.001 branch
  collapsed.dim = 4;
  collapsed.original_max_position = 1 << 30;
  cases.push_back(collapsed);
  for (const YarnParams& p : cases) {
    std::vector<float> got = YarnInvFreq(p);
    std::vector<double> want = YarnReference(p);
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_NEAR(got[i], want[i], 1e-6 * want[i]) << "dim " << p.dim << " i " << i;
    }
  }
  // V3.2 correction range is [10, 23]: below it unchanged, above it divided by 40.
  std::vector<float> f = YarnInvFreq(YarnParams{});
  EXPECT_NEAR(f[5], std::pow(10000.0, -10.0 / 64), 1e-6 * f[5]);
  EXPECT_NEAR(f[30], std::pow(10000.0, -60.0 / 64) / 40, 1e-6 * f[30]);
}

TEST(Yarn, PlainRopeWhenOff) {
  YarnParams p;
  p.yarn = false;
  p.dim = 64;
  std::vector<float> f = YarnInvFreq(p);
  ASSERT_EQ(f.size(), 32u);
  for (int i = 0; i < 32; ++i) {
    const double want = std::pow(10000.0, -2.0 * i / 64);
    EXPECT_NEAR(f[size_t(i)], want, 1e-6 * want) << i;
  }
}

TEST(Yarn, SoftmaxScaleV32) {
  const double mscale = 0.1 * std::log(40.0) + 1.0;
  const double want = std::pow(192.0, -0.5) * mscale * mscale;
  EXPECT_NEAR(YarnSoftmaxScale(192, YarnParams{}), want, 1e-7 * want);
  YarnParams off;
  off.yarn = false;
  EXPECT_NEAR(YarnSoftmaxScale(192, off), std::pow(192.0, -0.5), 1e-7);
  const double m2 = 0.1 * 0.707 * std::log(40.0) + 1.0;
  EXPECT_NEAR(YarnSoftmaxScale(64, YarnParams{}, 0.707f), 0.125 * m2 * m2, 1e-7);
}

// ---------------------------------------------------------------------------
// Norms, activations, softmax.
// ---------------------------------------------------------------------------
TEST(Norm, RmsNormMatchesDouble) {
  std::mt19937 rng(1);
  const int64_t m = 5, n = 777;
  std::vector<float> x = RandomVector(rng, size_t(m * n), -3.0f, 3.0f);
  std::vector<float> gamma = RandomVector(rng, size_t(n), 0.5f, 1.5f);
  std::vector<float> y(x.size());
  RmsNorm(x.data(), m, n, gamma.data(), 1e-6f, y.data());
  for (int64_t r = 0; r < m; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += double(x[size_t(r * n + i)]) * x[size_t(r * n + i)];
    const double inv = 1.0 / std::sqrt(ss / n + 1e-6);
    for (int64_t i = 0; i < n; ++i) {
      const double want = x[size_t(r * n + i)] * inv * gamma[size_t(i)];
      ASSERT_NEAR(y[size_t(r * n + i)], want, 1e-6 * (1 + std::fabs(want)));
    }
  }
  std::vector<float> inplace = x;  // y == x allowed
  RmsNorm(inplace.data(), m, n, gamma.data(), 1e-6f, inplace.data());
  EXPECT_TRUE(inplace == y);
}

TEST(Norm, LayerNormMatchesDouble) {
  std::mt19937 rng(2);
  const int64_t m = 4, n = 128;
  std::vector<float> x = RandomVector(rng, size_t(m * n), 2.0f, 6.0f);  // non-zero mean
  std::vector<float> gamma = RandomVector(rng, size_t(n), 0.5f, 1.5f);
  std::vector<float> beta = RandomVector(rng, size_t(n), -0.5f, 0.5f);
  std::vector<float> y(x.size());
  LayerNorm(x.data(), m, n, gamma.data(), beta.data(), 1e-6f, y.data());
  for (int64_t r = 0; r < m; ++r) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < n; ++i) mean += x[size_t(r * n + i)];
    mean /= n;
    for (int64_t i = 0; i < n; ++i) var += std::pow(x[size_t(r * n + i)] - mean, 2);
    var /= n;  // biased
    for (int64_t i = 0; i < n; ++i) {
      const double want =
          (x[size_t(r * n + i)] - mean) / std::sqrt(var + 1e-6) * gamma[size_t(i)] + beta[size_t(i)];
      ASSERT_NEAR(y[size_t(r * n + i)], want, 2e-6 * (1 + std::fabs(want)));
    }
  }
  std::vector<float> inplace = x;
  LayerNorm(inplace.data(), m, n, gamma.data(), beta.data(), 1e-6f, inplace.data());
  EXPECT_TRUE(inplace == y);
}

TEST(Activation, SiluMulMatchesDouble) {
  std::mt19937 rng(3);
  const int64_t n = 1000;
  std::vector<float> g = RandomVector(rng, size_t(n), -20.0f, 20.0f);
  std::vector<float> u = RandomVector(rng, size_t(n), -2.0f, 2.0f);
  std::vector<float> out(static_cast<size_t>(n));
  SiluMul(g.data(), u.data(), n, out.data());
  for (int64_t i = 0; i < n; ++i) {
    const double gi = g[size_t(i)];
    const double want = gi / (1 + std::exp(-gi)) * u[size_t(i)];
    ASSERT_NEAR(out[size_t(i)], want, 1e-6 * (1 + std::fabs(want))) << "g " << gi;
  }
}

TEST(Activation, SoftmaxMatchesDoubleAndIsShiftSafe) {
  std::mt19937 rng(4);
  const int64_t rows = 3, n = 300;
  std::vector<float> x = RandomVector(rng, size_t(rows * n), -10.0f, 10.0f);
  for (int64_t i = 0; i < n; ++i) x[size_t(2 * n + i)] += 1000.0f;  // would overflow exp
  std::vector<float> y = x;
  Softmax(y.data(), rows, n);
  for (int64_t r = 0; r < rows; ++r) {
    double mx = -1e300, sum = 0;
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, double(x[size_t(r * n + i)]));
    for (int64_t i = 0; i < n; ++i) sum += std::exp(x[size_t(r * n + i)] - mx);
    double total = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double want = std::exp(x[size_t(r * n + i)] - mx) / sum;
      ASSERT_NEAR(y[size_t(r * n + i)], want, 1e-6 * want + 1e-9);
      total += y[size_t(r * n + i)];
    }
    EXPECT_NEAR(total, 1.0, 1e-5);
  }
}

// ---------------------------------------------------------------------------
// RoPE.
// ---------------------------------------------------------------------------
void CheckRope(bool interleaved) {
  std::mt19937 rng(interleaved ? 5 : 6);
  const int dim = 32, half = dim / 2;
  const int64_t tokens = 6, heads = 3;
  const int64_t head_stride = 45, token_stride = heads * head_stride + 7;  // padded strides
  std::vector<float> inv_freq = YarnInvFreq(YarnParams{.dim = dim});
  const std::vector<int64_t> positions = {0, 1, 17, 4095, 32767, 131071};
  std::vector<float> x = RandomVector(rng, size_t(tokens * token_stride), -2.0f, 2.0f);
  std::vector<float> y = x;
  ApplyRope(y.data(), tokens, heads, token_stride, head_stride, positions.data(),
            inv_freq.data(), dim, interleaved);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = t * token_stride + h * head_stride;
      for (int i = 0; i < half; ++i) {
        const int64_t ire = base + (interleaved ? 2 * i : i);
        const int64_t iim = base + (interleaved ? 2 * i + 1 : i + half);
        // The angle is the fp32 product (as torch.outer in fp32); then exact complex math.
        const double angle = double(float(positions[size_t(t)]) * inv_freq[size_t(i)]);
        const double c = std::cos(angle), s = std::sin(angle);
        const double a = x[size_t(ire)], b = x[size_t(iim)];
        const double re = a * c - b * s, im = a * s + b * c;
        // fp32 cos/sin (<= 1 ulp) and two fp32 products: |err| <= ~4 * 2^-24 * |z|.
        const double tol = 1e-6 * std::hypot(a, b) + 1e-7;
        ASSERT_NEAR(y[size_t(ire)], re, tol) << "t " << t << " h " << h << " i " << i;
        ASSERT_NEAR(y[size_t(iim)], im, tol) << "t " << t << " h " << h << " i " << i;
        // Rotation preserves the pair's norm.
        ASSERT_NEAR(std::hypot(double(y[size_t(ire)]), double(y[size_t(iim)])), std::hypot(a, b),
                    tol);
      }
      // Values outside the rotated dims are untouched.
      for (int64_t d = dim; d < head_stride; ++d) ASSERT_EQ(y[size_t(base + d)], x[size_t(base + d)]);
    }
    for (int64_t d = heads * head_stride; d < token_stride; ++d)
      ASSERT_EQ(y[size_t(t * token_stride + d)], x[size_t(t * token_stride + d)]);
  }
  // Position 0 is the identity.
  for (int64_t d = 0; d < dim; ++d) EXPECT_EQ(y[size_t(d)], x[size_t(d)]);
}

TEST(Rope, InterleavedEqualsComplexMultiplication) { CheckRope(true); }
TEST(Rope, HalfSplitEqualsComplexMultiplication) { CheckRope(false); }

TEST(Rope, LayoutsAgreeUnderPermutation) {
  // Half-split on a vector equals interleaved on the same pairs laid out (i, i+half) -> (2i, 2i+1).
  std::mt19937 rng(7);
  const int dim = 64;
  std::vector<float> inv_freq = YarnInvFreq(YarnParams{});
  std::vector<float> hs = RandomVector(rng, dim);
  std::vector<float> il(dim);
  for (int i = 0; i < dim / 2; ++i) {
    il[size_t(2 * i)] = hs[size_t(i)];
    il[size_t(2 * i + 1)] = hs[size_t(i + dim / 2)];
  }
  const int64_t pos = 12345;
  ApplyRope(hs.data(), 1, 1, dim, dim, &pos, inv_freq.data(), dim, false);
  ApplyRope(il.data(), 1, 1, dim, dim, &pos, inv_freq.data(), dim, true);
  for (int i = 0; i < dim / 2; ++i) {
    EXPECT_EQ(il[size_t(2 * i)], hs[size_t(i)]);
    EXPECT_EQ(il[size_t(2 * i + 1)], hs[size_t(i + dim / 2)]);
  }
}

// ---------------------------------------------------------------------------
// Hadamard.
// ---------------------------------------------------------------------------
TEST(Hadamard, EqualsExplicitSylvesterMatrix) {
  std::mt19937 rng(8);
  for (int n : {1, 2, 8, 128}) {
    const int64_t rows = 3;
    const float scale = float(1.0 / std::sqrt(double(n)));
    std::vector<float> x = RandomVector(rng, size_t(rows * n));
    std::vector<float> y = x;
    Hadamard(y.data(), rows, n, scale);
    for (int64_t r = 0; r < rows; ++r) {
      for (int i = 0; i < n; ++i) {
        // Sylvester: H[i][j] = (-1)^popcount(i & j).
        double want = 0, mag = 0;
        for (int j = 0; j < n; ++j) {
          const double v = x[size_t(r * n + j)];
          want += (std::popcount(unsigned(i & j)) % 2 ? -v : v);
          mag += std::fabs(v);
        }
        want *= scale;
        ASSERT_NEAR(y[size_t(r * n + i)], want, 8 * n * kU * mag * scale + 1e-7)
            << "n " << n << " row " << r << " i " << i;
      }
    }
  }
}

TEST(Hadamard, OrthonormalInvolution) {
  std::mt19937 rng(9);
  const int n = 128;
  const int64_t rows = 10;
  const float scale = float(1.0 / std::sqrt(128.0));
  std::vector<float> x = RandomVector(rng, size_t(rows * n));
  std::vector<float> y = x;
  Hadamard(y.data(), rows, n, scale);
  for (int64_t r = 0; r < rows; ++r) {
    double nx = 0, ny = 0;
    for (int i = 0; i < n; ++i) {
      nx += double(x[size_t(r * n + i)]) * x[size_t(r * n + i)];
      ny += double(y[size_t(r * n + i)]) * y[size_t(r * n + i)];
    }
    EXPECT_NEAR(ny, nx, 1e-5 * nx);
  }
  Hadamard(y.data(), rows, n, scale);
  for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(y[i], x[i], 1e-5) << i;
}

TEST(Hadamard, RejectsNonPowerOfTwo) {
  std::vector<float> x(24);
  std::string out;
  EXPECT_TRUE(DiesWithMessage([&] { Hadamard(x.data(), 1, 24, 1.0f); }, "power of two", &out))
      << out;
}

// ---------------------------------------------------------------------------
// FP8 quantisation.
// ---------------------------------------------------------------------------
TEST(Quantize, Fp8GroupsScalesAndErrorBound) {
  // Bound used: v = x / s is exact when s is a power of two (ue8m0) and within
  // 2^-24 relative otherwise; e4m3 rounds v to nearest with error <= |v| * 2^-4
  // for |v| >= 2^-6 (3 mantissa bits: half an ulp is 2^-4 of the leading bit)
  // and <= 2^-10 (half the 2^-9 subnormal step) below. Hence
  //   |x - q * s| <= max(|x| * 2^-4, s * 2^-10) (+ 2^-22 |x| slack when not ue8m0).
  std::mt19937 rng(10);
  const int64_t rows = 4, n = 300;  // groups of 128: 128, 128, 44 (partial)
  const int group = 128;
  std::vector<float> x = RandomVector(rng, size_t(rows * n), -1.0f, 1.0f);
  for (int64_t c = 0; c < n; ++c) x[size_t(1 * n + c)] *= 1e-3f;  // tiny row
  for (int64_t c = 0; c < n; ++c) x[size_t(2 * n + c)] *= 300.0f;  // large row
  for (int64_t c = 256; c < n; ++c) x[size_t(3 * n + c)] = 0.0f;  // all-zero partial group
  x[size_t(3 * n + 5)] = 1e-7f;  // values far below the scale: subnormal codes
  for (bool ue8m0 : {true, false}) {
    std::vector<uint8_t> q(size_t(rows * n));
    std::vector<float> scales(size_t(rows * 3), -1.0f);
    QuantizeFp8(x.data(), rows, n, group, ue8m0, q.data(), scales.data());
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < 3; ++g) {
        const float s = scales[size_t(r * 3 + g)];
        float amax = 0;
        for (int64_t c = g * group; c < std::min(n, (g + 1) * group); ++c)
          amax = std::max(amax, std::fabs(x[size_t(r * n + c)]));
        const double floor_amax = std::max(double(amax), 1e-4);
        if (ue8m0) {
          ASSERT_TRUE(IsPowerOfTwo(s)) << s;
          // The smallest power of two with amax / s <= 448.
          ASSERT_GE(double(s) * 448.0, floor_amax);
          ASSERT_LT(double(s) * 224.0, floor_amax);
        } else {
          ASSERT_NEAR(s, floor_amax / 448.0, 1e-6 * floor_amax / 448.0);
        }
        for (int64_t c = g * group; c < std::min(n, (g + 1) * group); ++c) {
          const uint8_t code = q[size_t(r * n + c)];
          ASSERT_NE(code & 0x7f, 0x7f) << "NaN code";
          const double xv = x[size_t(r * n + c)];
          const double deq = double(Fp8E4M3ToFloat(code)) * s;
          const double bound = std::max(std::fabs(xv) / 16, s / 1024.0) +
                               (ue8m0 ? 0.0 : std::fabs(xv) * 0x1p-22);
          ASSERT_LE(std::fabs(xv - deq), bound)
              << "row " << r << " col " << c << " x " << xv << " deq " << deq << " s " << s;
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Linear / MatMulXW.
// ---------------------------------------------------------------------------
// Error bound for an fp32 dot product of K terms with exact inputs, any
// summation order (Higham's gamma_K): |err| <= K u / (1 - K u) * sum |x_k w_k|.
double DotBound(int64_t K, double abs_sum) {
  const double g = K * kU / (1 - K * kU);
  return g * abs_sum + 1e-30;
}

const DType kAllDtypes[] = {DType::kF32, DType::kBF16, DType::kF16, DType::kFP8E4M3};

// Linear with W [N, K]; reference from TestWeight::At (scalar decoders).
void CheckLinear(const TestWeight& tw, const WeightView& view, int64_t row_off, int64_t col_off,
                 int64_t m, ThreadPool* pool, const char* what) {
  std::mt19937 rng(uint32_t(m * 31 + view.rows));
  const int64_t N = view.rows, K = view.cols;
  std::vector<float> x = RandomVector(rng, size_t(m * K));
  std::vector<float> y(size_t(m * N), std::nanf(""));
  Linear(x.data(), m, view, y.data(), pool);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(x[size_t(i * K + k)]) * tw.At(row_off + n, col_off + k);
        want += p;
        mag += std::fabs(p);
      }
      ASSERT_NEAR(y[size_t(i * N + n)], want, DotBound(K, mag))
          << what << " " << DTypeName(view.dtype) << " m " << m << " row " << i << " col " << n;
    }
  }
}

// MatMulXW with W [K, N].
void CheckMatMulXW(const TestWeight& tw, const WeightView& view, int64_t row_off,
                   int64_t col_off, int64_t m, ThreadPool* pool, const char* what) {
  std::mt19937 rng(uint32_t(m * 17 + view.cols));
  const int64_t K = view.rows, N = view.cols;
  std::vector<float> x = RandomVector(rng, size_t(m * K));
  std::vector<float> y(size_t(m * N), std::nanf(""));
  MatMulXW(x.data(), m, view, y.data(), pool);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t n = 0; n < N; ++n) {
      double want = 0, mag = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double p = double(x[size_t(i * K + k)]) * tw.At(row_off + k, col_off + n);
        want += p;
        mag += std::fabs(p);
      }
      ASSERT_NEAR(y[size_t(i * N + n)], want, DotBound(K, mag))
          << what << " " << DTypeName(view.dtype) << " m " << m << " row " << i << " col " << n;
    }
  }
}

TEST(Gemm, LinearEveryDtypeOddSizes) {
  std::mt19937 rng(11);
  ThreadPool pool(2);
  const int64_t N = 200, K = 300;
  std::vector<float> values = RandomVector(rng, size_t(N * K));
  for (DType dt : kAllDtypes) {
    const TestWeight tw = MakeWeight(values, N, K, dt, /*pad=*/5);
    for (int64_t m : {1, 3, 7, 19, 300}) {
      CheckLinear(tw, tw.View(), 0, 0, m, nullptr, "inline");
      CheckLinear(tw, tw.View(), 0, 0, m, &pool, "pool");
    }
  }
}

TEST(Gemm, MatMulXWEveryDtypeOddSizes) {
  std::mt19937 rng(12);
  ThreadPool pool(2);
  const int64_t K = 200, N = 300;
  std::vector<float> values = RandomVector(rng, size_t(K * N));
  for (DType dt : kAllDtypes) {
    const TestWeight tw = MakeWeight(values, K, N, dt, /*pad=*/3);
    for (int64_t m : {1, 3, 7, 19, 300}) {
      CheckMatMulXW(tw, tw.View(), 0, 0, m, nullptr, "inline");
      CheckMatMulXW(tw, tw.View(), 0, 0, m, &pool, "pool");
    }
  }
}

TEST(Gemm, LongReductionAcrossDepthTiles) {
  // K = 700 spans three packed depth tiles (256 + 256 + 188).
  std::mt19937 rng(13);
  ThreadPool pool(2);
  std::vector<float> values = RandomVector(rng, size_t(70 * 700));
  const TestWeight lin = MakeWeight(values, 70, 700, DType::kFP8E4M3, 0, /*ue8m0=*/true);
  CheckLinear(lin, lin.View(), 0, 0, 13, &pool, "K=700");
  const TestWeight mm = MakeWeight(values, 700, 70, DType::kBF16);
  CheckMatMulXW(mm, mm.View(), 0, 0, 13, &pool, "K=700");
}

TEST(Gemm, Fp8RowSliceStartingMidBlock) {
  std::mt19937 rng(14);
  ThreadPool pool(2);
  const int64_t R = 300, C = 260;
  std::vector<float> values = RandomVector(rng, size_t(R * C));
  // Scales differ strongly between blocks, so a wrong block lookup cannot pass.
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) values[size_t(r * C + c)] *= float(1 + (r / 128) * 7 + (c / 128) * 3);
  const TestWeight tw = MakeWeight(values, R, C, DType::kFP8E4M3);
  const WeightView whole = tw.View();
  const WeightView slice = whole.Rows(70, 150);  // rows 70..219: blocks 0 and 1
  for (int64_t m : {1, 7, 300}) {
    CheckLinear(tw, slice, 70, 0, m, nullptr, "rows(70,150)");
    CheckLinear(tw, slice, 70, 0, m, &pool, "rows(70,150)");
    CheckMatMulXW(tw, slice, 70, 0, m, nullptr, "rows(70,150)");
    CheckMatMulXW(tw, slice, 70, 0, m, &pool, "rows(70,150)");
  }
  // A column window starting mid-block (col0 = 100): the view's block boundaries
  // fall at view columns 28 and 156.
  WeightView cols = slice;
  cols.data = static_cast<const uint8_t*>(slice.data) + 100;
  cols.col0 = 100;
  cols.cols = 150;
  for (int64_t m : {1, 7}) {
    CheckLinear(tw, cols, 70, 100, m, &pool, "cols(100,150)");
    CheckMatMulXW(tw, cols, 70, 100, m, &pool, "cols(100,150)");
  }
  // A slice of a slice.
  CheckLinear(tw, slice.Rows(60, 30), 130, 0, 7, &pool, "rows(130,30)");
  // Another block size (64) with ue8m0 scales.
  const TestWeight t64 = MakeWeight(values, R, C, DType::kFP8E4M3, /*pad=*/0, /*ue8m0=*/true,
                                    /*block=*/64);
  CheckLinear(t64, t64.View().Rows(100, 90), 100, 0, 19, &pool, "block64 rows(100,90)");
  CheckMatMulXW(t64, t64.View().Rows(100, 90), 100, 0, 3, &pool, "block64 rows(100,90)");
}

TEST(Gemm, PoolAndInlineAreBitIdentical) {
  std::mt19937 rng(15);
  ThreadPool pool(2);
  const int64_t N = 130, K = 520, m = 301;
  std::vector<float> values = RandomVector(rng, size_t(N * K));
  const TestWeight tw = MakeWeight(values, N, K, DType::kFP8E4M3);
  std::vector<float> x = RandomVector(rng, size_t(m * K));
  std::vector<float> a(size_t(m * N)), b(size_t(m * N));
  Linear(x.data(), m, tw.View(), a.data(), nullptr);
  Linear(x.data(), m, tw.View(), b.data(), &pool);
  EXPECT_TRUE(a == b);
}

TEST(Gemm, RejectsBadWeights) {
  std::vector<float> x(4), y(4);
  WeightView w = F32View(x.data(), 2, 2);
  w.dtype = DType::kI32;
  std::string out;
  EXPECT_TRUE(DiesWithMessage([&] { Linear(x.data(), 1, w, y.data(), nullptr); },
                              "not a floating type", &out))
      << out;
  WeightView f8 = F32View(x.data(), 2, 2);
  f8.dtype = DType::kFP8E4M3;
  EXPECT_TRUE(DiesWithMessage([&] { MatMulXW(x.data(), 1, f8, y.data(), nullptr); },
                              "without block scales", &out))
      << out;
}

// ---------------------------------------------------------------------------
// MoE router.
// ---------------------------------------------------------------------------
// Straightforward re-implementation: full sorts, explicit masks, double sums.
void MoeReference(const float* logits, const float* bias, int experts, int n_group,
                  int topk_group, int topk, bool norm, float route_scale, std::vector<int>* idx,
                  std::vector<double>* w) {
  std::vector<double> s(static_cast<size_t>(experts)), sel(static_cast<size_t>(experts));
  for (int e = 0; e < experts; ++e) {
    s[size_t(e)] = 1.0 / (1.0 + std::exp(-double(logits[e])));
    sel[size_t(e)] = s[size_t(e)] + (bias ? bias[e] : 0.0);
  }
  std::vector<bool> allowed(size_t(experts), true);
  if (n_group > 1) {
    const int gs = experts / n_group;
    std::vector<std::pair<double, int>> gscore;
    for (int g = 0; g < n_group; ++g) {
      std::vector<double> v(sel.begin() + g * gs, sel.begin() + (g + 1) * gs);
      std::sort(v.rbegin(), v.rend());
      gscore.push_back({v[0] + (gs > 1 ? v[1] : 0.0), g});
    }
    std::sort(gscore.begin(), gscore.end(), [](auto a, auto b) {
      return a.first != b.first ? a.first > b.first : a.second < b.second;
    });
    std::vector<bool> keep(size_t(n_group), false);
    for (int k = 0; k < topk_group; ++k) keep[size_t(gscore[size_t(k)].second)] = true;
    for (int e = 0; e < experts; ++e) allowed[size_t(e)] = keep[size_t(e / gs)];
  }
  std::vector<int> order;
  for (int e = 0; e < experts; ++e)
    if (allowed[size_t(e)]) order.push_back(e);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return sel[size_t(a)] > sel[size_t(b)]; });
  idx->assign(order.begin(), order.begin() + topk);
  double sum = 0;
  for (int e : *idx) sum += s[size_t(e)];
  w->clear();
  for (int e : *idx) w->push_back(s[size_t(e)] / (norm ? sum : 1.0) * route_scale);
}

float Logit(double p) { return float(std::log(p / (1 - p))); }

TEST(Moe, GroupRestrictionChangesTheAnswer) {
  // 8 experts in 4 groups of 2. Sigmoid scores: g0 {0.95, 0.05}, g1 {0.6, 0.6},
  // g2 {0.55, 0.55}, g3 {0.9, 0.01}. Group scores (top-2 sums): 1.0, 1.2, 1.1, 0.91.
  const double p[8] = {0.95, 0.05, 0.6, 0.6, 0.55, 0.55, 0.9, 0.01};
  std::vector<float> logits(8);
  for (int e = 0; e < 8; ++e) logits[size_t(e)] = Logit(p[e]);
  int32_t idx[2];
  float w[2];
  // Without groups: the two best experts overall (0 and 6).
  MoeRoute(logits.data(), nullptr, 1, 8, 1, 1, 2, true, 1.0f, idx, w);
  EXPECT_EQ(idx[0], 0);
  EXPECT_EQ(idx[1], 6);
  // Top-2 groups are g1 and g2: experts 2 and 3 (tie -> lower index first).
  MoeRoute(logits.data(), nullptr, 1, 8, 4, 2, 2, true, 2.5f, idx, w);
  EXPECT_EQ(idx[0], 2);
  EXPECT_EQ(idx[1], 3);
  EXPECT_NEAR(w[0], 1.25, 1e-6);
  EXPECT_NEAR(w[1], 1.25, 1e-6);
  std::vector<int> ridx;
  std::vector<double> rw;
  MoeReference(logits.data(), nullptr, 8, 4, 2, 2, true, 2.5f, &ridx, &rw);
  EXPECT_EQ(ridx[0], 2);
  EXPECT_EQ(ridx[1], 3);
  // The bias steers selection (group 3 wins) but weights use the unbiased scores.
  const float bias[8] = {0, 0, 0, 0, 0, 0, 0.5f, 0};
  MoeRoute(logits.data(), bias, 1, 8, 4, 1, 2, false, 1.0f, idx, w);
  EXPECT_EQ(idx[0], 6);
  EXPECT_EQ(idx[1], 7);
  EXPECT_NEAR(w[0], 0.9, 1e-6);
  EXPECT_NEAR(w[1], 0.01, 1e-6);
}

TEST(Moe, MatchesReferenceOnRandomInputs) {
  std::mt19937 rng(16);
  struct Case {
    int experts, n_group, topk_group, topk;
    bool norm;
    float scale;
  };
  const Case cases[] = {{64, 8, 3, 6, true, 2.5f}, {256, 8, 4, 8, true, 2.5f},
                        {32, 1, 1, 4, false, 1.0f}, {48, 16, 5, 7, false, 1.5f}};
  for (const Case& c : cases) {
    const int m = 40;
    std::vector<float> logits = RandomVector(rng, size_t(m * c.experts), -4.0f, 4.0f);
    std::vector<float> bias = RandomVector(rng, size_t(c.experts), -0.3f, 0.3f);
    std::vector<int32_t> idx(size_t(m * c.topk));
    std::vector<float> w(size_t(m * c.topk));
    MoeRoute(logits.data(), bias.data(), m, c.experts, c.n_group, c.topk_group, c.topk, c.norm,
             c.scale, idx.data(), w.data());
    for (int r = 0; r < m; ++r) {
      std::vector<int> ridx;
      std::vector<double> rw;
      MoeReference(logits.data() + r * c.experts, bias.data(), c.experts, c.n_group,
                   c.topk_group, c.topk, c.norm, c.scale, &ridx, &rw);
      for (int k = 0; k < c.topk; ++k) {
        ASSERT_EQ(idx[size_t(r * c.topk + k)], ridx[size_t(k)]) << "E " << c.experts << " row " << r;
        ASSERT_NEAR(w[size_t(r * c.topk + k)], rw[size_t(k)], 1e-6 * (1 + rw[size_t(k)]));
      }
    }
  }
}

// ---------------------------------------------------------------------------
// TopK (kernels/cpu/topk.cc).
// ---------------------------------------------------------------------------
TEST(TopK, OrderingTiesNanAndPadding) {
  const float nan = std::nanf("");
  const float s[] = {1.0f, 3.0f, nan, 3.0f, -1.0f, 2.0f, 3.0f, nan};
  int32_t out[10];
  EXPECT_EQ(TopK(s, 8, 5, out), 5);
  const int32_t want[] = {1, 3, 6, 5, 0};  // 3s by index, then 2, then 1
  for (int i = 0; i < 5; ++i) EXPECT_EQ(out[i], want[i]) << i;
  EXPECT_EQ(TopK(s, 8, 10, out), 8);
  const int32_t all[] = {1, 3, 6, 5, 0, 4, 2, 7, -1, -1};  // NaN last (by index), then -1
  for (int i = 0; i < 10; ++i) EXPECT_EQ(out[i], all[i]) << i;
  EXPECT_EQ(TopK(s, 0, 3, out), 0);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(out[i], -1);
}

TEST(TopK, MatchesFullSortOnRandomInputs) {
  std::mt19937 rng(17);
  std::uniform_int_distribution<int> small(0, 50);  // many ties
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t n = 1000 + trial * 37;
    const int k = 1 + trial * 50;
    std::vector<float> s(static_cast<size_t>(n));
    for (float& v : s) v = float(small(rng));
    std::vector<int32_t> out(static_cast<size_t>(k));
    const int got = TopK(s.data(), n, k, out.data());
    ASSERT_EQ(got, std::min<int64_t>(k, n));
    std::vector<int32_t> ref(static_cast<size_t>(n));
    std::iota(ref.begin(), ref.end(), 0);
    std::stable_sort(ref.begin(), ref.end(),
                     [&](int32_t a, int32_t b) { return s[size_t(a)] > s[size_t(b)]; });
    for (int i = 0; i < got; ++i) ASSERT_EQ(out[size_t(i)], ref[size_t(i)]) << i;
  }
}

// ---------------------------------------------------------------------------
// Timings (PD_BENCH=1).
// ---------------------------------------------------------------------------
bool BenchEnabled() { return std::getenv("PD_BENCH") != nullptr; }

// Best of 7 trials of >= 30 ms each (the dev box's 2 cores are shared, so the
// minimum is the least disturbed measurement).
template <typename F>
double SecondsPerCall(F&& f) {
  f();  // warm-up
  auto run = [&](int reps) {
    auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  int reps = 1;
  while (run(reps) < 0.03) reps *= 2;
  double best = 1e30;
  for (int trial = 0; trial < 7; ++trial) best = std::min(best, run(reps) / reps);
  return best;
}

void BenchGemm(bool linear, DType dt, int64_t m, int64_t k, int64_t n, ThreadPool* pool) {
  std::mt19937 rng(1);
  std::vector<float> values = RandomVector(rng, size_t(k * n));
  const TestWeight tw = linear ? MakeWeight(values, n, k, dt) : MakeWeight(values, k, n, dt);
  std::vector<float> x = RandomVector(rng, size_t(m * k));
  std::vector<float> y(size_t(m * n));
  const WeightView v = tw.View();
  const double s = SecondsPerCall([&] {
    if (linear) {
      Linear(x.data(), m, v, y.data(), pool);
    } else {
      MatMulXW(x.data(), m, v, y.data(), pool);
    }
  });
  std::printf("  %-8s %-7s m=%-5lld k=%-5lld n=%-5lld threads=%d: %9.1f us  %6.1f GFLOP/s\n",
              linear ? "Linear" : "MatMulXW", DTypeName(dt), static_cast<long long>(m),
              static_cast<long long>(k), static_cast<long long>(n), pool ? pool->num_threads() : 1,
              s * 1e6, 2.0 * m * k * n / s * 1e-9);
}

TEST(Bench, Gemm) {
  if (!BenchEnabled()) MINITEST_SKIP() << "set PD_BENCH=1";
  ThreadPool pool2(2);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool2}) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kFP8E4M3}) {
      BenchGemm(true, dt, 2048, 256, 512, p);
      BenchGemm(false, dt, 2048, 256, 512, p);
      BenchGemm(true, dt, 1, 256, 512, p);
      BenchGemm(false, dt, 1, 256, 512, p);
      BenchGemm(true, dt, 1, 2048, 2048, p);
      BenchGemm(false, dt, 1, 2048, 2048, p);
    }
  }
}

}  // namespace
}  // namespace pd::kernels::cpu

namespace pd::kernels::cpu {
namespace {

// Batch invariance: a row's output is bit-identical whatever m, the other rows
// and the pool (the forward pass relies on it for prefill == decode).
TEST(Gemm, RowsAreBitIdenticalWhateverTheBatch) {
  std::mt19937 rng(99);
  ThreadPool pool(2);
  for (DType dt : {DType::kF32, DType::kBF16, DType::kFP8E4M3}) {
    const int64_t rows = 150, cols = 700;  // K spans three 256-deep tiles
    auto wv = testing::RandomVector(rng, size_t(rows * cols));
    auto w = testing::MakeWeight(wv, rows, cols, dt);
    const int64_t m = 37;
    auto x = testing::RandomVector(rng, size_t(m * cols));
    std::vector<float> all(size_t(m * rows)), one(static_cast<size_t>(rows));
    Linear(x.data(), m, w.View(), all.data(), &pool);
    for (int64_t i : {int64_t(0), int64_t(5), int64_t(36)}) {
      Linear(x.data() + i * cols, 1, w.View(), one.data(), nullptr);
      for (int64_t j = 0; j < rows; ++j) ASSERT_EQ(one[size_t(j)], all[size_t(i * rows + j)]) << i << "," << j;
    }
    // MatMulXW with W as [K=rows, N=cols]: x has `rows` columns.
    auto x2 = testing::RandomVector(rng, size_t(m * rows));
    std::vector<float> all2(size_t(m * cols)), one2(static_cast<size_t>(cols));
    MatMulXW(x2.data(), m, w.View(), all2.data(), &pool);
    for (int64_t i : {int64_t(0), int64_t(17), int64_t(36)}) {
      MatMulXW(x2.data() + i * rows, 1, w.View(), one2.data(), &pool);
      for (int64_t j = 0; j < cols; ++j) ASSERT_EQ(one2[size_t(j)], all2[size_t(i * cols + j)]) << i << "," << j;
    }
  }
}

}  // namespace
}  // namespace pd::kernels::cpu
