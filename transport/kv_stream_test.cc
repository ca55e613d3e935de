#include "transport/kv_stream.h"

#include <gtest/gtest.h>

#include <functional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "transport/fault_injection.h"
#include "transport/loopback_backend.h"
#include "transport/memory_ops.h"
#include "transport/resource_counters.h"
#include "transport/testing/kv_test_util.h"

namespace pd::transport {
namespace {

using testing::CompareLayer;
using testing::CompareSequences;
using testing::MakeCache;
using testing::MakeFilledSequence;
using testing::V32Layout;

constexpr int kLayers = 4;
constexpr int64_t kTokens = 1000;  // 16 pages (last partial), 4 summary blocks of 256
const char kFingerprint[] = "a1b2c3d4e5f60718";

struct Stream {
  absl::StatusOr<std::unique_ptr<KvSender>> sender = absl::UnknownError("unset");
  absl::StatusOr<std::unique_ptr<KvReceiver>> receiver = absl::UnknownError("unset");
  ControlChannel* sender_channel = nullptr;
  ControlChannel* receiver_channel = nullptr;
};

struct StreamSetup {
  SenderOptions sender;
  ReceiverOptions receiver;
  std::string sender_fingerprint = kFingerprint;
  StreamSetup() {
    sender.max_chunk_bytes = 4 * 64 * 656;  // 4 MLA pages: several chunks per object
    receiver.model_fingerprint = kFingerprint;
    receiver.progress_timeout = absl::Seconds(5);
    sender.progress_timeout = absl::Seconds(5);
    // Loopback writes are synchronous: nothing is in flight once a sender is gone.
    receiver.quarantine_grace = absl::Milliseconds(100);
  }
};

Stream StartStream(Backend& send_backend, Backend& recv_backend, const kvcache::KvCache& src,
                   int32_t seq, kvcache::KvCache& dst, const StreamSetup& s, int64_t tokens = kTokens) {
  Stream out;
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  EXPECT_TRUE(listener.ok()) << listener.status();
  std::thread t([&] {
    auto ch = (*listener)->Accept(absl::Now() + absl::Seconds(5));
    if (!ch.ok()) {
      out.receiver = ch.status();
      return;
    }
    out.receiver_channel = ch->get();
    out.receiver = KvReceiver::Accept(recv_backend, std::move(*ch), dst, s.receiver);
  });
  auto ch = ControlChannel::Connect("127.0.0.1", (*listener)->port(), absl::Now() + absl::Seconds(5));
  EXPECT_TRUE(ch.ok()) << ch.status();
  out.sender_channel = ch->get();
  out.sender = KvSender::Start(send_backend, std::move(*ch), src,
                               {"req-1", s.sender_fingerprint, seq, tokens}, s.sender);
  t.join();
  return out;
}

absl::Status SendAll(KvSender& s, int layers = kLayers) {
  for (int l = 0; l < layers; ++l) {
    absl::Status st = s.SendLayer(l);
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

class KvStreamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    baseline_ = GetResourceCounters();
    src_ = *MakeCache(V32Layout(256), kLayers, kTokens);
    dst_ = *MakeCache(V32Layout(256), kLayers, kTokens);
    // Take a receiver page first so the receiver's page ids differ from the sender's.
    auto other = dst_->CreateSequence();
    ASSERT_TRUE(other.ok());
    ASSERT_TRUE(dst_->Reserve(*other, 200).ok());
    seq_ = *MakeFilledSequence(*src_, kTokens, 42);
    dst_free_before_ = dst_->free_pages();
  }
  void ExpectNothingLeaked() {
    EXPECT_EQ(GetResourceCounters(), baseline_) << "now: " << GetResourceCounters().ToString()
                                                << "\nbefore: " << baseline_.ToString();
  }
  void ExpectSequenceReleased() {
    EXPECT_EQ(dst_->free_pages(), dst_free_before_);
    EXPECT_EQ(dst_->live_sequences(), 1);
  }
  // After a failure the receiver hands its sequence back when the quarantine ends.
  void ExpectSequenceReleased(KvReceiver& rx) {
    absl::Status st = rx.WaitReleased(absl::Now() + absl::Seconds(5));
    EXPECT_TRUE(st.ok()) << st;
    ExpectSequenceReleased();
  }

  ResourceSnapshot baseline_;
  std::unique_ptr<kvcache::KvCache> src_, dst_;
  int32_t seq_ = -1;
  int64_t dst_free_before_ = 0;
};

TEST_F(KvStreamTest, LoopbackRoundTripIsByteExact) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    auto& rx = **st.receiver;
    EXPECT_EQ(GetResourceCounters()[Resource::kStream], baseline_[Resource::kStream] + 2);
    EXPECT_FALSE(rx.LayerReady(0));
    ASSERT_TRUE(SendAll(**st.sender).ok());
    ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(10)).ok());
    ASSERT_TRUE(rx.WaitDone(absl::Now() + absl::Seconds(10)).ok());
    for (int l = 0; l < kLayers; ++l) {
      EXPECT_TRUE(rx.LayerReady(l));
      EXPECT_TRUE((*st.sender)->LayerConfirmed(l));  // LayerReady precedes the receiver's Done
    }
    EXPECT_EQ(dst_->Length(rx.sequence()), kTokens);
    absl::Status cmp = CompareSequences(*src_, seq_, *dst_, rx.sequence(), kTokens);
    EXPECT_TRUE(cmp.ok()) << cmp;
    StreamStats rs = rx.stats(), ss = (*st.sender)->stats();
    EXPECT_EQ(rs.chunks, ss.chunks);
    EXPECT_EQ(rs.bytes, ss.bytes);
    const kernels::KvLayout l = V32Layout(256);
    EXPECT_EQ(rs.bytes, kLayers * (16 * (l.MlaPageBytes() + l.IndexPageBytes()) + 4 * l.SummaryBytes()));
    EXPECT_EQ(rs.resends, 0u);
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, TwoSidedLoopbackRoundTrip) {
  auto backend = NewLoopbackBackend({.two_sided = true});
  StreamSetup s;
  s.receiver.credit_chunks = 3;
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    // Layers submitted out of order still ship in order on a two-sided backend.
    for (int l = kLayers - 1; l >= 0; --l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
    ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(10)).ok());
    ASSERT_TRUE((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10)).ok());
    EXPECT_TRUE(CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens).ok());
  }
  ExpectNothingLeaked();
}

// Two-sided backends pair every write with one receive of the same length:
// segments larger than the sender's one-sided write pieces (256 KiB) must not
// be split (loopback2 fails a length mismatch).
TEST_F(KvStreamTest, TwoSidedLargeSegmentsStayWhole) {
  auto backend = NewLoopbackBackend({.two_sided = true});
  auto src = *MakeCache(V32Layout(256), 2, 4096, 1);
  auto dst = *MakeCache(V32Layout(256), 2, 4096, 1);
  const int32_t seq = *MakeFilledSequence(*src, 4096, 5);
  StreamSetup s;
  s.sender.max_chunk_bytes = 2 << 20;  // MLA chunks of 49 pages, 2 MiB contiguous
  {
    Stream st = StartStream(*backend, *backend, *src, seq, *dst, s, 4096);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    ASSERT_TRUE(SendAll(**st.sender, 2).ok());
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(fin.ok()) << fin;
    EXPECT_TRUE(CompareSequences(*src, seq, *dst, (*st.receiver)->sequence(), 4096).ok());
  }
  ExpectNothingLeaked();
}

// The prefill node ships a layer as soon as it is computed and may pause
// before the next one: a layer must land and become ready with no later
// layer sent, on every backend, including two-sided ones that issue
// operations in batches (loopback2 with group_ops behaves like the NCCL
// backend: a batch of receives completes only as a whole). Small credits
// split layers across receive windows.
struct OneLayerCase {
  const char* name;
  LoopbackOptions backend;
  uint32_t credit_chunks;
};

void PrintTo(const OneLayerCase& c, std::ostream* os) { *os << c.name; }

class OneLayerThenWaitTest : public KvStreamTest, public ::testing::WithParamInterface<OneLayerCase> {
 protected:
  uint64_t packed_before_ = 0;
};

TEST_P(OneLayerThenWaitTest, EachLayerLandsWithoutTheNext) {
  packed_before_ = LoopbackPackedMessages();
  auto backend = NewLoopbackBackend(GetParam().backend);
  StreamSetup s;
  s.receiver.credit_chunks = GetParam().credit_chunks;
  s.sender.max_batch_chunks = 4;
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    auto& rx = **st.receiver;
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
      absl::Status ready = rx.WaitLayer(l, absl::Now() + absl::Seconds(3));
      ASSERT_TRUE(ready.ok()) << "layer " << l << ": " << ready;
      absl::Status cmp = CompareLayer(*src_, seq_, *dst_, rx.sequence(), kTokens, l);
      EXPECT_TRUE(cmp.ok()) << cmp;
      if (l + 1 < kLayers) {
        // The sender pauses (computing the next layer): nothing more lands.
        absl::SleepFor(absl::Milliseconds(100));
        EXPECT_FALSE(rx.LayerReady(l + 1));
      }
    }
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(fin.ok()) << fin;
    ASSERT_TRUE(rx.WaitDone(absl::Now() + absl::Seconds(10)).ok());
    EXPECT_TRUE(CompareSequences(*src_, seq_, *dst_, rx.sequence(), kTokens).ok());
    EXPECT_EQ(rx.stats().chunks, (*st.sender)->stats().chunks);
  }
  ExpectNothingLeaked();
  if (GetParam().backend.pack_bytes > 0) {
    EXPECT_GT(LoopbackPackedMessages(), packed_before_);
  }
}

// 6 chunks per layer, 24 in all: one batch of 32 receives would span every
// layer; a credit of 4 chunks splits layers across windows, 1 makes every
// chunk its own window. Packed (like the NCCL backend with pack_bytes): a
// run is a whole layer (1 MiB), two chunks (credit 4) or about one chunk
// (200 KiB), and sender and receiver must cut the same runs.
INSTANTIATE_TEST_SUITE_P(
    Backends, OneLayerThenWaitTest,
    ::testing::Values(OneLayerCase{"loopback", {}, 64}, OneLayerCase{"loopback2", {.two_sided = true}, 64},
                      OneLayerCase{"loopback2_grouped", {.two_sided = true, .group_ops = 32}, 64},
                      OneLayerCase{"loopback2_grouped_credit4", {.two_sided = true, .group_ops = 32}, 4},
                      OneLayerCase{"loopback2_grouped_credit1", {.two_sided = true, .group_ops = 32}, 1},
                      OneLayerCase{"loopback2_packed", {.two_sided = true, .pack_bytes = 1 << 20}, 64},
                      OneLayerCase{"loopback2_packed_credit4", {.two_sided = true, .pack_bytes = 1 << 20}, 4},
                      OneLayerCase{"loopback2_packed_small", {.two_sided = true, .pack_bytes = 200 << 10}, 64}),
    [](const ::testing::TestParamInfo<OneLayerCase>& i) { return std::string(i.param.name); });

// Host memory whose reads for hashing take `delay` each (a loaded host, or a
// device cache whose bytes are copied to the host first).
class SlowReadOps final : public MemoryOps {
 public:
  explicit SlowReadOps(absl::Duration delay) : delay_(delay) {}
  bool device() const override { return false; }
  absl::Status CopyToHost(uint8_t* dst, const uint8_t* src, size_t n) override {
    return HostMemoryOps().CopyToHost(dst, src, n);
  }
  absl::Status CopyFromHost(uint8_t* dst, const uint8_t* src, size_t n) override {
    return HostMemoryOps().CopyFromHost(dst, src, n);
  }
  absl::Status ReadOnHost(const uint8_t* src, size_t n,
                          const std::function<void(const uint8_t*, size_t)>& fn) override {
    absl::SleepFor(delay_);
    return HostMemoryOps().ReadOnHost(src, n, fn);
  }
  absl::StatusOr<std::unique_ptr<StagingBuffer>> AllocateStaging(size_t bytes) override {
    return HostMemoryOps().AllocateStaging(bytes);
  }

 private:
  const absl::Duration delay_;
};

// Two-sided receivers hash each chunk after it landed, on a helper thread.
// When that hash is the last thing a full receive window waits for (its
// header already arrived), verifying the chunk frees the window: the receiver
// must post the next receives before it sleeps, since the sender's next chunk
// cannot complete (nor its header come to wake the receiver) until they are
// posted. Slow hashing (5 ms a read, far beyond the receiver's 1 ms of
// "data is flowing" polling) forces that order on every chunk; the stream
// used to stall until the progress timeout (2 s here) at the first chunk.
TEST_F(KvStreamTest, TwoSidedSlowReceiverHashingDoesNotStall) {
  SlowReadOps slow(absl::Milliseconds(5));
  const std::pair<const char*, LoopbackOptions> backends[] = {
      {"loopback2", {.two_sided = true}},
      {"loopback2_grouped", {.two_sided = true, .group_ops = 32}},
      {"loopback2_packed", {.two_sided = true, .pack_bytes = 1 << 20}},
  };
  for (const auto& [name, options] : backends) {
    for (uint32_t credit : {1u, 4u}) {
      SCOPED_TRACE(absl::StrCat(name, ", credit ", credit));
      auto backend = NewLoopbackBackend(options);
      auto dst = *MakeCache(V32Layout(256), kLayers, kTokens);
      StreamSetup s;
      s.receiver.credit_chunks = credit;
      s.receiver.memory_ops = &slow;
      s.receiver.progress_timeout = absl::Seconds(2);
      s.sender.progress_timeout = absl::Seconds(2);
      Stream st = StartStream(*backend, *backend, *src_, seq_, *dst, s);
      ASSERT_TRUE(st.sender.ok()) << st.sender.status();
      ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
      ASSERT_TRUE(SendAll(**st.sender).ok());
      absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
      ASSERT_TRUE(fin.ok()) << fin;
      absl::Status done = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10));
      ASSERT_TRUE(done.ok()) << done;
      absl::Status cmp = CompareSequences(*src_, seq_, *dst, (*st.receiver)->sequence(), kTokens);
      EXPECT_TRUE(cmp.ok()) << cmp;
    }
  }
  ExpectNothingLeaked();
}

// A two-sided fence completes only when every write before it met a receive,
// so the headers of a sender's batch wait for its last chunk's receive. The
// receiver may hold back a short run of receives to keep runs large, but
// never while that could be what the sender's batch waits for. Credit 5,
// batches of up to 8, no checksums (a batch of headers verifies in one
// pass): after layer 0 the receiver has posted layer 1's chunks 6-9, the
// sender's first batch of layer 1 is chunks 6-10, and chunk 10's receive
// used to wait for chunks 6-9 to be verified (a deadlock until the progress
// timeout) every time.
TEST_F(KvStreamTest, TwoSidedSenderBatchBeyondThePostedReceivesCompletes) {
  const std::pair<const char*, LoopbackOptions> backends[] = {
      {"loopback2", {.two_sided = true}},
      {"loopback2_grouped", {.two_sided = true, .group_ops = 32}},
  };
  for (const auto& [name, options] : backends) {
    SCOPED_TRACE(name);
    auto backend = NewLoopbackBackend(options);
    auto dst = *MakeCache(V32Layout(256), kLayers, kTokens);
    StreamSetup s;
    s.receiver.credit_chunks = 5;
    s.sender.max_batch_chunks = 8;
    s.sender.checksum = false;
    s.receiver.progress_timeout = absl::Seconds(2);
    s.sender.progress_timeout = absl::Seconds(2);
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst, s);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    auto& rx = **st.receiver;
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
      absl::Status ready = rx.WaitLayer(l, absl::Now() + absl::Seconds(5));
      ASSERT_TRUE(ready.ok()) << "layer " << l << ": " << ready;
    }
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(fin.ok()) << fin;
    absl::Status cmp = CompareSequences(*src_, seq_, *dst, rx.sequence(), kTokens);
    EXPECT_TRUE(cmp.ok()) << cmp;
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, StagedRoundTripThroughTwoSlots) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  s.sender.staged = true;
  s.receiver.staging_slots = 2;
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    // The receiver's ring is a counted staging buffer of 2 slots.
    EXPECT_EQ(GetResourceCounters()[Resource::kPinnedBuffer], baseline_[Resource::kPinnedBuffer] + 1);
    EXPECT_EQ(GetResourceCounters().pinned_bytes - baseline_.pinned_bytes,
              int64_t(2 * s.sender.max_chunk_bytes));
    ASSERT_TRUE(SendAll(**st.sender).ok());
    ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(10)).ok());
    ASSERT_TRUE((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10)).ok());
    EXPECT_TRUE(CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens).ok());
  }
  ExpectNothingLeaked();
}

// Per-layer readiness: a layer is ready as soon as its own chunks landed, in
// whatever order the sender computed the layers.
TEST_F(KvStreamTest, LayersBecomeReadyIndependently) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
  ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
  auto& rx = **st.receiver;
  ASSERT_TRUE((*st.sender)->SendLayer(2).ok());
  ASSERT_TRUE(rx.WaitLayer(2, absl::Now() + absl::Seconds(5)).ok());
  EXPECT_TRUE(CompareLayer(*src_, seq_, *dst_, rx.sequence(), kTokens, 2).ok());
  EXPECT_FALSE(rx.LayerReady(0));
  EXPECT_EQ(rx.WaitLayer(0, absl::Now() + absl::Milliseconds(50)).code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(rx.WaitLayer(kLayers, absl::Now()).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*st.sender)->SendLayer(2).code(), absl::StatusCode::kInvalidArgument);  // twice
  EXPECT_EQ((*st.sender)->Finish(absl::Now() + absl::Milliseconds(50)).code(),
            absl::StatusCode::kDeadlineExceeded);
  for (int l : {0, 1, 3}) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
  ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(10)).ok());
  ASSERT_TRUE(rx.WaitDone(absl::Now() + absl::Seconds(10)).ok());
}

TEST_F(KvStreamTest, OneChunkOfCreditStillCompletes) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  s.receiver.credit_chunks = 1;
  s.receiver.credit_bytes = s.sender.max_chunk_bytes;
  s.sender.max_batch_chunks = 8;
  Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
  ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
  ASSERT_TRUE(SendAll(**st.sender).ok());
  ASSERT_TRUE((*st.sender)->Finish(absl::Now() + absl::Seconds(10)).ok());
  EXPECT_TRUE(CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens).ok());
}

TEST_F(KvStreamTest, CorruptedAndDroppedChunksAreResent) {
  auto inner = NewLoopbackBackend();
  FaultPolicy policy;
  policy.corrupt_writes = {1, 7};
  policy.drop_writes = {4};
  policy.fence_delay = absl::Milliseconds(1);
  FaultInjectingBackend faulty(*inner, policy);
  StreamSetup s;
  {
    Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    ASSERT_TRUE(SendAll(**st.sender).ok());
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(fin.ok()) << fin;
    ASSERT_TRUE((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10)).ok());
    EXPECT_EQ(faulty.corrupted(), 2);
    EXPECT_EQ(faulty.dropped(), 1);
    EXPECT_EQ((*st.sender)->stats().resends, 3u);
    EXPECT_EQ((*st.receiver)->stats().checksum_failures, 3u);
    absl::Status cmp = CompareSequences(*src_, seq_, *dst_, (*st.receiver)->sequence(), kTokens);
    EXPECT_TRUE(cmp.ok()) << cmp;
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, PersistentCorruptionAbortsWithDataLoss) {
  auto inner = NewLoopbackBackend();
  FaultPolicy policy;
  policy.corrupt_probability = 1.0;
  FaultInjectingBackend faulty(*inner, policy);
  StreamSetup s;
  s.sender.max_resends = 2;
  {
    Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    ASSERT_TRUE(SendAll(**st.sender).ok());
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
    EXPECT_EQ(fin.code(), absl::StatusCode::kDataLoss) << fin;
    EXPECT_NE(fin.message().find("failed checksum verification 3 times"), std::string::npos) << fin;
    absl::Status rx = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10));
    EXPECT_EQ(rx.code(), absl::StatusCode::kDataLoss) << rx;
    EXPECT_NE(rx.message().find("sender aborted"), std::string::npos) << rx;
    ExpectSequenceReleased(**st.receiver);
  }
  ExpectNothingLeaked();
}

// A sender that gives up sends its Abort and closes its end at once; a
// receiver still verifying earlier chunks (slowly here: 20 ms a read) then
// fails to send their acknowledgements, with the Abort queued behind the
// headers it has not handled yet. It must report the sender's reason, not
// the closed channel (it used to report Unavailable on a loaded host).
TEST_F(KvStreamTest, ReceiverReportsTheSendersAbortQueuedBeforeTheClose) {
  auto inner = NewLoopbackBackend();
  FaultPolicy policy;
  policy.corrupt_probability = 1.0;
  FaultInjectingBackend faulty(*inner, policy);
  SlowReadOps slow(absl::Milliseconds(20));
  StreamSetup s;
  s.sender.max_resends = 2;
  s.receiver.memory_ops = &slow;
  {
    Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    ASSERT_TRUE(SendAll(**st.sender).ok());
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(20));
    EXPECT_EQ(fin.code(), absl::StatusCode::kDataLoss) << fin;
    absl::Status rx = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(20));
    EXPECT_EQ(rx.code(), absl::StatusCode::kDataLoss) << rx;
    EXPECT_NE(rx.message().find("sender aborted"), std::string::npos) << rx;
    ExpectSequenceReleased(**st.receiver);
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, TwoSidedCorruptionAbortsWithoutResend) {
  auto inner = NewLoopbackBackend({.two_sided = true});
  FaultPolicy policy;
  policy.corrupt_writes = {2};
  FaultInjectingBackend faulty(*inner, policy);
  StreamSetup s;
  {
    Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    // Write 2 is in layer 0: the stream may fail before every layer is queued
    // (SendLayer then returns its error).
    absl::Status sent = SendAll(**st.sender);
    EXPECT_TRUE(sent.ok() || absl::IsDataLoss(sent)) << sent;
    absl::Status rx = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10));
    EXPECT_EQ(rx.code(), absl::StatusCode::kDataLoss) << rx;
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(10));
    EXPECT_EQ(fin.code(), absl::StatusCode::kDataLoss) << fin;
    ExpectSequenceReleased(**st.receiver);
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, FingerprintMismatchIsRejectedAtHandshake) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  s.sender_fingerprint = "ffffffffffffffff";
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
    EXPECT_EQ(st.sender.status().code(), absl::StatusCode::kFailedPrecondition) << st.sender.status();
    EXPECT_NE(st.sender.status().message().find("fingerprint"), std::string::npos);
    EXPECT_EQ(st.receiver.status().code(), absl::StatusCode::kFailedPrecondition);
    ExpectSequenceReleased();
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, LayoutMismatchIsRejectedAtHandshake) {
  auto backend = NewLoopbackBackend();
  kernels::KvLayout other = V32Layout(256);
  other.rope_dim = 32;  // a different MLA record
  auto dst = *MakeCache(other, kLayers, kTokens);
  StreamSetup s;
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst, s);
    EXPECT_EQ(st.sender.status().code(), absl::StatusCode::kFailedPrecondition) << st.sender.status();
    EXPECT_NE(st.sender.status().message().find("layout mismatch"), std::string::npos);
    EXPECT_EQ(dst->live_sequences(), 0);
  }
  auto fewer = *MakeCache(V32Layout(256), kLayers - 1, kTokens);
  Stream st = StartStream(*backend, *backend, *src_, seq_, *fewer, s);
  EXPECT_EQ(st.sender.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(st.sender.status().message().find("layers"), std::string::npos) << st.sender.status();
}

TEST_F(KvStreamTest, NoRoomIsResourceExhausted) {
  auto backend = NewLoopbackBackend();
  auto small = *MakeCache(V32Layout(256), kLayers, 500);
  StreamSetup s;
  Stream st = StartStream(*backend, *backend, *src_, seq_, *small, s);
  EXPECT_EQ(st.sender.status().code(), absl::StatusCode::kResourceExhausted) << st.sender.status();
  EXPECT_EQ(small->live_sequences(), 0);
}

// The sender's process "dies" mid-stream: its data plane fails and its control
// connection is reset. The receiver reports Unavailable within 2 s and hands
// back the sequence and every buffer.
TEST_F(KvStreamTest, SenderDisappearsMidStream) {
  auto inner = NewLoopbackBackend();
  ControlChannel* sender_channel = nullptr;
  FaultPolicy policy;
  policy.disconnect_after_writes = 10;
  policy.on_disconnect = [&] { sender_channel->Sever(); };
  FaultInjectingBackend faulty(*inner, policy);
  StreamSetup s;
  {
    // Start with a policy-free path for the handshake, then ship.
    Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    sender_channel = st.sender_channel;
    absl::Time t0 = absl::Now();
    ASSERT_TRUE(SendAll(**st.sender).ok());
    absl::Status rx = (*st.receiver)->WaitDone(t0 + absl::Seconds(5));
    EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
    EXPECT_EQ(rx.code(), absl::StatusCode::kUnavailable) << rx;
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(5));
    EXPECT_EQ(fin.code(), absl::StatusCode::kUnavailable) << fin;
    ExpectSequenceReleased(**st.receiver);
    EXPECT_FALSE((*st.receiver)->LayerReady(kLayers - 1));
  }
  ExpectNothingLeaked();
}

// The receiver vanishes without a word (connection reset): the sender reports
// Unavailable within 2 s and releases its endpoint.
TEST_F(KvStreamTest, ReceiverDisappearsMidStream) {
  auto backend = NewLoopbackBackend();
  FaultPolicy policy;
  policy.fence_delay = absl::Milliseconds(20);  // keep the stream busy
  FaultInjectingBackend slow(*backend, policy);
  StreamSetup s;
  {
    Stream st = StartStream(slow, *backend, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    ASSERT_TRUE(SendAll(**st.sender).ok());
    absl::Time t0 = absl::Now();
    st.receiver_channel->Sever();
    absl::Status fin = (*st.sender)->Finish(t0 + absl::Seconds(5));
    EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
    EXPECT_EQ(fin.code(), absl::StatusCode::kUnavailable) << fin;
    EXPECT_EQ((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5)).code(),
              absl::StatusCode::kUnavailable);
    ExpectSequenceReleased(**st.receiver);
  }
  ExpectNothingLeaked();
}

// Page quarantine, live sender: the receiver fails while the sender's writes
// are still in flight (write_latency). The failure is reported at once, but
// the pages stay held until the sender has flushed every write and said so
// (Quiesced), long before the grace period, and writes did land after the
// failure: releasing the pages at the failure would have let them hit
// whichever sequence got the pages next.
TEST_F(KvStreamTest, ReceiverFailureQuarantinesPagesUntilSenderQuiesces) {
  auto inner = NewLoopbackBackend();
  FaultPolicy policy;
  policy.write_latency = absl::Milliseconds(150);
  StreamSetup s;
  s.receiver.quarantine_grace = absl::Seconds(30);
  s.receiver.quarantine_limit = absl::Seconds(30);
  {
    FaultInjectingBackend slow(*inner, policy);
    Stream st = StartStream(slow, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    ASSERT_TRUE(SendAll(**st.sender).ok());
    // Wait until writes are in flight, then fail the receiver.
    const absl::Time until = absl::Now() + absl::Seconds(5);
    while (slow.writes_in_flight() == 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(1));
    ASSERT_GT(slow.writes_in_flight(), 0);
    const absl::Time failed = absl::Now();
    (*st.receiver)->Abort(absl::CancelledError("decode node shutting down"));
    absl::Status rx = (*st.receiver)->WaitDone(failed + absl::Seconds(5));
    EXPECT_EQ(rx.code(), absl::StatusCode::kCancelled) << rx;
    const int64_t delivered_at_failure = slow.writes_delivered();
    // Reported, but the pages are held.
    EXPECT_LT(dst_->free_pages(), dst_free_before_);
    EXPECT_EQ(GetResourceCounters()[Resource::kQuarantine], baseline_[Resource::kQuarantine] + 1);
    ASSERT_TRUE((*st.receiver)->WaitReleased(failed + absl::Seconds(10)).ok());
    const absl::Duration held = absl::Now() - failed;
    EXPECT_EQ(slow.writes_in_flight(), 0) << "pages released with writes still in flight";
    EXPECT_GT(slow.writes_delivered(), delivered_at_failure) << "no write landed after the failure";
    EXPECT_LT(held, absl::Seconds(5)) << "released by the grace period, not by the sender's Quiesced";
    EXPECT_EQ(dst_->free_pages(), dst_free_before_);
    EXPECT_EQ((*st.sender)->Finish(absl::Now() + absl::Seconds(5)).code(), absl::StatusCode::kCancelled);
  }
  ExpectNothingLeaked();
}

// Page quarantine, dead sender: the sender vanishes (no Quiesced can come)
// with writes in flight; the pages stay held for quarantine_grace after its
// control channel dropped, by which time the last in-flight write has landed.
TEST_F(KvStreamTest, DeadSenderPagesAreHeldForTheGracePeriod) {
  auto inner = NewLoopbackBackend();
  ControlChannel* sender_channel = nullptr;
  FaultPolicy policy;
  policy.write_latency = absl::Milliseconds(200);
  policy.disconnect_after_writes = 12;
  policy.on_disconnect = [&] { sender_channel->Sever(); };
  StreamSetup s;
  s.receiver.quarantine_grace = absl::Milliseconds(500);
  {
    FaultInjectingBackend faulty(*inner, policy);
    Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    sender_channel = st.sender_channel;
    ASSERT_TRUE(SendAll(**st.sender).ok());
    absl::Status rx = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5));
    const absl::Time failed = absl::Now();
    EXPECT_EQ(rx.code(), absl::StatusCode::kUnavailable) << rx;
    EXPECT_GT(faulty.writes_in_flight(), 0);
    EXPECT_LT(dst_->free_pages(), dst_free_before_);
    ASSERT_TRUE((*st.receiver)->WaitReleased(failed + absl::Seconds(5)).ok());
    EXPECT_GE(absl::Now() - failed, absl::Milliseconds(450));
    EXPECT_EQ(faulty.writes_in_flight(), 0) << "pages released with writes still in flight";
    EXPECT_GT(faulty.late_writes(), 0) << "no write landed after the sender gave up";
    EXPECT_EQ(dst_->free_pages(), dst_free_before_);
  }
  ExpectNothingLeaked();
}

// The same with no grace period: the pages come back while the dead sender's
// writes are still in flight. This is what the quarantine prevents, and shows
// that the two tests above can see it.
TEST_F(KvStreamTest, WithoutGraceDeadSenderWritesOutliveThePages) {
  auto inner = NewLoopbackBackend();
  ControlChannel* sender_channel = nullptr;
  FaultPolicy policy;
  policy.write_latency = absl::Milliseconds(300);
  policy.disconnect_after_writes = 12;
  policy.on_disconnect = [&] { sender_channel->Sever(); };
  StreamSetup s;
  s.receiver.quarantine_grace = absl::ZeroDuration();
  FaultInjectingBackend faulty(*inner, policy);
  Stream st = StartStream(faulty, *inner, *src_, seq_, *dst_, s);
  ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
  sender_channel = st.sender_channel;
  ASSERT_TRUE(SendAll(**st.sender).ok());
  EXPECT_EQ((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5)).code(), absl::StatusCode::kUnavailable);
  ASSERT_TRUE((*st.receiver)->WaitReleased(absl::Now() + absl::Seconds(5)).ok());
  EXPECT_GT(faulty.writes_in_flight(), 0);
  EXPECT_EQ(dst_->free_pages(), dst_free_before_);
}

TEST_F(KvStreamTest, DestroyingAnUnfinishedStreamAbortsThePeer) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  {
    Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    ASSERT_TRUE((*st.sender)->SendLayer(0).ok());
    st.sender->reset();
    absl::Status rx = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5));
    EXPECT_EQ(rx.code(), absl::StatusCode::kCancelled) << rx;
    ExpectSequenceReleased(**st.receiver);
  }
  ExpectNothingLeaked();
}

TEST_F(KvStreamTest, IdleSenderHitsReceiverProgressDeadline) {
  auto backend = NewLoopbackBackend();
  StreamSetup s;
  s.receiver.progress_timeout = absl::Milliseconds(300);
  Stream st = StartStream(*backend, *backend, *src_, seq_, *dst_, s);
  ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
  absl::Status rx = (*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(rx.code(), absl::StatusCode::kDeadlineExceeded) << rx;
  EXPECT_EQ((*st.sender)->Finish(absl::Now() + absl::Seconds(5)).code(),
            absl::StatusCode::kDeadlineExceeded);
  ExpectSequenceReleased(**st.receiver);
}

TEST_F(KvStreamTest, NonManifestFirstMessageIsInvalidArgument) {
  auto backend = NewLoopbackBackend();
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(listener.ok());
  absl::StatusOr<std::unique_ptr<KvReceiver>> rx = absl::UnknownError("unset");
  std::thread t([&] {
    auto ch = (*listener)->Accept(absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(ch.ok());
    ReceiverOptions o;
    o.model_fingerprint = kFingerprint;
    rx = KvReceiver::Accept(*backend, std::move(*ch), *dst_, o);
  });
  auto ch = ControlChannel::Connect("127.0.0.1", (*listener)->port(), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(ch.ok());
  ASSERT_TRUE((*ch)->Send(proto::Done{1, 2}).ok());
  t.join();
  EXPECT_EQ(rx.status().code(), absl::StatusCode::kInvalidArgument) << rx.status();
  auto reply = (*ch)->Receive(absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(reply.ok());
  EXPECT_TRUE(std::holds_alternative<proto::Abort>(*reply));
}

TEST_F(KvStreamTest, BadRequestsAreNamed) {
  auto backend = NewLoopbackBackend();
  auto ch = ControlListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(ch.ok());
  auto c = ControlChannel::Connect("127.0.0.1", (*ch)->port(), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(c.ok());
  auto r = KvSender::Start(*backend, std::move(*c), *src_, {"req 1", kFingerprint, seq_, kTokens}, {});
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  auto c2 = ControlChannel::Connect("127.0.0.1", (*ch)->port(), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(c2.ok());
  auto r2 = KvSender::Start(*backend, std::move(*c2), *src_, {"req-1", kFingerprint, seq_, kTokens + 100}, {});
  EXPECT_EQ(r2.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r2.status().message().find("cannot ship"), std::string::npos) << r2.status();
}

}  // namespace
}  // namespace pd::transport
