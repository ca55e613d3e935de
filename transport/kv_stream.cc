#include "transport/kv_stream.h"

// XXH3 inlined into this file, so that it is compiled for this build's
// target (AVX2 on x86-64-v3): about 1.7x the speed of Debian's generic
// libxxhash build (docs/perf.md). The hash values are the same.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <optional>
#include <thread>

#include <sys/prctl.h>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/ids.h"
#include "common/logging.h"
#include "common/status.h"
#include "transport/chunk_plan.h"
#include "transport/resource_counters.h"

namespace pd::transport {
namespace {

using proto::ObjectKind;

// Direct writes are posted in pieces of at most this many bytes.
constexpr uint64_t kPieceBytes = 256 << 10;

// XXH3-64 over a sequence of byte ranges (equal to XXH3_64bits of their concatenation).
class Xxh3 {
 public:
  Xxh3() : state_(XXH3_createState()) { XXH3_64bits_reset(state_); }
  ~Xxh3() { XXH3_freeState(state_); }
  Xxh3(const Xxh3&) = delete;
  Xxh3& operator=(const Xxh3&) = delete;
  void Update(const uint8_t* p, size_t n) { XXH3_64bits_update(state_, p, n); }
  uint64_t Digest() const { return XXH3_64bits_digest(state_); }

 private:
  XXH3_state_t* state_;
};

std::string ChunkName(const PlannedChunk& c) {
  return absl::StrCat("chunk ", c.id, " (layer ", c.layer, " ", proto::ObjectKindName(c.kind),
                      ", tokens [", c.token_begin, ", ", c.token_end, "))");
}

// Offsets of `seq`'s objects in `cache`, relative to the arena base.
SideLayout LocalSide(const kvcache::KvCache& cache, int32_t seq, int64_t tokens) {
  SideLayout s;
  s.pages = cache.PageTable(seq);
  s.pages.resize(std::min<size_t>(s.pages.size(), size_t(kernels::NumPages(tokens))));
  const uint8_t* base = cache.arena();
  for (int l = 0; l < cache.options().num_layers; ++l) {
    s.mla.push_back(uint64_t(cache.MlaPool(l) - base));
    s.index.push_back(uint64_t(cache.IndexPool(l) - base));
    s.summary.push_back(uint64_t(reinterpret_cast<const uint8_t*>(cache.Summaries(l, seq)) - base));
  }
  return s;
}

// Packed two-sided streams (packed_group_bytes() > 0 on both ends): the
// runs of chunks both ends move as one transfer, as run_end[id] = the id
// after chunk id's run. Each layer's chunks in order, cut into runs of at
// most `packed` bytes and at most half the credit (so that two runs fit in
// flight); a chunk larger than that is a run of its own. Empty when not packed.
std::vector<uint32_t> PackedRuns(const ChunkPlan& plan, uint64_t packed, uint64_t credit_bytes,
                                 uint32_t credit_chunks) {
  std::vector<uint32_t> run_end;
  if (packed == 0) return run_end;
  const uint64_t max_bytes = std::min(packed, std::max<uint64_t>(1, credit_bytes / 2));
  const uint32_t max_chunks = std::max<uint32_t>(1, credit_chunks / 2);
  run_end.resize(plan.chunks.size());
  for (size_t l = 0; l + 1 < plan.layer_first.size(); ++l) {
    uint32_t begin = plan.layer_first[l];
    while (begin < plan.layer_first[l + 1]) {
      uint32_t end = begin;
      uint64_t bytes = 0;
      while (end < plan.layer_first[l + 1] && end - begin < max_chunks &&
             (end == begin || bytes + plan.chunks[end].bytes <= max_bytes)) {
        bytes += plan.chunks[end++].bytes;
      }
      for (uint32_t id = begin; id < end; ++id) run_end[id] = end;
      begin = end;
    }
  }
  return run_end;
}

// Whether chunk `id` carries (and is verified by) an XXH3-64 checksum.
bool Hashed(const proto::Manifest& m, uint32_t id) {
  return m.checksum && id % std::max<uint32_t>(1, m.checksum_every) == 0;
}

// Stream threads wait in steps of tens of microseconds while data is in
// flight; Linux adds 50 us of timer slack to every such wait by default.
void TightenTimerSlack() { prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); }

absl::Status HashOnHost(MemoryOps& ops, const uint8_t* p, size_t n, Xxh3& h) {
  return ops.ReadOnHost(p, n, [&](const uint8_t* q, size_t m) { h.Update(q, m); });
}

// Computes XXH3-64 of chunks on a helper thread, so that hashing chunk i
// overlaps posting chunk i+1: a sender thread that both copies and hashes is
// capped near the speed of one core doing both (docs/perf.md). Thread-safe.
class AsyncHasher {
 public:
  using Pieces = std::vector<std::pair<const uint8_t*, size_t>>;
  // `on_done` runs on the helper thread after each job.
  AsyncHasher(MemoryOps& ops, std::function<void()> on_done)
      : ops_(ops), on_done_(std::move(on_done)), thread_([this] { Run(); }) {}
  // Abandons queued jobs and joins the helper thread.
  ~AsyncHasher() {
    {
      absl::MutexLock lock(&mu_);
      stop_ = true;
    }
    thread_.join();
  }
  AsyncHasher(const AsyncHasher&) = delete;
  AsyncHasher& operator=(const AsyncHasher&) = delete;

  // Queues the hash of the concatenation of `pieces` (cache memory, read
  // through the MemoryOps); returns its ticket.
  uint64_t Submit(Pieces pieces) {
    absl::MutexLock lock(&mu_);
    jobs_.push_back({++submitted_, std::move(pieces)});
    return submitted_;
  }
  // False while job `ticket` runs; then true with its hash (or the
  // MemoryOps error) in `*out`, and the job is forgotten.
  bool Take(uint64_t ticket, absl::StatusOr<uint64_t>* out) {
    absl::MutexLock lock(&mu_);
    auto it = results_.find(ticket);
    if (it == results_.end()) return false;
    *out = std::move(it->second);
    results_.erase(it);
    return true;
  }

 private:
  struct Job {
    uint64_t ticket = 0;
    Pieces pieces;
  };
  void Run() {
    while (true) {
      Job job;
      {
        absl::MutexLock lock(&mu_);
        auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return stop_ || !jobs_.empty(); };
        mu_.Await(absl::Condition(&ready));
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      Xxh3 hash;
      absl::Status st;
      for (const auto& [p, n] : job.pieces) {
        st = HashOnHost(ops_, p, n, hash);
        if (!st.ok()) break;
      }
      {
        absl::MutexLock lock(&mu_);
        results_.emplace(job.ticket, st.ok() ? absl::StatusOr<uint64_t>(hash.Digest())
                                             : absl::StatusOr<uint64_t>(st));
      }
      on_done_();
    }
  }

  MemoryOps& ops_;
  const std::function<void()> on_done_;
  absl::Mutex mu_;
  std::deque<Job> jobs_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, absl::StatusOr<uint64_t>> results_ ABSL_GUARDED_BY(mu_);
  uint64_t submitted_ ABSL_GUARDED_BY(mu_) = 0;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

// =============================== sender ===============================

class SenderImpl final : public KvSender {
 public:
  SenderImpl(Backend& backend, std::unique_ptr<ControlChannel> channel, const kvcache::KvCache& cache,
             SendRequest request, SenderOptions options, MemoryOps& ops, proto::Manifest manifest,
             proto::Accept accept, ChunkPlan plan, std::unique_ptr<StagingBuffer> bounce,
             std::unique_ptr<HostPin> mapped_pin, std::unique_ptr<DataSender> data, bool one_sided,
             absl::Time start)
      : backend_(backend),
        channel_(std::move(channel)),
        cache_(cache),
        request_(std::move(request)),
        options_(std::move(options)),
        ops_(ops),
        manifest_(std::move(manifest)),
        accept_(std::move(accept)),
        plan_(std::move(plan)),
        bounce_(std::move(bounce)),
        mapped_pin_(std::move(mapped_pin)),
        data_(std::move(data)),
        one_sided_(one_sided),
        staged_(accept_.staging_slots > 0),
        mapped_(staged_ ? data_->mapped_destination() : nullptr),
        start_(start),
        token_(Resource::kStream) {
    const size_t n = plan_.chunks.size();
    state_.assign(n, State::kWaiting);
    attempts_.assign(n, 0);
    slot_of_.assign(n, 0);
    submitted_.assign(manifest_.num_layers, false);
    confirmed_.assign(manifest_.num_layers, false);
    credit_bytes_ = accept_.credit_bytes;
    credit_chunks_ = accept_.credit_chunks;
    for (uint32_t s = 0; s < accept_.staging_slots; ++s) free_slots_.push_back(s);
    if (!one_sided_) {
      run_end_ = PackedRuns(plan_, data_->packed_group_bytes(), accept_.credit_bytes, accept_.credit_chunks);
    }
    channel_->SetNotify([this] {
      absl::MutexLock lock(&mu_);
      ++wakeups_;
    });
    // Direct mode hashes the cache (through the MemoryOps); staged mode with
    // the receiver's ring mapped here hashes the bytes where they landed.
    if (manifest_.checksum && (!staged_ || mapped_ != nullptr)) {
      hasher_ = std::make_unique<AsyncHasher>(staged_ ? HostMemoryOps() : ops_, [this] {
        absl::MutexLock lock(&mu_);
        ++wakeups_;
      });
    }
    thread_ = std::thread([this] { Run(); });
  }

  ~SenderImpl() override {
    Abort(absl::CancelledError("KV sender destroyed before the stream finished"));
    thread_.join();
    channel_->SetNotify(nullptr);
  }

  absl::Status SendLayer(int layer) override {
    absl::MutexLock lock(&mu_);
    if (done_) return final_.ok() ? absl::FailedPreconditionError("stream already finished") : final_;
    if (layer < 0 || layer >= int(manifest_.num_layers)) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " outside [0, ", manifest_.num_layers, ")"));
    }
    if (submitted_[size_t(layer)]) {
      return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " was already sent"));
    }
    submitted_[size_t(layer)] = true;
    // Two-sided backends pair sends with receives in chunk-id order, so layers
    // are shipped in order; one-sided ones ship a layer as soon as it is queued.
    auto queue_layer = [&](uint32_t l) {
      for (uint32_t id = plan_.layer_first[l]; id < plan_.layer_first[l + 1]; ++id) ready_.push_back(id);
    };
    if (one_sided_) {
      queue_layer(uint32_t(layer));
    } else {
      while (next_layer_ < manifest_.num_layers && submitted_[next_layer_]) queue_layer(next_layer_++);
    }
    ++wakeups_;
    return absl::OkStatus();
  }

  absl::Status Finish(absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithDeadline(absl::Condition(&done_), deadline)) {
      return absl::DeadlineExceededError(
          absl::StrCat("KV stream ", request_.request_id, " not finished before the deadline (",
                       acked_, " of ", plan_.chunks.size(), " chunks acknowledged)"));
    }
    return final_;
  }

  void Abort(const absl::Status& why) override {
    absl::MutexLock lock(&mu_);
    if (abort_.ok()) abort_ = why.ok() ? absl::CancelledError("aborted") : why;
    ++wakeups_;
  }

  bool LayerConfirmed(int layer) const override {
    absl::MutexLock lock(&mu_);
    return layer >= 0 && size_t(layer) < confirmed_.size() && confirmed_[size_t(layer)];
  }

  StreamStats stats() const override {
    absl::MutexLock lock(&mu_);
    return stats_;
  }
  const proto::Manifest& manifest() const override { return manifest_; }

 private:
  enum class State : uint8_t { kWaiting, kPosted, kHeaderSent, kAcked };
  struct Batch {
    uint64_t fence = 0;
    proto::ChunkBatch headers;
    std::vector<uint64_t> hash_tickets;  // per header: AsyncHasher ticket, 0: checksum known
  };
  // A fenced chunk whose checksum the hasher is still computing.
  struct Hashing {
    proto::ChunkHeader header;
    uint64_t ticket = 0;
  };

  void Run() {
    TightenTimerSlack();
    absl::Status st = Loop();
    Finalize(st);
  }

  absl::Status Loop() {
    absl::Time last_progress = absl::Now();
    uint64_t seen_wakeups = 0;
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        if (!abort_.ok()) return abort_;
        seen_wakeups = wakeups_;
      }
      // 1. Control messages.
      while (true) {
        auto m = channel_->TryReceive();
        if (!m.ok()) {
          return absl::UnavailableError(absl::StrCat("KV stream ", request_.request_id,
                                                     ": receiver lost: ", m.status().message()));
        }
        if (!m->has_value()) break;
        PD_RETURN_IF_ERROR(Handle(**m));
        last_progress = absl::Now();
        if (receiver_done_) break;  // the receiver closes its end after Done
      }
      if (receiver_done_) {
        if (acked_ != plan_.chunks.size()) {
          return absl::DataLossError(absl::StrCat("receiver reported Done with ", acked_, " of ",
                                                  plan_.chunks.size(), " chunks acknowledged"));
        }
        return absl::OkStatus();
      }
      // 2. Completed fences release their chunks' headers, each once its
      // checksum is known: a chunk still being hashed holds back no other.
      PD_RETURN_IF_ERROR(ReleaseHeaders());
      if (released_any_) {
        released_any_ = false;
        last_progress = absl::Now();
      }
      // 3. Post more chunks within the credit (max_batches_in_flight fences).
      if (batches_.size() < size_t(options_.max_batches_in_flight)) {
        // Packed streams: a batch is exactly one run; otherwise up to
        // max_batch_chunks chunks.
        std::vector<uint32_t> ids = run_end_.empty() ? NextChunks() : NextRun();
        if (!ids.empty()) {
          Batch batch;
          for (uint32_t id : ids) {
            uint64_t ticket = 0;
            PD_ASSIGN_OR_RETURN(proto::ChunkHeader h, PostChunk(id, &ticket));
            batch.headers.chunks.push_back(h);
            batch.hash_tickets.push_back(ticket);
          }
          PD_ASSIGN_OR_RETURN(batch.fence, data_->PostFence());
          batches_.push_back(std::move(batch));
          continue;
        }
      }
      // 4. Wait for something to happen.
      const bool busy = acked_ < plan_.chunks.size();
      const bool awaiting_peer = !batches_.empty() || !hashing_.empty() || InFlight() > 0;
      if (awaiting_peer && absl::Now() - last_progress > options_.progress_timeout) {
        return absl::DeadlineExceededError(absl::StrCat(
            "KV stream ", request_.request_id, ": no progress for ",
            absl::FormatDuration(options_.progress_timeout), " (", acked_, " of ",
            plan_.chunks.size(), " chunks acknowledged)"));
      }
      if (!awaiting_peer) last_progress = absl::Now();  // idle: waiting for SendLayer
      if (!batches_.empty() && data_->Progress()) continue;
      // Fences are polled; acknowledgements, hashes and SendLayer wake us.
      absl::Duration wait = !batches_.empty() ? absl::Microseconds(20)
                            : busy            ? absl::Milliseconds(20)
                                              : absl::Milliseconds(100);
      absl::MutexLock lock(&mu_);
      auto woken = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return wakeups_ != seen_wakeups; };
      mu_.AwaitWithTimeout(absl::Condition(&woken), wait);
    }
  }

  size_t InFlight() const { return accept_.credit_chunks - credit_chunks_; }

  // Packed streams: the next run's chunk ids, taken off the queue, once the
  // credit covers all of it (or nothing is in flight); empty otherwise.
  std::vector<uint32_t> NextRun() {
    std::vector<uint32_t> run;
    if (run_end_.empty()) return run;
    absl::MutexLock lock(&mu_);
    if (ready_.empty()) return run;
    const uint32_t first = ready_.front(), end = run_end_[first];
    if (ready_.size() < end - first) return run;  // a run never spans layers: never happens
    uint64_t bytes = 0;
    for (uint32_t id = first; id < end; ++id) bytes += plan_.chunks[id].bytes;
    const bool idle = InFlight() == 0;
    if (!idle && (credit_chunks_ < end - first || credit_bytes_ < bytes)) return run;
    for (uint32_t id = first; id < end; ++id) {
      run.push_back(ready_.front());
      ready_.pop_front();
    }
    return run;
  }

  // Up to max_batch_chunks chunks (resends first) within the credit and,
  // staged, the free slots, taken off their queues.
  std::vector<uint32_t> NextChunks() {
    std::vector<uint32_t> ids;
    absl::MutexLock lock(&mu_);
    uint64_t credit_bytes = credit_bytes_;
    uint32_t credit_chunks = credit_chunks_;
    size_t slots = free_slots_.size();
    while (int(ids.size()) < options_.max_batch_chunks) {
      std::deque<uint32_t>& q = !resend_.empty() ? resend_ : ready_;
      if (q.empty()) break;
      const PlannedChunk& c = plan_.chunks[q.front()];
      const bool idle = InFlight() == 0 && ids.empty();
      if (credit_chunks == 0 || (c.bytes > credit_bytes && !idle)) break;
      if (staged_ && slots == 0) break;
      credit_bytes -= std::min(credit_bytes, c.bytes);
      --credit_chunks;
      if (staged_) --slots;
      ids.push_back(q.front());
      q.pop_front();
    }
    return ids;
  }

  // Sends, as one ChunkBatch, the headers of chunks whose fence completed
  // (fences complete in order) and whose checksum is known.
  absl::Status ReleaseHeaders() {
    proto::ChunkBatch out;
    while (!batches_.empty()) {
      PD_ASSIGN_OR_RETURN(bool fenced, data_->PollFence(batches_.front().fence));
      if (!fenced) break;
      Batch& b = batches_.front();
      for (size_t i = 0; i < b.headers.chunks.size(); ++i) {
        if (b.hash_tickets[i] == 0) {
          out.chunks.push_back(b.headers.chunks[i]);
        } else {
          hashing_.push_back({b.headers.chunks[i], b.hash_tickets[i]});
        }
      }
      batches_.pop_front();
      released_any_ = true;
    }
    for (auto it = hashing_.begin(); it != hashing_.end();) {
      absl::StatusOr<uint64_t> r = absl::UnknownError("unset");
      if (!hasher_->Take(it->ticket, &r)) {
        ++it;
        continue;
      }
      if (!r.ok()) return r.status();
      it->header.checksum = *r;
      out.chunks.push_back(it->header);
      it = hashing_.erase(it);
      released_any_ = true;
    }
    if (out.chunks.empty()) return absl::OkStatus();
    for (const auto& h : out.chunks) state_[h.chunk_id] = State::kHeaderSent;
    return channel_->Send(std::move(out));
  }

  // Posts chunk `id`'s writes. Its checksum is in the header, or (direct
  // mode) computed by the hasher under `*ticket`.
  absl::StatusOr<proto::ChunkHeader> PostChunk(uint32_t id, uint64_t* ticket) {
    const PlannedChunk& c = plan_.chunks[id];
    const uint8_t* arena = cache_.arena();
    Xxh3 hash;
    proto::ChunkHeader h;
    h.chunk_id = id;
    h.layer = c.layer;
    h.kind = c.kind;
    h.token_begin = c.token_begin;
    h.token_end = c.token_end;
    h.page_begin = c.first;
    h.page_count = c.count;
    h.bytes = c.bytes;
    h.attempt = attempts_[id];
    const bool hashed = Hashed(manifest_, id);
    if (staged_) {
      uint32_t slot = free_slots_.front();
      free_slots_.pop_front();
      slot_of_[id] = slot;
      h.slot = slot;
      const uint64_t slot_base = uint64_t(slot) * accept_.slot_bytes;
      uint64_t off = 0;
      for (const Segment& s : c.segments) {
        const uint8_t* src = arena + s.src;
        if (mapped_ != nullptr) {
          // The receiver's ring is mapped here (same host): copy the cache
          // bytes straight into the slot (device caches: one device-to-host
          // copy into pinned memory), no bounce, no put.
          PD_RETURN_IF_ERROR(ops_.CopyToHost(mapped_ + slot_base + off, src, s.len));
          off += s.len;
          continue;
        }
        if (bounce_ != nullptr) {  // device cache: copy into the pinned bounce slot first
          uint8_t* b = bounce_->data() + slot_base + off;
          PD_RETURN_IF_ERROR(ops_.CopyToHost(b, src, s.len));
          src = b;
        }
        if (hashed) hash.Update(src, s.len);
        PD_RETURN_IF_ERROR(data_->PostWrite(src, slot_base + off, s.len));
        off += s.len;
      }
      if (mapped_ != nullptr && hashed) {
        *ticket = hasher_->Submit({{mapped_ + slot_base, size_t(c.bytes)}});
      }
    } else {
      // Post in pieces (a backend that sends in the background gets going
      // sooner; one that is driven by this thread is driven between pieces);
      // the hasher hashes the source meanwhile.
      // Two-sided backends pair each write with one receive of the same
      // length (a whole segment), so only one-sided writes are split.
      AsyncHasher::Pieces pieces;
      const uint64_t piece = one_sided_ ? kPieceBytes : UINT64_MAX;
      for (const Segment& s : c.segments) {
        for (uint64_t off = 0; off < s.len; off += piece) {
          const uint64_t n = std::min<uint64_t>(piece, s.len - off);
          PD_RETURN_IF_ERROR(data_->PostWrite(arena + s.src + off, s.dst + off, n));
        }
        if (hashed) pieces.emplace_back(arena + s.src, s.len);
      }
      if (hashed) *ticket = hasher_->Submit(std::move(pieces));
    }
    if (staged_ && mapped_ == nullptr) h.checksum = hashed ? hash.Digest() : 0;
    ++writes_posted_;
    state_[id] = State::kPosted;
    credit_bytes_ -= std::min(credit_bytes_, c.bytes);
    --credit_chunks_;
    return h;
  }

  absl::Status Handle(const proto::ControlMessage& msg) {
    if (const auto* acks = std::get_if<proto::AckBatch>(&msg)) {
      for (const proto::ChunkAck& a : acks->acks) {
        if (a.chunk_id >= plan_.chunks.size() || state_[a.chunk_id] != State::kHeaderSent) {
          return absl::InvalidArgumentError(
              absl::StrCat("receiver acknowledged chunk ", a.chunk_id, ", which awaits no ack"));
        }
        const PlannedChunk& c = plan_.chunks[a.chunk_id];
        if (staged_) free_slots_.push_back(slot_of_[a.chunk_id]);
        absl::MutexLock lock(&mu_);
        if (a.ok) {
          state_[a.chunk_id] = State::kAcked;
          ++acked_;
          ++stats_.chunks;
          stats_.bytes += c.bytes;
          continue;
        }
        ++stats_.checksum_failures;
        if (!one_sided_) {
          return absl::DataLossError(absl::StrCat(ChunkName(c), " failed checksum verification on a ",
                                                  backend_.name(), " stream (no resend on two-sided backends)"));
        }
        if (attempts_[a.chunk_id] >= uint32_t(options_.max_resends)) {
          return absl::DataLossError(absl::StrCat(ChunkName(c), " failed checksum verification ",
                                                  attempts_[a.chunk_id] + 1, " times"));
        }
        ++attempts_[a.chunk_id];
        ++stats_.resends;
        state_[a.chunk_id] = State::kWaiting;
        resend_.push_back(a.chunk_id);
      }
      credit_bytes_ += acks->credit_bytes;
      credit_chunks_ += acks->credit_chunks;
      if (credit_chunks_ > accept_.credit_chunks || credit_bytes_ > accept_.credit_bytes) {
        return absl::InvalidArgumentError("receiver returned more credit than it granted");
      }
      return absl::OkStatus();
    }
    if (const auto* r = std::get_if<proto::LayerReady>(&msg)) {
      if (r->layer >= manifest_.num_layers) return absl::InvalidArgumentError("LayerReady for a bad layer");
      absl::MutexLock lock(&mu_);
      confirmed_[r->layer] = true;
      return absl::OkStatus();
    }
    if (std::holds_alternative<proto::Done>(msg)) {
      receiver_done_ = true;
      return absl::OkStatus();
    }
    if (const auto* a = std::get_if<proto::Abort>(&msg)) {
      peer_aborted_ = true;
      absl::Status s = proto::AbortToStatus(*a);
      return absl::Status(s.code(), absl::StrCat("receiver aborted the stream: ", s.message()));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected ", proto::MessageName(msg), " message from the receiver"));
  }

  void Finalize(absl::Status st) {
    if (absl::IsUnavailable(st) && !peer_aborted_) {
      // The data plane may fail first when the receiver aborts and drops its
      // memory; its Abort, if one is on the way, names the real cause.
      const absl::Time until = absl::Now() + absl::Milliseconds(200);
      while (true) {
        auto m = channel_->Receive(until);
        if (!m.ok()) break;
        if (const auto* a = std::get_if<proto::Abort>(&*m)) {
          peer_aborted_ = true;
          absl::Status s = proto::AbortToStatus(*a);
          st = absl::Status(s.code(), absl::StrCat("receiver aborted the stream: ", s.message()));
          break;
        }
      }
    }
    if (!st.ok()) {
      LOG(WARNING) << "KV stream " << request_.request_id << " (sender) failed: " << st;
      if (!peer_aborted_ && channel_->status().ok()) {
        channel_->Send(proto::StatusToAbort(st)).IgnoreError();
      }
      // The receiver holds the stream's pages in quarantine until it hears
      // that no write of ours can still land there: flush, then say so. A
      // data plane that cannot confirm says nothing (the receiver then waits
      // out its grace period).
      if (one_sided_ && channel_->status().ok()) {
        absl::Status q = data_->Quiesce(absl::Now() + options_.quiesce_timeout);
        if (q.ok()) {
          channel_->Send(proto::Quiesced{writes_posted_}).IgnoreError();
        } else {
          LOG(WARNING) << "KV stream " << request_.request_id
                       << " (sender): data plane did not quiesce: " << q;
        }
      }
    }
    if (!st.ok()) data_->Abandon();
    hasher_.reset();  // may read the receiver's ring mapped here
    channel_->Close();
    mapped_pin_.reset();  // before the mapping goes
    data_.reset();        // endpoint, remote key (and the mapping)
    bounce_.reset();      // pinned bounce buffers
    absl::MutexLock lock(&mu_);
    stats_.elapsed = absl::Now() - start_;
    final_ = st;
    done_ = true;
  }

  Backend& backend_;
  std::unique_ptr<ControlChannel> channel_;
  const kvcache::KvCache& cache_;
  const SendRequest request_;
  const SenderOptions options_;
  MemoryOps& ops_;
  const proto::Manifest manifest_;
  const proto::Accept accept_;
  const ChunkPlan plan_;
  std::unique_ptr<StagingBuffer> bounce_;
  std::unique_ptr<HostPin> mapped_pin_;  // the receiver's ring, mapped here, registered for DMA
  std::unique_ptr<DataSender> data_;
  const bool one_sided_, staged_;
  uint8_t* const mapped_;  // staged: the receiver's ring mapped into this process, or null
  const absl::Time start_;
  ResourceToken token_;
  std::unique_ptr<AsyncHasher> hasher_;  // checksums computed off the stream thread

  // Stream-thread state.
  std::vector<State> state_;
  std::vector<uint32_t> slot_of_;
  std::deque<uint32_t> free_slots_;
  std::deque<Batch> batches_;
  std::list<Hashing> hashing_;
  bool released_any_ = false;
  std::vector<uint32_t> run_end_;  // packed two-sided streams: PackedRuns
  uint64_t credit_bytes_ = 0;
  uint32_t credit_chunks_ = 0;
  uint64_t writes_posted_ = 0;  // chunks posted (for Quiesced)
  bool receiver_done_ = false, peer_aborted_ = false;

  mutable absl::Mutex mu_;
  std::vector<uint32_t> attempts_;  // stream thread; under mu_ when read elsewhere
  uint64_t acked_ ABSL_GUARDED_BY(mu_) = 0;
  std::deque<uint32_t> ready_ ABSL_GUARDED_BY(mu_);
  std::deque<uint32_t> resend_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> submitted_ ABSL_GUARDED_BY(mu_);
  std::vector<bool> confirmed_ ABSL_GUARDED_BY(mu_);
  uint32_t next_layer_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t wakeups_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Status abort_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_ ABSL_GUARDED_BY(mu_);
  StreamStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// Sends an Abort for `st` and closes the channel; returns `st`.
absl::Status Reject(ControlChannel& channel, absl::Status st) {
  channel.Send(proto::StatusToAbort(st)).IgnoreError();
  channel.Close();
  return st;
}

// ============================== receiver ==============================

class ReceiverImpl final : public KvReceiver {
 public:
  ReceiverImpl(std::unique_ptr<ControlChannel> channel, kvcache::KvCache& cache,
               ReceiverOptions options, MemoryOps& ops, proto::Manifest manifest, int32_t seq,
               ChunkPlan plan, std::unique_ptr<StagingBuffer> staging,
               std::unique_ptr<HostPin> staging_pin, uint64_t slot_bytes,
               std::unique_ptr<DataReceiver> data, bool one_sided, absl::Time start)
      : channel_(std::move(channel)),
        cache_(cache),
        options_(std::move(options)),
        ops_(ops),
        manifest_(std::move(manifest)),
        seq_(seq),
        plan_(std::move(plan)),
        staging_(std::move(staging)),
        staging_pin_(std::move(staging_pin)),
        slot_bytes_(slot_bytes),
        data_(std::move(data)),
        one_sided_(one_sided),
        start_(start),
        token_(Resource::kStream) {
    verified_.assign(plan_.chunks.size(), false);
    attempts_.assign(plan_.chunks.size(), 0);
    recv_ticket_.assign(plan_.chunks.size(), 0);
    landed_.assign(plan_.chunks.size(), false);
    hash_ticket_.assign(plan_.chunks.size(), 0);
    layer_left_.resize(manifest_.num_layers);
    for (uint32_t l = 0; l < manifest_.num_layers; ++l) {
      layer_left_[l] = plan_.layer_first[l + 1] - plan_.layer_first[l];
    }
    ready_.assign(manifest_.num_layers, false);
    channel_->SetNotify([this] {
      absl::MutexLock lock(&mu_);
      ++wakeups_;
    });
    if (!one_sided_) {
      run_end_ = PackedRuns(plan_, data_->packed_group_bytes(), options_.credit_bytes, options_.credit_chunks);
    }
    if (!one_sided_ && manifest_.checksum) {
      hasher_ = std::make_unique<AsyncHasher>(ops_, [this] {
        absl::MutexLock lock(&mu_);
        ++wakeups_;
      });
    }
    thread_ = std::thread([this] { Run(); });
  }

  ~ReceiverImpl() override {
    Abort(absl::CancelledError("KV receiver destroyed before the stream finished"));
    thread_.join();
    channel_->SetNotify(nullptr);
  }

  const proto::Manifest& manifest() const override { return manifest_; }
  int32_t sequence() const override { return seq_; }

  bool LayerReady(int layer) const override {
    absl::MutexLock lock(&mu_);
    return layer >= 0 && size_t(layer) < ready_.size() && ready_[size_t(layer)];
  }

  absl::Status WaitLayer(int layer, absl::Time deadline) override {
    if (layer < 0 || layer >= int(manifest_.num_layers)) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", layer, " outside [0, ", manifest_.num_layers, ")"));
    }
    absl::MutexLock lock(&mu_);
    auto cond = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return ready_[size_t(layer)] || done_; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&cond), deadline)) {
      return absl::DeadlineExceededError(absl::StrCat("KV layer ", layer, " of request ",
                                                      manifest_.request_id, " not ready by the deadline"));
    }
    return ready_[size_t(layer)] ? absl::OkStatus() : final_;
  }

  absl::Status WaitDone(absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithDeadline(absl::Condition(&done_), deadline)) {
      return absl::DeadlineExceededError(absl::StrCat("KV stream ", manifest_.request_id,
                                                      " not complete by the deadline"));
    }
    return final_;
  }

  absl::Status WaitReleased(absl::Time deadline) override {
    absl::MutexLock lock(&mu_);
    if (!mu_.AwaitWithDeadline(absl::Condition(&released_), deadline)) {
      return absl::DeadlineExceededError(absl::StrCat("KV stream ", manifest_.request_id,
                                                      ": memory still held (stream running or quarantined)"));
    }
    return absl::OkStatus();
  }

  // The stream thread notices `abort_` at its next wakeup and sends the Abort.
  void Abort(const absl::Status& why) override {
    absl::MutexLock lock(&mu_);
    if (done_ || !abort_.ok()) return;
    abort_ = why.ok() ? absl::CancelledError("aborted") : why;
    ++wakeups_;
  }

  StreamStats stats() const override {
    absl::MutexLock lock(&mu_);
    return stats_;
  }

 private:
  void Run() {
    TightenTimerSlack();
    absl::Status st = Loop();
    Finalize(st);
  }

  absl::Status Loop() {
    absl::Time last_progress = absl::Now();
    while (verified_count_ < plan_.chunks.size()) {
      // Taken before looking at anything a wakeup announces (messages, the
      // hasher's results), so that one that comes after the look ends the wait.
      uint64_t seen_wakeups = 0;
      {
        absl::MutexLock lock(&mu_);
        if (!abort_.ok()) return abort_;
        seen_wakeups = wakeups_;
      }
      if (!one_sided_) {
        PD_RETURN_IF_ERROR(PollLanded());
        if (!announced_.empty()) PD_RETURN_IF_ERROR(VerifyAnnounced());
        if (verified_count_ == plan_.chunks.size()) break;
        // After verifying: a chunk verified here (its hash finished after its
        // header came) freed part of the window, and the sender's next chunk
        // cannot complete, nor its header come to wake this thread, until the
        // receives for it are posted. Posting them only at the next wakeup
        // stalled the stream until progress_timeout whenever nothing else
        // was in flight (e.g. hashing slower than the 1 ms poll below).
        PD_RETURN_IF_ERROR(PostRecvsAhead());
      }
      auto msg = channel_->TryReceive();
      if (!msg.ok()) {
        return absl::UnavailableError(absl::StrCat("KV stream ", manifest_.request_id,
                                                   ": sender lost: ", msg.status().message()));
      }
      if (msg->has_value()) {
        PD_RETURN_IF_ERROR(Handle(**msg));
        last_progress = absl::Now();
        continue;
      }
      const absl::Time now = absl::Now();
      const absl::Time deadline = last_progress + options_.progress_timeout;
      if (now >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "KV stream ", manifest_.request_id, ": nothing from the sender for ",
            absl::FormatDuration(options_.progress_timeout), " (", verified_count_, " of ",
            plan_.chunks.size(), " chunks verified)"));
      }
      // Data arriving: drive the data plane here rather than leave it to
      // another thread (one busy thread per side on small hosts).
      if (data_->Progress()) {
        last_data_ = now;
        continue;
      }
      // Poll briefly while data flows (receives landing, announced chunks
      // not yet landed); otherwise sleep until a message, the hasher or Abort
      // wakes us (two-sided: still look for landed receives now and then, to
      // start hashing them early).
      absl::Duration poll = absl::InfiniteDuration();
      if (now - last_data_ < absl::Milliseconds(1) || !announced_.empty()) {
        poll = absl::Microseconds(20);
      } else if (!one_sided_ && next_landed_ < next_recv_) {
        poll = absl::Milliseconds(1);
      }
      const absl::Time wake = std::min(deadline, now + poll);
      absl::MutexLock lock(&mu_);
      auto woken = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return wakeups_ != seen_wakeups; };
      mu_.AwaitWithDeadline(absl::Condition(&woken), wake);
    }
    PD_RETURN_IF_ERROR(cache_.SetLength(seq_, int64_t(manifest_.num_tokens)));
    // Every chunk landed: end the data plane's part of the stream before
    // saying Done, so that per-peer state it leased (an NCCL communicator) is
    // idle again by the time the sender can start its next stream.
    hasher_.reset();
    data_.reset();
    PD_RETURN_IF_ERROR(channel_->Send(proto::Done{uint32_t(plan_.chunks.size()), plan_.total_bytes}));
    return absl::OkStatus();
  }

  // Two-sided: posts receives in chunk order ahead of the headers, as many as
  // the sender can fill without another acknowledgement: at most the credit
  // (credit_chunks chunks, credit_bytes bytes; always one chunk) posted and
  // not yet verified. Every chunk the sender sends before it needs an
  // acknowledgement then meets a posted receive, and every run of receives
  // issued together completes without one. Runs end at layer boundaries and
  // where posting stops (FlushRecvs), so that a layer lands as soon as the
  // sender sent it, whatever it does next. A run that would stop short of its
  // layer's end waits while more than half the window is in use and some
  // posted receive has not landed yet, so that runs stay large when the
  // window is small (never once all landed: see below).
  // Packed streams post whole runs (PackedRuns), each when it fits in the
  // window (or the window is empty), and flush after each.
  absl::Status PostRecvsAhead() {
    const uint64_t n = plan_.chunks.size();
    while (next_recv_ < n) {
      const uint32_t layer = plan_.chunks[next_recv_].layer;
      const uint64_t layer_end = run_end_.empty() ? plan_.layer_first[layer + 1] : run_end_[next_recv_];
      if (!run_end_.empty() && window_chunks_ > 0) {
        uint64_t bytes = 0;
        for (uint64_t id = next_recv_; id < layer_end; ++id) bytes += plan_.chunks[id].bytes;
        if (window_chunks_ + (layer_end - next_recv_) > options_.credit_chunks ||
            window_bytes_ + bytes > options_.credit_bytes) {
          break;
        }
      }
      uint64_t end = next_recv_, chunks = window_chunks_, bytes = window_bytes_;
      while (end < layer_end) {
        const uint64_t b = plan_.chunks[end].bytes;
        const bool whole_run = !run_end_.empty();  // checked above
        if (!whole_run && chunks > 0 &&
            (chunks + 1 > options_.credit_chunks || bytes + b > options_.credit_bytes)) {
          break;
        }
        ++chunks;
        bytes += b;
        ++end;
      }
      if (end == next_recv_) break;  // the window is full
      // Hold back a short run only while a posted receive has yet to land:
      // the sender sends what it has credit for in batches of several chunks
      // behind one fence, and a two-sided fence completes (and the batch's
      // headers leave) only once every write before it met a receive. Once
      // every posted receive landed, the sender's current batch may be
      // waiting for exactly the receive held back here, while this end
      // waits for that batch's headers.
      if (end < layer_end && window_chunks_ > 0 && next_landed_ < next_recv_ &&
          (2 * window_chunks_ > options_.credit_chunks || 2 * window_bytes_ > options_.credit_bytes)) {
        break;
      }
      for (; next_recv_ < end; ++next_recv_) {
        const PlannedChunk& c = plan_.chunks[next_recv_];
        for (const Segment& s : c.segments) {
          PD_ASSIGN_OR_RETURN(recv_ticket_[next_recv_], data_->PostRecv(s.dst, s.len));
        }
        ++window_chunks_;
        window_bytes_ += c.bytes;
      }
      PD_RETURN_IF_ERROR(data_->FlushRecvs());
    }
    return absl::OkStatus();
  }

  // Two-sided: notes the receives that completed (in order) and starts
  // hashing each sampled chunk as soon as it landed.
  absl::Status PollLanded() {
    while (next_landed_ < next_recv_) {
      PD_ASSIGN_OR_RETURN(bool landed, data_->PollRecv(recv_ticket_[next_landed_]));
      if (!landed) break;
      const uint32_t id = uint32_t(next_landed_++);
      landed_[id] = true;
      last_data_ = absl::Now();
      if (hasher_ != nullptr && Hashed(manifest_, id)) {
        AsyncHasher::Pieces pieces;
        for (const Segment& s : plan_.chunks[id].segments) pieces.emplace_back(cache_.arena() + s.dst, s.len);
        hash_ticket_[id] = hasher_->Submit(std::move(pieces));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Handle(const proto::ControlMessage& msg) {
    if (const auto* batch = std::get_if<proto::ChunkBatch>(&msg)) {
      if (batch->chunks.size() > options_.credit_chunks) {
        return absl::ResourceExhaustedError(absl::StrCat("sender sent ", batch->chunks.size(),
                                                         " chunks at once, credit is ",
                                                         options_.credit_chunks));
      }
      if (!one_sided_) {
        // Verified as they land and their hashes complete, in any order.
        const absl::Time now = absl::Now();
        for (const proto::ChunkHeader& h : batch->chunks) {
          PD_RETURN_IF_ERROR(CheckHeader(h));
          if (!announced_.emplace(h.chunk_id, Announced{h, now}).second) {
            return absl::InvalidArgumentError(
                absl::StrCat(ChunkName(plan_.chunks[h.chunk_id]), " announced twice"));
          }
        }
        PD_RETURN_IF_ERROR(PollLanded());
        return VerifyAnnounced();
      }
      proto::AckBatch acks;
      std::vector<uint32_t> completed_layers;
      for (const proto::ChunkHeader& h : batch->chunks) {
        PD_ASSIGN_OR_RETURN(bool ok, Verify(h));
        const PlannedChunk& c = plan_.chunks[h.chunk_id];
        acks.acks.push_back({h.chunk_id, ok});
        acks.credit_bytes += c.bytes;
        acks.credit_chunks += 1;
        if (!ok) {
          absl::MutexLock lock(&mu_);
          ++stats_.checksum_failures;
          continue;
        }
        if (MarkVerified(c)) completed_layers.push_back(c.layer);
      }
      return SendAcks(std::move(acks), completed_layers);
    }
    if (const auto* a = std::get_if<proto::Abort>(&msg)) {
      peer_aborted_ = true;
      absl::Status s = proto::AbortToStatus(*a);
      return absl::Status(s.code(), absl::StrCat("sender aborted the stream: ", s.message()));
    }
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected ", proto::MessageName(msg), " message from the sender"));
  }

  // Counts chunk `c` as verified; true when that completed its layer.
  bool MarkVerified(const PlannedChunk& c) {
    verified_[c.id] = true;
    ++verified_count_;
    if (!one_sided_) {
      --window_chunks_;
      window_bytes_ -= c.bytes;
    }
    absl::MutexLock lock(&mu_);
    ++stats_.chunks;
    stats_.bytes += c.bytes;
    return --layer_left_[c.layer] == 0;
  }

  absl::Status SendAcks(proto::AckBatch acks, const std::vector<uint32_t>& completed_layers) {
    if (!acks.acks.empty()) PD_RETURN_IF_ERROR(channel_->Send(std::move(acks)));
    for (uint32_t l : completed_layers) {
      {
        absl::MutexLock lock(&mu_);
        ready_[l] = true;
      }
      PD_RETURN_IF_ERROR(channel_->Send(proto::LayerReady{l}));
    }
    return absl::OkStatus();
  }

  // Two-sided: verifies the announced chunks that landed and (if sampled)
  // were hashed, and acknowledges them. A checksum mismatch fails the stream
  // (DataLoss: two-sided backends do not resend), as does an announced chunk
  // that does not land within progress_timeout.
  absl::Status VerifyAnnounced() {
    proto::AckBatch acks;
    std::vector<uint32_t> completed_layers;
    const absl::Time now = absl::Now();
    for (auto it = announced_.begin(); it != announced_.end();) {
      const proto::ChunkHeader& h = it->second.header;
      const PlannedChunk& c = plan_.chunks[h.chunk_id];
      if (!landed_[h.chunk_id]) {
        if (now - it->second.since > options_.progress_timeout) {
          return absl::DeadlineExceededError(absl::StrCat(ChunkName(c), " announced but not received within ",
                                                          absl::FormatDuration(options_.progress_timeout)));
        }
        ++it;
        continue;
      }
      if (Hashed(manifest_, h.chunk_id)) {
        absl::StatusOr<uint64_t> r = absl::UnknownError("unset");
        if (!hasher_->Take(hash_ticket_[h.chunk_id], &r)) {
          ++it;
          continue;
        }
        if (!r.ok()) return r.status();
        if (*r != h.checksum) {
          {
            absl::MutexLock lock(&mu_);
            ++stats_.checksum_failures;
          }
          return absl::DataLossError(absl::StrCat(ChunkName(c), " failed checksum verification"));
        }
      }
      acks.acks.push_back({h.chunk_id, true});
      acks.credit_bytes += c.bytes;
      acks.credit_chunks += 1;
      if (MarkVerified(c)) completed_layers.push_back(c.layer);
      it = announced_.erase(it);
    }
    return SendAcks(std::move(acks), completed_layers);
  }

  // Checks a header against the plan and the chunks verified so far.
  absl::Status CheckHeader(const proto::ChunkHeader& h) {
    if (h.chunk_id >= plan_.chunks.size()) {
      return absl::InvalidArgumentError(absl::StrCat("chunk id ", h.chunk_id, " outside the plan of ",
                                                     plan_.chunks.size(), " chunks"));
    }
    const PlannedChunk& c = plan_.chunks[h.chunk_id];
    if (h.layer != c.layer || h.kind != c.kind || h.page_begin != c.first || h.page_count != c.count ||
        h.bytes != c.bytes || h.token_begin != c.token_begin || h.token_end != c.token_end) {
      return absl::InvalidArgumentError(absl::StrCat("chunk header ", h.chunk_id, " (layer ", h.layer,
                                                     " ", proto::ObjectKindName(h.kind),
                                                     ") does not match the plan's ", ChunkName(c)));
    }
    if (verified_[h.chunk_id]) {
      return absl::InvalidArgumentError(absl::StrCat(ChunkName(c), " delivered twice"));
    }
    if (++attempts_[h.chunk_id] > 64) {
      return absl::DataLossError(absl::StrCat(ChunkName(c), " resent more than 64 times"));
    }
    return absl::OkStatus();
  }

  // One-sided: checks `h` against the plan, verifies the checksum of the
  // landed bytes and (staged) moves them into the cache. False: mismatch.
  absl::StatusOr<bool> Verify(const proto::ChunkHeader& h) {
    PD_RETURN_IF_ERROR(CheckHeader(h));
    const PlannedChunk& c = plan_.chunks[h.chunk_id];
    uint8_t* arena = cache_.arena();
    if (staging_ != nullptr) {
      if (h.slot >= staging_->size() / slot_bytes_ || h.bytes > slot_bytes_) {
        return absl::InvalidArgumentError(absl::StrCat(ChunkName(c), " names staging slot ", h.slot,
                                                       " outside the ring"));
      }
      const uint8_t* slot = staging_->data() + uint64_t(h.slot) * slot_bytes_;
      if (Hashed(manifest_, h.chunk_id) && XXH3_64bits(slot, h.bytes) != h.checksum) return false;
      uint64_t off = 0;
      for (const Segment& s : c.segments) {
        PD_RETURN_IF_ERROR(ops_.CopyFromHost(arena + s.dst, slot + off, s.len));
        off += s.len;
      }
      return true;
    }
    if (!Hashed(manifest_, h.chunk_id)) return true;
    Xxh3 hash;
    for (const Segment& s : c.segments) PD_RETURN_IF_ERROR(HashOnHost(ops_, arena + s.dst, s.len, hash));
    return hash.Digest() == h.checksum;
  }

  void Finalize(absl::Status st) {
    ResourceToken quarantine;
    bool quiesced = false;
    if (absl::IsUnavailable(st) && !peer_aborted_ && !channel_->status().ok()) {
      // A sender that fails sends its Abort and closes its end; this thread
      // may see the close first (an AckBatch sent to the closed channel)
      // while that Abort still waits in the inbox behind the chunk headers
      // being handled. It names the real cause. (Closed: whatever arrived
      // before the close is delivered at once, then the close status.)
      while (true) {
        auto m = channel_->TryReceive();
        if (!m.ok() || !m->has_value()) break;
        if (const auto* a = std::get_if<proto::Abort>(&**m)) {
          peer_aborted_ = true;
          absl::Status s = proto::AbortToStatus(*a);
          st = absl::Status(s.code(), absl::StrCat("sender aborted the stream: ", s.message()));
          break;  // a Quiesced after it is for AwaitQuiescence
        }
        if (std::holds_alternative<proto::Quiesced>(**m)) {
          quiesced = true;
          break;
        }
      }
    }
    if (!st.ok()) {
      LOG(WARNING) << "KV stream " << manifest_.request_id << " (receiver) failed: " << st;
      if (!peer_aborted_ && channel_->status().ok()) {
        channel_->Send(proto::StatusToAbort(st)).IgnoreError();
      }
      if (one_sided_) quarantine = ResourceToken(Resource::kQuarantine);
    }
    {
      // Report the outcome now; the memory may be held a while longer.
      absl::MutexLock lock(&mu_);
      stats_.elapsed = absl::Now() - start_;
      final_ = st;
      done_ = true;
    }
    if (!st.ok() && one_sided_ && !quiesced) AwaitQuiescence();
    hasher_.reset();  // reads the sequence's pages
    // Two-sided: destroying the receiver ends its posted receives first.
    data_.reset();
    staging_pin_.reset();
    staging_.reset();
    if (!st.ok()) cache_.Release(seq_).IgnoreError();
    channel_->Close();
    quarantine.Reset();
    absl::MutexLock lock(&mu_);
    released_ = true;
  }

  // The quarantine of a failed one-sided stream: returns once the sender
  // confirmed that all its writes landed (Quiesced), or quarantine_grace after
  // the control channel closed without that, or at quarantine_limit.
  void AwaitQuiescence() {
    const absl::Time limit = absl::Now() + options_.quarantine_limit;
    while (true) {
      auto msg = channel_->Receive(limit);
      if (msg.ok()) {
        if (std::holds_alternative<proto::Quiesced>(*msg)) {
          VLOG(1) << "KV stream " << manifest_.request_id << ": sender quiesced";
          return;
        }
        continue;  // late chunk headers, the sender's Abort
      }
      if (absl::IsDeadlineExceeded(msg.status())) {
        LOG(WARNING) << "KV stream " << manifest_.request_id << ": no Quiesced from a live sender in "
                     << absl::FormatDuration(options_.quarantine_limit) << "; releasing its pages";
        return;
      }
      // The sender is gone without confirming: its in-flight writes may still land.
      const absl::Time until = std::min(limit, absl::Now() + options_.quarantine_grace);
      VLOG(1) << "KV stream " << manifest_.request_id << ": sender gone ("
              << msg.status() << "); pages quarantined for " << absl::FormatDuration(until - absl::Now());
      absl::SleepFor(until - absl::Now());
      return;
    }
  }

  std::unique_ptr<ControlChannel> channel_;
  kvcache::KvCache& cache_;
  const ReceiverOptions options_;
  MemoryOps& ops_;
  const proto::Manifest manifest_;
  const int32_t seq_;
  const ChunkPlan plan_;
  std::unique_ptr<StagingBuffer> staging_;
  std::unique_ptr<HostPin> staging_pin_;  // the ring registered for fast device copies
  const uint64_t slot_bytes_;
  std::unique_ptr<DataReceiver> data_;
  const bool one_sided_;
  const absl::Time start_;
  ResourceToken token_;
  std::unique_ptr<AsyncHasher> hasher_;  // two-sided streams with checksums

  // Stream-thread state.
  struct Announced {
    proto::ChunkHeader header;
    absl::Time since;
  };
  std::vector<uint32_t> attempts_;
  std::vector<uint64_t> recv_ticket_;  // two-sided: the ticket of each chunk's last receive
  std::vector<bool> landed_;           // two-sided: the chunk's receives completed
  std::vector<uint64_t> hash_ticket_;  // two-sided: the receiver hasher's ticket
  uint64_t next_recv_ = 0;             // chunks [0, next_recv_) have receives posted
  uint64_t next_landed_ = 0;           // chunks [0, next_landed_) landed
  uint64_t window_chunks_ = 0, window_bytes_ = 0;  // posted and not yet verified
  std::map<uint32_t, Announced> announced_;      // two-sided: headers awaiting verification
  std::vector<uint32_t> run_end_;                // packed two-sided streams: PackedRuns
  bool peer_aborted_ = false;
  absl::Time last_data_ = absl::InfinitePast();  // the data plane last progressed here

  mutable absl::Mutex mu_;
  uint64_t wakeups_ ABSL_GUARDED_BY(mu_) = 0;
  bool released_ ABSL_GUARDED_BY(mu_) = false;
  // Stream thread only.
  std::vector<bool> verified_;
  uint64_t verified_count_ = 0;
  std::vector<uint32_t> layer_left_;
  std::vector<bool> ready_ ABSL_GUARDED_BY(mu_);
  absl::Status abort_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_ ABSL_GUARDED_BY(mu_);
  StreamStats stats_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

absl::Status ValidateManifest(const proto::Manifest& m, const kvcache::KvCache& cache,
                              const Backend& backend, const ReceiverOptions& o) {
  if (!IsValidRequestId(m.request_id)) {
    return absl::InvalidArgumentError(absl::StrCat("manifest has an invalid request id '",
                                                   m.request_id.substr(0, 64), "'"));
  }
  if (m.model_fingerprint != o.model_fingerprint) {
    return absl::FailedPreconditionError(absl::StrCat(
        "model fingerprint mismatch: sender has '", m.model_fingerprint.substr(0, 80),
        "', receiver has '", o.model_fingerprint, "'"));
  }
  if (m.num_layers != uint32_t(cache.options().num_layers)) {
    return absl::FailedPreconditionError(absl::StrCat("KV layout mismatch: sender has ", m.num_layers,
                                                      " layers, receiver ", cache.options().num_layers));
  }
  if (m.page_tokens != uint32_t(kernels::kPageTokens)) {
    return absl::FailedPreconditionError(absl::StrCat("KV layout mismatch: sender pages hold ",
                                                      m.page_tokens, " tokens, receiver pages ",
                                                      kernels::kPageTokens));
  }
  std::vector<proto::ObjectLayout> want = WireLayouts(cache.layout());
  if (m.objects.size() != want.size()) {
    return absl::FailedPreconditionError(absl::StrCat("KV layout mismatch: sender lists ",
                                                      m.objects.size(), " objects, receiver ",
                                                      want.size()));
  }
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(m.objects[i] == want[i])) {
      return absl::FailedPreconditionError(absl::StrCat(
          "KV layout mismatch: sender ", proto::DescribeLayout(m.objects[i]), ", receiver ",
          proto::DescribeLayout(want[i])));
    }
  }
  if (m.backend != backend.name()) {
    return absl::FailedPreconditionError(absl::StrCat("backend mismatch: sender uses ", m.backend,
                                                      ", receiver ", backend.name()));
  }
  if (m.num_tokens == 0) return absl::InvalidArgumentError("manifest announces zero tokens");
  if (int64_t(m.num_tokens) > cache.options().max_tokens_per_sequence) {
    return absl::ResourceExhaustedError(absl::StrCat(m.num_tokens, " tokens exceed the receiver's limit of ",
                                                     cache.options().max_tokens_per_sequence));
  }
  if (m.max_chunk_bytes < cache.layout().MlaPageBytes() || m.max_chunk_bytes > (1ull << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("manifest max_chunk_bytes ", m.max_chunk_bytes,
                                                   " outside [one MLA page, 1 GiB]"));
  }
  if (m.max_chunk_bytes > o.credit_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("chunks of ", m.max_chunk_bytes,
                                                     " bytes exceed the receiver's credit of ",
                                                     o.credit_bytes, " bytes"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvSender>> KvSender::Start(Backend& backend,
                                                          std::unique_ptr<ControlChannel> channel,
                                                          const kvcache::KvCache& cache,
                                                          const SendRequest& request,
                                                          const SenderOptions& options) {
  const absl::Time start = absl::Now();
  if (channel == nullptr) return absl::InvalidArgumentError("KvSender::Start: null control channel");
  if (!IsValidRequestId(request.request_id)) {
    return absl::InvalidArgumentError(absl::StrCat("invalid request id '", request.request_id, "'"));
  }
  if (request.tokens <= 0 || cache.Capacity(request.sequence) < request.tokens) {
    return absl::InvalidArgumentError(absl::StrCat("sequence ", request.sequence, " holds ",
                                                   cache.Capacity(request.sequence),
                                                   " reserved tokens, cannot ship ", request.tokens));
  }
  MemoryOps& ops = options.memory_ops != nullptr ? *options.memory_ops : HostMemoryOps();
  if (cache.on_device() && !ops.device()) {
    return absl::InvalidArgumentError("the KV cache is device memory: pass CUDA MemoryOps");
  }
  if (options.max_batch_chunks <= 0 || options.max_batches_in_flight <= 0 || options.max_resends < 0) {
    return absl::InvalidArgumentError(
        "max_batch_chunks and max_batches_in_flight must be positive and max_resends >= 0");
  }
  const bool staged = options.staged || (cache.on_device() && !backend.supports_device_memory());
  if (staged && !backend.one_sided()) {
    return absl::UnimplementedError(absl::StrCat("staged streams need a one-sided backend, not ",
                                                 backend.name()));
  }
  PeerContext peer{request.request_id, options.node_name,
                   request.receiver_node.empty() ? channel->peer() : request.receiver_node};
  PD_ASSIGN_OR_RETURN(std::string sender_info, backend.SenderInfo(peer));
  // Until Connect succeeds, a failure hands back what SenderInfo reserved.
  struct CancelGuard {
    Backend& backend;
    const PeerContext& peer;
    bool armed = true;
    ~CancelGuard() {
      if (armed) backend.CancelSenderInfo(peer);
    }
  } cancel{backend, peer};
  SideLayout src = LocalSide(cache, request.sequence, request.tokens);

  proto::Manifest m;
  m.request_id = request.request_id;
  m.model_fingerprint = request.model_fingerprint;
  m.num_layers = uint32_t(cache.options().num_layers);
  m.num_tokens = uint64_t(request.tokens);
  m.page_tokens = kernels::kPageTokens;
  m.objects = WireLayouts(cache.layout());
  m.backend = backend.name();
  m.sender_info = std::move(sender_info);
  m.max_chunk_bytes = options.max_chunk_bytes;
  m.staged = staged;
  m.checksum = options.checksum;
  m.checksum_every = std::max<uint32_t>(1, options.checksum_every);
  m.sender_node = options.node_name;
  m.source_pages = src.pages;
  PD_RETURN_IF_ERROR(channel->Send(m));

  const absl::Time deadline = start + options.handshake_timeout;
  auto reply = channel->Receive(deadline);
  if (!reply.ok()) {
    channel->Close();
    return absl::Status(absl::IsDeadlineExceeded(reply.status()) ? absl::StatusCode::kDeadlineExceeded
                                                                 : absl::StatusCode::kUnavailable,
                        absl::StrCat("KV handshake for ", request.request_id, ": ",
                                     reply.status().message()));
  }
  if (const auto* a = std::get_if<proto::Abort>(&*reply)) {
    channel->Close();
    absl::Status s = proto::AbortToStatus(*a);
    return absl::Status(s.code(), absl::StrCat("receiver rejected the stream: ", s.message()));
  }
  const auto* accept = std::get_if<proto::Accept>(&*reply);
  if (accept == nullptr) {
    return Reject(*channel, absl::InvalidArgumentError(absl::StrCat(
                                "expected accept from the receiver, got ", proto::MessageName(*reply))));
  }
  if (accept->request_id != request.request_id) {
    return Reject(*channel, absl::InvalidArgumentError("accept names another request"));
  }
  if (accept->credit_chunks == 0 || accept->credit_bytes < options.max_chunk_bytes) {
    return Reject(*channel, absl::InvalidArgumentError("receiver granted less credit than one chunk"));
  }
  if (staged != (accept->staging_slots > 0) ||
      (staged && accept->slot_bytes < options.max_chunk_bytes)) {
    return Reject(*channel, absl::InvalidArgumentError("receiver's staging ring does not fit the request"));
  }
  SideLayout dst;
  dst.pages = accept->page_table;
  dst.mla = accept->mla_offsets;
  dst.index = accept->index_offsets;
  dst.summary = accept->summary_offsets;
  PlanParams params{cache.layout(), m.num_layers, m.num_tokens, m.max_chunk_bytes};
  auto plan = MakeChunkPlan(params, src, dst);
  if (!plan.ok()) return Reject(*channel, Annotate(plan.status(), "receiver's accept"));

  // Staged streams write from host memory: the bounce ring (device caches),
  // allocated once the backend says whether the receiver's ring is mapped
  // here (then the device-to-host copies go straight into it), or the cache.
  MemoryRegion local{cache.arena(), cache.arena_bytes(), cache.on_device(), /*persistent=*/true};
  if (staged && cache.on_device()) local = MemoryRegion{};
  auto data = backend.Connect(local, accept->receiver_info, peer, deadline);
  if (!data.ok()) return Reject(*channel, data.status());
  cancel.armed = false;
  const uint64_t ring_bytes = uint64_t(accept->staging_slots) * accept->slot_bytes;
  uint8_t* mapped = staged ? (*data)->mapped_destination() : nullptr;
  std::unique_ptr<StagingBuffer> bounce;
  std::unique_ptr<HostPin> pin;
  if (staged && cache.on_device() && mapped == nullptr) {
    auto b = ops.AllocateStaging(ring_bytes);
    if (!b.ok()) {
      (*data)->Abandon();
      return Reject(*channel, b.status());
    }
    bounce = std::move(*b);
  } else if (mapped != nullptr && cache.on_device()) {
    auto p = ops.PinHostMemory(mapped, ring_bytes);
    if (p.ok()) {
      pin = std::move(*p);
    } else {
      LOG(WARNING) << "KV stream " << request.request_id
                   << ": cannot pin the receiver's mapped staging ring (copies run slower): " << p.status();
    }
  }
  return std::unique_ptr<KvSender>(new SenderImpl(
      backend, std::move(channel), cache, request, options, ops, std::move(m), std::move(*accept),
      std::move(*plan), std::move(bounce), std::move(pin), std::move(*data), backend.one_sided(), start));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> KvReceiver::Accept(Backend& backend,
                                                               std::unique_ptr<ControlChannel> channel,
                                                               kvcache::KvCache& cache,
                                                               const ReceiverOptions& options) {
  const absl::Time start = absl::Now();
  if (channel == nullptr) return absl::InvalidArgumentError("KvReceiver::Accept: null control channel");
  MemoryOps& ops = options.memory_ops != nullptr ? *options.memory_ops : HostMemoryOps();
  if (cache.on_device() && !ops.device()) {
    return Reject(*channel, absl::InvalidArgumentError("the KV cache is device memory: pass CUDA MemoryOps"));
  }
  const absl::Time deadline = start + options.handshake_timeout;
  auto msg = channel->Receive(deadline);
  if (!msg.ok()) {
    channel->Close();
    return Annotate(msg.status(), "waiting for a KV manifest");
  }
  const auto* mp = std::get_if<proto::Manifest>(&*msg);
  if (mp == nullptr) {
    return Reject(*channel, absl::InvalidArgumentError(absl::StrCat(
                                "expected a manifest, got ", proto::MessageName(*msg))));
  }
  proto::Manifest m = std::move(*mp);
  if (absl::Status s = ValidateManifest(m, cache, backend, options); !s.ok()) {
    return Reject(*channel, s);
  }
  const bool staged = m.staged || (cache.on_device() && !backend.supports_device_memory());
  if (staged && !backend.one_sided()) {
    return Reject(*channel, absl::UnimplementedError("staged streams need a one-sided backend"));
  }
  if (!backend.one_sided() && m.source_pages.size() < size_t(kernels::NumPages(int64_t(m.num_tokens)))) {
    return Reject(*channel, absl::InvalidArgumentError("manifest lacks the sender's page table"));
  }

  auto seq = cache.CreateSequence();
  if (!seq.ok()) return Reject(*channel, seq.status());
  // Until the stream object exists, a failure must hand the sequence back.
  auto fail = [&](absl::Status st) {
    cache.Release(*seq).IgnoreError();
    return Reject(*channel, std::move(st));
  };
  if (absl::Status s = cache.Reserve(*seq, int64_t(m.num_tokens)); !s.ok()) return fail(s);

  SideLayout dst = LocalSide(cache, *seq, int64_t(m.num_tokens));
  SideLayout src;
  if (!backend.one_sided()) src = SideLayout{m.source_pages, dst.mla, dst.index, dst.summary};
  PlanParams params{cache.layout(), m.num_layers, m.num_tokens, m.max_chunk_bytes};
  auto plan = MakeChunkPlan(params, src, dst);
  if (!plan.ok()) return fail(plan.status());

  MemoryRegion region{cache.arena(), cache.arena_bytes(), cache.on_device(), /*persistent=*/true};
  std::unique_ptr<StagingBuffer> staging;
  uint32_t slots = 0;
  std::unique_ptr<HostPin> staging_pin;
  if (staged) {
    slots = std::max<uint32_t>(1, options.staging_slots);
    const uint64_t ring_bytes = uint64_t(slots) * m.max_chunk_bytes;
    // Memory the backend can expose without copies (UCX shared memory maps
    // it into a sender on this host), else the MemoryOps' staging memory.
    auto b = backend.AllocateStagingRing(ring_bytes);
    if (!b.ok()) {
      if (!absl::IsUnimplemented(b.status())) {
        LOG(WARNING) << "KV stream " << m.request_id << ": no exposable staging ring from " << backend.name()
                     << " (" << b.status() << "); staging through the sender's own buffers";
      }
      b = ops.AllocateStaging(ring_bytes);
    }
    if (!b.ok()) return fail(b.status());
    staging = std::move(*b);
    if (cache.on_device()) {
      auto pin = ops.PinHostMemory(staging->data(), staging->size());
      if (pin.ok()) {
        staging_pin = std::move(*pin);
      } else {
        LOG(WARNING) << "KV stream " << m.request_id
                     << ": cannot pin the staging ring (copies run slower): " << pin.status();
      }
    }
    region = MemoryRegion{staging->data(), staging->size(), false};
  }
  PeerContext peer{m.request_id, options.node_name,
                   m.sender_node.empty() ? channel->peer() : m.sender_node};
  auto data = backend.Listen(region, m.sender_info, peer, deadline);
  if (!data.ok()) return fail(data.status());

  proto::Accept a;
  a.request_id = m.request_id;
  a.page_table = dst.pages;
  a.receiver_info = (*data)->info();
  a.mla_offsets = dst.mla;
  a.index_offsets = dst.index;
  a.summary_offsets = dst.summary;
  a.staging_slots = slots;
  a.slot_bytes = staged ? m.max_chunk_bytes : 0;
  a.credit_bytes = staged ? uint64_t(slots) * m.max_chunk_bytes : options.credit_bytes;
  a.credit_chunks = staged ? slots : options.credit_chunks;
  if (absl::Status s = channel->Send(a); !s.ok()) return fail(s);
  ReceiverOptions effective = options;
  effective.credit_chunks = a.credit_chunks;
  return std::unique_ptr<KvReceiver>(new ReceiverImpl(
      std::move(channel), cache, effective, ops, std::move(m), *seq, std::move(*plan),
      std::move(staging), std::move(staging_pin), a.slot_bytes, std::move(*data), backend.one_sided(),
      start));
}

}  // namespace pd::transport
