// Ships a DeepSeek-V3.2-shaped KV (61 layers x 788 B/token + pooled summaries)
// through a KV stream and reports GB/s: bytes of the stream's chunk plan
// divided by the time from the first SendLayer to the sender's Finish (every
// chunk landed, verified by XXH3 and acknowledged). Sender and receiver run in
// this process, each with its own backend instance (own ucp context/worker).
//
//   kv_transport_bench [--backend=ucx|loopback] [--tokens=16384] [--layers=61]
//                      [--iters=5] [--chunk_bytes=4194304] [--checksum=1]
//                      [--staged=0] [--ucx_arena=1] [--batch_chunks=4]
//                      [--batches_in_flight=4] [--credit_mb=64] [--credit_chunks=64]
// Prints one line per iteration and a final
//   RESULT backend=.. tls=.. tokens=.. bytes=.. best_gbps=.. median_gbps=..
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "transport/kv_stream.h"
#include "transport/loopback_backend.h"
#include "transport/testing/kv_test_util.h"
#include "transport/ucx/ucx_backend.h"

namespace pd::transport {
namespace {

int64_t Flag(const std::map<std::string, std::string>& f, const std::string& k, int64_t def) {
  auto it = f.find(k);
  int64_t v = def;
  if (it != f.end() && !absl::SimpleAtoi(it->second, &v)) {
    std::fprintf(stderr, "--%s=%s is not an integer\n", k.c_str(), it->second.c_str());
    std::exit(2);
  }
  return v;
}

int Main(const std::map<std::string, std::string>& f) {
  const std::string backend_name = f.count("backend") ? f.at("backend") : "ucx";
  const int64_t tokens = Flag(f, "tokens", 16384);
  const int layers = int(Flag(f, "layers", 61));
  const int iters = int(Flag(f, "iters", 5));
  std::unique_ptr<Backend> tx, rx;
  if (backend_name == "ucx") {
    UcxOptions uo;
    uo.peer_error_handling = Flag(f, "ucx_peer_errors", 1) != 0;
    auto a = NewUcxBackend(uo);
    auto b = NewUcxBackend(uo);
    PD_CHECK_OK(a.status());
    PD_CHECK_OK(b.status());
    tx = std::move(*a);
    rx = std::move(*b);
  } else if (backend_name == "loopback") {
    tx = NewLoopbackBackend();
    rx = NewLoopbackBackend();
  } else {
    std::fprintf(stderr, "unknown --backend=%s\n", backend_name.c_str());
    return 2;
  }
  auto src = *testing::MakeCache(testing::V32Layout(), layers, tokens, 1);
  // --ucx_arena=1: the receiver's arena is allocated by UCX (shm-mappable).
  std::unique_ptr<kvcache::Allocator> alloc = kvcache::NewHostAllocator();
  if (backend_name == "ucx" && Flag(f, "ucx_arena", 1) != 0) alloc = NewUcxArenaAllocator(*rx);
  auto dst = *testing::MakeCache(testing::V32Layout(), layers, tokens, 1, std::move(alloc));
  const int32_t seq = *testing::MakeFilledSequence(*src, tokens, 3);
  SenderOptions so;
  so.max_chunk_bytes = uint64_t(Flag(f, "chunk_bytes", 4 << 20));
  so.checksum = Flag(f, "checksum", 1) != 0;
  so.checksum_every = uint32_t(Flag(f, "checksum_every", 1));
  so.staged = Flag(f, "staged", 0) != 0;
  so.max_batch_chunks = int(Flag(f, "batch_chunks", so.max_batch_chunks));
  so.max_batches_in_flight = int(Flag(f, "batches_in_flight", so.max_batches_in_flight));
  ReceiverOptions ro;
  ro.model_fingerprint = "bench";
  ro.credit_bytes = uint64_t(Flag(f, "credit_mb", std::max<int64_t>(64, 4 * (so.max_chunk_bytes >> 20)))) << 20;
  ro.credit_chunks = uint32_t(Flag(f, "credit_chunks", ro.credit_chunks));
  auto listener = *ControlListener::Listen("127.0.0.1", 0);
  std::vector<double> gbps;
  uint64_t bytes = 0;
  for (int it = 0; it < iters; ++it) {
    std::unique_ptr<KvReceiver> receiver;
    std::thread acceptor([&] {
      auto ch = listener->Accept(absl::Now() + absl::Seconds(30));
      PD_CHECK_OK(ch.status());
      auto r = KvReceiver::Accept(*rx, std::move(*ch), *dst, ro);
      PD_CHECK_OK(r.status());
      receiver = std::move(*r);
    });
    auto ch = ControlChannel::Connect("127.0.0.1", listener->port(), absl::Now() + absl::Seconds(30));
    PD_CHECK_OK(ch.status());
    auto sender = KvSender::Start(*tx, std::move(*ch), *src,
                                  {absl::StrCat("bench-", it), "bench", seq, tokens}, so);
    PD_CHECK_OK(sender.status());
    acceptor.join();
    const absl::Time t0 = absl::Now();
    for (int l = 0; l < layers; ++l) PD_CHECK_OK((*sender)->SendLayer(l));
    PD_CHECK_OK((*sender)->Finish(absl::Now() + absl::Seconds(600)));
    const double secs = absl::ToDoubleSeconds(absl::Now() - t0);
    PD_CHECK_OK(receiver->WaitDone(absl::Now() + absl::Seconds(10)));
    bytes = (*sender)->stats().bytes;
    if (it == 0) PD_CHECK_OK(testing::CompareSequences(*src, seq, *dst, receiver->sequence(), tokens));
    PD_CHECK_OK(dst->Release(receiver->sequence()));
    gbps.push_back(double(bytes) / secs / 1e9);
    std::printf("iter %d: %llu bytes in %.3f ms = %.2f GB/s\n", it, (unsigned long long)bytes,
                secs * 1e3, gbps.back());
  }
  std::vector<double> sorted = gbps;
  std::sort(sorted.begin(), sorted.end());
  const char* tls = std::getenv("UCX_TLS");
  std::printf("RESULT backend=%s tls=%s tokens=%lld layers=%d bytes=%llu chunk_bytes=%llu best_gbps=%.3f "
              "median_gbps=%.3f\n",
              backend_name.c_str(), tls ? tls : "default", (long long)tokens, layers,
              (unsigned long long)bytes, (unsigned long long)so.max_chunk_bytes, sorted.back(),
              sorted[sorted.size() / 2]);
  return 0;
}

}  // namespace
}  // namespace pd::transport

int main(int argc, char** argv) {
  pd::InitLogging(argv[0]);
  std::map<std::string, std::string> f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "arguments are --key=value, got '%s'\n", a.c_str());
      return 2;
    }
    f[a.substr(2, eq - 2)] = a.substr(eq + 1);
  }
  return pd::transport::Main(f);
}
