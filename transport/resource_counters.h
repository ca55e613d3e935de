// Process-wide counters of every foreign buffer and handle the transport holds:
// the tests read them to prove that a stream, successful or failed, releases
// everything it took. Thread-safe.
#ifndef PD_TRANSPORT_RESOURCE_COUNTERS_H_
#define PD_TRANSPORT_RESOURCE_COUNTERS_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace pd::transport {

enum class Resource : int {
  kRegisteredRegion = 0,  // memory registered with a backend (ucp_mem_map, loopback registry)
  kRemoteKey,             // unpacked remote keys (ucp_rkey)
  kPinnedBuffer,          // staging / bounce buffers (pinned host memory on GPU hosts)
  kEndpoint,              // ucp endpoints, loopback connections
  kCommunicator,          // NCCL communicators
  kStream,                // live KvSender / KvReceiver objects
  kQuarantine,            // failed receiver streams whose pages and buffers are held back
  kCount,
};
const char* ResourceName(Resource r);

struct ResourceSnapshot {
  int64_t count[int(Resource::kCount)] = {};
  int64_t pinned_bytes = 0;
  int64_t registered_bytes = 0;
  int64_t operator[](Resource r) const { return count[int(r)]; }
  bool operator==(const ResourceSnapshot&) const = default;
  std::string ToString() const;
};

ResourceSnapshot GetResourceCounters();

// Counts one resource for its lifetime (RAII; move-only). `bytes` adds to
// pinned_bytes (kPinnedBuffer) or registered_bytes (kRegisteredRegion).
class ResourceToken {
 public:
  ResourceToken() = default;
  ResourceToken(Resource r, size_t bytes = 0);
  ResourceToken(ResourceToken&& o) noexcept;
  ResourceToken& operator=(ResourceToken&& o) noexcept;
  ResourceToken(const ResourceToken&) = delete;
  ResourceToken& operator=(const ResourceToken&) = delete;
  ~ResourceToken() { Reset(); }
  void Reset();

 private:
  Resource r_ = Resource::kCount;
  size_t bytes_ = 0;
};

}  // namespace pd::transport

#endif  // PD_TRANSPORT_RESOURCE_COUNTERS_H_
