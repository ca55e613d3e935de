// GPU-to-GPU KV transport benchmark (two GPUs of one host): ships a
// DeepSeek-V3.2-shaped KV (61 layers x 788 B/token + pooled summaries) from a
// device cache on GPU 0 to one on GPU 1, and in the same run measures the
// references, each as GB/s (10^9 B/s) over the same total bytes:
//   nccl_stream   KvSender/KvReceiver over the NCCL backend (what we ship)
//   nccl_plain    a plain ncclSend/ncclRecv loop over distinct device buffers
//                 of the same total size, in messages of --plain_chunks MiB
//                 (0: the whole KV as one message), one op per message
//   ucx_staged    KvSender/KvReceiver over UCX (UCX_TLS, default posix) with
//                 device memory staged through pinned host buffers
// One process, one thread per rank (GPU 0 sends, GPU 1 receives); stream
// timings run from the first SendLayer to the sender's Finish (every chunk
// landed and acknowledged). The first stream of each mode is checked byte for
// byte against the source (--verify=1).
//
//   kv_gpu_bench [--tokens=32768,131072] [--layers=61] [--iters=5]
//                [--modes=nccl,plain,ucx] [--chunk_mb=64] [--checksum_every=64]
//                [--plain_chunks=4,64,0] [--credit_mb=4096] [--ucx_chunk_mb=4]
//                [--verify=1]
// Prints one RESULT line per measurement and RATIO lines:
//   RESULT mode=nccl_stream tokens=.. bytes=.. chunk_bytes=.. best_gbps=.. median_gbps=..
//   RATIO tokens=.. stream_vs_plain_same_chunk=.. stream_vs_best_plain=..
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/barrier.h"
#include "common/logging.h"
#include "common/status.h"
#include "transport/cuda/cuda_memory.h"
#include "transport/kv_stream.h"
#include "transport/nccl/nccl_backend.h"
#include "transport/testing/gpu_test_util.h"
#include "transport/testing/kv_test_util.h"
#include "transport/ucx/ucx_backend.h"

namespace pd::transport {
namespace {

using Flags = std::map<std::string, std::string>;

int64_t Int(const Flags& f, const std::string& k, int64_t def) {
  auto it = f.find(k);
  int64_t v = def;
  if (it != f.end() && !absl::SimpleAtoi(it->second, &v)) {
    std::fprintf(stderr, "--%s=%s is not an integer\n", k.c_str(), it->second.c_str());
    std::exit(2);
  }
  return v;
}
std::vector<int64_t> IntList(const Flags& f, const std::string& k, const std::string& def) {
  std::vector<int64_t> out;
  for (absl::string_view p : absl::StrSplit(f.count(k) ? f.at(k) : def, ',', absl::SkipEmpty())) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(p, &v)) {
      std::fprintf(stderr, "--%s: '%s' is not an integer\n", k.c_str(), std::string(p).c_str());
      std::exit(2);
    }
    out.push_back(v);
  }
  return out;
}

#define CUDA_CHECK(x)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) LOG(FATAL) << #x << ": " << cudaGetErrorString(e_);          \
  } while (0)
#define NCCL_CHECK(x)                                                                   \
  do {                                                                                  \
    ncclResult_t r_ = (x);                                                              \
    if (r_ != ncclSuccess) LOG(FATAL) << #x << ": " << ncclGetErrorString(r_);          \
  } while (0)

struct Stats {
  double best = 0, median = 0;
};
Stats Summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return {v.back(), v[v.size() / 2]};
}

void PrintResult(const std::string& mode, int64_t tokens, uint64_t bytes, uint64_t chunk, const Stats& s,
                 const std::string& extra = "") {
  std::printf("RESULT mode=%s tokens=%lld bytes=%llu chunk_bytes=%llu best_gbps=%.2f median_gbps=%.2f%s\n",
              mode.c_str(), (long long)tokens, (unsigned long long)bytes, (unsigned long long)chunk, s.best,
              s.median, extra.c_str());
  std::fflush(stdout);
}

// A plain ncclSend/ncclRecv loop between GPU 0 and GPU 1 over `bytes` of
// distinct device memory per side, in messages of `chunk` bytes.
class PlainNccl {
 public:
  explicit PlainNccl(uint64_t bytes) : bytes_(bytes) {
    ncclUniqueId id;
    NCCL_CHECK(ncclGetUniqueId(&id));
    std::thread t[2];
    for (int r = 0; r < 2; ++r) {
      t[r] = std::thread([&, r] {
        CUDA_CHECK(cudaSetDevice(r));
        CUDA_CHECK(cudaMalloc(&buf_[r], bytes_));
        CUDA_CHECK(cudaMemset(buf_[r], r + 1, bytes_));
        CUDA_CHECK(cudaStreamCreateWithFlags(&stream_[r], cudaStreamNonBlocking));
        NCCL_CHECK(ncclCommInitRank(&comm_[r], 2, id, r));
      });
    }
    for (auto& x : t) x.join();
  }
  ~PlainNccl() {
    for (int r = 0; r < 2; ++r) {
      cudaSetDevice(r);
      ncclCommDestroy(comm_[r]);
      cudaStreamDestroy(stream_[r]);
      cudaFree(buf_[r]);
    }
  }
  // GB/s of one pass.
  double Run(uint64_t chunk) {
    if (chunk == 0) chunk = bytes_;
    absl::Barrier* start = new absl::Barrier(2);
    double secs[2] = {0, 0};
    std::thread t[2];
    for (int r = 0; r < 2; ++r) {
      t[r] = std::thread([&, r] {
        CUDA_CHECK(cudaSetDevice(r));
        CUDA_CHECK(cudaStreamSynchronize(stream_[r]));
        if (start->Block()) delete start;
        const absl::Time t0 = absl::Now();
        for (uint64_t off = 0; off < bytes_; off += chunk) {
          const uint64_t n = std::min(chunk, bytes_ - off);
          if (r == 0) {
            NCCL_CHECK(ncclSend(static_cast<uint8_t*>(buf_[0]) + off, n, ncclUint8, 1, comm_[0], stream_[0]));
          } else {
            NCCL_CHECK(ncclRecv(static_cast<uint8_t*>(buf_[1]) + off, n, ncclUint8, 0, comm_[1], stream_[1]));
          }
        }
        CUDA_CHECK(cudaStreamSynchronize(stream_[r]));
        secs[r] = absl::ToDoubleSeconds(absl::Now() - t0);
      });
    }
    for (auto& x : t) x.join();
    return double(bytes_) / std::max(secs[0], secs[1]) / 1e9;
  }

 private:
  const uint64_t bytes_;
  void* buf_[2] = {nullptr, nullptr};
  cudaStream_t stream_[2] = {nullptr, nullptr};
  ncclComm_t comm_[2] = {nullptr, nullptr};
};

// Device caches on GPU 0 (filled, one sequence) and GPU 1, plus the host
// source for verification.
struct Caches {
  std::unique_ptr<kvcache::KvCache> host_src, src, dst;
  int32_t seq = -1;
  uint64_t bytes = 0;  // the stream's payload
};

Caches MakeCaches(int layers, int64_t tokens) {
  Caches c;
  c.host_src = *testing::MakeCache(testing::V32Layout(), layers, tokens, 1);
  c.seq = *testing::MakeFilledSequence(*c.host_src, tokens, 77);
  c.src = *testing::MakeCache(testing::V32Layout(), layers, tokens, 1, NewCudaDeviceAllocator(0));
  PD_CHECK_OK(c.src->CreateSequence().status());
  PD_CHECK_OK(c.src->Reserve(c.seq, tokens));
  PD_CHECK_OK(testing::CopyArena(*c.host_src, *c.src));
  c.dst = *testing::MakeCache(testing::V32Layout(), layers, tokens, 1, NewCudaDeviceAllocator(1));
  return c;
}

absl::Status Verify(Caches& c, int layers, int64_t tokens, int32_t rseq) {
  auto mirror = *testing::MakeCache(testing::V32Layout(), layers, tokens, 1);
  PD_ASSIGN_OR_RETURN(int32_t s, mirror->CreateSequence());
  if (s != rseq) return absl::InternalError("host mirror's sequence differs");
  PD_RETURN_IF_ERROR(mirror->Reserve(s, tokens));
  PD_RETURN_IF_ERROR(testing::CopyArena(*c.dst, *mirror));
  return testing::CompareSequences(*c.host_src, c.seq, *mirror, rseq, tokens);
}

// Streams the KV `iters` times from c.src to c.dst; GB/s per stream.
std::vector<double> RunStreams(Backend& tx, Backend& rx, Caches& c, int layers, int64_t tokens, int iters,
                               const SenderOptions& so, const ReceiverOptions& ro, bool verify,
                               const std::string& mode) {
  auto listener = *ControlListener::Listen("127.0.0.1", 0);
  std::vector<double> gbps;
  for (int it = 0; it < iters; ++it) {
    std::unique_ptr<KvReceiver> receiver;
    std::thread acceptor([&] {
      auto ch = listener->Accept(absl::Now() + absl::Seconds(60));
      PD_CHECK_OK(ch.status());
      auto r = KvReceiver::Accept(rx, std::move(*ch), *c.dst, ro);
      PD_CHECK_OK(r.status());
      receiver = std::move(*r);
    });
    auto ch = ControlChannel::Connect("127.0.0.1", listener->port(), absl::Now() + absl::Seconds(60));
    PD_CHECK_OK(ch.status());
    auto sender = KvSender::Start(tx, std::move(*ch), *c.src,
                                  {absl::StrCat(mode, "-", tokens, "-", it), "bench", c.seq, tokens}, so);
    PD_CHECK_OK(sender.status());
    acceptor.join();
    const absl::Time t0 = absl::Now();
    for (int l = 0; l < layers; ++l) PD_CHECK_OK((*sender)->SendLayer(l));
    PD_CHECK_OK((*sender)->Finish(absl::Now() + absl::Seconds(600)));
    const double secs = absl::ToDoubleSeconds(absl::Now() - t0);
    PD_CHECK_OK(receiver->WaitDone(absl::Now() + absl::Seconds(60)));
    c.bytes = (*sender)->stats().bytes;
    if (it == 0 && verify) {
      absl::Status v = Verify(c, layers, tokens, receiver->sequence());
      std::printf("VERIFY mode=%s tokens=%lld %s\n", mode.c_str(), (long long)tokens,
                  v.ok() ? "OK" : std::string(v.ToString()).c_str());
      PD_CHECK_OK(v);
    }
    PD_CHECK_OK(c.dst->Release(receiver->sequence()));
    sender->reset();
    receiver.reset();
    gbps.push_back(double(c.bytes) / secs / 1e9);
    std::printf("  %s tokens=%lld iter %d: %.3f ms, %.2f GB/s\n", mode.c_str(), (long long)tokens, it,
                secs * 1e3, gbps.back());
    std::fflush(stdout);
  }
  return gbps;
}

int Main(const Flags& f) {
  setenv("NCCL_NVLS_ENABLE", "0", 0);
  const int gpus = CudaDeviceCount();
  if (gpus < 2) {
    std::fprintf(stderr, "kv_gpu_bench: needs two CUDA devices, %d visible\n", gpus);
    return 3;
  }
  const int layers = int(Int(f, "layers", 61));
  const int iters = int(Int(f, "iters", 5));
  const bool verify = Int(f, "verify", 1) != 0;
  const std::string modes = f.count("modes") ? f.at("modes") : "nccl,plain,ucx";
  auto has = [&](const char* m) { return absl::StrContains(absl::StrCat(",", modes, ","), absl::StrCat(",", m, ",")); };
  const uint64_t chunk = uint64_t(Int(f, "chunk_mb", 64)) << 20;

  auto tx_ops = *NewCudaMemoryOps({.device = 0});
  auto rx_ops = *NewCudaMemoryOps({.device = 1});
  SenderOptions so;
  so.memory_ops = tx_ops.get();
  so.max_chunk_bytes = chunk;
  so.checksum_every = uint32_t(Int(f, "checksum_every", 64));
  so.max_batch_chunks = 8;
  so.progress_timeout = absl::Seconds(60);
  ReceiverOptions ro;
  ro.model_fingerprint = "bench";
  ro.memory_ops = rx_ops.get();
  ro.credit_bytes = uint64_t(Int(f, "credit_mb", 4096)) << 20;
  ro.credit_chunks = 4096;
  ro.progress_timeout = absl::Seconds(60);

  for (int64_t tokens : IntList(f, "tokens", "32768,131072")) {
    Caches c = MakeCaches(layers, tokens);
    std::printf("# tokens=%lld layers=%d: source filled on GPU 0, destination on GPU 1\n", (long long)tokens,
                layers);
    Stats stream{};
    if (has("nccl")) {
      auto tx = NewNcclBackend({.device = 0});
      auto rx = NewNcclBackend({.device = 1});
      PD_CHECK_OK(tx.status());
      PD_CHECK_OK(rx.status());
      stream = Summarize(RunStreams(**tx, **rx, c, layers, tokens, iters, so, ro, verify, "nccl_stream"));
      PrintResult("nccl_stream", tokens, c.bytes, chunk, stream,
                  absl::StrCat(" checksum_every=", so.checksum_every));
    }
    if (c.bytes == 0) {
      // The stream did not run: size the references by the chunk plan's total.
      c.bytes = uint64_t(layers) * (uint64_t(kernels::NumPages(tokens)) *
                                        (testing::V32Layout().MlaPageBytes() + testing::V32Layout().IndexPageBytes()) +
                                    uint64_t(kernels::CeilDiv(tokens, 1024)) * testing::V32Layout().SummaryBytes());
    }
    double best_plain = 0, same_chunk = 0;
    if (has("plain")) {
      PlainNccl plain(c.bytes);
      for (int64_t mb : IntList(f, "plain_chunks", "4,64,0")) {
        const uint64_t pc = uint64_t(mb) << 20;
        plain.Run(pc);  // warm-up
        std::vector<double> v;
        for (int it = 0; it < iters; ++it) v.push_back(plain.Run(pc));
        Stats s = Summarize(v);
        PrintResult("nccl_plain", tokens, c.bytes, pc == 0 ? c.bytes : pc, s);
        best_plain = std::max(best_plain, s.best);
        if (pc == chunk) same_chunk = s.best;
      }
    }
    if (has("nccl") && has("plain")) {
      std::printf("RATIO tokens=%lld stream_vs_plain_same_chunk=%.3f stream_vs_best_plain=%.3f\n",
                  (long long)tokens, same_chunk > 0 ? stream.best / same_chunk : 0.0,
                  best_plain > 0 ? stream.best / best_plain : 0.0);
    }
    if (has("ucx")) {
      if (std::getenv("UCX_TLS") == nullptr) setenv("UCX_TLS", "posix", 1);
      auto tx = NewUcxBackend();
      auto rx = NewUcxBackend();
      PD_CHECK_OK(tx.status());
      PD_CHECK_OK(rx.status());
      SenderOptions uso = so;
      uso.max_chunk_bytes = uint64_t(Int(f, "ucx_chunk_mb", 4)) << 20;
      uso.staged = true;
      uso.checksum_every = 1;
      ReceiverOptions uro = ro;
      uro.staging_slots = 16;
      Stats s = Summarize(RunStreams(**tx, **rx, c, layers, tokens, std::max(1, iters / 2), uso, uro, verify,
                                     "ucx_staged"));
      PrintResult("ucx_staged", tokens, c.bytes, uso.max_chunk_bytes, s,
                  absl::StrCat(" tls=", std::getenv("UCX_TLS"), " device_memory=",
                               (*tx)->supports_device_memory() ? "direct" : "staged"));
    }
  }
  return 0;
}

}  // namespace
}  // namespace pd::transport

int main(int argc, char** argv) {
  pd::InitLogging(argv[0]);
  pd::transport::Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "kv_gpu_bench: arguments are --key=value, got '%s'\n", a.c_str());
      return 2;
    }
    f[a.substr(2, eq - 2)] = a.substr(eq + 1);
  }
  return pd::transport::Main(f);
}
