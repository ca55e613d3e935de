#include "transport/fault_injection.h"

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"

namespace pd::transport {

// One sender's writes in flight (write_latency), shared by the sender and the
// delivery thread; the inner sender lives here until the last write is
// delivered and flushed.
struct FaultInjectingBackend::Delayed {
  struct Write {
    absl::Time due;
    uint64_t dst = 0;
    std::vector<uint8_t> bytes;
    uint64_t seq = 0;
  };
  absl::Mutex mu;
  std::unique_ptr<DataSender> inner ABSL_GUARDED_BY(mu);
  std::deque<Write> queue ABSL_GUARDED_BY(mu);  // not yet handed to `inner`
  // Handed over; the bytes stay alive until a fence after them completed.
  std::deque<Write> handed ABSL_GUARDED_BY(mu);
  uint64_t posted ABSL_GUARDED_BY(mu) = 0;       // writes queued so far
  uint64_t handed_count ABSL_GUARDED_BY(mu) = 0;  // writes handed over so far
  bool orphaned ABSL_GUARDED_BY(mu) = false;      // the sender gave up
  absl::Status error ABSL_GUARDED_BY(mu);

  // Hands every due write to `inner` (all of them when `all`). Returns true
  // once the sender gave up and nothing is left: `inner` is then flushed and
  // destroyed.
  bool DeliverDue(FaultInjectingBackend& backend, absl::Time now, bool all) {
    absl::MutexLock lock(&mu);
    if (all) orphaned = true;  // the backend shuts down: later writes fail
    while (!queue.empty() && (all || queue.front().due <= now)) {
      Write w = std::move(queue.front());
      queue.pop_front();
      if (error.ok() && inner != nullptr) {
        error = inner->PostWrite(w.bytes.data(), w.dst, w.bytes.size());
      }
      ++handed_count;
      backend.CountInFlight(-1);
      backend.CountDelivered();
      if (orphaned) backend.CountLate();
      handed.push_back(std::move(w));
    }
    if (!orphaned || !queue.empty()) return false;
    if (inner != nullptr) {
      inner->Quiesce(absl::Now() + absl::Seconds(2)).IgnoreError();
      inner.reset();
    }
    handed.clear();
    return true;
  }
  absl::Time NextDue() {
    absl::MutexLock lock(&mu);
    if (!queue.empty()) return queue.front().due;
    return orphaned ? absl::InfinitePast() : absl::InfiniteFuture();
  }
};

namespace {

class FaultySender final : public DataSender {
 public:
  FaultySender(FaultInjectingBackend& backend, std::unique_ptr<DataSender> inner, bool one_sided)
      : backend_(backend), one_sided_(one_sided) {
    if (backend_.policy().write_latency > absl::ZeroDuration()) {
      delayed_ = std::make_shared<FaultInjectingBackend::Delayed>();
      absl::MutexLock lock(&delayed_->mu);
      delayed_->inner = std::move(inner);
    } else {
      inner_ = std::move(inner);
    }
    if (delayed_ != nullptr) backend_.Track(delayed_);
  }

  ~FaultySender() override {
    if (delayed_ == nullptr) return;
    {
      absl::MutexLock lock(&delayed_->mu);
      delayed_->orphaned = true;  // in-flight writes still land
    }
    backend_.Wake();
  }

  absl::Status PostWrite(const uint8_t* src, uint64_t dst, size_t len) override {
    if (disconnected_) return Disconnected();
    int64_t index = 0;
    switch (backend_.NextWrite(&index)) {
      case FaultInjectingBackend::Action::kPass:
        if (delayed_ != nullptr) return Delay(std::vector<uint8_t>(src, src + len), dst);
        return inner_->PostWrite(src, dst, len);
      case FaultInjectingBackend::Action::kDisconnect:
        disconnected_ = true;
        if (delayed_ != nullptr) {
          absl::MutexLock lock(&delayed_->mu);
          delayed_->orphaned = true;
        }
        if (backend_.policy().on_disconnect) backend_.policy().on_disconnect();
        return Disconnected();
      case FaultInjectingBackend::Action::kDrop:
        if (one_sided_) return absl::OkStatus();
        if (delayed_ != nullptr) return Delay(std::vector<uint8_t>(len, 0), dst);
        return inner_->PostWrite(Keep(std::vector<uint8_t>(len, 0)), dst, len);
      case FaultInjectingBackend::Action::kCorrupt: {
        std::vector<uint8_t> copy(src, src + len);
        if (len > 0) copy[size_t(index) % len] ^= 0x5a;
        if (delayed_ != nullptr) return Delay(std::move(copy), dst);
        return inner_->PostWrite(Keep(std::move(copy)), dst, len);
      }
    }
    return absl::InternalError("unreachable");
  }

  absl::StatusOr<uint64_t> PostFence() override {
    if (disconnected_) return Disconnected();
    if (delayed_ != nullptr) {
      absl::MutexLock lock(&delayed_->mu);
      const uint64_t id = ++fences_posted_;
      fences_[id] = Fence{absl::Now(), delayed_->posted, 0};
      return id;
    }
    auto id = inner_->PostFence();
    if (id.ok()) fences_[*id] = Fence{absl::Now(), ++fences_posted_, 0};
    return id;
  }

  bool Progress() override {
    if (delayed_ == nullptr) return inner_->Progress();
    absl::MutexLock lock(&delayed_->mu);
    return delayed_->inner != nullptr && delayed_->inner->Progress();
  }

  void Abandon() override {
    if (delayed_ == nullptr) {
      inner_->Abandon();
      return;
    }
    absl::MutexLock lock(&delayed_->mu);
    if (delayed_->inner != nullptr) delayed_->inner->Abandon();
  }

  absl::StatusOr<bool> PollFence(uint64_t id) override {
    if (disconnected_) return Disconnected();
    if (delayed_ != nullptr) return PollDelayedFence(id);
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
    uint64_t seq;       // no latency: fences posted up to this one; latency: writes before it
    uint64_t inner_id;  // latency: the inner fence, once every write before it was handed over
  };
  absl::Status Disconnected() const {
    return absl::UnavailableError("fault injection: data-plane peer disconnected");
  }
  // Keeps a tampered copy alive until the next fence completes.
  const uint8_t* Keep(std::vector<uint8_t> v) {
    kept_.emplace_back(fences_posted_ + 1, std::move(v));
    return kept_.back().second.data();
  }
  absl::Status Delay(std::vector<uint8_t> bytes, uint64_t dst) {
    {
      absl::MutexLock lock(&delayed_->mu);
      if (!delayed_->error.ok()) return delayed_->error;
      if (delayed_->inner == nullptr) return absl::UnavailableError("fault injection: backend shut down");
      const uint64_t seq = ++delayed_->posted;
      delayed_->queue.push_back({absl::Now() + backend_.policy().write_latency, dst, std::move(bytes), seq});
    }
    backend_.CountInFlight(1);
    backend_.Wake();
    return absl::OkStatus();
  }
  absl::StatusOr<bool> PollDelayedFence(uint64_t id) {
    auto it = fences_.find(id);
    if (it == fences_.end()) return true;
    Fence& f = it->second;
    absl::MutexLock lock(&delayed_->mu);
    if (!delayed_->error.ok()) return delayed_->error;
    if (delayed_->inner == nullptr) return absl::UnavailableError("fault injection: backend shut down");
    if (delayed_->handed_count < f.seq) return false;
    if (f.inner_id == 0) {
      absl::StatusOr<uint64_t> inner_id = delayed_->inner->PostFence();
      if (!inner_id.ok()) return inner_id.status();
      f.inner_id = *inner_id;
    }
    absl::StatusOr<bool> done = delayed_->inner->PollFence(f.inner_id);
    if (!done.ok() || !*done) return done;
    if (absl::Now() - f.posted < backend_.policy().fence_delay) return false;
    while (!delayed_->handed.empty() && delayed_->handed.front().seq <= f.seq) {
      delayed_->handed.pop_front();
    }
    fences_.erase(it);
    return true;
  }

  FaultInjectingBackend& backend_;
  std::unique_ptr<DataSender> inner_;                        // no write latency
  std::shared_ptr<FaultInjectingBackend::Delayed> delayed_;  // write latency
  const bool one_sided_;
  bool disconnected_ = false;
  std::map<uint64_t, Fence> fences_;
  uint64_t fences_posted_ = 0;
  std::deque<std::pair<uint64_t, std::vector<uint8_t>>> kept_;
};

}  // namespace

FaultInjectingBackend::FaultInjectingBackend(Backend& inner, FaultPolicy policy)
    : inner_(inner), policy_(std::move(policy)), rng_(policy_.seed * 0x9e3779b97f4a7c15ull + 1) {
  if (policy_.write_latency > absl::ZeroDuration()) thread_ = std::thread([this] { Deliver(); });
}

FaultInjectingBackend::~FaultInjectingBackend() {
  if (!thread_.joinable()) return;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void FaultInjectingBackend::Track(std::shared_ptr<Delayed> d) {
  absl::MutexLock lock(&mu_);
  delayed_.push_back(std::move(d));
  ++generation_;
}

void FaultInjectingBackend::Wake() {
  absl::MutexLock lock(&mu_);
  ++generation_;
}

bool FaultInjectingBackend::DrainWrites(absl::Time deadline) const {
  while (in_flight_.load() > 0) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// The delivery thread: hands each delayed write to its inner sender when due;
// at shutdown, everything at once.
void FaultInjectingBackend::Deliver() {
  while (true) {
    std::vector<std::shared_ptr<Delayed>> list;
    bool stop = false;
    {
      absl::MutexLock lock(&mu_);
      list = delayed_;
      stop = stop_;
    }
    absl::Time next = absl::InfiniteFuture();
    const absl::Time now = absl::Now();
    std::vector<Delayed*> finished;
    for (const auto& d : list) {
      if (d->DeliverDue(*this, now, stop)) {
        finished.push_back(d.get());
      } else {
        next = std::min(next, d->NextDue());
      }
    }
    absl::MutexLock lock(&mu_);
    std::erase_if(delayed_, [&](const std::shared_ptr<Delayed>& d) {
      return std::find(finished.begin(), finished.end(), d.get()) != finished.end();
    });
    if (stop) return;  // everything was delivered and every inner sender closed
    const uint64_t gen = generation_;
    auto woken = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return generation_ != gen || stop_; };
    mu_.AwaitWithDeadline(absl::Condition(&woken), next);
  }
}

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
