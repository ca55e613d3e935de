// CPU tests of the selection kernels' host-side tiling math and key encoding.
#include "kernels/cuda/select_plan.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/testing/minitest.h"

namespace pd::kernels::cuda {
namespace {

SelectPlanInput Prefill(int64_t q, int64_t ctx, int rows) {
  SelectPlanInput in;
  in.num_queries = q;
  in.num_seqs = 1;
  in.max_queries_per_seq = q;
  in.max_context = ctx;
  in.rows_per_query = rows;
  in.topk = 2048;
  in.num_sms = 132;
  return in;
}

TEST(SelectPlan, LargePrefillDoesNotSplit) {
  SelectPlan p;
  ASSERT_TRUE(PlanSelect(Prefill(8192, 131072, 64), &p, nullptr));
  EXPECT_EQ(p.queries_per_cta, 2);
  EXPECT_EQ(p.groups_per_seq, 4096);
  EXPECT_EQ(p.splits, 1);
  EXPECT_GE(p.keys_per_split, 131072);
  ASSERT_TRUE(PlanSelect(Prefill(8192, 131072, 8), &p, nullptr));
  EXPECT_EQ(p.queries_per_cta, 16);
  EXPECT_EQ(p.groups_per_seq, 512);
  EXPECT_EQ(p.splits, 1);
}

TEST(SelectPlan, SplitsCoverTheContextExactlyOnce) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    SelectPlanInput in;
    in.num_seqs = 1 + int(rng() % 200);
    in.max_queries_per_seq = 1 + int64_t(rng() % 3);
    in.num_queries = in.num_seqs * in.max_queries_per_seq;
    in.max_context = int64_t(rng() % 300000);
    const int rows[] = {8, 16, 32, 64};
    in.rows_per_query = rows[rng() % 4];
    in.topk = 1 + int(rng() % 2048);
    in.num_sms = 1 + int(rng() % 160);
    in.num_splits = (rng() % 4 == 0) ? int(rng() % 50) : 0;
    SelectPlan p;
    ASSERT_TRUE(PlanSelect(in, &p, nullptr));
    EXPECT_EQ(p.keys_per_split % kSelectKeysPerIter, 0);
    EXPECT_GE(p.splits, 1);
    // Every key in [0, ctx) falls in exactly one split, and no split is empty.
    const int64_t ctx = std::max<int64_t>(in.max_context, 1);
    EXPECT_GE(int64_t(p.splits) * p.keys_per_split, ctx);
    EXPECT_LT(int64_t(p.splits - 1) * p.keys_per_split, ctx);
    if (in.num_splits == 0 && p.splits > 1) {
      EXPECT_GE(p.keys_per_split, kSelectMinSplitKeys);
    }
    EXPECT_EQ(p.queries_per_cta * in.rows_per_query, p.rows_per_cta);
    EXPECT_EQ(p.rows_per_cta,
              (in.rows_per_query == 64 && in.max_queries_per_seq <= 1) ? 64 : kSelectRows);
    EXPECT_GE(p.groups_per_seq * p.queries_per_cta, in.max_queries_per_seq);
    EXPECT_LT((p.groups_per_seq - 1) * p.queries_per_cta, std::max<int64_t>(in.max_queries_per_seq, 1));
    // Workspace parts are aligned, disjoint and large enough.
    EXPECT_EQ(p.counts_offset % 256, 0u);
    EXPECT_GE(p.lists_bytes, size_t(in.num_queries) * p.splits * kSelectListCap * 8);
    EXPECT_GE(p.counts_bytes, size_t(in.num_queries) * p.splits * 4);
    EXPECT_EQ(p.workspace_bytes, p.counts_offset + p.counts_bytes);
    EXPECT_GE(p.counts_offset, p.lists_offset + p.lists_bytes);
  }
}

TEST(SelectPlan, DecodeSplitsToFillTheMachine) {
  SelectPlanInput in = Prefill(1, 131072, 64);
  SelectPlan p;
  ASSERT_TRUE(PlanSelect(in, &p, nullptr));
  EXPECT_EQ(p.splits, 256);  // >= 264 slots wanted, 512 keys each (the floor)
  EXPECT_EQ(p.keys_per_split, 512);
  in = Prefill(128, 131072, 64);
  in.num_seqs = 128;
  in.max_queries_per_seq = 1;
  ASSERT_TRUE(PlanSelect(in, &p, nullptr));
  EXPECT_EQ(p.splits, 2);  // 256 CTAs: one wave of the 264 slots
  in = Prefill(1024, 65536, 8);  // 64 CTAs along the queries
  ASSERT_TRUE(PlanSelect(in, &p, nullptr));
  EXPECT_EQ(p.splits, 4);  // 256 CTAs, one wave (5 would need two)
}

TEST(SelectPlan, RejectsBadInput) {
  SelectPlan p;
  const char* why = nullptr;
  SelectPlanInput in = Prefill(10, 100, 12);
  EXPECT_FALSE(PlanSelect(in, &p, &why));
  EXPECT_TRUE(why != nullptr);
  in = Prefill(10, 100, 64);
  in.topk = 4096;
  EXPECT_FALSE(PlanSelect(in, &p, &why));
  in = Prefill(10, 100, 64);
  in.max_queries_per_seq = 11;
  EXPECT_FALSE(PlanSelect(in, &p, &why));
}

TEST(SelectPlan, LargeTopkUsesBigListsAndOneSplit) {
  SelectPlanInput in = Prefill(100, 70000, 8);
  in.topk = 8192;
  SelectPlan p;
  const char* why = nullptr;
  EXPECT_FALSE(PlanSelect(in, &p, &why));  // not without allow_large_topk
  EXPECT_TRUE(why != nullptr && std::string(why).find("2048") != std::string::npos);
  in.allow_large_topk = true;
  in.num_splits = 5;
  ASSERT_TRUE(PlanSelect(in, &p, &why));
  EXPECT_EQ(p.splits, 1);
  EXPECT_EQ(p.list_cap, 4 * kSelectListCap);
  EXPECT_GE(p.lists_bytes, size_t(100) * 4 * kSelectListCap * 8);
  in.topk = 8193;
  EXPECT_FALSE(PlanSelect(in, &p, &why));
  in.topk = 2048;  // allowed but not large: the usual lists and splits
  ASSERT_TRUE(PlanSelect(in, &p, &why));
  EXPECT_EQ(p.list_cap, kSelectListCap);
  EXPECT_EQ(p.splits, 5);
}

TEST(SelectPlan, PerQueryKeyListsTakeOneQueryPerCta) {
  SelectPlanInput in = Prefill(300, 8192, 64);
  in.per_query_key_lists = true;
  SelectPlan p;
  ASSERT_TRUE(PlanSelect(in, &p, nullptr));
  EXPECT_EQ(p.rows_per_cta, 64);
  EXPECT_EQ(p.queries_per_cta, 1);
  EXPECT_EQ(p.groups_per_seq, 300);
  in.rows_per_query = 8;
  const char* why = nullptr;
  EXPECT_FALSE(PlanSelect(in, &p, &why));
  EXPECT_TRUE(why != nullptr && std::string(why).find("64") != std::string::npos);
}

TEST(CandidateKey, OrdersLikeTheCpuTopK) {
  // Score descending, ties by lower index, NaN last, -0 == +0.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  std::vector<float> s(500);
  for (auto& x : s) x = (rng() % 5 == 0) ? float(int(u(rng))) : u(rng);
  s[10] = -0.0f;
  s[11] = 0.0f;
  s[12] = std::numeric_limits<float>::quiet_NaN();
  s[13] = std::numeric_limits<float>::infinity();
  s[14] = -std::numeric_limits<float>::infinity();
  auto better = [&](int a, int b) {
    const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
    if (na != nb) return nb;
    if (!na && s[a] != s[b]) return s[a] > s[b];
    return a < b;
  };
  for (int a = 0; a < 500; ++a) {
    for (int b = 0; b < 500; ++b) {
      if (a == b) continue;
      const bool kb = CandidateKey(s[a], a) > CandidateKey(s[b], b);
      ASSERT_EQ(kb, better(a, b)) << a << " " << b << " " << s[a] << " " << s[b];
    }
    EXPECT_EQ(CandidateIndex(CandidateKey(s[a], a)), a);
    EXPECT_NE(CandidateKey(s[a], a), 0u);
  }
}

// The seeding rank: the expected count of keys above the seed (rank x
// stride) exceeds k by 4.5 sqrt(1.3 k stride); from k = 1024 on that is at
// least 4 standard deviations of the count (about sqrt(rank) x stride for keys
// in random order), the count stays within 1.47 k, and the rank fits in the
// union of the lanes' sample tops.
TEST(SelectPlan, SeedRankLeavesAMarginAboveK) {
  EXPECT_EQ(SelectSeedTopk(0), 0);
  EXPECT_EQ(SelectSeedTopk(2048), 187);
  EXPECT_LE(SelectSeedTopk(kSelectMaxTopk), kSelectSeedLanes * kSelectSeedLaneTop);
  int prev = 0;
  for (int k = 1; k <= 8192; ++k) {
    const int r = SelectSeedTopk(k);
    ASSERT_GE(r, prev) << k;
    prev = r;
    const double expected = double(r) * kSelectSampleStride;
    const double sd = std::sqrt(double(r)) * kSelectSampleStride;
    ASSERT_GE(expected - double(k), 4.5 * std::sqrt(1.3 * k * kSelectSampleStride) - 1e-9) << k;
    if (k >= 1024) {
      ASSERT_GE((expected - double(k)) / sd, 4.0) << k;
    }
    if (k >= 2048) {
      ASSERT_LE(expected, 1.47 * k) << k;
    }
  }
  EXPECT_EQ(SelectSeedMinKeys(2048), 8192);
  EXPECT_EQ(SelectSeedMinKeys(0), 4);
}

// The seed as the version-2 kernel forms it (select_kernel_v2.cuh), simulated
// on keys in random order: sampled key j (every kSelectSampleStride-th of the
// range) is row j % 128 of a stage, scored by lane slot (row / 16) * 8 + row % 8
// of the query's 64; each slot keeps its kSelectSeedLaneTop best scores, and
// the seed is the SelectSeedTopk(k)-th best of their union. It must never
// exceed the exact sample rank's score (so the list check is what decides
// exactness), every trial must leave at least k keys of the range at or above
// it (no rescan), and the mean count must stay near 1.46 k.
TEST(SelectPlan, SeedFromLaneTopsKeepsKKeysAboveIt) {
  const int k = 2048, r = SelectSeedTopk(k), P = kSelectSampleStride;
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int n : {8192, 30000, 60000, 124000}) {
    std::vector<double> v(static_cast<size_t>(n));
    double mean = 0.0;
    int least = n;
    const int trials = 60;
    for (int trial = 0; trial < trials; ++trial) {
      for (double& x : v) x = u(rng);
      std::vector<std::vector<double>> lane(kSelectSeedLanes);
      std::vector<double> sample;
      for (int j = 0; int64_t(j) * P < n; ++j) {
        const int row = j % 128;
        const double x = v[size_t(j) * P];
        lane[size_t((row / 16) * 8 + row % 8)].push_back(x);
        sample.push_back(x);
      }
      std::vector<double> uni;
      for (auto& l : lane) {
        std::sort(l.begin(), l.end(), std::greater<double>());
        for (size_t i = 0; i < l.size() && i < size_t(kSelectSeedLaneTop); ++i) uni.push_back(l[i]);
      }
      ASSERT_GE(uni.size(), size_t(r)) << n;
      std::sort(uni.begin(), uni.end(), std::greater<double>());
      std::sort(sample.begin(), sample.end(), std::greater<double>());
      const double seed = uni[size_t(r - 1)];
      ASSERT_LE(seed, sample[size_t(r - 1)]) << n;
      const int count = int(std::count_if(v.begin(), v.end(), [&](double x) { return x >= seed; }));
      least = std::min(least, count);
      mean += double(count) / trials;
    }
    EXPECT_GE(least, k) << n;
    EXPECT_LE(mean, 1.5 * k) << n;
    EXPECT_GE(mean, 1.4 * k) << n;
  }
}

}  // namespace
}  // namespace pd::kernels::cuda
