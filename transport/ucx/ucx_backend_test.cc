// KV streams over the real UCX backend, in one process with two ucp contexts
// (sender and receiver), over TCP and over shared memory (UCX_TLS).
#include "transport/ucx/ucx_backend.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "transport/fault_injection.h"
#include "transport/kv_stream.h"
#include "transport/resource_counters.h"
#include "transport/testing/kv_test_util.h"

namespace pd::transport {
namespace {

constexpr int kLayers = 3;
constexpr int64_t kTokens = 3000;
const char kFingerprint[] = "feedfacecafebeef";

struct Stream {
  absl::StatusOr<std::unique_ptr<KvSender>> sender = absl::UnknownError("unset");
  absl::StatusOr<std::unique_ptr<KvReceiver>> receiver = absl::UnknownError("unset");
  ControlChannel* sender_channel = nullptr;
  ControlChannel* receiver_channel = nullptr;
};

Stream StartStream(Backend& tx, Backend& rx, const kvcache::KvCache& src, int32_t seq,
                   kvcache::KvCache& dst, SenderOptions so, ReceiverOptions ro) {
  Stream out;
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  EXPECT_TRUE(listener.ok());
  std::thread t([&] {
    auto ch = (*listener)->Accept(absl::Now() + absl::Seconds(10));
    if (!ch.ok()) {
      out.receiver = ch.status();
      return;
    }
    out.receiver_channel = ch->get();
    out.receiver = KvReceiver::Accept(rx, std::move(*ch), dst, ro);
  });
  auto ch = ControlChannel::Connect("127.0.0.1", (*listener)->port(), absl::Now() + absl::Seconds(10));
  EXPECT_TRUE(ch.ok());
  out.sender_channel = ch->get();
  out.sender = KvSender::Start(tx, std::move(*ch), src, {"ucx-req", kFingerprint, seq, kTokens}, so);
  t.join();
  return out;
}

// Per-request resources (staging, streams, quarantines) must be back to their
// baseline after every stream; the arena registration is per backend, and
// the sender backend keeps `cached_endpoints` endpoints and `cached_keys`
// remote keys (of cache arenas) for later streams to the same receiver.
void ExpectRequestResourcesReleased(const ResourceSnapshot& base, int cached_endpoints = 0,
                                    int cached_keys = 0) {
  ResourceSnapshot now = GetResourceCounters();
  for (Resource r : {Resource::kPinnedBuffer, Resource::kStream, Resource::kQuarantine}) {
    EXPECT_EQ(now[r], base[r]) << ResourceName(r) << "; now " << now.ToString();
  }
  EXPECT_EQ(now[Resource::kEndpoint], base[Resource::kEndpoint] + cached_endpoints) << now.ToString();
  EXPECT_EQ(now[Resource::kRemoteKey], base[Resource::kRemoteKey] + cached_keys) << now.ToString();
  EXPECT_EQ(now.pinned_bytes, base.pinned_bytes);
}

class UcxStreamTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    setenv("UCX_TLS", GetParam(), 1);
    baseline_ = GetResourceCounters();
    src_ = *testing::MakeCache(testing::V32Layout(1024), kLayers, kTokens);
    dst_ = *testing::MakeCache(testing::V32Layout(1024), kLayers, kTokens);
    seq_ = *testing::MakeFilledSequence(*src_, kTokens, 7);
    auto tx = NewUcxBackend();
    ASSERT_TRUE(tx.ok()) << tx.status();
    auto rx = NewUcxBackend();
    ASSERT_TRUE(rx.ok()) << rx.status();
    tx_ = std::move(*tx);
    rx_ = std::move(*rx);
    so_.max_chunk_bytes = 256 << 10;
    ro_.model_fingerprint = kFingerprint;
    ro_.quarantine_grace = absl::Milliseconds(300);
  }
  void TearDown() override {
    tx_.reset();
    rx_.reset();
    EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
    unsetenv("UCX_TLS");
  }

  ResourceSnapshot baseline_;
  std::unique_ptr<kvcache::KvCache> src_, dst_;
  int32_t seq_ = -1;
  std::unique_ptr<Backend> tx_, rx_;
  SenderOptions so_;
  ReceiverOptions ro_;
};

TEST_P(UcxStreamTest, RoundTripIsByteExactAndRegistersOnce) {
  for (int round = 0; round < 2; ++round) {
    {
      Stream st = StartStream(*tx_, *rx_, *src_, seq_, *dst_, so_, ro_);
      ASSERT_TRUE(st.sender.ok()) << st.sender.status();
      ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
      for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
      absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(20));
      ASSERT_TRUE(fin.ok()) << fin;
      ASSERT_TRUE((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(20)).ok());
      absl::Status cmp = testing::CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens);
      EXPECT_TRUE(cmp.ok()) << cmp;
      ASSERT_TRUE(dst_->Release((*st.receiver)->sequence()).ok());
    }
    // One endpoint and the arena's key stay cached: the second round reuses them.
    ExpectRequestResourcesReleased(baseline_, 1, 1);
    // The receiver's arena was registered once, and stays registered.
    EXPECT_EQ(GetResourceCounters()[Resource::kRegisteredRegion],
              baseline_[Resource::kRegisteredRegion] + 1);
  }
}

TEST_P(UcxStreamTest, StagedRoundTrip) {
  so_.staged = true;
  ro_.staging_slots = 3;
  {
    Stream st = StartStream(*tx_, *rx_, *src_, seq_, *dst_, so_, ro_);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
    ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(20)).ok());
    absl::Status cmp = testing::CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens);
    EXPECT_TRUE(cmp.ok()) << cmp;
  }
  // The endpoint stays cached; the per-stream ring's key does not.
  ExpectRequestResourcesReleased(baseline_, 1, 0);
  // The per-stream ring registration ended with the stream.
  EXPECT_EQ(GetResourceCounters()[Resource::kRegisteredRegion], baseline_[Resource::kRegisteredRegion]);
}

// Staging rings come from UCX itself: over shared memory the sender maps the
// receiver's ring and stores into it directly (a staged device stream copies
// device-to-host straight into the slot); over TCP it cannot, and puts do.
TEST_P(UcxStreamTest, StagingRingIsMappedIntoSendersOnSharedMemory) {
  const bool shm = std::string(GetParam()) == "posix";
  {
    auto ring = rx_->AllocateStagingRing(1 << 20);
    ASSERT_TRUE(ring.ok()) << ring.status();
    EXPECT_EQ(GetResourceCounters()[Resource::kPinnedBuffer], baseline_[Resource::kPinnedBuffer] + 1);
    EXPECT_EQ(GetResourceCounters()[Resource::kRegisteredRegion], baseline_[Resource::kRegisteredRegion] + 1);
    EXPECT_TRUE(std::all_of((*ring)->data(), (*ring)->data() + (*ring)->size(), [](uint8_t b) { return b == 0; }));
    PeerContext peer{"ring-1", "decode", "prefill"};
    auto recv = rx_->Listen({(*ring)->data(), (*ring)->size(), false, false}, "", peer,
                            absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(recv.ok()) << recv.status();
    // Listen reused the ring's registration.
    EXPECT_EQ(GetResourceCounters()[Resource::kRegisteredRegion], baseline_[Resource::kRegisteredRegion] + 1);
    auto send = tx_->Connect({}, (*recv)->info(), peer, absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(send.ok()) << send.status();
    std::vector<uint8_t> pattern(4096);
    for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = uint8_t(i * 7 + 1);
    uint8_t* mapped = (*send)->mapped_destination();
    EXPECT_EQ(mapped != nullptr, shm);
    if (mapped != nullptr) {
      std::memcpy(mapped + 8192, pattern.data(), pattern.size());
    } else {
      ASSERT_TRUE((*send)->PostWrite(pattern.data(), 8192, pattern.size()).ok());
    }
    auto fence = (*send)->PostFence();
    ASSERT_TRUE(fence.ok());
    const absl::Time until = absl::Now() + absl::Seconds(5);
    while (true) {
      auto done = (*send)->PollFence(*fence);
      ASSERT_TRUE(done.ok()) << done.status();
      if (*done || absl::Now() > until) break;
      (*recv)->Progress();
    }
    // Emulated puts land when the receiver's worker progresses.
    while (!std::equal(pattern.begin(), pattern.end(), (*ring)->data() + 8192) && absl::Now() < until) {
      (*recv)->Progress();
    }
    EXPECT_TRUE(std::equal(pattern.begin(), pattern.end(), (*ring)->data() + 8192));
  }
  // The ring, its registration and the mapping went with their owners.
  ExpectRequestResourcesReleased(baseline_, 1, 0);
  EXPECT_EQ(GetResourceCounters()[Resource::kRegisteredRegion], baseline_[Resource::kRegisteredRegion]);
}

TEST_P(UcxStreamTest, CorruptionOverUcxIsResent) {
  FaultPolicy policy;
  policy.corrupt_writes = {0, 5};
  FaultInjectingBackend faulty(*tx_, policy);
  {
    Stream st = StartStream(faulty, *rx_, *src_, seq_, *dst_, so_, ro_);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
    ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(20)).ok());
    EXPECT_EQ((*st.sender)->stats().resends, 2u);
    EXPECT_TRUE(testing::CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens).ok());
  }
  ExpectRequestResourcesReleased(baseline_, 1, 1);
}

// Without the peer cache every stream creates and releases its own endpoint
// and key; a failed stream's cached peer is never reused (ReceiverVanishes...
// ends with nothing cached).
TEST_P(UcxStreamTest, WithoutPeerCacheEveryStreamReleasesItsEndpoint) {
  UcxOptions o;
  o.max_cached_peers = 0;
  auto tx = NewUcxBackend(o);
  ASSERT_TRUE(tx.ok()) << tx.status();
  {
    Stream st = StartStream(**tx, *rx_, *src_, seq_, *dst_, so_, ro_);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
    ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(20)).ok());
    EXPECT_TRUE(testing::CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens).ok());
  }
  ExpectRequestResourcesReleased(baseline_);
}

TEST_P(UcxStreamTest, ReceiverVanishesSenderReportsUnavailable) {
  FaultPolicy policy;
  policy.fence_delay = absl::Milliseconds(30);
  FaultInjectingBackend slow(*tx_, policy);
  int64_t free_before = dst_->free_pages();
  {
    Stream st = StartStream(slow, *rx_, *src_, seq_, *dst_, so_, ro_);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
    absl::Time t0 = absl::Now();
    st.receiver_channel->Sever();
    absl::Status fin = (*st.sender)->Finish(t0 + absl::Seconds(5));
    EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
    EXPECT_EQ(fin.code(), absl::StatusCode::kUnavailable) << fin;
    EXPECT_EQ((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5)).code(),
              absl::StatusCode::kUnavailable);
    ASSERT_TRUE((*st.receiver)->WaitReleased(absl::Now() + absl::Seconds(5)).ok());
    EXPECT_EQ(dst_->free_pages(), free_before);
  }
  ExpectRequestResourcesReleased(baseline_);
}

// The page-reuse hazard on a real one-sided data plane. The receiver's arena
// stays registered across streams, so a put still in flight when its stream
// failed lands wherever it was addressed. The sender dies with writes in
// flight (write_latency); the next sequence that gets the failed stream's
// pages must not see any of them. With `grace` zero the pages come back at
// once and the late puts do overwrite the new sequence (the control case).
class UcxQuarantineTest : public UcxStreamTest {
 protected:
  // Streams until the sender dies with puts in flight, waits for the receiver
  // to hand the pages back, gives them to a new sequence filled with known
  // bytes, lets every in-flight put land, and returns the comparison of that
  // sequence with its known bytes. `*late` counts puts that landed after the
  // sender died.
  absl::Status ReuseAfterDeadSender(absl::Duration grace, int64_t* late) {
    ControlChannel* sender_channel = nullptr;
    FaultPolicy policy;
    policy.write_latency = absl::Milliseconds(300);
    policy.disconnect_after_writes = 8;
    policy.on_disconnect = [&] { sender_channel->Sever(); };
    ro_.quarantine_grace = grace;
    FaultInjectingBackend faulty(*tx_, policy);
    auto ref = *testing::MakeCache(testing::V32Layout(1024), kLayers, kTokens, 1);
    const int32_t ref_seq = *testing::MakeFilledSequence(*ref, kTokens, 77);
    const std::vector<int32_t> free_before_pages = [&] {
      // The pages the stream will get (the allocator hands out the same ones again after Release).
      auto probe = dst_->CreateSequence();
      EXPECT_TRUE(probe.ok());
      EXPECT_TRUE(dst_->Reserve(*probe, kTokens).ok());
      std::vector<int32_t> p = dst_->PageTable(*probe);
      EXPECT_TRUE(dst_->Release(*probe).ok());
      return p;
    }();
    absl::Status result;
    {
      Stream st = StartStream(faulty, *rx_, *src_, seq_, *dst_, so_, ro_);
      if (!st.sender.ok() || !st.receiver.ok()) return absl::InternalError("the stream did not start");
      sender_channel = st.sender_channel;
      EXPECT_EQ(dst_->PageTable((*st.receiver)->sequence()), free_before_pages);
      for (int l = 0; l < kLayers; ++l) (*st.sender)->SendLayer(l).IgnoreError();
      EXPECT_EQ((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5)).code(),
                absl::StatusCode::kUnavailable);
      EXPECT_GT(faulty.writes_in_flight(), 0);
      EXPECT_TRUE((*st.receiver)->WaitReleased(absl::Now() + absl::Seconds(5)).ok());
      // The pages are free again: the next sequence gets exactly them.
      auto reused = testing::MakeFilledSequence(*dst_, kTokens, 77);
      if (!reused.ok()) return reused.status();
      EXPECT_EQ(dst_->PageTable(*reused), free_before_pages);
      EXPECT_TRUE(faulty.DrainWrites(absl::Now() + absl::Seconds(5)));
      (*st.sender)->Finish(absl::Now() + absl::Seconds(5)).IgnoreError();
      st.sender->reset();
      absl::SleepFor(absl::Milliseconds(100));  // the last puts' bytes reach memory
      result = testing::CompareSequences(*ref, ref_seq, *dst_, *reused, kTokens);
      EXPECT_TRUE(dst_->Release(*reused).ok());
    }
    *late = faulty.late_writes();
    return result;
  }
};

TEST_P(UcxQuarantineTest, LatePutsNeverLandInReusedPages) {
  int64_t late = 0;
  absl::Status st = ReuseAfterDeadSender(absl::Milliseconds(800), &late);
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_GT(late, 0) << "no put landed after the sender died: the test proved nothing";
  ExpectRequestResourcesReleased(baseline_);
}

TEST_P(UcxQuarantineTest, WithoutQuarantineLatePutsCorruptReusedPages) {
  int64_t late = 0;
  absl::Status st = ReuseAfterDeadSender(absl::ZeroDuration(), &late);
  EXPECT_EQ(st.code(), absl::StatusCode::kDataLoss) << st;
  EXPECT_GT(late, 0);
  ExpectRequestResourcesReleased(baseline_);
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxQuarantineTest, ::testing::Values("tcp", "posix"),
                         [](const auto& info) { return std::string(info.param); });

INSTANTIATE_TEST_SUITE_P(Transports, UcxStreamTest, ::testing::Values("tcp", "posix"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace pd::transport
