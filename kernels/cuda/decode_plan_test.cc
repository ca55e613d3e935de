// CPU tests of the decode selection path's plan (decode_plan.h).
#include "kernels/cuda/decode_plan.h"

#include <algorithm>
#include <random>

#include "kernels/testing/minitest.h"

namespace pd::kernels::cuda {
namespace {

DecodePlanInput In(int seqs, int64_t rows, int sms = 132) {
  DecodePlanInput in;
  in.num_seqs = seqs;
  in.max_rows = rows;
  in.num_sms = sms;
  return in;
}

TEST(DecodePlan, BatchOneSpreadsOverTheMachine) {
  DecodeSelectPlan p;
  ASSERT_TRUE(PlanDecodeSelect(In(1, 131072), &p, nullptr));
  EXPECT_TRUE(p.enabled);
  EXPECT_EQ(p.row_stride, 131072);
  EXPECT_GE(p.score_ctas, 132);
  EXPECT_LE(p.score_ctas, 132 * kDecodeScoreCtasPerSm);
  EXPECT_GE(p.topk_ctas, 32);
  EXPECT_EQ(p.topk_rows_per_cta, kDecodeMinTopkRows);
  EXPECT_EQ(p.cand_cap, 8192);
}

TEST(DecodePlan, LargeBatchFillsOneWave) {
  DecodeSelectPlan p;
  ASSERT_TRUE(PlanDecodeSelect(In(128, 131072), &p, nullptr));
  // Whole waves: the last wave of scoring CTAs at least 90% full.
  const int64_t slots = 132 * kDecodeScoreCtasPerSm, ctas = int64_t(p.score_ctas) * 128;
  const int64_t waves = (ctas + slots - 1) / slots;
  EXPECT_GE(ctas * 10, waves * slots * 9);
  EXPECT_LE(waves, 2);
  const int64_t tslots = 132 * kDecodeTopkCtasPerSm, tctas = int64_t(p.topk_ctas) * 128;
  EXPECT_LE((tctas + tslots - 1) / tslots, 2);
  EXPECT_GE(p.topk_ctas, 2);
}

TEST(DecodePlan, RangesCoverEveryRowAndLayoutIsAligned) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 3000; ++trial) {
    const int seqs = 1 + int(rng() % 300);
    const int64_t rows = (rng() % 5 == 0) ? int64_t(rng() % 70) : int64_t(rng() % 600000);
    const int sms = 1 + int(rng() % 160);
    DecodeSelectPlan p;
    ASSERT_TRUE(PlanDecodeSelect(In(seqs, rows, sms), &p, nullptr));
    EXPECT_EQ(p.row_stride % 64, 0);
    EXPECT_GE(p.row_stride, std::max<int64_t>(rows, 1));
    EXPECT_LT(p.row_stride, std::max<int64_t>(rows, 1) + 64);
    EXPECT_EQ(p.rows_per_cta % 64, 0);
    EXPECT_EQ(p.topk_rows_per_cta % 64, 0);
    // Scoring and top-k ranges tile [0, row_stride) with no empty CTA.
    EXPECT_GE(int64_t(p.score_ctas) * p.rows_per_cta, p.row_stride);
    EXPECT_LT(int64_t(p.score_ctas - 1) * p.rows_per_cta, p.row_stride);
    EXPECT_GE(int64_t(p.topk_ctas) * p.topk_rows_per_cta, p.row_stride);
    EXPECT_LT(int64_t(p.topk_ctas - 1) * p.topk_rows_per_cta, p.row_stride);
    EXPECT_GE(p.rows_per_cta, std::min<int64_t>(p.row_stride, 64 * kDecodeMinPagesPerCta));
    EXPECT_GE(p.cand_cap, kDecodeSmemCand);
    // Parts in order, 256-byte aligned, disjoint, inside the workspace.
    EXPECT_EQ(p.logits_offset, size_t(0));
    EXPECT_GE(p.cand_offset, size_t(seqs) * size_t(p.row_stride) * 4);
    EXPECT_GE(p.hist_offset, p.cand_offset + size_t(seqs) * size_t(p.cand_cap) * 4);
    EXPECT_EQ(p.counters_offset, p.hist_offset + size_t(seqs) * kDecodeBins * 4);
    EXPECT_EQ(p.zero_bytes, size_t(seqs) * (kDecodeBins + kDecodeCounters) * 4);
    EXPECT_GE(p.workspace_bytes, p.hist_offset + p.zero_bytes);
    EXPECT_EQ(p.cand_offset % 256, size_t(0));
    EXPECT_EQ(p.hist_offset % 256, size_t(0));
    EXPECT_EQ(p.counters_offset % 16, size_t(0));
  }
}

TEST(DecodePlan, RejectsBadInput) {
  DecodeSelectPlan p;
  const char* why = nullptr;
  EXPECT_FALSE(PlanDecodeSelect(In(0, 100), &p, &why));
  EXPECT_TRUE(why != nullptr);
  EXPECT_FALSE(PlanDecodeSelect(In(70000, 100), &p, nullptr));
  EXPECT_FALSE(PlanDecodeSelect(In(1, -1), &p, nullptr));
  EXPECT_FALSE(PlanDecodeSelect(In(1, int64_t(1) << 31), &p, nullptr));
  EXPECT_FALSE(p.enabled);
}

}  // namespace
}  // namespace pd::kernels::cuda
