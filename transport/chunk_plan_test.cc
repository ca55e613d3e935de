#include "transport/chunk_plan.h"

#include <gtest/gtest.h>

#include <map>
#include <set>

namespace pd::transport {
namespace {

using proto::ObjectKind;

kernels::KvLayout Layout() {
  kernels::KvLayout l;
  l.summary_block = 256;
  return l;
}

SideLayout Side(std::vector<int32_t> pages, uint32_t layers, uint64_t base) {
  SideLayout s;
  s.pages = std::move(pages);
  for (uint32_t l = 0; l < layers; ++l) {
    s.mla.push_back(base + l * 10'000'000);
    s.index.push_back(base + l * 10'000'000 + 5'000'000);
    s.summary.push_back(base + l * 10'000'000 + 9'000'000);
  }
  return s;
}

// Every byte of every object is planned exactly once, in the documented order,
// at the offsets the layout gives (recomputed here page by page).
TEST(ChunkPlanTest, CoversEveryObjectOnceInOrder) {
  const kernels::KvLayout l = Layout();
  const uint32_t layers = 3;
  const uint64_t tokens = 1000;  // 16 pages (last partial), 4 summary blocks (last partial)
  std::vector<int32_t> src_pages, dst_pages;
  for (int i = 0; i < 16; ++i) {
    src_pages.push_back(i);
    dst_pages.push_back(i < 8 ? 100 + i : 300 - i);  // a run, then descending pages
  }
  SideLayout src = Side(src_pages, layers, 0), dst = Side(dst_pages, layers, 1ull << 32);
  PlanParams p{l, layers, tokens, 5 * l.MlaPageBytes()};
  auto plan = MakeChunkPlan(p, src, dst);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->layer_first.size(), layers + 1);
  uint64_t total = 0;
  for (uint32_t layer = 0; layer < layers; ++layer) {
    std::map<ObjectKind, std::set<uint64_t>> seen;  // dst offsets of pages / blocks
    ObjectKind last = ObjectKind::kSummary;
    int phase = 0;  // 0 summaries, 1 keys, 2 latents
    for (uint32_t id = plan->layer_first[layer]; id < plan->layer_first[layer + 1]; ++id) {
      const PlannedChunk& c = plan->chunks[id];
      EXPECT_EQ(c.id, id);
      EXPECT_EQ(c.layer, layer);
      EXPECT_LE(c.bytes, p.max_chunk_bytes);
      int ph = c.kind == ObjectKind::kSummary ? 0 : c.kind == ObjectKind::kIndexKey ? 1 : 2;
      EXPECT_GE(ph, phase) << "order: summaries, keys, latents";
      phase = ph;
      last = c.kind;
      uint64_t seg_bytes = 0;
      std::vector<uint64_t> dsts, srcs;
      for (const Segment& s : c.segments) {
        seg_bytes += s.len;
        uint64_t unit = c.kind == ObjectKind::kSummary ? l.SummaryBytes()
                        : c.kind == ObjectKind::kIndexKey ? l.IndexPageBytes()
                                                          : l.MlaPageBytes();
        ASSERT_EQ(s.len % unit, 0u);
        for (uint64_t o = 0; o < s.len; o += unit) {
          dsts.push_back(s.dst + o);
          srcs.push_back(s.src + o);
        }
      }
      EXPECT_EQ(seg_bytes, c.bytes);
      ASSERT_EQ(dsts.size(), c.count);
      for (uint32_t i = 0; i < c.count; ++i) {
        uint64_t want_dst, want_src;
        if (c.kind == ObjectKind::kSummary) {
          want_dst = dst.summary[layer] + (c.first + i) * l.SummaryBytes();
          want_src = src.summary[layer] + (c.first + i) * l.SummaryBytes();
        } else {
          bool keys = c.kind == ObjectKind::kIndexKey;
          uint64_t pb = keys ? l.IndexPageBytes() : l.MlaPageBytes();
          want_dst = (keys ? dst.index : dst.mla)[layer] + uint64_t(dst_pages[c.first + i]) * pb;
          want_src = (keys ? src.index : src.mla)[layer] + uint64_t(src_pages[c.first + i]) * pb;
        }
        EXPECT_EQ(dsts[i], want_dst) << "chunk " << id << " unit " << i;
        EXPECT_EQ(srcs[i], want_src) << "chunk " << id << " unit " << i;
        EXPECT_TRUE(seen[c.kind].insert(dsts[i]).second) << "unit planned twice";
      }
      total += c.bytes;
    }
    EXPECT_EQ(last, ObjectKind::kMlaLatent);
    EXPECT_EQ(seen[ObjectKind::kSummary].size(), 4u);
    EXPECT_EQ(seen[ObjectKind::kIndexKey].size(), 16u);
    EXPECT_EQ(seen[ObjectKind::kMlaLatent].size(), 16u);
  }
  EXPECT_EQ(total, plan->total_bytes);
  EXPECT_EQ(total, layers * (16 * (l.MlaPageBytes() + l.IndexPageBytes()) + 4 * l.SummaryBytes()));
  // Token ranges: the last page and block are partial.
  const PlannedChunk& last_mla = plan->chunks[plan->layer_first[1] - 1];
  EXPECT_EQ(last_mla.token_end, tokens);
  EXPECT_EQ(plan->chunks[0].token_end, tokens);  // one summary chunk covers all 4 blocks
}

TEST(ChunkPlanTest, ContiguousPagesCoalesce) {
  const kernels::KvLayout l = Layout();
  std::vector<int32_t> pages;
  for (int i = 0; i < 32; ++i) pages.push_back(i);
  auto plan = MakeChunkPlan({l, 1, 32 * 64, 64ull << 20}, Side(pages, 1, 0), Side(pages, 1, 0));
  ASSERT_TRUE(plan.ok());
  ASSERT_EQ(plan->chunks.size(), 3u);  // summaries, keys, latents
  for (const auto& c : plan->chunks) EXPECT_EQ(c.segments.size(), 1u);
  // Receiver of a one-sided stream: sender pages unknown, segments follow dst only.
  SideLayout unknown;
  auto recv_plan = MakeChunkPlan({l, 1, 32 * 64, 64ull << 20}, unknown, Side(pages, 1, 0));
  ASSERT_TRUE(recv_plan.ok()) << recv_plan.status();
  EXPECT_EQ(recv_plan->total_bytes, plan->total_bytes);
}

TEST(ChunkPlanTest, BadInputsAreNamed) {
  const kernels::KvLayout l = Layout();
  std::vector<int32_t> pages(4, 0);
  for (int i = 0; i < 4; ++i) pages[i] = i;
  auto short_table = MakeChunkPlan({l, 1, 5 * 64, 1 << 20}, Side(pages, 1, 0), Side(pages, 1, 0));
  ASSERT_FALSE(short_table.ok());
  EXPECT_NE(short_table.status().message().find("page table"), std::string::npos);
  std::vector<int32_t> neg = pages;
  neg[2] = -1;
  auto negative = MakeChunkPlan({l, 1, 4 * 64, 1 << 20}, Side(pages, 1, 0), Side(neg, 1, 0));
  ASSERT_FALSE(negative.ok());
  EXPECT_NE(negative.status().message().find("negative"), std::string::npos);
  auto tiny = MakeChunkPlan({l, 1, 4 * 64, 1000}, Side(pages, 1, 0), Side(pages, 1, 0));
  ASSERT_FALSE(tiny.ok());
  EXPECT_NE(tiny.status().message().find("max_chunk_bytes"), std::string::npos);
  auto layers = MakeChunkPlan({l, 2, 4 * 64, 1 << 20}, Side(pages, 1, 0), Side(pages, 2, 0));
  ASSERT_FALSE(layers.ok());
  EXPECT_NE(layers.status().message().find("layers"), std::string::npos);
}

TEST(ChunkPlanTest, WireLayoutsMatchV32Sizes) {
  auto w = WireLayouts(kernels::KvLayout{});
  ASSERT_EQ(w.size(), 3u);
  EXPECT_EQ(w[0].unit_bytes, 656u);
  EXPECT_EQ(w[0].page_bytes, 64u * 656);
  EXPECT_EQ(w[1].unit_bytes, 132u);
  EXPECT_EQ(w[1].page_bytes, 64u * 132);
  EXPECT_EQ(w[2].unit_bytes, 512u);
  EXPECT_EQ(w[2].unit_tokens, 1024u);
}

}  // namespace
}  // namespace pd::transport
