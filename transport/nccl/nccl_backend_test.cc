// Two GPUs: KV streams from a device cache on GPU 0 to one on GPU 1 through
// the NCCL backend, in one process (one thread per rank). Skips with fewer
// than two GPUs.
#include "transport/nccl/nccl_backend.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "transport/cuda/cuda_memory.h"
#include "transport/kv_stream.h"
#include "transport/resource_counters.h"
#include "transport/testing/gpu_test_util.h"
#include "transport/testing/kv_test_util.h"

namespace pd::transport {
namespace {

constexpr int kLayers = 4;
constexpr int64_t kTokens = 5000;
const char kFingerprint[] = "0badc0de";

struct Stream {
  absl::StatusOr<std::unique_ptr<KvSender>> sender = absl::UnknownError("unset");
  absl::StatusOr<std::unique_ptr<KvReceiver>> receiver = absl::UnknownError("unset");
};

class NcclTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() < 2) GTEST_SKIP() << "needs two CUDA devices, " << CudaDeviceCount() << " visible";
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    baseline_ = GetResourceCounters();
    host_src_ = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
    seq_ = *testing::MakeFilledSequence(*host_src_, kTokens, 21);
    src_ = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1, NewCudaDeviceAllocator(0));
    ASSERT_TRUE(src_->CreateSequence().ok());
    ASSERT_TRUE(src_->Reserve(seq_, kTokens).ok());
    ASSERT_TRUE(testing::CopyArena(*host_src_, *src_).ok());
    dst_ = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1, NewCudaDeviceAllocator(1));
    tx_ops_ = *NewCudaMemoryOps({.device = 0});
    rx_ops_ = *NewCudaMemoryOps({.device = 1});
    auto tx = NewNcclBackend({.device = 0});
    auto rx = NewNcclBackend({.device = 1});
    ASSERT_TRUE(tx.ok()) << tx.status();
    ASSERT_TRUE(rx.ok()) << rx.status();
    tx_ = std::move(*tx);
    rx_ = std::move(*rx);
    so_.memory_ops = tx_ops_.get();
    so_.max_chunk_bytes = 1 << 20;
    ro_.model_fingerprint = kFingerprint;
    ro_.memory_ops = rx_ops_.get();
    // The decode node listens on one port for every stream.
    auto listener = ControlListener::Listen("127.0.0.1", 0);
    ASSERT_TRUE(listener.ok()) << listener.status();
    listener_ = std::move(*listener);
  }
  void TearDown() override {
    tx_.reset();
    rx_.reset();
    tx_ops_.reset();
    rx_ops_.reset();
    src_.reset();
    dst_.reset();
    if (!IsSkipped()) {
      EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
    }
  }

  Stream Start(const std::string& request_id) {
    Stream out;
    std::thread t([&] {
      auto ch = listener_->Accept(absl::Now() + absl::Seconds(30));
      if (!ch.ok()) {
        out.receiver = ch.status();
        return;
      }
      out.receiver = KvReceiver::Accept(*rx_, std::move(*ch), *dst_, ro_);
    });
    auto ch = ControlChannel::Connect("127.0.0.1", listener_->port(), absl::Now() + absl::Seconds(30));
    EXPECT_TRUE(ch.ok());
    out.sender = KvSender::Start(*tx_, std::move(*ch), *src_,
                                 {request_id, kFingerprint, seq_, kTokens, "decode-gpu1"}, so_);
    t.join();
    return out;
  }

  // The received sequence, copied to the host and compared with the source.
  absl::Status CheckReceived(int32_t rseq) {
    auto host_dst = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
    auto s = host_dst->CreateSequence();
    if (!s.ok() || *s != rseq) return absl::InternalError("host mirror's sequence differs");
    PD_RETURN_IF_ERROR(host_dst->Reserve(rseq, kTokens));
    PD_RETURN_IF_ERROR(testing::CopyArena(*dst_, *host_dst));
    return testing::CompareSequences(*host_src_, seq_, *host_dst, rseq, kTokens);
  }

  // One layer of the received sequence, copied to the host and compared.
  absl::Status CheckLayer(int32_t rseq, int layer) {
    auto host_dst = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
    auto s = host_dst->CreateSequence();
    if (!s.ok() || *s != rseq) return absl::InternalError("host mirror's sequence differs");
    PD_RETURN_IF_ERROR(host_dst->Reserve(rseq, kTokens));
    PD_RETURN_IF_ERROR(testing::CopyArena(*dst_, *host_dst));
    return testing::CompareLayer(*host_src_, seq_, *host_dst, rseq, kTokens, layer);
  }

  std::unique_ptr<ControlListener> listener_;
  ResourceSnapshot baseline_;
  std::unique_ptr<kvcache::KvCache> host_src_, src_, dst_;
  int32_t seq_ = -1;
  std::unique_ptr<MemoryOps> tx_ops_, rx_ops_;
  std::unique_ptr<Backend> tx_, rx_;
  SenderOptions so_;
  ReceiverOptions ro_;
};

// Byte-exact twice; the second stream reuses both ends' communicator (the
// sender finds it by the receiver's node name) and ships layer by layer, each
// layer landing before the next is sent.
TEST_F(NcclTest, Gpu0ToGpu1IsByteExactAndReusesTheCommunicator) {
  for (int round = 0; round < 2; ++round) {
    so_.checksum_every = round == 0 ? 1 : 4;  // every chunk, then a sample
    const uint64_t created = NcclCommunicatorsCreated();
    Stream st = Start(absl::StrCat("nccl-", round));
    ASSERT_TRUE(st.sender.ok()) << st.sender.status();
    ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
      if (round == 0) continue;
      absl::Status ready = (*st.receiver)->WaitLayer(l, absl::Now() + absl::Seconds(10));
      ASSERT_TRUE(ready.ok()) << "layer " << l << ": " << ready;
      absl::Status cmp = CheckLayer((*st.receiver)->sequence(), l);
      EXPECT_TRUE(cmp.ok()) << cmp;
      if (l + 1 < kLayers) {
        EXPECT_FALSE((*st.receiver)->LayerReady(l + 1));
      }
    }
    absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(60));
    ASSERT_TRUE(fin.ok()) << fin;
    ASSERT_TRUE((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(10)).ok());
    absl::Status cmp = CheckReceived((*st.receiver)->sequence());
    EXPECT_TRUE(cmp.ok()) << cmp;
    ASSERT_TRUE(dst_->Release((*st.receiver)->sequence()).ok());
    st.sender->reset();
    st.receiver->reset();
    // One communicator per end, created by the first stream and reused by
    // the second, cached for the next stream.
    EXPECT_EQ(NcclCommunicatorsCreated() - created, round == 0 ? 2u : 0u) << "round " << round;
    EXPECT_EQ(GetResourceCounters()[Resource::kCommunicator], baseline_[Resource::kCommunicator] + 2)
        << "round " << round;
  }
}

// The receiver fails mid-stream: both ends report it, abort and drop their
// communicator (nothing can land afterwards), hand back the sequence; the
// next stream bootstraps a fresh communicator and succeeds.
TEST_F(NcclTest, FailedStreamAbortsTheCommunicatorAndTheNextOneWorks) {
  const int64_t free_before = dst_->free_pages();
  {
    Stream st = Start("nccl-fail");
    ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
    // Layer 0 alone lands, whatever the sender does next.
    ASSERT_TRUE((*st.sender)->SendLayer(0).ok());
    absl::Status ready = (*st.receiver)->WaitLayer(0, absl::Now() + absl::Seconds(30));
    ASSERT_TRUE(ready.ok()) << ready;
    EXPECT_TRUE(CheckLayer((*st.receiver)->sequence(), 0).ok());
    absl::SleepFor(absl::Milliseconds(200));
    EXPECT_FALSE((*st.receiver)->LayerReady(1));
    (*st.receiver)->Abort(absl::CancelledError("decode node draining"));
    EXPECT_EQ((*st.receiver)->WaitDone(absl::Now() + absl::Seconds(5)).code(), absl::StatusCode::kCancelled);
    ASSERT_TRUE((*st.receiver)->WaitReleased(absl::Now() + absl::Seconds(5)).ok());
    EXPECT_EQ(dst_->free_pages(), free_before);
    EXPECT_EQ((*st.sender)->Finish(absl::Now() + absl::Seconds(10)).code(), absl::StatusCode::kCancelled);
  }
  EXPECT_EQ(GetResourceCounters()[Resource::kCommunicator], baseline_[Resource::kCommunicator]);
  const uint64_t created = NcclCommunicatorsCreated();
  Stream st = Start("nccl-after");
  ASSERT_TRUE(st.sender.ok() && st.receiver.ok());
  for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
  absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(60));
  ASSERT_TRUE(fin.ok()) << fin;
  absl::Status cmp = CheckReceived((*st.receiver)->sequence());
  EXPECT_TRUE(cmp.ok()) << cmp;
  EXPECT_EQ(NcclCommunicatorsCreated() - created, 2u);  // a fresh pair
}

// Packing (both ends set pack_bytes): each run of a layer's chunks travels
// as one NCCL message through the device staging buffers; byte-exact, layer
// by layer, twice over the same communicators. With packing on one end only
// the ends agree on none, and the stream is still exact.
TEST_F(NcclTest, PackedStreamsAreByteExact) {
  for (uint64_t rx_pack : {uint64_t(2) << 20, uint64_t(0)}) {
    tx_.reset();
    rx_.reset();
    tx_ = *NewNcclBackend({.device = 0, .pack_bytes = 2 << 20});
    rx_ = *NewNcclBackend({.device = 1, .pack_bytes = rx_pack});
    for (int round = 0; round < 2; ++round) {
      Stream st = Start(absl::StrCat("nccl-packed-", rx_pack, "-", round));
      ASSERT_TRUE(st.sender.ok()) << st.sender.status();
      ASSERT_TRUE(st.receiver.ok()) << st.receiver.status();
      for (int l = 0; l < kLayers; ++l) {
        ASSERT_TRUE((*st.sender)->SendLayer(l).ok());
        absl::Status ready = (*st.receiver)->WaitLayer(l, absl::Now() + absl::Seconds(10));
        ASSERT_TRUE(ready.ok()) << "layer " << l << ": " << ready;
      }
      absl::Status fin = (*st.sender)->Finish(absl::Now() + absl::Seconds(60));
      ASSERT_TRUE(fin.ok()) << fin;
      absl::Status cmp = CheckReceived((*st.receiver)->sequence());
      EXPECT_TRUE(cmp.ok()) << "pack " << rx_pack << " round " << round << ": " << cmp;
      ASSERT_TRUE(dst_->Release((*st.receiver)->sequence()).ok());
      // Clear the destination, so that the next round proves its own bytes.
      ASSERT_EQ(cudaSetDevice(1), cudaSuccess);
      ASSERT_EQ(cudaMemset(dst_->arena(), 0, dst_->arena_bytes()), cudaSuccess);
      ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    }
  }
}

TEST_F(NcclTest, HostMemoryIsRejected) {
  auto host = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
  MemoryRegion r{host->arena(), host->arena_bytes(), false, true};
  auto l = rx_->Listen(r, std::string(16, '\0'), {"x", "decode", "prefill"}, absl::Now() + absl::Seconds(1));
  EXPECT_EQ(l.status().code(), absl::StatusCode::kInvalidArgument) << l.status();
  EXPECT_EQ(NewNcclBackend({.device = 1 << 20}).status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace pd::transport
