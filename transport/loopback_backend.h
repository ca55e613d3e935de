// In-process data plane, for tests and for co-located prefill/decode: the
// receiver's region is entered in a process-wide registry, the sender copies
// into it. One-sided mode behaves like puts; two-sided mode pairs each write
// with a posted receive in order, like NCCL send/recv, and with `group_ops`
// also batches like the NCCL backend: operations are held until a fence
// (sends), FlushRecvs (receives) or `group_ops` of them are queued, and a
// batch of receives completes only when all of it matched sends (an NCCL
// group's CUDA event). With `pack_bytes`, it also packs like the NCCL
// backend: every group of two or more writes between fences travels as one
// message, which must meet one group of receives between FlushRecvs of the
// same total length (a mismatch breaks the region with InvalidArgument).
#ifndef PD_TRANSPORT_LOOPBACK_BACKEND_H_
#define PD_TRANSPORT_LOOPBACK_BACKEND_H_

#include <memory>

#include "transport/backend.h"

namespace pd::transport {

struct LoopbackOptions {
  bool two_sided = false;
  // Two-sided only: operations per batch at most; 0: no batching.
  size_t group_ops = 0;
  // Two-sided only: packed_group_bytes() of both ends; 0: no packing.
  uint64_t pack_bytes = 0;
};

// Host memory only. Writes to a region whose receiver is gone fail with
// Unavailable; writes outside the region fail with OutOfRange.
std::unique_ptr<Backend> NewLoopbackBackend(const LoopbackOptions& options = {});

// Packed messages (groups of two or more writes) delivered so far by every
// loopback backend of this process; for tests.
uint64_t LoopbackPackedMessages();

}  // namespace pd::transport

#endif  // PD_TRANSPORT_LOOPBACK_BACKEND_H_
