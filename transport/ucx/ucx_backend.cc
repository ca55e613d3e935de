#include "transport/ucx/ucx_backend.h"

#include <sys/epoll.h>
#include <unistd.h>
#include <ucp/api/ucp.h>
#include <ucs/debug/log_def.h>

#include <atomic>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <algorithm>
#include <list>
#include <map>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
#include "transport/blob_codec.h"
#include "transport/resource_counters.h"

namespace pd::transport {
namespace {

absl::Status UcsError(ucs_status_t s, absl::string_view call) {
  const std::string msg = absl::StrCat(call, ": ", ucs_status_string(s));
  switch (s) {
    case UCS_ERR_NO_MEMORY:
    case UCS_ERR_NO_RESOURCE: return absl::ResourceExhaustedError(msg);
    case UCS_ERR_INVALID_PARAM: return absl::InvalidArgumentError(msg);
    case UCS_ERR_TIMED_OUT: return absl::DeadlineExceededError(msg);
    case UCS_ERR_CANCELED: return absl::CancelledError(msg);
    default: return absl::UnavailableError(msg);
  }
}

using blob::GetBytes;
using blob::GetU64;
using blob::PutBytes;
using blob::PutU64;

// UCX 1.13's shared-memory transports cannot detect a dead peer: creating an
// endpoint with UCP_ERR_HANDLING_MODE_PEER to a peer reachable only through
// them fails with UNREACHABLE, and UCX first logs "no active messages
// transport to <...>: posix/memory - no peer failure handler" as an ERROR.
// Peer::Create expects that failure and retries without peer error handling,
// so while it probes, on its thread, this handler turns that one message into
// a VLOG; every other UCX message passes.
thread_local bool probing_peer_error_mode = false;

ucs_log_func_rc_t FilterPeerModeProbe(const char* file, unsigned line, const char* function,
                                      ucs_log_level_t level, const ucs_log_component_config_t* comp,
                                      const char* format, va_list ap) {
  if (!probing_peer_error_mode || level != UCS_LOG_LEVEL_ERROR) return UCS_LOG_FUNC_RC_CONTINUE;
  char text[512];
  va_list copy;
  va_copy(copy, ap);
  std::vsnprintf(text, sizeof(text), format, copy);
  va_end(copy);
  if (std::strstr(text, "no peer failure handler") == nullptr) return UCS_LOG_FUNC_RC_CONTINUE;
  VLOG(1) << "UCX (expected while probing peer error handling): " << text;
  return UCS_LOG_FUNC_RC_STOP;
}

void InstallUcxLogFilter() {
  static std::once_flag once;
  std::call_once(once, [] { ucs_log_push_handler(FilterPeerModeProbe); });
}

// Owns the ucp context, worker and the progress thread.
class Worker {
 public:
  static absl::StatusOr<std::unique_ptr<Worker>> Create(const UcxOptions& o) {
    auto w = std::unique_ptr<Worker>(new Worker(o));
    InstallUcxLogFilter();
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return UcsError(s, "ucp_config_read");
    // Larger TCP segments: puts over TCP are emulated with active messages,
    // one segment (and one acknowledgement) at a time; UCX's 8 KiB default
    // costs about half the bandwidth (docs/perf.md). The environment wins.
    // (The key is the tcp component's field name, without its TCP_ prefix;
    // set only where tcp may be selected, or UCX warns about an unused key.)
    const char* tls = std::getenv("UCX_TLS");
    const bool tcp_possible = tls == nullptr || std::strstr(tls, "tcp") != nullptr ||
                              std::strstr(tls, "all") != nullptr || tls[0] == '^';
    if (!o.tcp_seg_size.empty() && tcp_possible) {
      for (const char* var : {"RX_SEG_SIZE", "TX_SEG_SIZE"}) {
        if (std::getenv(absl::StrCat("UCX_TCP_", var).c_str()) != nullptr) continue;
        s = ucp_config_modify(config, var, o.tcp_seg_size.c_str());
        if (s != UCS_OK) {
          ucp_config_release(config);
          return UcsError(s, absl::StrCat("ucp_config_modify(", var, "=", o.tcp_seg_size, ")"));
        }
      }
    }
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
    params.features = UCP_FEATURE_RMA | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 1;
    s = ucp_init(&params, config, &w->context_);
    ucp_config_release(config);
    if (s != UCS_OK) return UcsError(s, "ucp_init");
    ucp_context_attr_t cattr{};
    cattr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
    if (ucp_context_query(w->context_, &cattr) == UCS_OK) {
      w->cuda_ = (cattr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
    }
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_MULTI;
    s = ucp_worker_create(w->context_, &wp, &w->worker_);
    if (s != UCS_OK) return UcsError(s, "ucp_worker_create");
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    s = ucp_worker_get_address(w->worker_, &addr, &len);
    if (s != UCS_OK) return UcsError(s, "ucp_worker_get_address");
    w->address_.assign(reinterpret_cast<const char*>(addr), len);
    ucp_worker_release_address(w->worker_, addr);
    s = ucp_worker_get_efd(w->worker_, &w->efd_);
    if (s != UCS_OK) return UcsError(s, "ucp_worker_get_efd");
    w->epfd_ = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    if (w->epfd_ < 0 || epoll_ctl(w->epfd_, EPOLL_CTL_ADD, w->efd_, &ev) != 0) {
      return absl::InternalError("epoll on the ucp worker's event fd failed");
    }
    w->thread_ = std::thread([p = w.get()] { p->Progress(); });
    return w;
  }

  ~Worker() {
    stop_ = true;
    if (worker_ != nullptr) ucp_worker_signal(worker_);
    if (thread_.joinable()) thread_.join();
    // Let in-flight wireup messages of force-closed endpoints finish: UCX 1.13
    // asserts in ucp_worker_destroy when it purges a half-done wireup.
    if (worker_ != nullptr) {
      const absl::Time until = absl::Now() + absl::Milliseconds(50);
      while (absl::Now() < until) ucp_worker_progress(worker_);
    }
    if (epfd_ >= 0) ::close(epfd_);
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }

  ucp_context_h context() const { return context_; }
  ucp_worker_h worker() const { return worker_; }
  const std::string& address() const { return address_; }
  bool cuda() const { return cuda_; }
  // Progresses the worker on the calling thread (a stream thread waiting for
  // its operations) and keeps the progress thread off the worker's lock for
  // the next millisecond. True when something progressed.
  bool Drive() {
    driven_until_.store(absl::ToUnixNanos(absl::Now() + absl::Milliseconds(1)),
                        std::memory_order_relaxed);
    bool any = false;
    for (int i = 0; i < 16 && ucp_worker_progress(worker_) != 0; ++i) any = true;
    return any;
  }
  // Tells the progress thread that operations are in flight (and wakes it
  // only if it sleeps: signalling takes the worker lock and a syscall).
  void Busy() {
    busy_until_ = absl::ToUnixNanos(absl::Now() + absl::Milliseconds(1));
    if (sleeping_.load(std::memory_order_acquire)) ucp_worker_signal(worker_);
  }

 private:
  explicit Worker(const UcxOptions& o) : options_(o) {}

  // The progress thread: the only caller of ucp_worker_progress. Polls while
  // there was activity in the last `spin` (or a poster marked itself busy),
  // then sleeps on the worker's event fd for up to 5 ms.
  void Progress() {
    absl::Time last_activity = absl::Now();
    while (!stop_) {
      if (absl::ToUnixNanos(absl::Now()) < driven_until_.load(std::memory_order_relaxed)) {
        // A stream thread drives the worker: stay off its lock.
        std::this_thread::sleep_for(std::chrono::microseconds(200));
        last_activity = absl::Now();
        continue;
      }
      if (ucp_worker_progress(worker_) != 0) {
        last_activity = absl::Now();
        continue;
      }
      const absl::Time now = absl::Now();
      if (now - last_activity < options_.spin || absl::ToUnixNanos(now) < busy_until_.load()) {
        continue;
      }
      sleeping_.store(true);  // seq_cst: pairs with Busy()'s store-then-load
      // A poster that saw sleeping_ false before this store is within its
      // busy window: look again before sleeping.
      if (absl::ToUnixNanos(absl::Now()) < busy_until_.load() ||
          ucp_worker_arm(worker_) == UCS_ERR_BUSY) {
        sleeping_.store(false, std::memory_order_release);
        continue;
      }
      epoll_event ev;
      epoll_wait(epfd_, &ev, 1, 5);
      sleeping_.store(false, std::memory_order_release);
      last_activity = absl::Now();
    }
  }

  const UcxOptions options_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string address_;
  bool cuda_ = false;
  int efd_ = -1, epfd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> busy_until_{0};
  std::atomic<bool> sleeping_{false};  // the progress thread waits on the event fd
  std::atomic<int64_t> driven_until_{0};  // a stream thread drives progress until then
  std::thread thread_;
};

// One ucp_mem_map registration and its packed rkey.
class Registration {
 public:
  static absl::StatusOr<std::shared_ptr<Registration>> Create(Worker& w, const MemoryRegion& r) {
    auto reg = std::shared_ptr<Registration>(new Registration(w, r));
    ucp_mem_map_params_t p{};
    p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                   UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
    p.address = r.base;
    p.length = r.bytes;
    p.memory_type = r.on_device ? UCS_MEMORY_TYPE_CUDA : UCS_MEMORY_TYPE_HOST;
    ucs_status_t s = ucp_mem_map(w.context(), &p, &reg->memh_);
    if (s != UCS_OK) {
      reg->memh_ = nullptr;
      return UcsError(s, absl::StrCat("ucp_mem_map of ", r.bytes, " bytes"));
    }
    void* rkey = nullptr;
    size_t len = 0;
    s = ucp_rkey_pack(w.context(), reg->memh_, &rkey, &len);
    if (s != UCS_OK) return UcsError(s, "ucp_rkey_pack");
    reg->rkey_.assign(static_cast<const char*>(rkey), len);
    ucp_rkey_buffer_release(rkey);
    reg->token_ = ResourceToken(Resource::kRegisteredRegion, r.bytes);
    return reg;
  }
  // Allocates and registers `bytes` of host memory in one call.
  static absl::StatusOr<std::shared_ptr<Registration>> Allocate(Worker& w, size_t bytes) {
    ucp_mem_map_params_t p{};
    p.field_mask = UCP_MEM_MAP_PARAM_FIELD_LENGTH | UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    p.length = bytes;
    p.flags = UCP_MEM_MAP_ALLOCATE;
    ucp_mem_h memh = nullptr;
    ucs_status_t s = ucp_mem_map(w.context(), &p, &memh);
    if (s != UCS_OK) return UcsError(s, absl::StrCat("ucp_mem_map(ALLOCATE) of ", bytes, " bytes"));
    ucp_mem_attr_t attr{};
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    s = ucp_mem_query(memh, &attr);
    if (s != UCS_OK) {
      ucp_mem_unmap(w.context(), memh);
      return UcsError(s, "ucp_mem_query");
    }
    MemoryRegion r{static_cast<uint8_t*>(attr.address), bytes, false, true};
    auto reg = std::shared_ptr<Registration>(new Registration(w, r));
    reg->memh_ = memh;
    void* rkey = nullptr;
    size_t len = 0;
    s = ucp_rkey_pack(w.context(), memh, &rkey, &len);
    if (s != UCS_OK) return UcsError(s, "ucp_rkey_pack");
    reg->rkey_.assign(static_cast<const char*>(rkey), len);
    ucp_rkey_buffer_release(rkey);
    reg->token_ = ResourceToken(Resource::kRegisteredRegion, bytes);
    return reg;
  }
  ~Registration() {
    if (memh_ != nullptr) ucp_mem_unmap(worker_.context(), memh_);
  }
  const std::string& rkey() const { return rkey_; }
  const MemoryRegion& region() const { return region_; }

 private:
  Registration(Worker& w, const MemoryRegion& r) : worker_(w), region_(r) {}
  Worker& worker_;
  const MemoryRegion region_;
  ucp_mem_h memh_ = nullptr;
  std::string rkey_;
  ResourceToken token_;
};

class UcxReceiver final : public DataReceiver {
 public:
  UcxReceiver(Worker& w, std::shared_ptr<Registration> reg, std::string info)
      : worker_(w), reg_(std::move(reg)), info_(std::move(info)) {}
  std::string info() const override { return info_; }
  // Puts that UCX emulates (TCP) are applied by this worker's progress.
  bool Progress() override { return worker_.Drive(); }

 private:
  Worker& worker_;
  std::shared_ptr<Registration> reg_;  // a per-stream registration ends here
  const std::string info_;
};

// ---------------------------------------------------------------- sender side

// Why a peer's operations failed (UCX callbacks run on the progress thread).
class FailureState {
 public:
  bool failed() const { return failed_.load(); }
  void Fail(ucs_status_t s, const char* what) {
    absl::MutexLock lock(&mu_);
    if (error_.empty()) error_ = absl::StrCat(what, ": ", ucs_status_string(s));
    failed_ = true;
  }
  absl::Status Error() const {
    absl::MutexLock lock(&mu_);
    return absl::UnavailableError(absl::StrCat("UCX peer unreachable: ", error_));
  }

 private:
  std::atomic<bool> failed_{false};
  mutable absl::Mutex mu_;
  std::string error_ ABSL_GUARDED_BY(mu_);
};

// An unpacked remote key. Shared memory maps the remote region on unpack, so
// keeping the key keeps that mapping (and its page-table entries) warm.
class RemoteKey {
 public:
  explicit RemoteKey(ucp_rkey_h rkey) : rkey_(rkey), token_(Resource::kRemoteKey) {}
  ~RemoteKey() { ucp_rkey_destroy(rkey_); }
  RemoteKey(const RemoteKey&) = delete;
  RemoteKey& operator=(const RemoteKey&) = delete;
  ucp_rkey_h get() const { return rkey_; }

 private:
  const ucp_rkey_h rkey_;
  ResourceToken token_;
};

void EpError(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<FailureState*>(arg)->Fail(status, "endpoint error");
}

// One endpoint to a remote worker and the remote keys unpacked on it, shared
// by the streams to that worker and cached by the backend (PeerCache). The
// endpoint closes when the last stream and the cache let go of it.
class Peer {
 public:
  static absl::StatusOr<std::shared_ptr<Peer>> Create(Worker& w, const std::string& address,
                                                      bool error_handling) {
    auto peer = std::shared_ptr<Peer>(new Peer(w, address));
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    ep.err_mode = error_handling ? UCP_ERR_HANDLING_MODE_PEER : UCP_ERR_HANDLING_MODE_NONE;
    ep.err_handler.cb = EpError;
    ep.err_handler.arg = &peer->failure_;
    probing_peer_error_mode = error_handling;
    ucs_status_t s = ucp_ep_create(w.worker(), &ep, &peer->ep_);
    probing_peer_error_mode = false;
    if (s == UCS_ERR_UNREACHABLE && error_handling) {
      // Some transports (UCX 1.13's shared memory) cannot detect a dead peer;
      // then the control channel's heartbeat is the only failure detector.
      ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
      s = ucp_ep_create(w.worker(), &ep, &peer->ep_);
      if (s == UCS_OK) VLOG(1) << "UCX endpoint without peer error handling";
    }
    if (s != UCS_OK) {
      peer->ep_ = nullptr;
      return UcsError(s, "ucp_ep_create");
    }
    peer->token_ = ResourceToken(Resource::kEndpoint);
    return peer;
  }

  // Destroys the keys, then closes the endpoint: flush when healthy, force
  // after an error or when abandoned; waits (at most 2 s) so that no callback
  // can touch this object afterwards.
  ~Peer() {
    {
      absl::MutexLock lock(&mu_);
      keys_.clear();
    }
    if (ep_ == nullptr) return;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    p.flags = failure_.failed() || abandoned_ ? UCP_EP_CLOSE_FLAG_FORCE : 0;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep_, &p);
    if (r != nullptr && !UCS_PTR_IS_ERR(r)) {
      const absl::Time deadline = absl::Now() + absl::Seconds(2);
      worker_.Busy();
      while (ucp_request_check_status(r) == UCS_INPROGRESS && absl::Now() < deadline) {
        std::this_thread::yield();
      }
      if (ucp_request_check_status(r) == UCS_INPROGRESS) {
        LOG(WARNING) << "UCX endpoint close did not finish in 2 s; leaving it to UCX";
        // Callbacks may still run: leak their small target rather than crash.
        new FailureState();
      }
      ucp_request_free(r);
    }
  }
  Peer(const Peer&) = delete;
  Peer& operator=(const Peer&) = delete;

  ucp_ep_h ep() const { return ep_; }
  const std::string& address() const { return address_; }
  FailureState& failure() { return failure_; }
  // A stream to this peer failed: it may be gone. Close by force; never reuse.
  void Abandon() { abandoned_ = true; }
  bool usable() const { return !abandoned_ && !failure_.failed(); }

  // The remote key for `blob`. Keys of persistent regions (cache arenas) are
  // kept for later streams when `cache`; others belong to the caller.
  absl::StatusOr<std::shared_ptr<RemoteKey>> Key(const std::string& blob, bool cache) {
    absl::MutexLock lock(&mu_);
    if (cache) {
      auto it = keys_.find(blob);
      if (it != keys_.end()) return it->second;
    }
    ucp_rkey_h rkey = nullptr;
    ucs_status_t s = ucp_ep_rkey_unpack(ep_, blob.data(), &rkey);
    if (s != UCS_OK) return UcsError(s, "ucp_ep_rkey_unpack");
    auto key = std::make_shared<RemoteKey>(rkey);
    if (cache) {
      if (keys_.size() >= kMaxKeysPerPeer) keys_.erase(keys_.begin());
      keys_[blob] = key;
    }
    return key;
  }

 private:
  static constexpr size_t kMaxKeysPerPeer = 16;
  Peer(Worker& w, std::string address) : worker_(w), address_(std::move(address)) {}

  Worker& worker_;
  const std::string address_;
  ucp_ep_h ep_ = nullptr;
  FailureState failure_;
  std::atomic<bool> abandoned_{false};
  ResourceToken token_;
  absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<RemoteKey>> keys_ ABSL_GUARDED_BY(mu_);
};

// The backend's endpoints by remote worker address: at most `capacity`,
// least recently used evicted first (a stream still using an evicted peer
// keeps it until it ends). Unusable peers are dropped on sight. Thread-safe.
class PeerCache {
 public:
  PeerCache(Worker& w, size_t capacity, bool error_handling)
      : worker_(w), capacity_(capacity), error_handling_(error_handling) {}
  ~PeerCache() { Clear(); }

  absl::StatusOr<std::shared_ptr<Peer>> Get(const std::string& address) {
    {
      absl::MutexLock lock(&mu_);
      for (auto it = lru_.begin(); it != lru_.end(); ++it) {
        if ((*it)->address() != address) continue;
        std::shared_ptr<Peer> p = *it;
        lru_.erase(it);
        if (!p->usable()) break;
        lru_.push_front(p);
        return p;
      }
    }
    PD_ASSIGN_OR_RETURN(std::shared_ptr<Peer> p, Peer::Create(worker_, address, error_handling_));
    std::vector<std::shared_ptr<Peer>> evicted;  // closed outside the lock
    absl::MutexLock lock(&mu_);
    if (capacity_ == 0) return p;
    lru_.push_front(p);
    while (lru_.size() > capacity_) {
      evicted.push_back(std::move(lru_.back()));
      lru_.pop_back();
    }
    return p;
  }

  void Evict(const Peer* peer) {
    std::shared_ptr<Peer> victim;
    absl::MutexLock lock(&mu_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it) {
      if (it->get() == peer) {
        victim = std::move(*it);
        lru_.erase(it);
        break;
      }
    }
  }

  void Clear() {
    std::list<std::shared_ptr<Peer>> all;
    absl::MutexLock lock(&mu_);
    all.swap(lru_);
  }

  bool caching() const { return capacity_ > 0; }

 private:
  Worker& worker_;
  const size_t capacity_;
  const bool error_handling_;
  absl::Mutex mu_;
  std::list<std::shared_ptr<Peer>> lru_ ABSL_GUARDED_BY(mu_);  // most recent first
};

// Per-stream fence state, shared with the fence callbacks.
struct FenceState {
  std::atomic<uint64_t> done{0};
  FailureState failure;
};

// Callbacks own their request: ucp_request_free before completion would
// suppress the callback, so requests are released here.
void PutDone(void* request, ucs_status_t status, void* user_data) {
  if (status != UCS_OK) static_cast<FailureState*>(user_data)->Fail(status, "ucp_put_nbx");
  ucp_request_free(request);
}

struct FenceCtx {
  std::shared_ptr<FenceState> state;
  uint64_t id;
};
void FenceDone(void* request, ucs_status_t status, void* user_data) {
  auto* f = static_cast<FenceCtx*>(user_data);
  if (status != UCS_OK) f->state->failure.Fail(status, "ucp_ep_flush_nbx");
  // Fences complete in order on one endpoint; record the highest.
  uint64_t cur = f->state->done.load();
  while (cur < f->id && !f->state->done.compare_exchange_weak(cur, f->id)) {
  }
  delete f;
  if (request != nullptr) ucp_request_free(request);
}

class UcxSender final : public DataSender {
 public:
  UcxSender(Worker& w, PeerCache& cache, std::shared_ptr<Peer> peer, std::shared_ptr<RemoteKey> key,
            uint64_t remote_base, uint64_t remote_bytes, uint8_t* direct)
      : worker_(w),
        cache_(cache),
        peer_(std::move(peer)),
        key_(std::move(key)),
        remote_base_(remote_base),
        remote_bytes_(remote_bytes),
        direct_(direct),
        state_(std::make_shared<FenceState>()) {}

  ~UcxSender() override {
    // An unfinished stream may have faced a dead peer: do not reuse it.
    if (state_->failure.failed() || state_->done.load() != fences_posted_) Abandon();
    key_.reset();
    peer_.reset();  // closes the endpoint if nothing else holds it
  }

  absl::Status PostWrite(const uint8_t* src, uint64_t dst, size_t len) override {
    PD_RETURN_IF_ERROR(Check());
    if (dst + len > remote_bytes_ || dst + len < dst) {
      return absl::OutOfRangeError(absl::StrCat("UCX put [", dst, ", +", len,
                                                ") outside the remote region of ", remote_bytes_,
                                                " bytes"));
    }
    if (direct_ != nullptr) {
      std::memcpy(direct_ + dst, src, len);
      return absl::OkStatus();
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = PutDone;
    p.user_data = &peer_->failure();
    ucs_status_ptr_t r = ucp_put_nbx(peer_->ep(), src, len, remote_base_ + dst, key_->get(), &p);
    if (UCS_PTR_IS_ERR(r)) return UcsError(UCS_PTR_STATUS(r), "ucp_put_nbx");
    worker_.Drive();  // r, if any, completes later: PutDone releases it
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> PostFence() override {
    PD_RETURN_IF_ERROR(Check());
    const uint64_t id = ++fences_posted_;
    if (direct_ != nullptr) {
      // The copies are done; the control message announcing them follows
      // them through a syscall, which orders the stores for the reader.
      std::atomic_thread_fence(std::memory_order_release);
      state_->done = id;
      return id;
    }
    auto* ctx = new FenceCtx{state_, id};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = FenceDone;
    p.user_data = ctx;
    ucs_status_ptr_t r = ucp_ep_flush_nbx(peer_->ep(), &p);
    if (UCS_PTR_IS_ERR(r)) {
      delete ctx;
      return UcsError(UCS_PTR_STATUS(r), "ucp_ep_flush_nbx");
    }
    if (r == nullptr) FenceDone(nullptr, UCS_OK, ctx);  // else FenceDone runs on completion
    worker_.Drive();
    return id;
  }

  absl::StatusOr<bool> PollFence(uint64_t id) override {
    PD_RETURN_IF_ERROR(Check());
    if (state_->done.load() >= id) return true;
    if (direct_ == nullptr) worker_.Drive();
    PD_RETURN_IF_ERROR(Check());
    return state_->done.load() >= id;
  }

  bool Progress() override { return direct_ == nullptr && worker_.Drive(); }

  uint8_t* mapped_destination() const override { return direct_; }

  void Abandon() override {
    peer_->Abandon();
    cache_.Evict(peer_.get());
  }

 private:
  absl::Status Check() const {
    if (peer_->failure().failed()) return peer_->failure().Error();
    if (state_->failure.failed()) return state_->failure.Error();
    return absl::OkStatus();
  }

  Worker& worker_;
  PeerCache& cache_;
  std::shared_ptr<Peer> peer_;
  std::shared_ptr<RemoteKey> key_;
  const uint64_t remote_base_, remote_bytes_;
  uint8_t* const direct_;  // the remote region mapped here (shared memory), or null
  std::shared_ptr<FenceState> state_;
  uint64_t fences_posted_ = 0;
};

class UcxBackend final : public Backend {
 public:
  UcxBackend(std::unique_ptr<Worker> w, const UcxOptions& o)
      : worker_(std::move(w)),
        options_(o),
        name_(o.name),
        peers_(std::make_unique<PeerCache>(*worker_, size_t(std::max(0, o.max_cached_peers)),
                                           o.peer_error_handling)) {}
  ~UcxBackend() override {
    peers_.reset();  // endpoints before the worker
    absl::MutexLock lock(&mu_);
    cache_.clear();
  }

  std::string name() const override { return name_; }
  bool one_sided() const override { return true; }
  bool supports_device_memory() const override { return worker_->cuda(); }
  absl::StatusOr<std::string> SenderInfo(const PeerContext&) override { return std::string(); }

  absl::StatusOr<std::unique_ptr<DataReceiver>> Listen(const MemoryRegion& region, const std::string&,
                                                       const PeerContext&, absl::Time) override {
    if (region.on_device && !worker_->cuda()) {
      return absl::FailedPreconditionError("UCX reports no CUDA memory support: stage device memory");
    }
    std::shared_ptr<Registration> reg;
    {
      absl::MutexLock lock(&mu_);
      if (region.persistent) {
        auto it = cache_.find(region.base);
        if (it != cache_.end() && it->second->region().bytes == region.bytes) reg = it->second;
      } else {
        // A staging ring from AllocateStagingRing: registered at allocation.
        auto it = rings_.find(region.base);
        if (it != rings_.end()) {
          std::shared_ptr<Registration> r = it->second.lock();
          if (r != nullptr && r->region().bytes == region.bytes) reg = std::move(r);
        }
      }
    }
    if (reg == nullptr) {
      PD_ASSIGN_OR_RETURN(reg, Registration::Create(*worker_, region));
      if (region.persistent) {
        absl::MutexLock lock(&mu_);
        cache_[region.base] = reg;
      }
    }
    std::string info;
    PutU64(info, reinterpret_cast<uint64_t>(region.base));
    PutU64(info, region.bytes);
    PutBytes(info, worker_->address().data(), worker_->address().size());
    PutBytes(info, reg->rkey().data(), reg->rkey().size());
    PutU64(info, region.persistent ? 1 : 0);  // senders may keep the key for later streams
    return std::unique_ptr<DataReceiver>(new UcxReceiver(*worker_, std::move(reg), std::move(info)));
  }

  absl::StatusOr<std::unique_ptr<DataSender>> Connect(const MemoryRegion& local,
                                                      const std::string& receiver_info,
                                                      const PeerContext&, absl::Time deadline) override {
    if (local.on_device && !worker_->cuda()) {
      return absl::FailedPreconditionError("UCX reports no CUDA memory support: stage device memory");
    }
    absl::string_view in(receiver_info);
    std::string address, rkey;
    uint64_t base = 0, bytes = 0, persistent = 0;
    if (!GetU64(in, &base) || !GetU64(in, &bytes) || !GetBytes(in, &address) ||
        !GetBytes(in, &rkey) || !GetU64(in, &persistent) || !in.empty() || address.empty()) {
      return absl::InvalidArgumentError("malformed UCX receiver info");
    }
    PD_ASSIGN_OR_RETURN(std::shared_ptr<Peer> peer, peers_->Get(address));
    PD_ASSIGN_OR_RETURN(std::shared_ptr<RemoteKey> key,
                        peer->Key(rkey, persistent != 0 && peers_->caching()));
    // Shared-memory transports map the remote region into this process: then
    // a put is a plain memcpy by the posting thread, with no worker lock,
    // request or progress (UCX does the same copy inside ucp_put_nbx).
    void* direct = nullptr;
    if (!options_.direct_puts || ucp_rkey_ptr(key->get(), base, &direct) != UCS_OK) direct = nullptr;
    if (direct != nullptr) VLOG(1) << "UCX sender: remote region mapped here; puts are direct copies";
    return std::unique_ptr<DataSender>(new UcxSender(*worker_, *peers_, std::move(peer), std::move(key),
                                                     base, bytes, static_cast<uint8_t*>(direct)));
  }

  void ForgetRegion(const uint8_t* base) override {
    absl::MutexLock lock(&mu_);
    cache_.erase(base);
  }

  // UCX-allocated host memory: on shared-memory transports a sender maps it
  // (ucp_rkey_ptr) and copies into it directly, where memory registered
  // from elsewhere (e.g. cudaHostAlloc) could only take puts emulated with
  // active messages (two copies, 8 KiB segments: ~3 GB/s, docs/perf.md).
  absl::StatusOr<std::unique_ptr<StagingBuffer>> AllocateStagingRing(size_t bytes) override;

  // For NewUcxArenaAllocator: allocate + register, entered in the cache.
  absl::StatusOr<uint8_t*> AllocateArena(size_t bytes) {
    PD_ASSIGN_OR_RETURN(std::shared_ptr<Registration> reg, Registration::Allocate(*worker_, bytes));
    uint8_t* base = reg->region().base;
    std::memset(base, 0, bytes);
    absl::MutexLock lock(&mu_);
    cache_[base] = std::move(reg);
    return base;
  }

 private:
  std::unique_ptr<Worker> worker_;
  const UcxOptions options_;
  const std::string name_;
  std::unique_ptr<PeerCache> peers_;
  absl::Mutex mu_;
  // Registrations of persistent regions (cache arenas), by base address.
  std::map<const uint8_t*, std::shared_ptr<Registration>> cache_ ABSL_GUARDED_BY(mu_);
  // Live staging rings from AllocateStagingRing, by base address.
  std::map<const uint8_t*, std::weak_ptr<Registration>> rings_ ABSL_GUARDED_BY(mu_);

  friend class UcxRing;
};

// A staging ring allocated and registered by UCX (the registration unmaps
// and frees it when the ring and every stream that listened on it let go).
class UcxRing final : public StagingBuffer {
 public:
  UcxRing(UcxBackend& b, std::shared_ptr<Registration> reg)
      : backend_(b), reg_(std::move(reg)), token_(Resource::kPinnedBuffer, reg_->region().bytes) {}
  ~UcxRing() override {
    absl::MutexLock lock(&backend_.mu_);
    backend_.rings_.erase(reg_->region().base);
  }
  uint8_t* data() const override { return reg_->region().base; }
  size_t size() const override { return reg_->region().bytes; }

 private:
  UcxBackend& backend_;
  std::shared_ptr<Registration> reg_;
  ResourceToken token_;
};

absl::StatusOr<std::unique_ptr<StagingBuffer>> UcxBackend::AllocateStagingRing(size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("zero-byte staging ring");
  PD_ASSIGN_OR_RETURN(std::shared_ptr<Registration> reg, Registration::Allocate(*worker_, bytes));
  std::memset(reg->region().base, 0, bytes);
  {
    absl::MutexLock lock(&mu_);
    rings_[reg->region().base] = reg;
  }
  return std::unique_ptr<StagingBuffer>(new UcxRing(*this, std::move(reg)));
}

class UcxArenaAllocator final : public kvcache::Allocator {
 public:
  explicit UcxArenaAllocator(UcxBackend& b) : backend_(b) {}
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    PD_ASSIGN_OR_RETURN(uint8_t* p, backend_.AllocateArena(bytes));
    return static_cast<void*>(p);
  }
  // Drops the backend's reference; UCX frees the memory once no stream uses it.
  void Free(void* p, size_t) override { backend_.ForgetRegion(static_cast<uint8_t*>(p)); }
  bool on_device() const override { return false; }

 private:
  UcxBackend& backend_;
};

}  // namespace

std::unique_ptr<kvcache::Allocator> NewUcxArenaAllocator(Backend& ucx_backend) {
  auto* b = dynamic_cast<UcxBackend*>(&ucx_backend);
  if (b == nullptr) return nullptr;
  return std::make_unique<UcxArenaAllocator>(*b);
}

absl::StatusOr<std::unique_ptr<Backend>> NewUcxBackend(const UcxOptions& options) {
  PD_ASSIGN_OR_RETURN(std::unique_ptr<Worker> w, Worker::Create(options));
  VLOG(1) << "UCX backend up; CUDA memory " << (w->cuda() ? "supported" : "not supported");
  return std::unique_ptr<Backend>(new UcxBackend(std::move(w), options));
}

}  // namespace pd::transport
