#include "transport/loopback_backend.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "transport/resource_counters.h"

namespace pd::transport {
namespace {

std::atomic<uint64_t> packed_messages{0};

// One receiver's exposed region. Two-sided state pairs writes and receives.
struct Entry {
  absl::Mutex mu;
  uint8_t* base = nullptr;
  size_t bytes = 0;
  bool alive ABSL_GUARDED_BY(mu) = true;
  absl::Status broken ABSL_GUARDED_BY(mu);
  struct Pending {
    const uint8_t* src;  // sends
    uint64_t dst;        // receives
    size_t len;
    uint64_t ops = 1;    // operations this one stands for (packed: several)
    std::shared_ptr<std::vector<uint8_t>> packed = {};      // a packed send's bytes
    std::vector<std::pair<uint64_t, size_t>> parts = {};    // a packed receive's (dst, len)
  };
  // Issued operations, matched in order.
  std::deque<Pending> sends ABSL_GUARDED_BY(mu), recvs ABSL_GUARDED_BY(mu);
  uint64_t sends_posted ABSL_GUARDED_BY(mu) = 0, sends_done ABSL_GUARDED_BY(mu) = 0;
  uint64_t recvs_posted ABSL_GUARDED_BY(mu) = 0, recvs_done ABSL_GUARDED_BY(mu) = 0;
  // Batching (group_ops > 0): operations queued but not yet issued, and the
  // last receive ticket of every issued batch of receives.
  size_t group_ops = 0;
  uint64_t pack_bytes = 0;
  std::deque<Pending> queued_sends ABSL_GUARDED_BY(mu), queued_recvs ABSL_GUARDED_BY(mu);
  std::vector<uint64_t> recv_batch_ends ABSL_GUARDED_BY(mu);

  bool batching() const { return group_ops > 0 || pack_bytes > 0; }
  void IssueSendsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (pack_bytes > 0 && queued_sends.size() >= 2) {
      auto bytes = std::make_shared<std::vector<uint8_t>>();
      for (const Pending& p : queued_sends) bytes->insert(bytes->end(), p.src, p.src + p.len);
      Pending packed{bytes->data(), 0, bytes->size()};
      packed.ops = queued_sends.size();
      packed.packed = std::move(bytes);
      queued_sends.clear();
      sends.push_back(std::move(packed));
    }
    while (!queued_sends.empty()) {
      sends.push_back(queued_sends.front());
      queued_sends.pop_front();
    }
    MatchLocked();
  }
  void IssueRecvsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (queued_recvs.empty()) return;
    if (pack_bytes > 0 && queued_recvs.size() >= 2) {
      Pending packed{nullptr, 0, 0};
      for (const Pending& p : queued_recvs) {
        packed.parts.emplace_back(p.dst, p.len);
        packed.len += p.len;
      }
      packed.ops = queued_recvs.size();
      queued_recvs.clear();
      recvs.push_back(std::move(packed));
    }
    while (!queued_recvs.empty()) {
      recvs.push_back(queued_recvs.front());
      queued_recvs.pop_front();
    }
    recv_batch_ends.push_back(recvs_posted);
    MatchLocked();
  }
  // Batching: receive `ticket` is complete once its whole batch matched.
  bool RecvDoneLocked(uint64_t ticket) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (!batching()) return recvs_done >= ticket;
    if (ticket > recvs_posted - queued_recvs.size()) IssueRecvsLocked();  // as NCCL polling flushes
    auto it = std::lower_bound(recv_batch_ends.begin(), recv_batch_ends.end(), ticket);
    return it != recv_batch_ends.end() && recvs_done >= *it;
  }

  // Pairs queued sends with queued receives.
  void MatchLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    while (broken.ok() && !sends.empty() && !recvs.empty()) {
      Pending s = sends.front(), r = recvs.front();
      sends.pop_front();
      recvs.pop_front();
      if (s.len != r.len) {
        broken = absl::InvalidArgumentError(absl::StrCat("loopback send of ", s.len,
                                                         " bytes met a receive of ", r.len));
        return;
      }
      if (r.parts.empty()) {
        std::memcpy(base + r.dst, s.src, s.len);
      } else {
        uint64_t off = 0;
        for (const auto& [dst, len] : r.parts) {
          std::memcpy(base + dst, s.src + off, len);
          off += len;
        }
      }
      sends_done += s.ops;
      recvs_done += r.ops;
      if (s.ops > 1) packed_messages.fetch_add(1, std::memory_order_relaxed);
    }
  }
};

class Registry {
 public:
  static Registry& Get() {
    static Registry* r = new Registry();
    return *r;
  }
  uint64_t Add(std::shared_ptr<Entry> e) {
    absl::MutexLock lock(&mu_);
    entries_[++next_] = std::move(e);
    return next_;
  }
  std::shared_ptr<Entry> Find(uint64_t id) {
    absl::MutexLock lock(&mu_);
    auto it = entries_.find(id);
    return it == entries_.end() ? nullptr : it->second;
  }
  void Remove(uint64_t id) {
    absl::MutexLock lock(&mu_);
    entries_.erase(id);
  }

 private:
  absl::Mutex mu_;
  uint64_t next_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<uint64_t, std::shared_ptr<Entry>> entries_ ABSL_GUARDED_BY(mu_);
};

class LoopbackReceiver final : public DataReceiver {
 public:
  LoopbackReceiver(std::shared_ptr<Entry> e, uint64_t id)
      : entry_(std::move(e)), id_(id), token_(Resource::kRegisteredRegion, entry_->bytes) {}
  ~LoopbackReceiver() override {
    Registry::Get().Remove(id_);
    absl::MutexLock lock(&entry_->mu);
    entry_->alive = false;
  }
  std::string info() const override { return absl::StrCat(id_); }
  absl::StatusOr<uint64_t> PostRecv(uint64_t dst, size_t len) override {
    absl::MutexLock lock(&entry_->mu);
    if (dst + len > entry_->bytes) {
      return absl::OutOfRangeError(absl::StrCat("loopback receive [", dst, ", +", len,
                                                ") outside the region of ", entry_->bytes, " bytes"));
    }
    if (entry_->batching()) {
      entry_->queued_recvs.push_back({nullptr, dst, len});
      ++entry_->recvs_posted;
      // A packed group is never split.
      if (entry_->pack_bytes == 0 && entry_->queued_recvs.size() >= entry_->group_ops) entry_->IssueRecvsLocked();
      return entry_->recvs_posted;
    }
    entry_->recvs.push_back({nullptr, dst, len});
    entry_->MatchLocked();
    return ++entry_->recvs_posted;
  }
  absl::StatusOr<bool> PollRecv(uint64_t ticket) override {
    absl::MutexLock lock(&entry_->mu);
    if (!entry_->broken.ok()) return entry_->broken;
    return entry_->RecvDoneLocked(ticket);
  }
  absl::Status FlushRecvs() override {
    absl::MutexLock lock(&entry_->mu);
    entry_->IssueRecvsLocked();
    return absl::OkStatus();
  }
  uint64_t packed_group_bytes() const override { return entry_->pack_bytes; }

 private:
  std::shared_ptr<Entry> entry_;
  uint64_t id_;
  ResourceToken token_;
};

class LoopbackSender final : public DataSender {
 public:
  LoopbackSender(std::shared_ptr<Entry> e, bool two_sided)
      : entry_(std::move(e)), two_sided_(two_sided), token_(Resource::kEndpoint) {}
  absl::Status PostWrite(const uint8_t* src, uint64_t dst, size_t len) override {
    absl::MutexLock lock(&entry_->mu);
    if (!entry_->alive) return absl::UnavailableError("loopback receiver is gone");
    if (!entry_->broken.ok()) return entry_->broken;
    if (two_sided_) {
      ++entry_->sends_posted;
      if (entry_->batching()) {
        entry_->queued_sends.push_back({src, 0, len});
        if (entry_->pack_bytes == 0 && entry_->queued_sends.size() >= entry_->group_ops) {
          entry_->IssueSendsLocked();
        }
        return absl::OkStatus();
      }
      entry_->sends.push_back({src, 0, len});
      entry_->MatchLocked();
      return absl::OkStatus();
    }
    if (dst + len > entry_->bytes || dst + len < dst) {
      return absl::OutOfRangeError(absl::StrCat("loopback write [", dst, ", +", len,
                                                ") outside the region of ", entry_->bytes, " bytes"));
    }
    std::memcpy(entry_->base + dst, src, len);
    return absl::OkStatus();
  }
  absl::StatusOr<uint64_t> PostFence() override {
    if (!two_sided_) return ++fences_;
    absl::MutexLock lock(&entry_->mu);
    entry_->IssueSendsLocked();
    return entry_->sends_posted;
  }
  uint64_t packed_group_bytes() const override { return two_sided_ ? entry_->pack_bytes : 0; }
  absl::StatusOr<bool> PollFence(uint64_t id) override {
    absl::MutexLock lock(&entry_->mu);
    if (!entry_->broken.ok()) return entry_->broken;
    if (!two_sided_) return true;
    if (!entry_->alive && entry_->sends_done < id) {
      return absl::UnavailableError("loopback receiver is gone");
    }
    return entry_->sends_done >= id;
  }

 private:
  std::shared_ptr<Entry> entry_;
  const bool two_sided_;
  uint64_t fences_ = 0;
  ResourceToken token_;
};

class LoopbackBackend final : public Backend {
 public:
  explicit LoopbackBackend(const LoopbackOptions& o) : options_(o) {}
  std::string name() const override { return options_.two_sided ? "loopback2" : "loopback"; }
  bool one_sided() const override { return !options_.two_sided; }
  bool supports_device_memory() const override { return false; }
  absl::StatusOr<std::string> SenderInfo(const PeerContext&) override { return std::string(); }
  absl::StatusOr<std::unique_ptr<DataReceiver>> Listen(const MemoryRegion& region, const std::string&,
                                                       const PeerContext&, absl::Time) override {
    if (region.on_device) return absl::InvalidArgumentError("loopback backend: device memory");
    auto e = std::make_shared<Entry>();
    e->base = region.base;
    e->bytes = region.bytes;
    e->group_ops = options_.two_sided ? options_.group_ops : 0;
    e->pack_bytes = options_.two_sided ? options_.pack_bytes : 0;
    uint64_t id = Registry::Get().Add(e);
    return std::unique_ptr<DataReceiver>(new LoopbackReceiver(std::move(e), id));
  }
  absl::StatusOr<std::unique_ptr<DataSender>> Connect(const MemoryRegion& local, const std::string& info,
                                                      const PeerContext&, absl::Time) override {
    if (local.on_device) return absl::InvalidArgumentError("loopback backend: device memory");
    uint64_t id = 0;
    if (!absl::SimpleAtoi(info, &id)) {
      return absl::InvalidArgumentError(absl::StrCat("bad loopback receiver info '", info, "'"));
    }
    std::shared_ptr<Entry> e = Registry::Get().Find(id);
    if (e == nullptr) return absl::UnavailableError(absl::StrCat("no loopback receiver ", id));
    return std::unique_ptr<DataSender>(new LoopbackSender(std::move(e), options_.two_sided));
  }

 private:
  const LoopbackOptions options_;
};

}  // namespace

uint64_t LoopbackPackedMessages() { return packed_messages.load(std::memory_order_relaxed); }

std::unique_ptr<Backend> NewLoopbackBackend(const LoopbackOptions& options) {
  return std::make_unique<LoopbackBackend>(options);
}

}  // namespace pd::transport
