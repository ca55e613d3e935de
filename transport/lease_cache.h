// A bounded cache of expensive per-peer handles (NCCL communicators) that one
// stream at a time leases: a stream takes an idle entry for its peer (or by
// key), or inserts a new one; when the stream ends the entry becomes idle
// again (most recently used) or, if it may be broken, is destroyed. At most
// `capacity` entries exist; inserting into a full cache destroys the least
// recently used idle entry, and fails with ResourceExhausted when every entry
// is leased. Values are destroyed outside the lock. Thread-safe.
#ifndef PD_TRANSPORT_LEASE_CACHE_H_
#define PD_TRANSPORT_LEASE_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"

namespace pd::transport {

template <typename T>
class LeaseCache {
 public:
  // A leased entry; `value` stays valid until the lease is released.
  struct Lease {
    uint64_t key = 0;
    T* value = nullptr;
  };

  explicit LeaseCache(size_t capacity) : capacity_(capacity) {}
  ~LeaseCache() { Clear(); }
  LeaseCache(const LeaseCache&) = delete;
  LeaseCache& operator=(const LeaseCache&) = delete;

  // The most recently used idle entry for `peer`, now leased; nullopt if none.
  std::optional<Lease> AcquireIdle(const std::string& peer) {
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (!it->busy && it->peer == peer) return TakeLocked(it);
    }
    return std::nullopt;
  }

  // Entry `key` if it exists and is idle, now leased; nullopt otherwise.
  std::optional<Lease> AcquireKey(uint64_t key) {
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key == key) {
        if (it->busy) return std::nullopt;
        return TakeLocked(it);
      }
    }
    return std::nullopt;
  }

  // True when an Insert would succeed now (a free slot or an idle victim).
  bool HasRoom() const {
    absl::MutexLock lock(&mu_);
    return entries_.size() < capacity_ || IdleCountLocked() > 0;
  }

  // Adds `value` for `peer` under `key` (unique), leased. Makes room by
  // destroying the least recently used idle entry; ResourceExhausted (and
  // `value` destroyed) when every entry is leased; InvalidArgument for a
  // duplicate key.
  absl::StatusOr<Lease> Insert(uint64_t key, std::string peer, std::unique_ptr<T> value) {
    std::unique_ptr<T> victim;
    absl::MutexLock lock(&mu_);
    for (const Entry& e : entries_) {
      if (e.key == key) return absl::InvalidArgumentError(absl::StrCat("duplicate cache key ", key));
    }
    if (capacity_ == 0) return absl::ResourceExhaustedError("lease cache has no capacity");
    if (entries_.size() >= capacity_) {
      auto lru = entries_.end();
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (!it->busy) lru = it;  // the list runs most recent first
      }
      if (lru == entries_.end()) {
        return absl::ResourceExhaustedError(
            absl::StrCat("all ", capacity_, " cached handles are in use"));
      }
      victim = std::move(lru->value);
      entries_.erase(lru);
    }
    entries_.push_front(Entry{key, std::move(peer), std::move(value), true});
    return Lease{key, entries_.front().value.get()};
  }  // `victim`, declared before the lock, is destroyed after it is released

  // Ends the lease on `key`: idle and most recently used when `reusable`,
  // otherwise removed and destroyed. Unknown keys are ignored.
  void Release(uint64_t key, bool reusable) {
    std::unique_ptr<T> victim;
    absl::MutexLock lock(&mu_);
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (it->key != key) continue;
      if (reusable) {
        it->busy = false;
        entries_.splice(entries_.begin(), entries_, it);
      } else {
        victim = std::move(it->value);
        entries_.erase(it);
      }
      return;
    }
  }

  // Destroys every entry (callers must have released their leases).
  void Clear() {
    std::list<Entry> all;
    {
      absl::MutexLock lock(&mu_);
      all.swap(entries_);
    }
  }

  size_t size() const {
    absl::MutexLock lock(&mu_);
    return entries_.size();
  }
  size_t idle() const {
    absl::MutexLock lock(&mu_);
    return IdleCountLocked();
  }
  size_t capacity() const { return capacity_; }

 private:
  struct Entry {
    uint64_t key;
    std::string peer;
    std::unique_ptr<T> value;
    bool busy;
  };

  Lease TakeLocked(typename std::list<Entry>::iterator it) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    it->busy = true;
    entries_.splice(entries_.begin(), entries_, it);
    return Lease{entries_.front().key, entries_.front().value.get()};
  }
  size_t IdleCountLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    size_t n = 0;
    for (const Entry& e : entries_) n += e.busy ? 0 : 1;
    return n;
  }

  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Entry> entries_ ABSL_GUARDED_BY(mu_);  // most recently used first
};

}  // namespace pd::transport

#endif  // PD_TRANSPORT_LEASE_CACHE_H_
