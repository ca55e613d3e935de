// KV streams: a prefill node (KvSender) pushes a sequence's KV to a decode node
// (KvReceiver) layer by layer, over any data-plane Backend, steered by a
// ControlChannel. docs/kv-format.md specifies the wire protocol; in short:
//
//   sender                                receiver
//   Manifest (fingerprint, layout, ...) ->  validate; allocate a sequence,
//                                        <- Accept (page table, region blob, credit)
//   per layer: summaries, keys, latents:
//     puts into the receiver's pages, fence,
//     ChunkBatch (headers + XXH3-64)   ->  verify the landed bytes
//                                        <- AckBatch (ok / resend, credit back)
//                                        <- LayerReady(L)
//                                        <- Done  (every chunk verified)
//   either side: Abort(code, message) on failure.
//
// Threads: each KvSender and each KvReceiver runs one stream thread that drives
// its data plane and control channel; a sender with checksums on also runs a
// hasher thread (the hash of chunk i overlaps posting chunk i+1), and so does
// the receiver of a two-sided stream (it hashes each sampled chunk as soon as
// it landed, before or while its header arrives). A chunk's header leaves as
// soon as its fence completed and its checksum is known, so a chunk still
// being hashed holds back no other. Public methods are thread-safe.
// Two-sided backends (NCCL): the receiver posts receives ahead, within the
// credit, and issues them (DataReceiver::FlushRecvs) in runs that never span
// two layers, so that a layer lands as soon as the sender sent it, however
// long the sender then pauses before the next layer. Backends that pack each
// group into one transfer (packed_group_bytes() > 0) get the same runs on
// both ends: each layer's chunks cut, in order, into runs of at most that
// many bytes and at most half the credit (bytes and chunks; a larger chunk
// is a run of its own); the sender fences after each run and the receiver
// flushes after each.
// Deadlines: every wait is bounded (handshake_timeout, progress_timeout, the
// caller's deadline); a dead peer is reported as Unavailable within the control
// channel's peer timeout (1.5 s by default).
// Flow control: the receiver grants credit (bytes and chunks not yet
// acknowledged); the sender never exceeds it, so memory on both sides is bounded
// by the credit (staging slots in staged mode).
// Page quarantine: after a failed one-sided stream, a sender that has not yet
// noticed the failure (or packets still in flight) can land puts in the
// receiver's memory. The receiver therefore reports the failure at once but
// hands back the sequence's pages and the stream's buffers only when the
// sender confirmed (Quiesced: it flushed its writes to remote completion and
// posts no more), or `quarantine_grace` after the sender is known gone
// (control channel closed without a Quiesced), and at the latest
// `quarantine_limit` after the failure. Two-sided backends need no quarantine:
// the receiver's posted receives end with its DataReceiver.
#ifndef PD_TRANSPORT_KV_STREAM_H_
#define PD_TRANSPORT_KV_STREAM_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvcache/kv_cache.h"
#include "proto/kv_control.h"
#include "transport/backend.h"
#include "transport/control_channel.h"
#include "transport/memory_ops.h"

namespace pd::transport {

struct StreamStats {
  uint64_t chunks = 0;         // chunks verified (receiver) / acknowledged (sender)
  uint64_t bytes = 0;          // payload bytes of those chunks
  uint64_t resends = 0;        // chunks sent again after a checksum mismatch
  uint64_t checksum_failures = 0;
  absl::Duration elapsed;      // handshake start to completion
};

struct SenderOptions {
  std::string node_name = "prefill";  // this node's stable name
  uint64_t max_chunk_bytes = 4u << 20;
  // Ask for a staging ring instead of direct puts into the receiver's pages.
  // Forced when the cache is device memory and the backend cannot reach it.
  bool staged = false;
  bool checksum = true;   // XXH3-64 per chunk, verified by the receiver
  // With `checksum`: only chunks whose id is a multiple of this are hashed and
  // verified (a sampled check where the backend has its own integrity and
  // hashing would bound the bandwidth, e.g. NCCL over NVLink). 1: every chunk.
  uint32_t checksum_every = 1;
  int max_resends = 3;    // per chunk, then the stream aborts with DataLoss
  // Chunks posted before one fence + header batch, and fenced batches whose
  // headers are not yet sent (the pipeline depth within the credit).
  int max_batch_chunks = 2;
  int max_batches_in_flight = 8;
  absl::Duration handshake_timeout = absl::Seconds(10);
  // No acknowledgement or completed fence for this long fails the stream.
  absl::Duration progress_timeout = absl::Seconds(10);
  // After a failure: how long to wait for the data plane to flush before
  // telling the receiver its memory is free again (Quiesced).
  absl::Duration quiesce_timeout = absl::Seconds(2);
  MemoryOps* memory_ops = nullptr;  // how to reach the cache; null: host memory
};

struct SendRequest {
  std::string request_id;
  std::string model_fingerprint;
  int32_t sequence = -1;  // in the sender's cache
  int64_t tokens = 0;     // tokens to ship (<= the sequence's capacity)
  // The receiver's stable node name: it keys the per-peer state a backend
  // keeps across streams (NCCL communicators). Empty: the control channel's
  // peer address (host:port), stable only while the receiver keeps its port.
  std::string receiver_node = {};
};

class KvSender {
 public:
  // Sends the manifest and waits for the receiver's Accept. A rejection comes
  // back as the receiver's error (FailedPrecondition for a fingerprint or layout
  // mismatch, ResourceExhausted when it has no room). `backend` and `cache` must
  // outlive the sender; the sequence must not change until the stream ends.
  static absl::StatusOr<std::unique_ptr<KvSender>> Start(Backend& backend,
                                                         std::unique_ptr<ControlChannel> channel,
                                                         const kvcache::KvCache& cache,
                                                         const SendRequest& request,
                                                         const SenderOptions& options);
  // Aborts with Cancelled when the stream has not finished, then joins the
  // stream thread; every endpoint, key and staging buffer is released.
  virtual ~KvSender() = default;

  // Queues layer `layer` (computed and final in the cache) for shipping and
  // returns at once. Each layer once. The stream's error once it failed.
  virtual absl::Status SendLayer(int layer) = 0;
  // Waits until the receiver verified every layer (its Done), the stream
  // failed, or the deadline (DeadlineExceeded; the stream continues).
  virtual absl::Status Finish(absl::Time deadline) = 0;
  // Fails the stream with `why` (sent to the receiver as an Abort).
  virtual void Abort(const absl::Status& why) = 0;
  // True once the receiver reported layer `layer` ready.
  virtual bool LayerConfirmed(int layer) const = 0;
  virtual StreamStats stats() const = 0;
  virtual const proto::Manifest& manifest() const = 0;
};

struct ReceiverOptions {
  std::string node_name = "decode";
  std::string model_fingerprint;  // must equal the manifest's
  uint64_t credit_bytes = 64u << 20;
  uint32_t credit_chunks = 64;
  uint32_t staging_slots = 8;  // staged mode: ring slots of max_chunk_bytes each
  absl::Duration handshake_timeout = absl::Seconds(10);
  // Nothing from the sender (headers, Abort) for this long fails the stream;
  // it also bounds how long a sender may pause between two layers.
  absl::Duration progress_timeout = absl::Seconds(10);
  // Page quarantine after a failed one-sided stream (see the top of this
  // file): how long after the sender is known gone its in-flight writes may
  // still land, and the longest wait for a live sender's Quiesced.
  absl::Duration quarantine_grace = absl::Seconds(2);
  absl::Duration quarantine_limit = absl::Seconds(10);
  MemoryOps* memory_ops = nullptr;  // how to reach the cache; null: host memory
};

class KvReceiver {
 public:
  // Waits for a manifest on `channel`, validates it against `cache` and
  // `options`, allocates a sequence, reserves its pages, exposes the memory to
  // the sender and replies Accept. On rejection the sender gets an Abort and
  // this returns the same error: FailedPrecondition for a fingerprint, layout or
  // backend mismatch, InvalidArgument for a malformed manifest,
  // ResourceExhausted when the cache has no room.
  static absl::StatusOr<std::unique_ptr<KvReceiver>> Accept(Backend& backend,
                                                            std::unique_ptr<ControlChannel> channel,
                                                            kvcache::KvCache& cache,
                                                            const ReceiverOptions& options);
  // Fails an unfinished stream (Cancelled) and joins the stream thread; after a
  // failure that waits for the quarantine to end (at most quarantine_limit).
  virtual ~KvReceiver() = default;

  virtual const proto::Manifest& manifest() const = 0;
  // The sequence the KV lands in. After a successful stream it belongs to the
  // caller, with Length = manifest().num_tokens; a failed stream releases it
  // when its quarantine ends (WaitReleased).
  virtual int32_t sequence() const = 0;
  // True once every chunk of layer `layer` landed and passed its checksum.
  virtual bool LayerReady(int layer) const = 0;
  // OK once layer `layer` is ready; the stream's error if it failed first;
  // DeadlineExceeded at the deadline; InvalidArgument for a bad layer.
  virtual absl::Status WaitLayer(int layer, absl::Time deadline) = 0;
  // OK once every layer is ready (the sequence's length is then set).
  virtual absl::Status WaitDone(absl::Time deadline) = 0;
  // OK once the stream ended and, after a failure, its sequence and buffers
  // went back (the quarantine ended); DeadlineExceeded before that.
  virtual absl::Status WaitReleased(absl::Time deadline) = 0;
  virtual void Abort(const absl::Status& why) = 0;
  virtual StreamStats stats() const = 0;
};

}  // namespace pd::transport

#endif  // PD_TRANSPORT_KV_STREAM_H_
