// The UCX data plane (the RDMA path): one ucp context and worker per backend,
// one progress thread, endpoints created from worker addresses exchanged on
// the control channel, receiver memory registered once (ucp_mem_map) and
// written with one-sided puts (ucp_put_nbx) under rkeys sent on the control
// channel, completion by post-then-poll (ucp_ep_flush_nbx is the fence).
// Senders keep endpoints and the remote keys of cache arenas per receiver
// worker (bounded, LRU) so that later streams skip wireup and, on shared
// memory, the remapping of the receiver's arena.
//
// Runs on whatever UCX selects (UCX_TLS): shared memory and TCP on hosts
// without RDMA NICs, verbs where they exist. Device memory is registered
// directly when UCX reports CUDA support; otherwise supports_device_memory()
// is false and streams stage device memory through pinned host buffers.
// Endpoints use UCP_ERR_HANDLING_MODE_PEER: a vanished peer fails its
// operations with Unavailable instead of hanging.
#ifndef PD_TRANSPORT_UCX_UCX_BACKEND_H_
#define PD_TRANSPORT_UCX_UCX_BACKEND_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "kvcache/kv_cache.h"
#include "transport/backend.h"

namespace pd::transport {

struct UcxOptions {
  // Backend name on the wire; both ends must use the same.
  std::string name = "ucx";
  // Progress thread: keep polling this long after the last activity before
  // sleeping on the worker's event fd.
  absl::Duration spin = absl::Microseconds(200);
  // When UCX can map the receiver's region into this process (shared-memory
  // transports: ucp_rkey_ptr), write it with plain copies on the posting
  // thread instead of ucp_put_nbx. Off: always ucp_put_nbx.
  bool direct_puts = true;
  // Endpoints (and the remote keys of cache arenas) kept for later streams to
  // the same receiver, least recently used evicted first; a failed stream's
  // peer is never reused. 0: one endpoint per stream.
  int max_cached_peers = 8;
  // Endpoints with UCP_ERR_HANDLING_MODE_PEER (a dead peer fails operations
  // instead of hanging them). Off only for measurements: UCX 1.13 then may
  // pick other protocols (e.g. TCP put zcopy instead of emulated puts).
  bool peer_error_handling = true;
  // UCX_TCP_TX_SEG_SIZE / UCX_TCP_RX_SEG_SIZE unless set in the environment
  // (puts over TCP move one segment per active message). Empty: UCX's default.
  std::string tcp_seg_size = "256k";
};

// Creates the context, worker and progress thread. Unavailable (with UCX's
// error text) when UCX cannot initialise.
absl::StatusOr<std::unique_ptr<Backend>> NewUcxBackend(const UcxOptions& options = {});

// A KV-arena allocator whose memory UCX itself allocates and registers
// (ucp_mem_map with UCP_MEM_MAP_ALLOCATE) in `ucx_backend`'s context. Shared
// memory transports can then map the arena into the sender, so puts are
// direct copies instead of messages; Listen reuses this registration. Host
// memory only. `ucx_backend` (from NewUcxBackend) must outlive the allocator
// and every cache that uses it. Null when `ucx_backend` is not a UCX backend.
std::unique_ptr<kvcache::Allocator> NewUcxArenaAllocator(Backend& ucx_backend);

}  // namespace pd::transport

#endif  // PD_TRANSPORT_UCX_UCX_BACKEND_H_
