#include "transport/nccl/nccl_backend.h"

#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
#include "transport/blob_codec.h"
#include "transport/cuda/cuda_memory.h"
#include "transport/cuda/cuda_util.h"
#include "transport/lease_cache.h"
#include "transport/resource_counters.h"

namespace pd::transport {
namespace {

using blob::GetBytes;
using blob::GetU64;
using blob::PutBytes;
using blob::PutU64;
using cuda_internal::Event;
using cuda_internal::Stream;
using cuda_internal::UseDevice;

// Blob versions: 1 (no packing field) and 2 (a trailing pack_bytes).
constexpr uint64_t kBlobVersion = 2;

std::atomic<uint64_t> communicators_created{0};
constexpr int kSenderRank = 0, kReceiverRank = 1;
enum : uint64_t { kReuse = 0, kCreate = 1 };

absl::Status NcclStatus(ncclResult_t r, absl::string_view call, ncclComm_t comm = nullptr) {
  if (r == ncclSuccess || r == ncclInProgress) return absl::OkStatus();
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  std::string msg = absl::StrCat(call, ": ", ncclGetErrorString(r),
                                 last != nullptr && *last ? absl::StrCat(" (", last, ")") : "");
  switch (r) {
    case ncclRemoteError:
    case ncclSystemError: return absl::UnavailableError(msg);
    case ncclInvalidArgument:
    case ncclInvalidUsage: return absl::InvalidArgumentError(msg);
    default: return absl::InternalError(msg);
  }
}

// Device memory from cudaMalloc, freed on destruction.
class DeviceBuffer {
 public:
  static absl::StatusOr<std::unique_ptr<DeviceBuffer>> Create(int device, size_t bytes) {
    PD_RETURN_IF_ERROR(UseDevice(device));
    void* p = nullptr;
    PD_RETURN_IF_ERROR(Annotate(cuda_internal::CudaStatus(cudaMalloc(&p, bytes), "cudaMalloc"),
                                absl::StrCat("NCCL packing buffer of ", bytes, " bytes")));
    return std::unique_ptr<DeviceBuffer>(new DeviceBuffer(device, static_cast<uint8_t*>(p), bytes));
  }
  ~DeviceBuffer() {
    cudaSetDevice(device_);
    cudaFree(p_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  uint8_t* get() const { return p_; }
  size_t size() const { return n_; }

 private:
  DeviceBuffer(int device, uint8_t* p, size_t n) : device_(device), p_(p), n_(n) {}
  const int device_;
  uint8_t* const p_;
  const size_t n_;
};

// Packing (NcclOptions::pack_bytes): two staging buffers used in turn and a
// copy stream, so that gathering (sender) or scattering (receiver) one group
// overlaps the transfer of the other. Stream-ordered: a buffer is reused
// only after the event recorded behind its last use (`free`).
struct PackRing {
  ~PackRing() { copy.reset(); }  // drains the copies before buffers and events go
  std::unique_ptr<Stream> copy;
  std::unique_ptr<DeviceBuffer> buf[2];
  std::unique_ptr<Event> ready[2], free[2];
  int next = 0;
};

// One 2-rank NCCL communicator (non-blocking mode) and the CUDA stream its
// operations run on. Destruction aborts it (local; ends anything still
// running on the GPU, never waits for the peer) and drains the stream (and
// the packing copies).
class Comm {
 public:
  // Starts joining communicator `id` as `rank`; usable once WaitIdle is OK.
  static absl::StatusOr<std::unique_ptr<Comm>> Start(int device, const ncclUniqueId& id, int rank) {
    PD_ASSIGN_OR_RETURN(std::unique_ptr<Stream> stream, Stream::Create(device));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    ncclResult_t r = ncclCommInitRankConfig(&comm, 2, id, rank, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      if (comm != nullptr) ncclCommAbort(comm);
      return NcclStatus(r, "ncclCommInitRankConfig");
    }
    communicators_created.fetch_add(1, std::memory_order_relaxed);
    return std::unique_ptr<Comm>(new Comm(device, comm, std::move(stream)));
  }
  ~Comm() {
    cudaSetDevice(device_);
    ncclResult_t r = ncclCommAbort(comm_);
    if (r != ncclSuccess) LOG(WARNING) << NcclStatus(r, "ncclCommAbort");
    stream_.reset();  // synchronizes
    pack_.reset();    // the copy stream synchronizes before the buffers go
  }
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  // OK once nothing is being set up or enqueued (initialisation, the last
  // ncclGroupEnd); the communicator's error; DeadlineExceeded at `deadline`.
  absl::Status WaitIdle(absl::Time deadline, absl::string_view what) {
    while (true) {
      ncclResult_t async = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
      if (r != ncclSuccess) return NcclStatus(r, "ncclCommGetAsyncError", comm_);
      if (async == ncclSuccess) return absl::OkStatus();
      if (async != ncclInProgress) return NcclStatus(async, what, comm_);
      if (absl::Now() > deadline) {
        return absl::DeadlineExceededError(absl::StrCat(what, ": NCCL communicator not ready in time"));
      }
      std::this_thread::yield();
    }
  }
  // The communicator's asynchronous error, without waiting (OK while busy).
  absl::Status Health() {
    ncclResult_t async = ncclSuccess;
    ncclResult_t r = ncclCommGetAsyncError(comm_, &async);
    if (r != ncclSuccess) return NcclStatus(r, "ncclCommGetAsyncError", comm_);
    return NcclStatus(async, "NCCL communicator", comm_);
  }

  ncclComm_t get() const { return comm_; }
  cudaStream_t stream() const { return stream_->get(); }
  int device() const { return device_; }

  // The packing ring, with buffers of at least `bytes` each (created on
  // first use; grown after draining both streams).
  absl::StatusOr<PackRing*> Ring(size_t bytes) {
    if (pack_ == nullptr) {
      auto ring = std::make_unique<PackRing>();
      PD_ASSIGN_OR_RETURN(ring->copy, Stream::Create(device_));
      for (int k = 0; k < 2; ++k) {
        PD_ASSIGN_OR_RETURN(ring->ready[k], Event::Create(device_));
        PD_ASSIGN_OR_RETURN(ring->free[k], Event::Create(device_));
      }
      pack_ = std::move(ring);
    }
    if (pack_->buf[0] == nullptr || pack_->buf[0]->size() < bytes) {
      PD_RETURN_IF_ERROR(UseDevice(device_));
      PD_RETURN_IF_ERROR(cuda_internal::CudaStatus(cudaStreamSynchronize(stream()), "cudaStreamSynchronize"));
      PD_RETURN_IF_ERROR(
          cuda_internal::CudaStatus(cudaStreamSynchronize(pack_->copy->get()), "cudaStreamSynchronize"));
      for (auto& b : pack_->buf) {
        b.reset();
        PD_ASSIGN_OR_RETURN(b, DeviceBuffer::Create(device_, bytes));
      }
    }
    return pack_.get();
  }

 private:
  Comm(int device, ncclComm_t c, std::unique_ptr<Stream> s)
      : device_(device), comm_(c), stream_(std::move(s)), token_(Resource::kCommunicator) {}
  const int device_;
  const ncclComm_t comm_;
  std::unique_ptr<Stream> stream_;
  std::unique_ptr<PackRing> pack_;  // NcclOptions::pack_bytes
  ResourceToken token_;
};

using CommCache = LeaseCache<Comm>;

// Queued operations issued in ncclGroupStart/End batches; completions are
// CUDA events recorded after each batch. Shared by sender and receiver.
class Batcher {
 public:
  // `pack_bytes` > 0: each flushed group of two or more operations moves as
  // one message through the communicator's packing ring.
  Batcher(const NcclOptions& o, CommCache& cache, CommCache::Lease lease, absl::Time ready_deadline,
          uint64_t pack_bytes)
      : o_(o), cache_(cache), lease_(lease), ready_deadline_(ready_deadline), pack_bytes_(pack_bytes) {}
  // A clean end (every operation issued and complete, no error) keeps the
  // communicator for later streams; anything else aborts and drops it.
  ~Batcher() {
    const bool clean = !failed_ && !abandoned_ && pending_.empty() && events_.empty();
    cache_.Release(lease_.key, clean);
  }
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  Comm& comm() { return *lease_.value; }
  void Abandon() { abandoned_ = true; }
  bool failed() const { return failed_; }

  // Queues one send (`send`) or receive of `len` bytes at device address `p`;
  // returns its 1-based sequence number.
  absl::StatusOr<uint64_t> Queue(bool send, uint8_t* p, size_t len) {
    if (failed_) return error_;
    pending_.push_back({send, p, len});
    ++queued_;
    // A packed group is the caller's (it must equal the peer's): never split.
    if (pack_bytes_ == 0 && pending_.size() >= o_.group_ops) PD_RETURN_IF_ERROR(Flush());
    return queued_;
  }

  // Issues the queued operations as one group and records an event after it.
  absl::Status Flush() {
    if (failed_) return error_;
    if (pending_.empty()) return absl::OkStatus();
    absl::Status st = Issue();
    if (!st.ok()) Fail(st);
    return st;
  }

  // True once operation `seq` (and every earlier one) completed on the GPU.
  absl::StatusOr<bool> Done(uint64_t seq) {
    if (failed_) return error_;
    if (seq > issued_) PD_RETURN_IF_ERROR(Flush());
    while (!events_.empty()) {
      absl::StatusOr<bool> done = events_.front().second->Query();
      if (!done.ok()) {
        Fail(done.status());
        return error_;
      }
      if (!*done) break;
      completed_ = events_.front().first;
      spare_.push_back(std::move(events_.front().second));
      events_.pop_front();
    }
    if (completed_ >= seq) return true;
    if (absl::Status h = comm().Health(); !h.ok()) {
      Fail(h);
      return error_;
    }
    return false;
  }
  uint64_t queued() const { return queued_; }
  uint64_t pack_bytes() const { return pack_bytes_; }

 private:
  struct Op {
    bool send;
    uint8_t* p;
    size_t len;
  };

  absl::Status Issue() {
    Comm& c = comm();
    PD_RETURN_IF_ERROR(UseDevice(c.device()));
    // Initialisation (first batch) or the previous group's enqueueing.
    const absl::Time deadline = issued_ == 0 ? ready_deadline_ : absl::Now() + o_.op_timeout;
    PD_RETURN_IF_ERROR(c.WaitIdle(deadline, "NCCL communicator setup"));
    if (pack_bytes_ > 0 && pending_.size() >= 2) return IssuePacked();
    PD_RETURN_IF_ERROR(NcclStatus(ncclGroupStart(), "ncclGroupStart"));
    for (const Op& op : pending_) {
      ncclResult_t r = op.send ? ncclSend(op.p, op.len, ncclUint8, kReceiverRank, c.get(), c.stream())
                               : ncclRecv(op.p, op.len, ncclUint8, kSenderRank, c.get(), c.stream());
      if (r != ncclSuccess && r != ncclInProgress) {
        ncclGroupEnd();
        return NcclStatus(r, op.send ? "ncclSend" : "ncclRecv", c.get());
      }
    }
    PD_RETURN_IF_ERROR(NcclStatus(ncclGroupEnd(), "ncclGroupEnd", c.get()));
    // Non-blocking communicators may still be enqueueing: wait before
    // recording the event behind the group.
    PD_RETURN_IF_ERROR(c.WaitIdle(absl::Now() + o_.op_timeout, "ncclGroupEnd"));
    std::unique_ptr<Event> ev;
    if (!spare_.empty()) {
      ev = std::move(spare_.back());
      spare_.pop_back();
    } else {
      PD_ASSIGN_OR_RETURN(ev, Event::Create(c.device()));
    }
    PD_RETURN_IF_ERROR(ev->Record(c.stream()));
    issued_ = queued_;
    events_.emplace_back(issued_, std::move(ev));
    pending_.clear();
    return absl::OkStatus();
  }

  // The pending group as one message. Sender: gather the sources into a
  // ring buffer on the copy stream, then send it on the communicator's
  // stream. Receiver: receive into a ring buffer, then scatter it on the
  // copy stream; the group completes when the scatter did.
  absl::Status IssuePacked() {
    Comm& c = comm();
    uint64_t total = 0;
    for (const Op& op : pending_) total += op.len;
    PD_ASSIGN_OR_RETURN(PackRing * ring, c.Ring(std::max<uint64_t>(total, pack_bytes_)));
    const int k = ring->next;
    ring->next ^= 1;
    uint8_t* buf = ring->buf[k]->get();
    cudaStream_t copy = ring->copy->get();
    const bool send = pending_.front().send;
    auto wait = [](cudaStream_t s, const Event& e) {
      return cuda_internal::CudaStatus(cudaStreamWaitEvent(s, e.get(), 0), "cudaStreamWaitEvent");
    };
    auto memcpy_async = [&](uint8_t* dst, const uint8_t* src, size_t n) {
      return cuda_internal::CudaStatus(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, copy),
                                       "cudaMemcpyAsync(device to device)");
    };
    if (send) {
      PD_RETURN_IF_ERROR(wait(copy, *ring->free[k]));  // its previous send completed
      uint64_t off = 0;
      for (const Op& op : pending_) {
        PD_RETURN_IF_ERROR(memcpy_async(buf + off, op.p, op.len));
        off += op.len;
      }
      PD_RETURN_IF_ERROR(ring->ready[k]->Record(copy));
      PD_RETURN_IF_ERROR(wait(c.stream(), *ring->ready[k]));
    } else {
      PD_RETURN_IF_ERROR(wait(c.stream(), *ring->free[k]));  // its previous scatter completed
    }
    PD_RETURN_IF_ERROR(NcclStatus(ncclGroupStart(), "ncclGroupStart"));
    ncclResult_t r = send ? ncclSend(buf, total, ncclUint8, kReceiverRank, c.get(), c.stream())
                          : ncclRecv(buf, total, ncclUint8, kSenderRank, c.get(), c.stream());
    if (r != ncclSuccess && r != ncclInProgress) {
      ncclGroupEnd();
      return NcclStatus(r, send ? "ncclSend (packed)" : "ncclRecv (packed)", c.get());
    }
    PD_RETURN_IF_ERROR(NcclStatus(ncclGroupEnd(), "ncclGroupEnd", c.get()));
    PD_RETURN_IF_ERROR(c.WaitIdle(absl::Now() + o_.op_timeout, "ncclGroupEnd"));
    cudaStream_t done_on = c.stream();
    if (send) {
      PD_RETURN_IF_ERROR(ring->free[k]->Record(c.stream()));
    } else {
      PD_RETURN_IF_ERROR(ring->ready[k]->Record(c.stream()));
      PD_RETURN_IF_ERROR(wait(copy, *ring->ready[k]));
      uint64_t off = 0;
      for (const Op& op : pending_) {
        PD_RETURN_IF_ERROR(memcpy_async(op.p, buf + off, op.len));
        off += op.len;
      }
      PD_RETURN_IF_ERROR(ring->free[k]->Record(copy));
      done_on = copy;
    }
    std::unique_ptr<Event> ev;
    if (!spare_.empty()) {
      ev = std::move(spare_.back());
      spare_.pop_back();
    } else {
      PD_ASSIGN_OR_RETURN(ev, Event::Create(c.device()));
    }
    PD_RETURN_IF_ERROR(ev->Record(done_on));
    issued_ = queued_;
    events_.emplace_back(issued_, std::move(ev));
    pending_.clear();
    return absl::OkStatus();
  }

  void Fail(const absl::Status& st) {
    if (failed_) return;
    failed_ = true;
    error_ = absl::IsUnavailable(st) || absl::IsDeadlineExceeded(st)
                 ? st
                 : absl::UnavailableError(absl::StrCat("NCCL data plane failed: ", st.message()));
  }

  const NcclOptions& o_;
  CommCache& cache_;
  const CommCache::Lease lease_;
  const absl::Time ready_deadline_;
  const uint64_t pack_bytes_;
  std::vector<Op> pending_;
  std::deque<std::pair<uint64_t, std::unique_ptr<Event>>> events_;  // (last op covered, event)
  std::vector<std::unique_ptr<Event>> spare_;
  uint64_t queued_ = 0, issued_ = 0, completed_ = 0;
  bool failed_ = false, abandoned_ = false;
  absl::Status error_;
};

class NcclSender final : public DataSender {
 public:
  NcclSender(const NcclOptions& o, CommCache& cache, CommCache::Lease lease, uint64_t pack_bytes)
      : b_(o, cache, lease, absl::Now() + o.op_timeout, pack_bytes) {}

  absl::Status PostWrite(const uint8_t* src, uint64_t, size_t len) override {
    return b_.Queue(true, const_cast<uint8_t*>(src), len).status();
  }
  absl::StatusOr<uint64_t> PostFence() override {
    PD_RETURN_IF_ERROR(b_.Flush());
    return b_.queued();
  }
  absl::StatusOr<bool> PollFence(uint64_t id) override { return b_.Done(id); }
  void Abandon() override { b_.Abandon(); }
  uint64_t packed_group_bytes() const override { return b_.pack_bytes(); }

 private:
  Batcher b_;
};

class NcclReceiver final : public DataReceiver {
 public:
  NcclReceiver(const NcclOptions& o, CommCache& cache, CommCache::Lease lease, uint8_t* base,
               size_t bytes, std::string info, absl::Time ready_deadline, uint64_t pack_bytes)
      : b_(o, cache, lease, ready_deadline, pack_bytes), base_(base), bytes_(bytes), info_(std::move(info)) {}

  std::string info() const override { return info_; }
  absl::StatusOr<uint64_t> PostRecv(uint64_t dst, size_t len) override {
    if (dst + len > bytes_ || dst + len < dst) {
      return absl::OutOfRangeError(absl::StrCat("NCCL receive [", dst, ", +", len,
                                                ") outside the region of ", bytes_, " bytes"));
    }
    return b_.Queue(false, base_ + dst, len);
  }
  absl::StatusOr<bool> PollRecv(uint64_t ticket) override { return b_.Done(ticket); }
  // Issues the receives queued so far as one group (its CUDA event completes
  // when all of them did), so that they never wait for later receives.
  absl::Status FlushRecvs() override { return b_.Flush(); }
  uint64_t packed_group_bytes() const override { return b_.pack_bytes(); }

 private:
  Batcher b_;
  uint8_t* const base_;
  const size_t bytes_;
  const std::string info_;
};

class NcclBackend final : public Backend {
 public:
  explicit NcclBackend(const NcclOptions& o)
      : o_(o), comms_(size_t(std::max(1, o.max_communicators))), rng_(std::random_device{}()) {}
  ~NcclBackend() override { comms_.Clear(); }

  std::string name() const override { return o_.name; }
  bool one_sided() const override { return false; }
  bool supports_device_memory() const override { return true; }

  // Offers the key of an idle communicator to this peer (0: none), reserved
  // for this stream until Connect or CancelSenderInfo.
  absl::StatusOr<std::string> SenderInfo(const PeerContext& peer) override {
    std::optional<CommCache::Lease> lease = comms_.AcquireIdle(peer.remote_node);
    std::string info;
    PutU64(info, kBlobVersion);
    PutU64(info, lease ? lease->key : 0);
    PutU64(info, o_.pack_bytes);
    if (lease) {
      absl::MutexLock lock(&mu_);
      offered_[peer.request_id] = *lease;
    }
    return info;
  }

  void CancelSenderInfo(const PeerContext& peer) override {
    std::optional<CommCache::Lease> lease = TakeOffered(peer.request_id);
    if (lease) comms_.Release(lease->key, true);
  }

  absl::StatusOr<std::unique_ptr<DataReceiver>> Listen(const MemoryRegion& region,
                                                       const std::string& sender_info,
                                                       const PeerContext& peer,
                                                       absl::Time deadline) override {
    if (!region.on_device) {
      return absl::InvalidArgumentError("the NCCL backend moves device memory; the region is host memory");
    }
    absl::string_view in(sender_info);
    uint64_t version = 0, key = 0, sender_pack = 0;
    if (!GetU64(in, &version) || (version != 1 && version != 2) || !GetU64(in, &key) ||
        (version == 2 && !GetU64(in, &sender_pack)) || !in.empty()) {
      return absl::InvalidArgumentError("malformed NCCL sender info");
    }
    // Packing when both ends ask for it, in groups of the smaller size.
    const uint64_t pack = sender_pack > 0 && o_.pack_bytes > 0 ? std::min(sender_pack, o_.pack_bytes) : 0;
    std::string info;
    PutU64(info, version);  // answer in the sender's version
    std::optional<CommCache::Lease> lease;
    if (key != 0) lease = comms_.AcquireKey(key);
    if (lease) {
      PutU64(info, kReuse);
      PutU64(info, key);
    } else {
      // A new communicator: this end is its bootstrap root.
      if (!comms_.HasRoom()) {
        return absl::ResourceExhaustedError(absl::StrCat("all ", comms_.capacity(),
                                                         " NCCL communicators are in use"));
      }
      PD_RETURN_IF_ERROR(UseDevice(o_.device));
      ncclUniqueId id;
      PD_RETURN_IF_ERROR(NcclStatus(ncclGetUniqueId(&id), "ncclGetUniqueId"));
      PD_ASSIGN_OR_RETURN(std::unique_ptr<Comm> comm, Comm::Start(o_.device, id, kReceiverRank));
      const uint64_t new_key = NewKey();
      PD_ASSIGN_OR_RETURN(CommCache::Lease l, comms_.Insert(new_key, peer.remote_node, std::move(comm)));
      lease = l;
      PutU64(info, kCreate);
      PutU64(info, new_key);
      PutBytes(info, &id, sizeof(id));
    }
    if (version == 2) PutU64(info, pack);
    return std::unique_ptr<DataReceiver>(new NcclReceiver(o_, comms_, *lease, region.base, region.bytes,
                                                          std::move(info),
                                                          absl::Now() + o_.init_timeout, pack));
  }

  absl::StatusOr<std::unique_ptr<DataSender>> Connect(const MemoryRegion& local,
                                                      const std::string& receiver_info,
                                                      const PeerContext& peer,
                                                      absl::Time deadline) override {
    std::optional<CommCache::Lease> offered = TakeOffered(peer.request_id);
    auto release_offer = [&] {
      if (offered) comms_.Release(offered->key, true);
    };
    if (!local.on_device) {
      release_offer();
      return absl::InvalidArgumentError("the NCCL backend moves device memory; the region is host memory");
    }
    absl::string_view in(receiver_info);
    uint64_t version = 0, mode = 0, key = 0, pack = 0;
    std::string id_bytes;
    bool ok = GetU64(in, &version) && version == kBlobVersion && GetU64(in, &mode) && GetU64(in, &key) &&
              key != 0;
    if (ok && mode == kCreate) ok = GetBytes(in, &id_bytes) && id_bytes.size() == sizeof(ncclUniqueId);
    if (ok) ok = GetU64(in, &pack) && (pack == 0 || (o_.pack_bytes > 0 && pack <= o_.pack_bytes));
    if (!ok || !in.empty() || (mode != kReuse && mode != kCreate)) {
      release_offer();
      return absl::InvalidArgumentError("malformed NCCL receiver info");
    }
    if (mode == kReuse) {
      if (!offered || offered->key != key) {
        release_offer();
        return absl::InvalidArgumentError(
            absl::StrCat("receiver reuses NCCL communicator ", key, ", which this sender did not offer"));
      }
      return std::unique_ptr<DataSender>(new NcclSender(o_, comms_, *offered, pack));
    }
    // The receiver created a new communicator: it no longer has the one we
    // offered (evicted, failed, restarted; its lease ends before its Done, so
    // it is never merely busy), so ours is stale: drop it, then join the new one.
    if (offered) comms_.Release(offered->key, /*reusable=*/false);
    ncclUniqueId id;
    std::memcpy(&id, id_bytes.data(), sizeof(id));
    PD_RETURN_IF_ERROR(UseDevice(o_.device));
    PD_ASSIGN_OR_RETURN(std::unique_ptr<Comm> comm, Comm::Start(o_.device, id, kSenderRank));
    const absl::Time until = std::min(deadline, absl::Now() + o_.init_timeout);
    PD_RETURN_IF_ERROR(comm->WaitIdle(until, "joining the receiver's NCCL communicator"));
    PD_ASSIGN_OR_RETURN(CommCache::Lease lease, comms_.Insert(key, peer.remote_node, std::move(comm)));
    return std::unique_ptr<DataSender>(new NcclSender(o_, comms_, lease, pack));
  }

 private:
  uint64_t NewKey() {
    absl::MutexLock lock(&mu_);
    uint64_t k = 0;
    while (k == 0) k = rng_();
    return k;
  }
  std::optional<CommCache::Lease> TakeOffered(const std::string& request_id) {
    absl::MutexLock lock(&mu_);
    auto it = offered_.find(request_id);
    if (it == offered_.end()) return std::nullopt;
    CommCache::Lease l = it->second;
    offered_.erase(it);
    return l;
  }

  const NcclOptions o_;
  CommCache comms_;
  absl::Mutex mu_;
  std::mt19937_64 rng_ ABSL_GUARDED_BY(mu_);
  // Communicators SenderInfo reserved, by request id, until Connect.
  std::map<std::string, CommCache::Lease> offered_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

uint64_t NcclCommunicatorsCreated() { return communicators_created.load(std::memory_order_relaxed); }

absl::StatusOr<std::unique_ptr<Backend>> NewNcclBackend(const NcclOptions& options) {
  const int n = CudaDeviceCount();
  if (options.device < 0 || options.device >= n) {
    return absl::FailedPreconditionError(
        absl::StrCat("NCCL backend: CUDA device ", options.device, " does not exist (", n, " visible)"));
  }
  if (options.group_ops == 0) return absl::InvalidArgumentError("NcclOptions.group_ops is 0");
  return std::unique_ptr<Backend>(new NcclBackend(options));
}

}  // namespace pd::transport
