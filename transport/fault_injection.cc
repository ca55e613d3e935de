#include "transport/fault_injection.h"

#include <cstring>
#include <deque>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"

namespace pd::transport {
namespace {

class FaultySender final : public DataSender {
 public:
  FaultySender(FaultInjectingBackend& backend, std::unique_ptr<DataSender> inner, bool one_sided)
      : backend_(backend), inner_(std::move(inner)), one_sided_(one_sided) {}

  absl::Status PostWrite(const uint8_t* src, uint64_t dst, size_t len) override {
    if (disconnected_) return Disconnected();
    int64_t index = 0;
    switch (backend_.NextWrite(&index)) {
      case FaultInjectingBackend::Action::kPass:
        return inner_->PostWrite(src, dst, len);
      case FaultInjectingBackend::Action::kDisconnect:
        disconnected_ = true;
        if (backend_.policy().on_disconnect) backend_.policy().on_disconnect();
        return Disconnected();
      case FaultInjectingBackend::Action::kDrop:
        if (one_sided_) return absl::OkStatus();
        return inner_->PostWrite(Keep(std::vector<uint8_t>(len, 0)), dst, len);
      case FaultInjectingBackend::Action::kCorrupt: {
        std::vector<uint8_t> copy(src, src + len);
        if (len > 0) copy[size_t(index) % len] ^= 0x5a;
        return inner_->PostWrite(Keep(std::move(copy)), dst, len);
      }
    }
    return absl::InternalError("unreachable");
  }

  absl::StatusOr<uint64_t> PostFence() override {
    if (disconnected_) return Disconnected();
    auto id = inner_->PostFence();
    if (id.ok()) fences_[*id] = Fence{absl::Now(), ++fences_posted_};
    return id;
  }

  absl::StatusOr<bool> PollFence(uint64_t id) override {
    if (disconnected_) return Disconnected();
    auto done = inner_->PollFence(id);
    if (!done.ok() || !*done) return done;
    auto it = fences_.find(id);
    if (it != fences_.end()) {
      if (absl::Now() - it->second.posted < backend_.policy().fence_delay) return false;
      // Tampered copies posted before this fence are no longer read.
      while (!kept_.empty() && kept_.front().first <= it->second.seq) kept_.pop_front();
      fences_.erase(it);
    }
    return true;
  }

 private:
  struct Fence {
    absl::Time posted;
    uint64_t seq;
  };
  absl::Status Disconnected() const {
    return absl::UnavailableError("fault injection: data-plane peer disconnected");
  }
  // Keeps a tampered copy alive until the next fence completes.
  const uint8_t* Keep(std::vector<uint8_t> v) {
    kept_.emplace_back(fences_posted_ + 1, std::move(v));
    return kept_.back().second.data();
  }

  FaultInjectingBackend& backend_;
  std::unique_ptr<DataSender> inner_;
  const bool one_sided_;
  bool disconnected_ = false;
  std::map<uint64_t, Fence> fences_;
  uint64_t fences_posted_ = 0;
  std::deque<std::pair<uint64_t, std::vector<uint8_t>>> kept_;
};

}  // namespace

FaultInjectingBackend::FaultInjectingBackend(Backend& inner, FaultPolicy policy)
    : inner_(inner), policy_(std::move(policy)), rng_(policy_.seed * 0x9e3779b97f4a7c15ull + 1) {}

FaultInjectingBackend::Action FaultInjectingBackend::NextWrite(int64_t* index) {
  const int64_t i = writes_++;
  *index = i;
  if (policy_.disconnect_after_writes >= 0 && i >= policy_.disconnect_after_writes) {
    disconnected_ = true;
    return Action::kDisconnect;
  }
  if (policy_.drop_writes.count(i)) {
    ++dropped_;
    return Action::kDrop;
  }
  bool corrupt = policy_.corrupt_writes.count(i) > 0;
  if (!corrupt && policy_.corrupt_probability > 0) {
    // splitmix64
    uint64_t z = (rng_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    corrupt = double(z >> 11) * 0x1.0p-53 < policy_.corrupt_probability;
  }
  if (corrupt) {
    ++corrupted_;
    return Action::kCorrupt;
  }
  return Action::kPass;
}

absl::StatusOr<std::unique_ptr<DataSender>> FaultInjectingBackend::Connect(
    const MemoryRegion& local, const std::string& receiver_info, const PeerContext& peer,
    absl::Time deadline) {
  auto inner = inner_.Connect(local, receiver_info, peer, deadline);
  if (!inner.ok()) return inner.status();
  return std::unique_ptr<DataSender>(new FaultySender(*this, std::move(*inner), inner_.one_sided()));
}

}  // namespace pd::transport
