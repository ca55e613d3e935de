// GPU-to-GPU KV transport benchmark (two GPUs of one host): ships a
// DeepSeek-V3.2-shaped KV (61 layers x 788 B/token + pooled summaries) from a
// device cache on GPU 0 to one on GPU 1, and in the same run measures the
// references, each as GB/s (10^9 B/s) over the same total bytes:
//   nccl_stream   KvSender/KvReceiver over the NCCL backend (what we ship)
//   nccl_plain    a plain ncclSend/ncclRecv loop over distinct device buffers
//                 of the same total size, in messages of --plain_chunks MiB
//                 (0: the whole KV as one message), one op per message
//   nccl_plain_kv a plain ncclSend/ncclRecv loop over the stream's own
//                 messages (the KV's objects in the caches: per layer the
//                 summaries, the keys and the MLA latents, cut at the chunk
//                 size), one op per message (ops=single) or one ncclGroup per
//                 layer (ops=layer_group): what NCCL itself achieves with the
//                 KV's message sizes, with no protocol around it
//   ucx_staged    KvSender/KvReceiver over UCX (UCX_TLS, default posix) with
//                 device memory staged through host memory (the receiver's
//                 UCX-allocated ring, mapped into the sender on shared memory)
// nccl_stream runs once per --pack_mb x --checksum_every x --batch_chunks
// combination (checksum_every=0: checksums off; pack_mb > 0: NCCL packing,
// NcclOptions::pack_bytes, on both ends, where batches are the packed runs);
// the first is the headline figure. RATIO lines compare each with the plain
// loops.
// One process, one thread per rank (GPU 0 sends, GPU 1 receives); stream
// timings run from the first SendLayer to the sender's Finish (every chunk
// landed and acknowledged). The first stream of each mode is checked byte for
// byte against the source (--verify=1).
//
//   kv_gpu_bench [--tokens=32768,131072] [--layers=61] [--iters=5]
//                [--modes=nccl,plain,plain_kv,ucx] [--chunk_mb=64]
//                [--checksum_every=64] [--batch_chunks=8] [--pack_mb=0] [--plain_chunks=4,64,0]
//                [--credit_mb=4096] [--ucx_chunk_mb=4] [--ucx_checksum_every=1]
//                [--verify=1] [--tag=NAME]
// Prints one RESULT line per measurement and RATIO lines:
//   RESULT mode=nccl_stream tokens=.. bytes=.. chunk_bytes=.. best_gbps=.. median_gbps=..
//   RATIO tokens=.. variant=.. headline=0|1 stream_vs_plain_same_chunk=.. stream_vs_best_plain=..
//         stream_vs_plain_kv=..
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
#include "transport/chunk_plan.h"
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

// --tag=NAME: appended to every RESULT and RATIO line as tag=NAME (e.g. the
// NCCL environment of the run).
std::string g_tag;
// A byte-for-byte check failed (the run goes on; main returns 1).
bool g_failed = false;

void PrintResult(const std::string& mode, int64_t tokens, uint64_t bytes, uint64_t chunk, const Stats& s,
                 const std::string& extra = "") {
  std::printf("RESULT mode=%s tokens=%lld bytes=%llu chunk_bytes=%llu best_gbps=%.2f median_gbps=%.2f%s%s\n",
              mode.c_str(), (long long)tokens, (unsigned long long)bytes, (unsigned long long)chunk, s.best,
              s.median, extra.c_str(), g_tag.c_str());
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
      for (void* b : stage_[r]) cudaFree(b);
      if (copy_stream_[r] != nullptr) {
        cudaStreamDestroy(copy_stream_[r]);
        for (int k = 0; k < 2; ++k) {
          cudaEventDestroy(copied_[r][k]);
          cudaEventDestroy(moved_[r][k]);
        }
      }
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

  // GB/s of one pass over `ops` (send from src + op.src on GPU 0 into
  // dst + op.dst on GPU 1), each its own launch, or one ncclGroup per layer
  // (`layer_first` as in a ChunkPlan: ops of layer L are [layer_first[L],
  // layer_first[L+1])).
  double RunOps(uint8_t* src, uint8_t* dst, const std::vector<Segment>& ops,
                const std::vector<size_t>& layer_first, bool group_layers) {
    absl::Barrier* start = new absl::Barrier(2);
    double secs[2] = {0, 0};
    uint64_t bytes = 0;
    for (const Segment& o : ops) bytes += o.len;
    std::thread t[2];
    for (int r = 0; r < 2; ++r) {
      t[r] = std::thread([&, r] {
        CUDA_CHECK(cudaSetDevice(r));
        CUDA_CHECK(cudaStreamSynchronize(stream_[r]));
        if (start->Block()) delete start;
        const absl::Time t0 = absl::Now();
        auto op = [&](const Segment& o) {
          if (r == 0) {
            NCCL_CHECK(ncclSend(src + o.src, o.len, ncclUint8, 1, comm_[0], stream_[0]));
          } else {
            NCCL_CHECK(ncclRecv(dst + o.dst, o.len, ncclUint8, 0, comm_[1], stream_[1]));
          }
        };
        for (size_t l = 0; l + 1 < layer_first.size(); ++l) {
          if (group_layers) NCCL_CHECK(ncclGroupStart());
          for (size_t i = layer_first[l]; i < layer_first[l + 1]; ++i) op(ops[i]);
          if (group_layers) NCCL_CHECK(ncclGroupEnd());
        }
        CUDA_CHECK(cudaStreamSynchronize(stream_[r]));
        secs[r] = absl::ToDoubleSeconds(absl::Now() - t0);
      });
    }
    for (auto& x : t) x.join();
    return double(bytes) / std::max(secs[0], secs[1]) / 1e9;
  }

  // GB/s of one pass over `ops` packed into units: consecutive ops of at most
  // `unit_bytes` together (a unit never spans layers when `per_layer`; an
  // op larger than the limit is a unit of its own). The sender gathers each
  // unit with device-to-device copies into one of two staging buffers on a
  // copy stream and sends it as one message; the receiver receives into one
  // of two staging buffers and scatters it on its copy stream. Unit i's
  // copies overlap unit i-1's transfer. What packing the KV's small messages
  // into large ones would give (the stream does not pack).
  double RunPacked(uint8_t* src, uint8_t* dst, const std::vector<Segment>& ops,
                   const std::vector<size_t>& layer_first, uint64_t unit_bytes, bool per_layer) {
    std::vector<std::pair<size_t, size_t>> units;  // [begin, end) into ops
    std::vector<uint64_t> unit_len;
    std::vector<bool> starts_layer(ops.size() + 1, false);
    for (size_t b : layer_first) starts_layer[b] = true;
    for (size_t i = 0; i < ops.size(); ++i) {
      const bool fresh = units.empty() || (per_layer && starts_layer[i]) ||
                         unit_len.back() + ops[i].len > unit_bytes;
      if (fresh) {
        units.push_back({i, i});
        unit_len.push_back(0);
      }
      units.back().second = i + 1;
      unit_len.back() += ops[i].len;
    }
    const uint64_t max_unit = *std::max_element(unit_len.begin(), unit_len.end());
    for (int r = 0; r < 2; ++r) {
      CUDA_CHECK(cudaSetDevice(r));
      if (stage_bytes_ < max_unit) {
        for (auto& b : stage_[r]) {
          if (b != nullptr) CUDA_CHECK(cudaFree(b));
          CUDA_CHECK(cudaMalloc(&b, max_unit));
        }
      }
      if (copy_stream_[r] == nullptr) {
        CUDA_CHECK(cudaStreamCreateWithFlags(&copy_stream_[r], cudaStreamNonBlocking));
        for (int k = 0; k < 2; ++k) {
          CUDA_CHECK(cudaEventCreateWithFlags(&copied_[r][k], cudaEventDisableTiming));
          CUDA_CHECK(cudaEventCreateWithFlags(&moved_[r][k], cudaEventDisableTiming));
        }
      }
    }
    stage_bytes_ = std::max(stage_bytes_, max_unit);
    absl::Barrier* start = new absl::Barrier(2);
    double secs[2] = {0, 0};
    uint64_t bytes = 0;
    for (uint64_t n : unit_len) bytes += n;
    std::thread t[2];
    for (int r = 0; r < 2; ++r) {
      t[r] = std::thread([&, r] {
        CUDA_CHECK(cudaSetDevice(r));
        CUDA_CHECK(cudaStreamSynchronize(stream_[r]));
        if (start->Block()) delete start;
        const absl::Time t0 = absl::Now();
        for (size_t u = 0; u < units.size(); ++u) {
          const int k = int(u % 2);
          uint8_t* stage = static_cast<uint8_t*>(stage_[r][k]);
          if (r == 0) {
            // Gather: the buffer is free once its previous send completed.
            if (u >= 2) CUDA_CHECK(cudaStreamWaitEvent(copy_stream_[0], moved_[0][k]));
            uint64_t off = 0;
            for (size_t i = units[u].first; i < units[u].second; ++i) {
              CUDA_CHECK(cudaMemcpyAsync(stage + off, src + ops[i].src, ops[i].len, cudaMemcpyDeviceToDevice,
                                         copy_stream_[0]));
              off += ops[i].len;
            }
            CUDA_CHECK(cudaEventRecord(copied_[0][k], copy_stream_[0]));
            CUDA_CHECK(cudaStreamWaitEvent(stream_[0], copied_[0][k]));
            NCCL_CHECK(ncclSend(stage, unit_len[u], ncclUint8, 1, comm_[0], stream_[0]));
            CUDA_CHECK(cudaEventRecord(moved_[0][k], stream_[0]));
          } else {
            // Receive: the buffer is free once its previous scatter completed.
            if (u >= 2) CUDA_CHECK(cudaStreamWaitEvent(stream_[1], copied_[1][k]));
            NCCL_CHECK(ncclRecv(stage, unit_len[u], ncclUint8, 0, comm_[1], stream_[1]));
            CUDA_CHECK(cudaEventRecord(moved_[1][k], stream_[1]));
            CUDA_CHECK(cudaStreamWaitEvent(copy_stream_[1], moved_[1][k]));
            uint64_t off = 0;
            for (size_t i = units[u].first; i < units[u].second; ++i) {
              CUDA_CHECK(cudaMemcpyAsync(dst + ops[i].dst, stage + off, ops[i].len, cudaMemcpyDeviceToDevice,
                                         copy_stream_[1]));
              off += ops[i].len;
            }
            CUDA_CHECK(cudaEventRecord(copied_[1][k], copy_stream_[1]));
          }
        }
        CUDA_CHECK(cudaStreamSynchronize(stream_[r]));
        CUDA_CHECK(cudaStreamSynchronize(copy_stream_[r]));
        secs[r] = absl::ToDoubleSeconds(absl::Now() - t0);
      });
    }
    for (auto& x : t) x.join();
    units_ = units.size();
    return double(bytes) / std::max(secs[0], secs[1]) / 1e9;
  }
  size_t units() const { return units_; }

 private:
  const uint64_t bytes_;
  void* buf_[2] = {nullptr, nullptr};
  cudaStream_t stream_[2] = {nullptr, nullptr};
  ncclComm_t comm_[2] = {nullptr, nullptr};
  // RunPacked: two staging buffers per GPU, a copy stream and its events.
  void* stage_[2][2] = {{nullptr, nullptr}, {nullptr, nullptr}};
  uint64_t stage_bytes_ = 0;
  cudaStream_t copy_stream_[2] = {nullptr, nullptr};
  cudaEvent_t copied_[2][2] = {}, moved_[2][2] = {};
  size_t units_ = 0;
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

// The stream's messages: its chunk plan between the two caches' sequence
// (each fresh cache gives the sequence the same pages), flattened to
// segments, with the first segment of each layer.
absl::Status KvMessages(const Caches& c, int layers, int64_t tokens, uint64_t chunk, std::vector<Segment>* ops,
                        std::vector<size_t>* layer_first) {
  auto side = [&](const kvcache::KvCache& cache) {
    SideLayout s;
    s.pages = cache.PageTable(c.seq);
    s.pages.resize(size_t(kernels::NumPages(tokens)));
    for (int l = 0; l < layers; ++l) {
      s.mla.push_back(uint64_t(cache.MlaPool(l) - cache.arena()));
      s.index.push_back(uint64_t(cache.IndexPool(l) - cache.arena()));
      s.summary.push_back(uint64_t(reinterpret_cast<const uint8_t*>(cache.Summaries(l, c.seq)) - cache.arena()));
    }
    return s;
  };
  // The destination cache has no sequence yet: mirror the source's (same
  // options, so the same offsets and page ids).
  SideLayout src = side(*c.src);
  PlanParams params{testing::V32Layout(), uint32_t(layers), uint64_t(tokens), chunk};
  PD_ASSIGN_OR_RETURN(ChunkPlan plan, MakeChunkPlan(params, src, src));
  ops->clear();
  layer_first->assign(1, 0);
  for (int l = 0; l < layers; ++l) {
    for (uint32_t id = plan.layer_first[l]; id < plan.layer_first[l + 1]; ++id) {
      for (const Segment& s : plan.chunks[id].segments) ops->push_back(s);
    }
    layer_first->push_back(ops->size());
  }
  return absl::OkStatus();
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
                                  {absl::StrCat(mode, "-", tokens, "-", it), "bench", c.seq, tokens, "bench-gpu1"},
                                  so);
    PD_CHECK_OK(sender.status());
    acceptor.join();
    const absl::Time t0 = absl::Now();
    for (int l = 0; l < layers; ++l) PD_CHECK_OK((*sender)->SendLayer(l));
    PD_CHECK_OK((*sender)->Finish(absl::Now() + absl::Seconds(60)));
    const double secs = absl::ToDoubleSeconds(absl::Now() - t0);
    PD_CHECK_OK(receiver->WaitDone(absl::Now() + absl::Seconds(60)));
    c.bytes = (*sender)->stats().bytes;
    if (it == 0 && verify) {
      absl::Status v = Verify(c, layers, tokens, receiver->sequence());
      std::printf("VERIFY mode=%s tokens=%lld %s\n", mode.c_str(), (long long)tokens,
                  v.ok() ? "OK" : std::string(v.ToString()).c_str());
      if (!v.ok()) g_failed = true;  // measured on, reported by the exit code
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
  if (f.count("tag")) g_tag = " tag=" + f.at("tag");
  const int layers = int(Int(f, "layers", 61));
  const int iters = int(Int(f, "iters", 5));
  const bool verify = Int(f, "verify", 1) != 0;
  const std::string modes = f.count("modes") ? f.at("modes") : "nccl,plain,plain_kv,ucx";
  auto has = [&](const char* m) { return absl::StrContains(absl::StrCat(",", modes, ","), absl::StrCat(",", m, ",")); };
  const uint64_t chunk = uint64_t(Int(f, "chunk_mb", 64)) << 20;
  const std::vector<int64_t> batch_list = IntList(f, "batch_chunks", "8");
  const std::vector<int64_t> csum_list = IntList(f, "checksum_every", "64");
  if (batch_list.empty() || csum_list.empty()) {
    std::fprintf(stderr, "kv_gpu_bench: --batch_chunks and --checksum_every need a value\n");
    return 2;
  }

  auto tx_ops = *NewCudaMemoryOps({.device = 0});
  auto rx_ops = *NewCudaMemoryOps({.device = 1});
  SenderOptions so;
  so.memory_ops = tx_ops.get();
  so.max_chunk_bytes = chunk;
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
    // (variant, best GB/s) of every stream configuration; the first is the headline.
    std::vector<std::pair<std::string, double>> streams;
    if (has("nccl")) {
      for (int64_t pack_mb : IntList(f, "pack_mb", "0")) {
        auto tx = NewNcclBackend({.device = 0, .pack_bytes = uint64_t(pack_mb) << 20});
        auto rx = NewNcclBackend({.device = 1, .pack_bytes = uint64_t(pack_mb) << 20});
        PD_CHECK_OK(tx.status());
        PD_CHECK_OK(rx.status());
        for (int64_t csum : csum_list) {
          // Packed streams batch by run: the batch size does not apply.
          for (int64_t batch : pack_mb > 0 ? std::vector<int64_t>{batch_list[0]} : batch_list) {
            SenderOptions v = so;
            v.checksum = csum > 0;
            v.checksum_every = uint32_t(std::max<int64_t>(1, csum));
            v.max_batch_chunks = int(batch);
            const std::string variant = absl::StrCat("pack", pack_mb, "_csum", csum, pack_mb > 0 ? "_runs" : "_batch",
                                                     pack_mb > 0 ? 0 : batch);
            // Every packing size's first stream is checked byte for byte.
            const bool check = verify && csum == csum_list[0] && batch == batch_list[0];
            Stats s = Summarize(RunStreams(**tx, **rx, c, layers, tokens, iters, v, ro, check, "nccl_stream"));
            PrintResult("nccl_stream", tokens, c.bytes, chunk, s,
                        absl::StrCat(" pack_mb=", pack_mb, " checksum_every=", csum, " batch_chunks=",
                                     pack_mb > 0 ? std::string("run") : absl::StrCat(batch),
                                     " variant=", variant, streams.empty() ? " headline=1" : " headline=0"));
            streams.emplace_back(variant, s.best);
          }
        }
      }
    }
    if (c.bytes == 0) {
      // The stream did not run: size the references by the chunk plan's total.
      c.bytes = uint64_t(layers) * (uint64_t(kernels::NumPages(tokens)) *
                                        (testing::V32Layout().MlaPageBytes() + testing::V32Layout().IndexPageBytes()) +
                                    uint64_t(kernels::CeilDiv(tokens, 1024)) * testing::V32Layout().SummaryBytes());
    }
    double best_plain = 0, same_chunk = 0, plain_kv = 0;
    if (has("plain") || has("plain_kv")) {
      PlainNccl plain(c.bytes);
      if (has("plain")) {
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
      if (has("plain_kv")) {
        std::vector<Segment> ops;
        std::vector<size_t> layer_first;
        PD_CHECK_OK(KvMessages(c, layers, tokens, chunk, &ops, &layer_first));
        for (bool grouped : {false, true}) {
          plain.RunOps(c.src->arena(), c.dst->arena(), ops, layer_first, grouped);  // warm-up
          std::vector<double> v;
          for (int it = 0; it < iters; ++it) {
            v.push_back(plain.RunOps(c.src->arena(), c.dst->arena(), ops, layer_first, grouped));
          }
          Stats s = Summarize(v);
          PrintResult("nccl_plain_kv", tokens, c.bytes, chunk, s,
                      absl::StrCat(" ops=", grouped ? "layer_group" : "single", " messages=", ops.size()));
          plain_kv = std::max(plain_kv, s.best);
        }
        // Packing the messages: one per layer, or up to 64 MiB across layers.
        // Checked once: the destination is cleared, then compared.
        for (bool per_layer : {true, false}) {
          const uint64_t unit = per_layer ? UINT64_MAX : uint64_t(64) << 20;
          CUDA_CHECK(cudaSetDevice(1));
          CUDA_CHECK(cudaMemset(c.dst->arena(), 0, c.dst->arena_bytes()));
          CUDA_CHECK(cudaDeviceSynchronize());
          plain.RunPacked(c.src->arena(), c.dst->arena(), ops, layer_first, unit, per_layer);
          if (verify) {
            absl::Status st = Verify(c, layers, tokens, c.seq);
            std::printf("VERIFY mode=nccl_plain_kv ops=%s tokens=%lld %s\n",
                        per_layer ? "layer_packed" : "packed_64", (long long)tokens,
                        st.ok() ? "OK" : std::string(st.ToString()).c_str());
            if (!st.ok()) g_failed = true;
          }
          std::vector<double> v;
          for (int it = 0; it < iters; ++it) {
            v.push_back(plain.RunPacked(c.src->arena(), c.dst->arena(), ops, layer_first, unit, per_layer));
          }
          Stats s = Summarize(v);
          PrintResult("nccl_plain_kv", tokens, c.bytes, chunk, s,
                      absl::StrCat(" ops=", per_layer ? "layer_packed" : "packed_64", " messages=", plain.units()));
        }
      }
    }
    if (has("plain") || has("plain_kv")) {
      for (size_t i = 0; i < streams.size(); ++i) {
        const double best = streams[i].second;
        std::printf("RATIO tokens=%lld variant=%s headline=%d stream_vs_plain_same_chunk=%.3f "
                    "stream_vs_best_plain=%.3f stream_vs_plain_kv=%.3f%s\n",
                    (long long)tokens, streams[i].first.c_str(), i == 0 ? 1 : 0,
                    same_chunk > 0 ? best / same_chunk : 0.0, best_plain > 0 ? best / best_plain : 0.0,
                    plain_kv > 0 ? best / plain_kv : 0.0, g_tag.c_str());
      }
    }
    if (has("ucx")) {
      if (std::getenv("UCX_TLS") == nullptr) setenv("UCX_TLS", "posix", 1);
      auto tx = NewUcxBackend();
      auto rx = NewUcxBackend();
      PD_CHECK_OK(tx.status());
      PD_CHECK_OK(rx.status());
      for (int64_t csum : IntList(f, "ucx_checksum_every", "1")) {
        SenderOptions uso = so;
        uso.max_chunk_bytes = uint64_t(Int(f, "ucx_chunk_mb", 4)) << 20;
        uso.staged = true;
        uso.checksum = csum > 0;
        uso.checksum_every = uint32_t(std::max<int64_t>(1, csum));
        uso.max_batch_chunks = 8;
        ReceiverOptions uro = ro;
        uro.staging_slots = 16;
        Stats s = Summarize(RunStreams(**tx, **rx, c, layers, tokens, std::max(1, iters / 2), uso, uro, verify,
                                       "ucx_staged"));
        PrintResult("ucx_staged", tokens, c.bytes, uso.max_chunk_bytes, s,
                    absl::StrCat(" tls=", std::getenv("UCX_TLS"), " device_memory=",
                                 (*tx)->supports_device_memory() ? "direct" : "staged",
                                 " checksum_every=", csum));
      }
    }
  }
  return g_failed ? 1 : 0;
}

}  // namespace
}  // namespace pd::transport

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // every line reaches the log, even before an abort
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
