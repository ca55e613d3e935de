#include "transport/ucx/ucx_backend.h"

#include <sys/epoll.h>
#include <unistd.h>
#include <ucp/api/ucp.h>

#include <atomic>
#include <cstring>
#include <map>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"
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

// Blob helpers: length-prefixed fields.
void PutU64(std::string& s, uint64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }
void PutBytes(std::string& s, const void* p, size_t n) {
  PutU64(s, n);
  s.append(static_cast<const char*>(p), n);
}
bool GetU64(absl::string_view& s, uint64_t* v) {
  if (s.size() < 8) return false;
  std::memcpy(v, s.data(), 8);
  s.remove_prefix(8);
  return true;
}
bool GetBytes(absl::string_view& s, std::string* out) {
  uint64_t n = 0;
  if (!GetU64(s, &n) || n > s.size()) return false;
  out->assign(s.data(), n);
  s.remove_prefix(n);
  return true;
}

// Owns the ucp context, worker and the progress thread.
class Worker {
 public:
  static absl::StatusOr<std::unique_ptr<Worker>> Create(const UcxOptions& o) {
    auto w = std::unique_ptr<Worker>(new Worker(o));
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return UcsError(s, "ucp_config_read");
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
  // Tells the progress thread that operations are in flight.
  void Busy() {
    busy_until_ = absl::ToUnixNanos(absl::Now() + absl::Milliseconds(1));
    ucp_worker_signal(worker_);
  }

 private:
  explicit Worker(const UcxOptions& o) : options_(o) {}

  // The progress thread: the only caller of ucp_worker_progress. Polls while
  // there was activity in the last `spin` (or a poster marked itself busy),
  // then sleeps on the worker's event fd for up to 5 ms.
  void Progress() {
    absl::Time last_activity = absl::Now();
    while (!stop_) {
      if (ucp_worker_progress(worker_) != 0) {
        last_activity = absl::Now();
        continue;
      }
      const absl::Time now = absl::Now();
      if (now - last_activity < options_.spin || absl::ToUnixNanos(now) < busy_until_.load()) {
        continue;
      }
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;
      epoll_event ev;
      epoll_wait(epfd_, &ev, 1, 5);
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
  UcxReceiver(std::shared_ptr<Registration> reg, std::string info)
      : reg_(std::move(reg)), info_(std::move(info)) {}
  std::string info() const override { return info_; }

 private:
  std::shared_ptr<Registration> reg_;  // a per-stream registration ends here
  const std::string info_;
};

// Completion state shared with UCX callbacks (which run on the progress thread).
struct OpState {
  std::atomic<uint64_t> fences_done{0};
  std::atomic<bool> failed{false};
  absl::Mutex mu;
  std::string error ABSL_GUARDED_BY(mu);
  void Fail(ucs_status_t s, const char* what) {
    absl::MutexLock lock(&mu);
    if (error.empty()) error = absl::StrCat(what, ": ", ucs_status_string(s));
    failed = true;
  }
  absl::Status Error() {
    absl::MutexLock lock(&mu);
    return absl::UnavailableError(absl::StrCat("UCX peer unreachable: ", error));
  }
};

// Callbacks own their request: ucp_request_free before completion would
// suppress the callback, so requests are released here.
void PutDone(void* request, ucs_status_t status, void* user_data) {
  if (status != UCS_OK) static_cast<OpState*>(user_data)->Fail(status, "ucp_put_nbx");
  ucp_request_free(request);
}

struct FenceCtx {
  OpState* state;
  uint64_t id;
};
void FenceDone(void* request, ucs_status_t status, void* user_data) {
  auto* f = static_cast<FenceCtx*>(user_data);
  if (status != UCS_OK) f->state->Fail(status, "ucp_ep_flush_nbx");
  // Fences complete in order on one endpoint; record the highest.
  uint64_t cur = f->state->fences_done.load();
  while (cur < f->id && !f->state->fences_done.compare_exchange_weak(cur, f->id)) {
  }
  delete f;
  if (request != nullptr) ucp_request_free(request);
}

void EpError(void* arg, ucp_ep_h, ucs_status_t status) {
  static_cast<OpState*>(arg)->Fail(status, "endpoint error");
}

class UcxSender final : public DataSender {
 public:
  UcxSender(Worker& w) : worker_(w), state_(std::make_unique<OpState>()) {}

  absl::Status Init(const std::string& receiver_info, absl::Time deadline) {
    absl::string_view in(receiver_info);
    std::string address, rkey;
    if (!GetU64(in, &remote_base_) || !GetU64(in, &remote_bytes_) || !GetBytes(in, &address) ||
        !GetBytes(in, &rkey) || !in.empty()) {
      return absl::InvalidArgumentError("malformed UCX receiver info");
    }
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = EpError;
    ep.err_handler.arg = state_.get();
    ucs_status_t s = ucp_ep_create(worker_.worker(), &ep, &ep_);
    if (s == UCS_ERR_UNREACHABLE) {
      // Some transports (UCX 1.13's shared memory) cannot detect a dead peer;
      // then the control channel's heartbeat is the only failure detector.
      ep.err_mode = UCP_ERR_HANDLING_MODE_NONE;
      s = ucp_ep_create(worker_.worker(), &ep, &ep_);
      if (s == UCS_OK) VLOG(1) << "UCX endpoint without peer error handling";
    }
    if (s != UCS_OK) {
      ep_ = nullptr;
      return UcsError(s, "ucp_ep_create");
    }
    ep_token_ = ResourceToken(Resource::kEndpoint);
    s = ucp_ep_rkey_unpack(ep_, rkey.data(), &rkey_);
    if (s != UCS_OK) {
      rkey_ = nullptr;
      return UcsError(s, "ucp_ep_rkey_unpack");
    }
    rkey_token_ = ResourceToken(Resource::kRemoteKey);
    return absl::OkStatus();
  }

  ~UcxSender() override {
    if (rkey_ != nullptr) ucp_rkey_destroy(rkey_);
    if (ep_ != nullptr) Close();
  }

  absl::Status PostWrite(const uint8_t* src, uint64_t dst, size_t len) override {
    if (state_->failed) return state_->Error();
    if (dst + len > remote_bytes_ || dst + len < dst) {
      return absl::OutOfRangeError(absl::StrCat("UCX put [", dst, ", +", len,
                                                ") outside the remote region of ", remote_bytes_,
                                                " bytes"));
    }
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = PutDone;
    p.user_data = state_.get();
    ucs_status_ptr_t r = ucp_put_nbx(ep_, src, len, remote_base_ + dst, rkey_, &p);
    if (UCS_PTR_IS_ERR(r)) return UcsError(UCS_PTR_STATUS(r), "ucp_put_nbx");
    worker_.Busy();  // r, if any, completes later: PutDone releases it
    return absl::OkStatus();
  }

  absl::StatusOr<uint64_t> PostFence() override {
    if (state_->failed) return state_->Error();
    const uint64_t id = ++fences_posted_;
    auto* ctx = new FenceCtx{state_.get(), id};
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = FenceDone;
    p.user_data = ctx;
    ucs_status_ptr_t r = ucp_ep_flush_nbx(ep_, &p);
    if (UCS_PTR_IS_ERR(r)) {
      delete ctx;
      return UcsError(UCS_PTR_STATUS(r), "ucp_ep_flush_nbx");
    }
    if (r == nullptr) FenceDone(nullptr, UCS_OK, ctx);  // else FenceDone runs on completion
    worker_.Busy();
    return id;
  }

  absl::StatusOr<bool> PollFence(uint64_t id) override {
    if (state_->failed) return state_->Error();
    return state_->fences_done.load() >= id;
  }

 private:
  // Closes the endpoint: flush when healthy, force after an error; waits (at
  // most 2 s) so that no callback can touch state_ afterwards.
  void Close() {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    // Flush-close only a healthy endpoint whose every fence completed (a
    // finished stream); anything else may face a dead peer: force.
    const bool clean = !state_->failed && state_->fences_done.load() == fences_posted_;
    p.flags = clean ? 0 : UCP_EP_CLOSE_FLAG_FORCE;
    ucs_status_ptr_t r = ucp_ep_close_nbx(ep_, &p);
    if (r != nullptr && !UCS_PTR_IS_ERR(r)) {
      const absl::Time deadline = absl::Now() + absl::Seconds(2);
      worker_.Busy();
      while (ucp_request_check_status(r) == UCS_INPROGRESS && absl::Now() < deadline) {
        std::this_thread::yield();
      }
      if (ucp_request_check_status(r) == UCS_INPROGRESS) {
        LOG(WARNING) << "UCX endpoint close did not finish in 2 s; leaving it to UCX";
        state_.release();  // callbacks may still run: leak the small state rather than crash
      }
      ucp_request_free(r);
    }
    ep_ = nullptr;
  }

  Worker& worker_;
  std::unique_ptr<OpState> state_;
  ucp_ep_h ep_ = nullptr;
  ucp_rkey_h rkey_ = nullptr;
  uint64_t remote_base_ = 0, remote_bytes_ = 0;
  uint64_t fences_posted_ = 0;
  ResourceToken ep_token_, rkey_token_;
};

class UcxBackend final : public Backend {
 public:
  UcxBackend(std::unique_ptr<Worker> w, std::string name) : worker_(std::move(w)), name_(std::move(name)) {}
  ~UcxBackend() override {
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
    if (region.persistent) {
      absl::MutexLock lock(&mu_);
      auto it = cache_.find(region.base);
      if (it != cache_.end() && it->second->region().bytes == region.bytes) reg = it->second;
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
    return std::unique_ptr<DataReceiver>(new UcxReceiver(std::move(reg), std::move(info)));
  }

  absl::StatusOr<std::unique_ptr<DataSender>> Connect(const MemoryRegion& local,
                                                      const std::string& receiver_info,
                                                      const PeerContext&, absl::Time deadline) override {
    if (local.on_device && !worker_->cuda()) {
      return absl::FailedPreconditionError("UCX reports no CUDA memory support: stage device memory");
    }
    auto s = std::make_unique<UcxSender>(*worker_);
    PD_RETURN_IF_ERROR(s->Init(receiver_info, deadline));
    return std::unique_ptr<DataSender>(std::move(s));
  }

  void ForgetRegion(const uint8_t* base) override {
    absl::MutexLock lock(&mu_);
    cache_.erase(base);
  }

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
  const std::string name_;
  absl::Mutex mu_;
  // Registrations of persistent regions (cache arenas), by base address.
  std::map<const uint8_t*, std::shared_ptr<Registration>> cache_ ABSL_GUARDED_BY(mu_);
};

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
  return std::unique_ptr<Backend>(new UcxBackend(std::move(w), options.name));
}

}  // namespace pd::transport
