// The NCCL data plane: GPU to GPU (two GPUs of one host over NVLink, or
// across nodes over NCCL's network), two-sided ncclSend/ncclRecv between the
// sender's and the receiver's KV arenas in device memory.
//
// Communicators: one 2-rank communicator per stream at a time (sender rank 0,
// receiver rank 1), created lazily per prefill/decode pair and cached for
// later streams to the same peer (keyed by the peer's node name:
// SendRequest::receiver_node on the sender, the manifest's sender node on the
// receiver) (at most max_communicators per backend,
// least recently used idle one evicted first; counted as
// Resource::kCommunicator). Bootstrap over the control channel: the manifest's
// backend blob names the communicator the sender would reuse; the receiver
// either leases that one or, if it has no idle communicator of that key,
// creates one (ncclGetUniqueId + non-blocking ncclCommInitRankConfig) and
// returns the ncclUniqueId in the Accept's blob; the sender then joins it.
// docs/kv-format.md has the blob layouts (version 2 adds the packing size;
// a receiver answers version-1 senders in version 1, without packing).
//
// Each communicator owns one CUDA stream. Writes and receives are queued and
// issued in ncclGroupStart/End batches on it (a sender's at each fence, a
// receiver's at each FlushRecvs, which the stream calls at layer boundaries;
// at most group_ops per batch); fences and receive tickets are CUDA events
// recorded after each batch, polled with cudaEventQuery (post-then-poll), as
// is ncclCommGetAsyncError. A stream that ends with operations outstanding (the
// peer died, the stream failed) aborts its communicator (ncclCommAbort),
// waits for the CUDA stream to drain and drops the communicator from the
// cache, so no receive can land in the arena afterwards.
//
// Built only when CUDA and nccl.h are found (PD_HAVE_NCCL).
#ifndef PD_TRANSPORT_NCCL_NCCL_BACKEND_H_
#define PD_TRANSPORT_NCCL_NCCL_BACKEND_H_

#include <cstddef>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "transport/backend.h"

namespace pd::transport {

struct NcclOptions {
  // Backend name on the wire; both ends must use the same.
  std::string name = "nccl";
  // The CUDA device this node's KV arena lives on.
  int device = 0;
  // Communicators kept per backend (leased ones count; a stream that finds
  // every one leased fails with ResourceExhausted).
  int max_communicators = 4;
  // Bound on joining a communicator (both ends), and on NCCL enqueueing one
  // batch of operations.
  absl::Duration init_timeout = absl::Seconds(30);
  absl::Duration op_timeout = absl::Seconds(10);
  // Operations fused into one ncclGroupStart/End launch.
  size_t group_ops = 32;
  // Packing: each group of two or more sends (receives) the stream flushes
  // together travels as one message of at most about this many bytes,
  // gathered into (scattered from) two device staging buffers per
  // communicator and side, on a copy stream that overlaps the transfer of
  // the other buffer; fewer, larger NCCL messages for the KV's small
  // objects. Used when both ends set it (the smaller value); the stream then
  // cuts the same runs on both ends (kv_stream.h). 0: off.
  uint64_t pack_bytes = 0;
};

// FailedPrecondition when `device` does not exist (no GPU, no driver).
absl::StatusOr<std::unique_ptr<Backend>> NewNcclBackend(const NcclOptions& options = {});

// Communicators this process has started joining (both ends, every backend),
// ever: a stream that reuses a cached communicator adds none.
uint64_t NcclCommunicatorsCreated();

}  // namespace pd::transport

#endif  // PD_TRANSPORT_NCCL_NCCL_BACKEND_H_
