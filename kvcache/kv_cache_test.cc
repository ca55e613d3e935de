#include "kvcache/kv_cache.h"

#include <gtest/gtest.h>

#include <cstring>

#include <set>

namespace pd::kvcache {
namespace {

KvCacheOptions SmallOptions() {
  KvCacheOptions o;
  o.layout.kv_lora_rank = 128;
  o.layout.rope_dim = 32;
  o.layout.index_head_dim = 64;
  o.layout.summary_block = 256;
  o.num_layers = 3;
  o.num_pages = 10;
  o.max_sequences = 2;
  o.max_tokens_per_sequence = 1000;
  return o;
}

TEST(KvCacheTest, PagesAreExclusiveAndReturned) {
  auto cache = KvCache::Create(SmallOptions());
  ASSERT_TRUE(cache.ok()) << cache.status();
  KvCache& c = **cache;
  auto a = c.CreateSequence(), b = c.CreateSequence();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(c.CreateSequence().status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(c.Reserve(*a, 130).ok());  // 3 pages
  ASSERT_TRUE(c.Reserve(*b, 64 * 7).ok());  // 7 pages
  EXPECT_EQ(c.free_pages(), 0);
  EXPECT_EQ(c.Reserve(*a, 200).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(c.Capacity(*a), 192);  // unchanged by the failed reserve
  std::set<int32_t> all;
  for (int32_t p : c.PageTable(*a)) all.insert(p);
  for (int32_t p : c.PageTable(*b)) all.insert(p);
  EXPECT_EQ(all.size(), 10u);
  ASSERT_TRUE(c.Release(*b).ok());
  EXPECT_EQ(c.free_pages(), 7);
  EXPECT_EQ(c.Release(*b).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(c.Reserve(*a, 1001).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(c.SetLength(*a, 193).code(), absl::StatusCode::kOutOfRange);
  ASSERT_TRUE(c.SetLength(*a, 150).ok());
  EXPECT_EQ(c.Length(*a), 150);
}

TEST(KvCacheTest, PoolsDoNotOverlap) {
  auto o = SmallOptions();
  auto cache = KvCache::Create(o);
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  const KvLayout& l = c.layout();
  for (int layer = 0; layer < o.num_layers; ++layer) {
    uint8_t* mla_end = c.MlaPool(layer) + o.num_pages * l.MlaPageBytes();
    EXPECT_LE(mla_end, c.IndexPool(layer));
    uint8_t* idx_end = c.IndexPool(layer) + o.num_pages * l.IndexPageBytes();
    EXPECT_LE(idx_end, reinterpret_cast<uint8_t*>(c.Summaries(layer, 0)));
    uint8_t* summ_end = reinterpret_cast<uint8_t*>(c.Summaries(layer, o.max_sequences - 1)) +
                        c.max_blocks_per_sequence() * l.SummaryBytes();
    uint8_t* next = layer + 1 < o.num_layers ? c.MlaPool(layer + 1) : c.arena() + c.arena_bytes();
    EXPECT_LE(summ_end, next);
  }
  // Every byte is writable.
  std::memset(c.arena(), 0xab, c.arena_bytes());
}

TEST(KvCacheTest, ScopedSequenceReleasesOnDestruction) {
  auto cache = KvCache::Create(SmallOptions());
  ASSERT_TRUE(cache.ok());
  KvCache& c = **cache;
  {
    auto a = ScopedSequence::Create(&c, 200);
    ASSERT_TRUE(a.ok()) << a.status();
    EXPECT_EQ(c.free_pages(), 6);
    ScopedSequence moved = std::move(*a);
    EXPECT_EQ(c.live_sequences(), 1);
    EXPECT_EQ(c.Capacity(moved.id()), 256);
    // Too large: the sequence it created is released again.
    EXPECT_EQ(ScopedSequence::Create(&c, 64 * 7).status().code(), absl::StatusCode::kResourceExhausted);
    EXPECT_EQ(c.live_sequences(), 1);
  }
  EXPECT_EQ(c.live_sequences(), 0);
  EXPECT_EQ(c.free_pages(), 10);
}

TEST(KvCacheTest, RejectsBadOptions) {
  auto o = SmallOptions();
  o.layout.kv_lora_rank = 100;
  EXPECT_EQ(KvCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = SmallOptions();
  o.num_pages = 0;
  EXPECT_EQ(KvCache::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pd::kvcache
