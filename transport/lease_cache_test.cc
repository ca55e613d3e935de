#include "transport/lease_cache.h"

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

namespace pd::transport {
namespace {

// Records its destruction.
struct Handle {
  Handle(int id, std::vector<int>* destroyed) : id(id), destroyed(destroyed) {}
  ~Handle() { destroyed->push_back(id); }
  int id;
  std::vector<int>* destroyed;
};

class LeaseCacheTest : public ::testing::Test {
 protected:
  std::unique_ptr<Handle> Make(int id) { return std::make_unique<Handle>(id, &destroyed_); }
  std::vector<int> destroyed_;
};

TEST_F(LeaseCacheTest, IdleEntriesAreReusedPerPeerAndByKey) {
  LeaseCache<Handle> c(4);
  auto a = c.Insert(1, "decode-a", Make(1));
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->value->id, 1);
  EXPECT_FALSE(c.AcquireIdle("decode-a").has_value());  // leased
  EXPECT_FALSE(c.AcquireKey(1).has_value());
  c.Release(1, /*reusable=*/true);
  EXPECT_FALSE(c.AcquireIdle("decode-b").has_value());  // another peer
  auto again = c.AcquireIdle("decode-a");
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->key, 1u);
  EXPECT_EQ(again->value, a->value);
  c.Release(1, true);
  auto by_key = c.AcquireKey(1);
  ASSERT_TRUE(by_key.has_value());
  EXPECT_EQ(by_key->value->id, 1);
  EXPECT_FALSE(c.AcquireKey(2).has_value());
  EXPECT_TRUE(destroyed_.empty());
  EXPECT_EQ(c.Insert(1, "decode-c", Make(9)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(LeaseCacheTest, FullCacheEvictsLeastRecentlyUsedIdleEntry) {
  LeaseCache<Handle> c(3);
  for (int i = 1; i <= 3; ++i) {
    ASSERT_TRUE(c.Insert(uint64_t(i), absl::StrCat("p", i), Make(i)).ok());
  }
  // Use order (oldest first): 1, 3, 2. Entry 1 is then the least recently used.
  for (int i : {1, 3, 2}) c.Release(uint64_t(i), true);
  ASSERT_TRUE(c.Insert(4, "p4", Make(4)).ok());
  EXPECT_EQ(destroyed_, std::vector<int>({1}));
  EXPECT_EQ(c.size(), 3u);
  // Re-leasing 3 makes it recent: the next victim is 2.
  ASSERT_TRUE(c.AcquireKey(3).has_value());
  c.Release(3, true);
  c.Release(4, true);  // 4 most recent now; order: 4, 3, 2
  ASSERT_TRUE(c.Insert(5, "p5", Make(5)).ok());
  EXPECT_EQ(destroyed_, std::vector<int>({1, 2}));
}

TEST_F(LeaseCacheTest, LeasedEntriesAreNeverEvicted) {
  LeaseCache<Handle> c(2);
  ASSERT_TRUE(c.Insert(1, "a", Make(1)).ok());
  ASSERT_TRUE(c.Insert(2, "b", Make(2)).ok());
  EXPECT_FALSE(c.HasRoom());
  auto full = c.Insert(3, "c", Make(3));
  EXPECT_EQ(full.status().code(), absl::StatusCode::kResourceExhausted) << full.status();
  EXPECT_EQ(destroyed_, std::vector<int>({3}));  // the rejected value, nothing else
  c.Release(2, true);
  EXPECT_TRUE(c.HasRoom());
  ASSERT_TRUE(c.Insert(3, "c", Make(4)).ok());
  EXPECT_EQ(destroyed_, std::vector<int>({3, 2}));
}

TEST_F(LeaseCacheTest, BrokenEntriesAreDestroyedOnRelease) {
  LeaseCache<Handle> c(2);
  ASSERT_TRUE(c.Insert(7, "a", Make(7)).ok());
  c.Release(7, /*reusable=*/false);
  EXPECT_EQ(destroyed_, std::vector<int>({7}));
  EXPECT_EQ(c.size(), 0u);
  EXPECT_FALSE(c.AcquireIdle("a").has_value());
  c.Release(7, true);  // unknown now: ignored
}

TEST_F(LeaseCacheTest, ConcurrentLeasesOfOnePeerNeverShareAnEntry) {
  LeaseCache<Handle> c(8);
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(c.Insert(uint64_t(i + 1), "peer", Make(i)).ok());
    c.Release(uint64_t(i + 1), true);
  }
  std::atomic<int> in_use[4] = {};
  std::atomic<bool> overlap{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int k = 0; k < 2000; ++k) {
        auto l = c.AcquireIdle("peer");
        if (!l) continue;
        if (in_use[l->value->id]++ != 0) overlap = true;
        in_use[l->value->id]--;
        c.Release(l->key, true);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(overlap.load());
  EXPECT_EQ(c.idle(), 4u);
}

TEST_F(LeaseCacheTest, ClearDestroysEverything) {
  {
    LeaseCache<Handle> c(2);
    ASSERT_TRUE(c.Insert(1, "a", Make(1)).ok());
    c.Release(1, true);
  }
  EXPECT_EQ(destroyed_, std::vector<int>({1}));
}

}  // namespace
}  // namespace pd::transport
