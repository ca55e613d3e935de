// A decorator around any Backend that tampers with the data plane by policy:
// drops, corrupts or delays writes, or disconnects, so that the stream's
// failure handling runs in tests without a real fault.
#ifndef PD_TRANSPORT_FAULT_INJECTION_H_
#define PD_TRANSPORT_FAULT_INJECTION_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "transport/backend.h"

namespace pd::transport {

// Writes are numbered from 0 in the order they are posted through this
// decorator (all its senders together).
struct FaultPolicy {
  // Not delivered (one-sided: the receiver's memory keeps its old bytes;
  // two-sided: zeros are delivered instead, to keep sends and receives paired).
  std::set<int64_t> drop_writes;
  // Delivered with one byte flipped.
  std::set<int64_t> corrupt_writes;
  // Every write is corrupted independently with this probability.
  double corrupt_probability = 0;
  uint64_t seed = 1;
  // Each fence completes this much later than the inner backend's.
  absl::Duration fence_delay = absl::ZeroDuration();
  // Data in flight: each write reaches the inner backend this much after it
  // was posted (a copy of its bytes travels), delivered by a thread of the
  // decorator. Fences complete only after the writes before them were
  // delivered. Writes still in flight when their sender gives up (destroyed,
  // disconnected) are delivered anyway, as a dying sender's packets would be.
  absl::Duration write_latency = absl::ZeroDuration();
  // Writes from this index on, and every fence after them, fail with
  // Unavailable; `on_disconnect` runs once when that starts (e.g. to sever the
  // control channel, as a crashed peer would). -1: never.
  int64_t disconnect_after_writes = -1;
  std::function<void()> on_disconnect;
};

class FaultInjectingBackend final : public Backend {
 public:
  // `inner` must outlive this decorator.
  FaultInjectingBackend(Backend& inner, FaultPolicy policy);
  // Delivers every write still in flight, then joins the delivery thread.
  ~FaultInjectingBackend() override;

  std::string name() const override { return inner_.name(); }
  bool one_sided() const override { return inner_.one_sided(); }
  bool supports_device_memory() const override { return false; }
  absl::StatusOr<std::string> SenderInfo(const PeerContext& peer) override {
    return inner_.SenderInfo(peer);
  }
  absl::StatusOr<std::unique_ptr<DataReceiver>> Listen(const MemoryRegion& region,
                                                       const std::string& sender_info,
                                                       const PeerContext& peer,
                                                       absl::Time deadline) override {
    return inner_.Listen(region, sender_info, peer, deadline);
  }
  absl::StatusOr<std::unique_ptr<DataSender>> Connect(const MemoryRegion& local,
                                                      const std::string& receiver_info,
                                                      const PeerContext& peer,
                                                      absl::Time deadline) override;
  void CancelSenderInfo(const PeerContext& peer) override { inner_.CancelSenderInfo(peer); }
  void ForgetRegion(const uint8_t* base) override { inner_.ForgetRegion(base); }

  int64_t writes() const { return writes_.load(); }
  int64_t dropped() const { return dropped_.load(); }
  int64_t corrupted() const { return corrupted_.load(); }
  // write_latency: writes posted but not yet handed to the inner backend,
  // writes handed over, and writes handed over after their sender had given
  // up (destroyed or disconnected), i.e. that landed after the stream failed.
  int64_t writes_in_flight() const { return in_flight_.load(); }
  int64_t writes_delivered() const { return delivered_.load(); }
  int64_t late_writes() const { return late_writes_.load(); }
  // Blocks until no write is in flight (or the deadline); true when none is.
  bool DrainWrites(absl::Time deadline) const;

  // Internal: the next write index and what to do with it.
  enum class Action { kPass, kDrop, kCorrupt, kDisconnect };
  Action NextWrite(int64_t* index);
  const FaultPolicy& policy() const { return policy_; }
  struct Delayed;  // one sender's writes in flight (fault_injection.cc)
  void Track(std::shared_ptr<Delayed> d);
  void CountInFlight(int64_t delta) { in_flight_ += delta; }
  void CountDelivered() { ++delivered_; }
  void Wake();
  void CountLate() { ++late_writes_; }

 private:
  void Deliver();

  Backend& inner_;
  const FaultPolicy policy_;
  std::atomic<int64_t> writes_{0}, dropped_{0}, corrupted_{0}, in_flight_{0}, delivered_{0},
      late_writes_{0};
  std::atomic<bool> disconnected_{false};
  std::atomic<uint64_t> rng_;
  // write_latency: the senders with writes in flight and the delivery thread.
  absl::Mutex mu_;
  std::vector<std::shared_ptr<Delayed>> delayed_ ABSL_GUARDED_BY(mu_);
  uint64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // bumped by every posted write
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace pd::transport

#endif  // PD_TRANSPORT_FAULT_INJECTION_H_
