// A real peer process on the other end of a KV stream over UCX (TCP and shared
// memory), killed with SIGKILL mid-stream: the surviving side reports
// Unavailable within 2 s and holds no endpoint, key, staging buffer or stream.
#include <gtest/gtest.h>

#include <cstdlib>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "tests/transport/peer_process.h"
#include "transport/kv_stream.h"
#include "transport/resource_counters.h"
#include "transport/testing/kv_test_util.h"
#include "transport/ucx/ucx_backend.h"

namespace pd::transport {
namespace {

using testing::PeerProcess;

constexpr int kLayers = 6;
constexpr int64_t kTokens = 4096;
const char kFingerprint[] = "00112233445566778899aabbccddeeff";

std::vector<std::string> PeerArgs(std::vector<std::string> extra) {
  std::vector<std::string> a = {KV_PEER_PATH, "--backend=ucx", absl::StrCat("--layers=", kLayers),
                                absl::StrCat("--tokens=", kTokens), "--seed=5",
                                absl::StrCat("--fingerprint=", kFingerprint)};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

// `cached`: endpoints (and arena keys) the sender keeps for later streams to
// the same receiver after a successful stream; a failed one keeps none.
void ExpectRequestResourcesReleased(const ResourceSnapshot& base, int cached = 0) {
  ResourceSnapshot now = GetResourceCounters();
  for (Resource r : {Resource::kPinnedBuffer, Resource::kStream, Resource::kQuarantine}) {
    EXPECT_EQ(now[r], base[r]) << ResourceName(r) << "; now " << now.ToString();
  }
  for (Resource r : {Resource::kRemoteKey, Resource::kEndpoint}) {
    EXPECT_EQ(now[r], base[r] + cached) << ResourceName(r) << "; now " << now.ToString();
  }
}

class PeerKillTest : public ::testing::TestWithParam<const char*> {
 protected:
  void SetUp() override {
    setenv("UCX_TLS", GetParam(), 1);
    env_ = {absl::StrCat("UCX_TLS=", GetParam())};
    baseline_ = GetResourceCounters();
  }
  void TearDown() override { unsetenv("UCX_TLS"); }
  std::vector<std::string> env_;
  ResourceSnapshot baseline_;
};

TEST_P(PeerKillTest, StreamToPeerProcessIsByteExact) {
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(listener.ok());
  PeerProcess rx(PeerArgs({"--role=receiver", "--listen=127.0.0.1:0"}), env_);
  ASSERT_TRUE(rx.started());
  std::string line = rx.WaitForLine("LISTENING", absl::Seconds(10));
  ASSERT_FALSE(line.empty());
  uint32_t port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(10), &port)) << line;
  auto backend = NewUcxBackend();
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto cache = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens);
  int32_t seq = *testing::MakeFilledSequence(*cache, kTokens, 5);
  auto ch = ControlChannel::Connect("127.0.0.1", uint16_t(port), absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(ch.ok()) << ch.status();
  {
    auto tx = KvSender::Start(**backend, std::move(*ch), *cache, {"kill-0", kFingerprint, seq, kTokens}, {});
    ASSERT_TRUE(tx.ok()) << tx.status();
    for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*tx)->SendLayer(l).ok());
    absl::Status fin = (*tx)->Finish(absl::Now() + absl::Seconds(30));
    EXPECT_TRUE(fin.ok()) << fin;
  }
  EXPECT_EQ(rx.WaitForLine("RESULT", absl::Seconds(10)), "RESULT OK");
  EXPECT_EQ(rx.Wait(), 0);
  ExpectRequestResourcesReleased(baseline_, 1);
  backend->reset();
  EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
}

// The sending process dies after its first layers: this receiver reports
// Unavailable within 2 s, releases the sequence and every per-request buffer.
TEST_P(PeerKillTest, SenderKilledMidStream) {
  auto backend = NewUcxBackend();
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto cache = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens);
  const int64_t free_before = cache->free_pages();
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(listener.ok());
  PeerProcess tx(PeerArgs({"--role=sender", absl::StrCat("--connect=127.0.0.1:", (*listener)->port()),
                           "--layer_delay_ms=300"}),
                 env_);
  ASSERT_TRUE(tx.started());
  auto ch = (*listener)->Accept(absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(ch.ok()) << ch.status();
  ReceiverOptions o;
  o.model_fingerprint = kFingerprint;
  o.quarantine_grace = absl::Milliseconds(500);
  {
    auto rx = KvReceiver::Accept(**backend, std::move(*ch), *cache, o);
    ASSERT_TRUE(rx.ok()) << rx.status();
    ASSERT_TRUE((*rx)->WaitLayer(0, absl::Now() + absl::Seconds(10)).ok());
    const absl::Time killed = absl::Now();
    tx.Kill();
    absl::Status st = (*rx)->WaitDone(killed + absl::Seconds(10));
    EXPECT_LT(absl::Now() - killed, absl::Seconds(2));
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
    EXPECT_FALSE((*rx)->LayerReady(kLayers - 1));
    // The dead sender cannot confirm that its puts landed: the pages stay
    // quarantined for the grace period, then come back.
    const absl::Time reported = absl::Now();
    EXPECT_LT(cache->free_pages(), free_before);
    ASSERT_TRUE((*rx)->WaitReleased(reported + absl::Seconds(5)).ok());
    EXPECT_GE(absl::Now() - reported, absl::Milliseconds(400));
    EXPECT_EQ(cache->free_pages(), free_before);
    EXPECT_EQ(cache->live_sequences(), 0);
  }
  ExpectRequestResourcesReleased(baseline_);
  backend->reset();
  EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
}

// The receiving process dies mid-stream: this sender reports Unavailable
// within 2 s and releases its endpoint and remote key.
TEST_P(PeerKillTest, ReceiverKilledMidStream) {
  PeerProcess rx(PeerArgs({"--role=receiver", "--listen=127.0.0.1:0"}), env_);
  ASSERT_TRUE(rx.started());
  std::string line = rx.WaitForLine("LISTENING", absl::Seconds(10));
  uint32_t port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(10), &port)) << line;
  auto backend = NewUcxBackend();
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto cache = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens);
  int32_t seq = *testing::MakeFilledSequence(*cache, kTokens, 5);
  auto ch = ControlChannel::Connect("127.0.0.1", uint16_t(port), absl::Now() + absl::Seconds(10));
  ASSERT_TRUE(ch.ok());
  {
    auto tx = KvSender::Start(**backend, std::move(*ch), *cache, {"kill-1", kFingerprint, seq, kTokens}, {});
    ASSERT_TRUE(tx.ok()) << tx.status();
    ASSERT_TRUE((*tx)->SendLayer(0).ok());
    ASSERT_FALSE(rx.WaitForLine("LAYER 0 READY", absl::Seconds(10)).empty());
    EXPECT_GT(GetResourceCounters()[Resource::kEndpoint], baseline_[Resource::kEndpoint]);
    const absl::Time killed = absl::Now();
    rx.Kill();
    for (int l = 1; l < kLayers; ++l) (*tx)->SendLayer(l).IgnoreError();
    absl::Status st = (*tx)->Finish(killed + absl::Seconds(10));
    EXPECT_LT(absl::Now() - killed, absl::Seconds(2));
    EXPECT_EQ(st.code(), absl::StatusCode::kUnavailable) << st;
  }
  ExpectRequestResourcesReleased(baseline_);
  backend->reset();
  EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
}

INSTANTIATE_TEST_SUITE_P(Transports, PeerKillTest, ::testing::Values("tcp", "posix"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace pd::transport
