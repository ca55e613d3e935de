// The UCX data plane (the RDMA path): one ucp context and worker per backend,
// one progress thread, endpoints created from worker addresses exchanged on
// the control channel, receiver memory registered once (ucp_mem_map) and
// written with one-sided puts (ucp_put_nbx) under rkeys sent on the control
// channel, completion by post-then-poll (ucp_ep_flush_nbx is the fence).
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
