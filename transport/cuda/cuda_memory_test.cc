// One GPU: device KV arenas, CUDA MemoryOps, and a KV stream between device
// caches through UCX with pinned-host staging. Skips without a GPU.
#include "transport/cuda/cuda_memory.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <thread>
#include <vector>

#include "transport/kv_stream.h"
#include "transport/resource_counters.h"
#include "transport/testing/gpu_test_util.h"
#include "transport/testing/kv_test_util.h"
#include "transport/ucx/ucx_backend.h"

namespace pd::transport {
namespace {

constexpr int kLayers = 3;
constexpr int64_t kTokens = 3000;
const char kFingerprint[] = "c0ffee";

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (CudaDeviceCount() < 1) GTEST_SKIP() << "no CUDA device visible";
    baseline_ = GetResourceCounters();
  }
  ResourceSnapshot baseline_;
};

TEST_F(CudaTest, DeviceArenaIsZeroedDeviceMemory) {
  auto dev = testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1, NewCudaDeviceAllocator(0));
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_TRUE((*dev)->on_device());
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, (*dev)->arena()), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeDevice);
  auto host = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
  std::memset(host->arena(), 0x5a, host->arena_bytes());
  ASSERT_TRUE(testing::CopyArena(**dev, *host).ok());
  const uint8_t* p = host->arena();
  EXPECT_TRUE(std::all_of(p, p + host->arena_bytes(), [](uint8_t b) { return b == 0; }));
}

// ReadOnHost hands back exactly the device bytes, in order, in pieces no
// larger than the configured piece, and its pinned buffers are counted.
TEST_F(CudaTest, ReadOnHostDeliversTheDeviceBytesInOrder) {
  const size_t n = 10'000'003;
  std::vector<uint8_t> want(n);
  std::iota(want.begin(), want.end(), uint8_t(7));
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, n), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d, want.data(), n, cudaMemcpyHostToDevice), cudaSuccess);
  {
    auto ops = NewCudaMemoryOps({.device = 0, .piece_bytes = 1'000'000});
    ASSERT_TRUE(ops.ok()) << ops.status();
    std::vector<uint8_t> got;
    size_t calls = 0;
    absl::Status st = (*ops)->ReadOnHost(static_cast<uint8_t*>(d), n, [&](const uint8_t* p, size_t m) {
      EXPECT_LE(m, 1'000'000u);
      got.insert(got.end(), p, p + m);
      ++calls;
    });
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(calls, 11u);
    EXPECT_EQ(got, want);
    EXPECT_EQ(GetResourceCounters()[Resource::kPinnedBuffer], baseline_[Resource::kPinnedBuffer] + 2);
    auto staging = (*ops)->AllocateStaging(12345);
    ASSERT_TRUE(staging.ok());
    EXPECT_EQ(GetResourceCounters().pinned_bytes, baseline_.pinned_bytes + 2'000'000 + 12345);
    std::vector<uint8_t> back(100);
    ASSERT_TRUE((*ops)->CopyToHost(back.data(), static_cast<uint8_t*>(d) + 500, 100).ok());
    EXPECT_TRUE(std::equal(back.begin(), back.end(), want.begin() + 500));
  }
  EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
  cudaFree(d);
  EXPECT_EQ(NewCudaMemoryOps({.device = 1 << 20}).status().code(), absl::StatusCode::kFailedPrecondition);
}

// PinHostMemory page-locks memory allocated elsewhere (cudaHostRegister),
// counts it while pinned, copies into it, and a second pin of the same range
// is an empty one (already registered).
TEST_F(CudaTest, PinHostMemoryRegistersAndReleases) {
  const size_t n = 8 << 20;
  void* host = std::aligned_alloc(4096, n);
  ASSERT_NE(host, nullptr);
  std::memset(host, 0, n);
  void* d = nullptr;
  ASSERT_EQ(cudaMalloc(&d, n), cudaSuccess);
  ASSERT_EQ(cudaMemset(d, 0x3c, n), cudaSuccess);
  {
    auto ops = *NewCudaMemoryOps({.device = 0});
    auto pin = ops->PinHostMemory(static_cast<uint8_t*>(host), n);
    ASSERT_TRUE(pin.ok()) << pin.status();
    EXPECT_EQ(GetResourceCounters()[Resource::kPinnedBuffer], baseline_[Resource::kPinnedBuffer] + 1);
    EXPECT_EQ(GetResourceCounters().pinned_bytes, baseline_.pinned_bytes + int64_t(n));
    cudaPointerAttributes attr{};
    ASSERT_EQ(cudaPointerGetAttributes(&attr, host), cudaSuccess);
    EXPECT_EQ(attr.type, cudaMemoryTypeHost);
    auto again = ops->PinHostMemory(static_cast<uint8_t*>(host), n);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(GetResourceCounters()[Resource::kPinnedBuffer], baseline_[Resource::kPinnedBuffer] + 1);
    ASSERT_TRUE(ops->CopyToHost(static_cast<uint8_t*>(host), static_cast<uint8_t*>(d), n).ok());
    const uint8_t* p = static_cast<uint8_t*>(host);
    EXPECT_TRUE(std::all_of(p, p + n, [](uint8_t b) { return b == 0x3c; }));
  }
  EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
  cudaPointerAttributes attr{};
  ASSERT_EQ(cudaPointerGetAttributes(&attr, host), cudaSuccess);
  EXPECT_EQ(attr.type, cudaMemoryTypeUnregistered);  // unregistered again
  cudaFree(d);
  std::free(host);
}

// A device-to-device KV stream over UCX (shared memory or TCP), staged through
// pinned host memory: UCX built without CUDA support cannot reach device
// memory, so the stream forces staging; the bytes land exactly, and every
// pinned buffer and registration goes back.
class UcxStagingTest : public CudaTest, public ::testing::WithParamInterface<const char*> {};

TEST_P(UcxStagingTest, DeviceToDeviceThroughPinnedStagingIsByteExact) {
  setenv("UCX_TLS", GetParam(), 1);
  const int rx_device = CudaDeviceCount() > 1 ? 1 : 0;
  auto host_src = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
  const int32_t seq = *testing::MakeFilledSequence(*host_src, kTokens, 11);
  auto src = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1, NewCudaDeviceAllocator(0));
  ASSERT_TRUE(src->CreateSequence().ok());
  ASSERT_TRUE(src->Reserve(seq, kTokens).ok());
  ASSERT_TRUE(testing::CopyArena(*host_src, *src).ok());
  auto dst = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1, NewCudaDeviceAllocator(rx_device));
  auto tx_ops = *NewCudaMemoryOps({.device = 0});
  auto rx_ops = *NewCudaMemoryOps({.device = rx_device});
  {
    auto tx = NewUcxBackend();
    auto rx = NewUcxBackend();
    ASSERT_TRUE(tx.ok() && rx.ok());
    SenderOptions so;
    so.memory_ops = tx_ops.get();
    so.max_chunk_bytes = 1 << 20;
    so.staged = true;  // what a UCX without CUDA support gets anyway
    ReceiverOptions ro;
    ro.model_fingerprint = kFingerprint;
    ro.memory_ops = rx_ops.get();
    ro.staging_slots = 4;
    auto listener = *ControlListener::Listen("127.0.0.1", 0);
    absl::StatusOr<std::unique_ptr<KvReceiver>> receiver = absl::UnknownError("unset");
    std::thread t([&] {
      auto ch = listener->Accept(absl::Now() + absl::Seconds(10));
      ASSERT_TRUE(ch.ok());
      receiver = KvReceiver::Accept(**rx, std::move(*ch), *dst, ro);
    });
    auto ch = ControlChannel::Connect("127.0.0.1", listener->port(), absl::Now() + absl::Seconds(10));
    ASSERT_TRUE(ch.ok());
    auto sender = KvSender::Start(**tx, std::move(*ch), *src, {"gpu-ucx", kFingerprint, seq, kTokens}, so);
    t.join();
    ASSERT_TRUE(sender.ok()) << sender.status();
    ASSERT_TRUE(receiver.ok()) << receiver.status();
    EXPECT_TRUE((*sender)->manifest().staged);
    for (int l = 0; l < kLayers; ++l) ASSERT_TRUE((*sender)->SendLayer(l).ok());
    absl::Status fin = (*sender)->Finish(absl::Now() + absl::Seconds(60));
    ASSERT_TRUE(fin.ok()) << fin;
    ASSERT_TRUE((*receiver)->WaitDone(absl::Now() + absl::Seconds(10)).ok());
    auto host_dst = *testing::MakeCache(testing::V32Layout(), kLayers, kTokens, 1);
    ASSERT_TRUE(host_dst->CreateSequence().ok());
    ASSERT_TRUE(host_dst->Reserve((*receiver)->sequence(), kTokens).ok());
    ASSERT_TRUE(testing::CopyArena(*dst, *host_dst).ok());
    absl::Status cmp = testing::CompareSequences(*host_src, seq, *host_dst, (*receiver)->sequence(), kTokens);
    EXPECT_TRUE(cmp.ok()) << cmp;
  }
  tx_ops.reset();
  rx_ops.reset();
  EXPECT_EQ(GetResourceCounters(), baseline_) << GetResourceCounters().ToString();
  unsetenv("UCX_TLS");
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxStagingTest, ::testing::Values("tcp", "posix"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace pd::transport
