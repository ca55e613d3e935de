// The data plane of a KV stream: what a backend (UCX, NCCL, loopback, or a
// decorator around one) must do to move chunk bytes from a sender's memory into
// a receiver's memory. The stream protocol (kv_stream.h) sits on top and owns
// chunking, checksums, credits and failure handling; the control channel
// carries the blobs that backends exchange.
//
// Asynchronous operations are post-then-poll: Post* returns at once, Poll*
// reports done (true), in progress (false) or a final error. Errors crossing
// this interface are absl::Status; Unavailable means the peer went away.
#ifndef PD_TRANSPORT_BACKEND_H_
#define PD_TRANSPORT_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/memory_ops.h"

namespace pd::transport {

// A span of memory a stream reads from or writes into.
struct MemoryRegion {
  uint8_t* base = nullptr;
  size_t bytes = 0;
  bool on_device = false;  // CUDA device memory
  // The memory outlives this stream (a KV cache arena): a backend may keep its
  // registration for later streams until ForgetRegion. False for per-stream
  // buffers, whose registration must end with the stream.
  bool persistent = false;
};

// Who is on the other side of a stream (for per-peer resource caches).
struct PeerContext {
  std::string request_id;
  std::string local_node;   // this node's stable name
  std::string remote_node;  // the peer's stable name
};

// Sender side of one stream. Used by one thread at a time.
class DataSender {
 public:
  virtual ~DataSender() = default;
  // Posts a write of `len` bytes at `src` (inside the local region given to
  // Backend::Connect) to byte `dst_offset` of the receiver's region. `src` must
  // stay unchanged until a fence posted after this write has completed.
  virtual absl::Status PostWrite(const uint8_t* src, uint64_t dst_offset, size_t len) = 0;
  // Posts a fence behind every write posted so far and returns its id.
  virtual absl::StatusOr<uint64_t> PostFence() = 0;
  // True once fence `id` completed: every write before it is in the receiver's
  // memory (one-sided) or was consumed by a matching receive (two-sided).
  virtual absl::StatusOr<bool> PollFence(uint64_t id) = 0;
  // Called once the stream posts no more writes (after a failure): OK only
  // when every write posted so far has certainly landed in the receiver's
  // memory (or been consumed by a receive), so the receiver may reuse it;
  // an error when that cannot be known by the deadline (a broken data plane).
  // Drives the data plane on the calling thread, for backends whose
  // operations progress only when polled; true when something progressed (the
  // caller then polls again at once instead of sleeping). Default: nothing.
  virtual bool Progress() { return false; }
  // The stream failed: the peer may be gone, so per-peer state this sender
  // used (cached endpoints, keys) must not be reused. Default: nothing cached.
  virtual void Abandon() {}
  // One-sided backends on one host: the receiver's region mapped into this
  // process (its byte 0), or null. When non-null the caller may store bytes
  // into the region directly instead of PostWrite (e.g. a device-to-host copy
  // straight into a receiver's staging slot); a later PostFence orders those
  // stores like writes. Default: not mapped.
  virtual uint8_t* mapped_destination() const { return nullptr; }
  // Two-sided backends that move each fenced group of writes as one
  // transfer (packing them on the way): the largest group in bytes, agreed
  // with the receiver (its packed_group_bytes() is the same). The stream
  // then makes the groups equal on both ends (kv_stream.h). 0: groups are
  // free (each write pairs with one receive of its own).
  virtual uint64_t packed_group_bytes() const { return 0; }
  // Default: a fence behind every write, polled until the deadline.
  virtual absl::Status Quiesce(absl::Time deadline) {
    absl::StatusOr<uint64_t> fence = PostFence();
    if (!fence.ok()) return fence.status();
    while (true) {
      absl::StatusOr<bool> done = PollFence(*fence);
      if (!done.ok()) return done.status();
      if (*done) return absl::OkStatus();
      if (absl::Now() > deadline) return absl::DeadlineExceededError("data plane did not quiesce");
      std::this_thread::yield();
    }
  }
};

// Receiver side of one stream. Used by one thread at a time. Destroying it
// ends every receive posted through it (two-sided backends complete or cancel
// them first), so nothing lands in the region on its behalf afterwards. A
// one-sided backend cannot stop a sender's puts into a region that stays
// registered: the stream quarantines such memory after a failure until the
// sender confirms (Quiesce) or is known gone (kv_stream.h).
class DataReceiver {
 public:
  virtual ~DataReceiver() = default;
  // The blob the sender passes to Backend::Connect.
  virtual std::string info() const = 0;
  // Two-sided backends only: posts the receive matching the sender's next
  // write (same order, same length) into byte `dst_offset` of the region.
  // Returns a ticket for PollRecv.
  virtual absl::StatusOr<uint64_t> PostRecv(uint64_t dst_offset, size_t len) {
    return absl::UnimplementedError("PostRecv on a one-sided backend");
  }
  // True once the receive `ticket` (and every earlier one) completed.
  virtual absl::StatusOr<bool> PollRecv(uint64_t ticket) {
    return absl::UnimplementedError("PollRecv on a one-sided backend");
  }
  // Two-sided backends: receives posted before this call never wait for
  // receives posted after it. A backend that issues receives in batches (NCCL
  // groups, whose completion is the whole group's) issues what it holds now.
  // The stream calls it at every layer boundary and whenever it stops
  // posting, so that a layer's data lands without depending on later layers.
  // Default: receives are issued as they are posted.
  virtual absl::Status FlushRecvs() { return absl::OkStatus(); }
  // Two-sided backends that move each group of receives between FlushRecvs
  // calls as one transfer: the sender's packed_group_bytes(), agreed at
  // Listen / Connect. 0: no packing.
  virtual uint64_t packed_group_bytes() const { return 0; }
  // Drives the data plane on the calling thread while the stream waits (for
  // backends that apply incoming data only when progressed); true when
  // something progressed. Default: nothing to drive.
  virtual bool Progress() { return false; }
};

// A data-plane backend. Implementations are thread-safe: streams on several
// threads share one backend.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  // One-sided: the sender writes into the receiver's memory (puts). Two-sided:
  // every write pairs with a PostRecv on the receiver (send/recv).
  virtual bool one_sided() const = 0;
  // True when regions may be CUDA device memory on both sides; when false the
  // stream stages device memory through host buffers.
  virtual bool supports_device_memory() const = 0;
  // Sender: the blob for the manifest (worker address, NCCL unique id...).
  virtual absl::StatusOr<std::string> SenderInfo(const PeerContext& peer) = 0;
  // Receiver: exposes `region` to the sender that sent `sender_info`. The
  // backend may cache the region's registration across streams; the returned
  // object's destructor releases everything specific to this stream.
  virtual absl::StatusOr<std::unique_ptr<DataReceiver>> Listen(const MemoryRegion& region,
                                                               const std::string& sender_info,
                                                               const PeerContext& peer,
                                                               absl::Time deadline) = 0;
  // Sender: connects to the receiver's region described by `receiver_info`;
  // `local` is where the stream's writes read from.
  virtual absl::StatusOr<std::unique_ptr<DataSender>> Connect(const MemoryRegion& local,
                                                              const std::string& receiver_info,
                                                              const PeerContext& peer,
                                                              absl::Time deadline) = 0;
  // Sender: the stream for `peer` ends before Connect (the handshake failed):
  // releases whatever SenderInfo reserved for it. Default: nothing reserved.
  virtual void CancelSenderInfo(const PeerContext& peer) {}
  // Drops any cached registration of memory starting at `base` (call before
  // freeing memory that was given to Listen). Default: nothing cached.
  virtual void ForgetRegion(const uint8_t* base) {}
  // Receiver: host memory for a staging ring that this backend can expose to
  // a sender on the same host without copies (UCX: allocated by UCX, so that
  // shared-memory transports map it into the sender); Listen on it reuses
  // the allocation's registration. Counted as Resource::kPinnedBuffer.
  // Unimplemented when the backend has no such memory (the stream then
  // allocates the ring through its MemoryOps).
  virtual absl::StatusOr<std::unique_ptr<StagingBuffer>> AllocateStagingRing(size_t bytes) {
    return absl::UnimplementedError("backend has no exposable staging memory");
  }
};

}  // namespace pd::transport

#endif  // PD_TRANSPORT_BACKEND_H_
