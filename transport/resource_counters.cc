#include "transport/resource_counters.h"

#include <atomic>
#include <iterator>
#include <utility>

#include "absl/strings/str_cat.h"

namespace pd::transport {
namespace {
std::atomic<int64_t> g_count[int(Resource::kCount)];
std::atomic<int64_t> g_pinned_bytes{0};
std::atomic<int64_t> g_registered_bytes{0};

void AddBytes(Resource r, int64_t delta) {
  if (r == Resource::kPinnedBuffer) g_pinned_bytes += delta;
  if (r == Resource::kRegisteredRegion) g_registered_bytes += delta;
}
}  // namespace

const char* ResourceName(Resource r) {
  static constexpr const char* kNames[] = {"registered_region", "remote_key", "pinned_buffer",
                                           "endpoint",          "communicator", "stream",
                                           "quarantined_stream"};
  static_assert(std::size(kNames) == size_t(Resource::kCount));
  return int(r) >= 0 && r < Resource::kCount ? kNames[int(r)] : "?";
}

std::string ResourceSnapshot::ToString() const {
  std::string s;
  for (int i = 0; i < int(Resource::kCount); ++i) {
    absl::StrAppend(&s, i ? " " : "", ResourceName(Resource(i)), "=", count[i]);
  }
  absl::StrAppend(&s, " pinned_bytes=", pinned_bytes, " registered_bytes=", registered_bytes);
  return s;
}

ResourceSnapshot GetResourceCounters() {
  ResourceSnapshot s;
  for (int i = 0; i < int(Resource::kCount); ++i) s.count[i] = g_count[i].load();
  s.pinned_bytes = g_pinned_bytes.load();
  s.registered_bytes = g_registered_bytes.load();
  return s;
}

ResourceToken::ResourceToken(Resource r, size_t bytes) : r_(r), bytes_(bytes) {
  ++g_count[int(r)];
  AddBytes(r, int64_t(bytes));
}

ResourceToken::ResourceToken(ResourceToken&& o) noexcept
    : r_(std::exchange(o.r_, Resource::kCount)), bytes_(std::exchange(o.bytes_, 0)) {}

ResourceToken& ResourceToken::operator=(ResourceToken&& o) noexcept {
  if (this != &o) {
    Reset();
    r_ = std::exchange(o.r_, Resource::kCount);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void ResourceToken::Reset() {
  if (r_ == Resource::kCount) return;
  --g_count[int(r_)];
  AddBytes(r_, -int64_t(bytes_));
  r_ = Resource::kCount;
  bytes_ = 0;
}

}  // namespace pd::transport
