#include "transport/control_channel.h"

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <array>
#include <chrono>
#include <deque>
#include <thread>
#include <utility>
#include <vector>

#include <boost/asio.hpp>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/logging.h"
#include "common/status.h"

namespace pd::transport {

namespace asio = boost::asio;
using asio::ip::tcp;
using SteadyClock = std::chrono::steady_clock;

namespace {

// After a failed write: how long the read side may go on delivering what the
// peer sent before the connection broke, before the channel closes anyway.
constexpr std::chrono::milliseconds kWriteFailedDrain{200};

std::chrono::nanoseconds ToChrono(absl::Duration d) {
  return std::chrono::nanoseconds(absl::ToInt64Nanoseconds(d));
}

// Liveness options on a connected socket: no Nagle, fast keepalive probes and a
// bounded time for unacknowledged data, so a vanished host is noticed by the
// kernel too (the heartbeat catches a silent peer first).
void TuneSocket(tcp::socket& s) {
  int fd = s.native_handle();
  int one = 1, idle = 1, intvl = 1, cnt = 2;
  unsigned user_timeout_ms = 2000;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  ::setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
  ::setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
  ::setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &user_timeout_ms, sizeof(user_timeout_ms));
}

// Runs `io` on the calling thread until `*done` or the deadline.
void RunUntil(asio::io_context& io, const bool* done, absl::Time deadline) {
  while (!*done) {
    absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) return;
    io.run_for(ToChrono(std::min(left, absl::Milliseconds(50))));
    if (io.stopped()) io.restart();
  }
}

}  // namespace

class ControlChannel::Impl {
 public:
  explicit Impl(const ControlChannelOptions& options) : options_(options) {}
  ~Impl() {
    Close();
    if (thread_.joinable()) thread_.join();
    boost::system::error_code ec;
    socket_.close(ec);
  }

  void Start(std::string peer) {
    peer_ = std::move(peer);
    TuneSocket(socket_);
    last_rx_ = SteadyClock::now();
    ReadHeader();
    ArmHeartbeat();
    thread_ = std::thread([this] { io_.run(); });
  }

  absl::Status Send(const proto::ControlMessage& msg) {
    PD_ASSIGN_OR_RETURN(std::string frame, proto::EncodeFrame(msg));
    {
      absl::MutexLock lock(&mu_);
      if (closed_) return close_status_;
    }
    asio::post(io_, [this, f = std::move(frame)]() mutable { Enqueue(std::move(f)); });
    return absl::OkStatus();
  }

  absl::StatusOr<proto::ControlMessage> Receive(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) { return !inbox_.empty() || closed_; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&ready), deadline)) {
      return absl::DeadlineExceededError(
          absl::StrCat("no control message from ", peer_, " before the deadline"));
    }
    return PopLocked();
  }

  absl::StatusOr<std::optional<proto::ControlMessage>> TryReceive() {
    absl::MutexLock lock(&mu_);
    if (inbox_.empty() && !closed_) return std::optional<proto::ControlMessage>();
    PD_ASSIGN_OR_RETURN(proto::ControlMessage m, PopLocked());
    return std::optional<proto::ControlMessage>(std::move(m));
  }

  void SetNotify(std::function<void()> fn) {
    absl::MutexLock lock(&mu_);
    notify_ = std::move(fn);
  }

  void Close() {
    asio::post(io_, [this] {
      closing_ = true;
      if (!writing_) {
        Fail(absl::CancelledError(absl::StrCat("control channel to ", peer_, " closed locally")));
        return;
      }
      close_timer_.expires_after(std::chrono::milliseconds(500));
      close_timer_.async_wait([this](const boost::system::error_code& ec) {
        if (!ec) Fail(absl::CancelledError(absl::StrCat("control channel to ", peer_, " closed locally")));
      });
    });
  }

  void Sever() {
    asio::post(io_, [this] {
      boost::system::error_code ec;
      socket_.set_option(asio::socket_base::linger(true, 0), ec);
      Fail(absl::UnavailableError(absl::StrCat("control channel to ", peer_, " severed")));
    });
  }

  absl::Status status() const {
    absl::MutexLock lock(&mu_);
    return closed_ ? close_status_ : absl::OkStatus();
  }
  const std::string& peer() const { return peer_; }

  asio::io_context& io() { return io_; }
  tcp::socket& socket() { return socket_; }

 private:
  absl::StatusOr<proto::ControlMessage> PopLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (inbox_.empty()) return close_status_;
    proto::ControlMessage m = std::move(inbox_.front());
    inbox_.pop_front();
    return m;
  }

  // --- I/O thread only below. ---
  void Enqueue(std::string frame) {
    if (failed_ || !write_error_.ok()) return;
    outq_.push_back(std::move(frame));
    if (!writing_) WriteNext();
  }

  void WriteNext() {
    writing_ = true;
    asio::async_write(socket_, asio::buffer(outq_.front()),
                      [this](const boost::system::error_code& ec, size_t) {
                        if (failed_) {  // the frame's buffer lived until now
                          writing_ = false;
                          outq_.clear();
                          return;
                        }
                        if (ec) {
                          WriteFailed(absl::UnavailableError(absl::StrCat(
                              "control channel to ", peer_, ": write failed: ", ec.message())));
                          return;
                        }
                        outq_.pop_front();
                        if (!outq_.empty()) {
                          WriteNext();
                          return;
                        }
                        writing_ = false;
                        if (closing_) {
                          Fail(absl::CancelledError(
                              absl::StrCat("control channel to ", peer_, " closed locally")));
                        }
                      });
  }

  void ReadHeader() {
    asio::async_read(socket_, asio::buffer(header_),
                     [this](const boost::system::error_code& ec, size_t) {
                       if (ec) return ReadFailed(ec);
                       last_rx_ = SteadyClock::now();
                       auto len = proto::DecodeFrameHeader(header_);
                       if (!len.ok()) {
                         Fail(absl::InvalidArgumentError(absl::StrCat(
                             "control channel from ", peer_, ": ", len.status().message())));
                         return;
                       }
                       body_.resize(*len);
                       ReadBody();
                     });
  }

  void ReadBody() {
    asio::async_read(socket_, asio::buffer(body_), [this](const boost::system::error_code& ec, size_t) {
      if (ec) return ReadFailed(ec);
      last_rx_ = SteadyClock::now();
      auto msg = proto::DecodePayload(body_);
      if (!msg.ok()) {
        Fail(absl::InvalidArgumentError(
            absl::StrCat("control channel from ", peer_, ": ", msg.status().message())));
        return;
      }
      if (!std::holds_alternative<proto::Heartbeat>(*msg)) {
        std::function<void()> notify;
        bool overflow = false;
        {
          absl::MutexLock lock(&mu_);
          overflow = inbox_.size() >= options_.max_inbox_messages;
          if (!overflow) inbox_.push_back(std::move(*msg));
          notify = notify_;
        }
        if (overflow) {
          Fail(absl::ResourceExhaustedError(absl::StrCat("control channel from ", peer_,
                                                         ": more than ", options_.max_inbox_messages,
                                                         " unread messages")));
          return;
        }
        if (notify) notify();
      }
      ReadHeader();
    });
  }

  // A write failed: the peer closed or reset the connection. It may have
  // sent frames (its Abort) before it closed: they are still in the socket's
  // receive buffer (readable after a reset too), and the pending read
  // delivers them before it fails in turn and closes the channel with this
  // error. Until then frames to send are dropped; at most kWriteFailedDrain.
  void WriteFailed(absl::Status why) {
    writing_ = false;
    outq_.clear();
    write_error_ = std::move(why);
    if (closing_) return Fail(write_error_);
    close_timer_.expires_after(kWriteFailedDrain);
    close_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (!ec) Fail(write_error_);
    });
  }

  void ReadFailed(const boost::system::error_code& ec) {
    if (ec == asio::error::operation_aborted) return;  // we closed it
    if (!write_error_.ok()) return Fail(write_error_);
    Fail(absl::UnavailableError(absl::StrCat(
        "control channel to ", peer_,
        ec == asio::error::eof ? ": peer closed the connection" : ": read failed: " + ec.message())));
  }

  void ArmHeartbeat() {
    heartbeat_timer_.expires_after(ToChrono(options_.heartbeat_interval));
    heartbeat_timer_.async_wait([this](const boost::system::error_code& ec) {
      if (ec || failed_) return;
      auto silent = SteadyClock::now() - last_rx_;
      if (silent > ToChrono(options_.peer_timeout)) {
        Fail(absl::UnavailableError(absl::StrCat(
            "control peer ", peer_, " silent for ",
            std::chrono::duration_cast<std::chrono::milliseconds>(silent).count(),
            " ms (peer timeout ", absl::FormatDuration(options_.peer_timeout), ")")));
        return;
      }
      auto frame = proto::EncodeFrame(proto::Heartbeat{++heartbeat_seq_});
      if (frame.ok()) Enqueue(std::move(*frame));
      ArmHeartbeat();
    });
  }

  // Closes the socket and records why; the I/O thread then runs out of work.
  void Fail(absl::Status why) {
    if (failed_) return;
    failed_ = true;
    boost::system::error_code ec;
    heartbeat_timer_.cancel();
    close_timer_.cancel();
    socket_.shutdown(tcp::socket::shutdown_both, ec);
    socket_.close(ec);
    if (!writing_) outq_.clear();  // else the write completion clears it
    std::function<void()> notify;
    {
      absl::MutexLock lock(&mu_);
      if (!closed_) {
        closed_ = true;
        close_status_ = std::move(why);
        VLOG(1) << "control channel closed: " << close_status_;
      }
      notify = notify_;
    }
    if (notify) notify();
  }

  const ControlChannelOptions options_;
  asio::io_context io_;
  tcp::socket socket_{io_};
  asio::steady_timer heartbeat_timer_{io_};
  asio::steady_timer close_timer_{io_};
  std::thread thread_;
  std::string peer_;

  // I/O thread state.
  std::array<uint8_t, proto::kFrameHeaderBytes> header_{};
  std::vector<uint8_t> body_;
  std::deque<std::string> outq_;
  bool writing_ = false, closing_ = false, failed_ = false;
  absl::Status write_error_;  // a write failed; closing once the read side ends
  SteadyClock::time_point last_rx_;
  uint64_t heartbeat_seq_ = 0;

  mutable absl::Mutex mu_;
  std::deque<proto::ControlMessage> inbox_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status close_status_ ABSL_GUARDED_BY(mu_);
  std::function<void()> notify_ ABSL_GUARDED_BY(mu_);
};

ControlChannel::ControlChannel(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlChannel::~ControlChannel() = default;

absl::StatusOr<std::unique_ptr<ControlChannel>> ControlChannel::Connect(
    const std::string& host, uint16_t port, absl::Time deadline, const ControlChannelOptions& options) {
  auto impl = std::make_unique<Impl>(options);
  const std::string where = absl::StrCat(host, ":", port);
  boost::system::error_code ec;
  tcp::resolver resolver(impl->io());
  auto endpoints = resolver.resolve(host, std::to_string(port), ec);
  if (ec) return absl::UnavailableError(absl::StrCat("resolving ", where, ": ", ec.message()));
  bool done = false;
  boost::system::error_code connect_ec;
  asio::async_connect(impl->socket(), endpoints,
                      [&](const boost::system::error_code& e, const tcp::endpoint&) {
                        connect_ec = e;
                        done = true;
                      });
  RunUntil(impl->io(), &done, deadline);
  if (!done) {
    impl->socket().close(ec);  // cancels; run the aborted handler before returning
    impl->io().restart();
    while (!done) impl->io().run_one();
    return absl::DeadlineExceededError(absl::StrCat("connecting to ", where, " timed out"));
  }
  if (connect_ec) {
    return absl::UnavailableError(absl::StrCat("connecting to ", where, ": ", connect_ec.message()));
  }
  impl->io().restart();
  impl->Start(where);
  return std::unique_ptr<ControlChannel>(new ControlChannel(std::move(impl)));
}

absl::Status ControlChannel::Send(const proto::ControlMessage& msg) { return impl_->Send(msg); }
absl::StatusOr<proto::ControlMessage> ControlChannel::Receive(absl::Time deadline) {
  return impl_->Receive(deadline);
}
absl::StatusOr<std::optional<proto::ControlMessage>> ControlChannel::TryReceive() {
  return impl_->TryReceive();
}
void ControlChannel::SetNotify(std::function<void()> fn) { impl_->SetNotify(std::move(fn)); }
void ControlChannel::Close() { impl_->Close(); }
void ControlChannel::Sever() { impl_->Sever(); }
absl::Status ControlChannel::status() const { return impl_->status(); }
const std::string& ControlChannel::peer() const { return impl_->peer(); }

class ControlListener::Impl {
 public:
  asio::io_context io;
  tcp::acceptor acceptor{io};
};

ControlListener::ControlListener(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ControlListener::~ControlListener() {
  boost::system::error_code ec;
  impl_->acceptor.close(ec);
}

absl::StatusOr<std::unique_ptr<ControlListener>> ControlListener::Listen(const std::string& host,
                                                                         uint16_t port) {
  auto impl = std::make_unique<Impl>();
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("bad listen address '", host, "': ", ec.message()));
  tcp::endpoint ep(addr, port);
  impl->acceptor.open(ep.protocol(), ec);
  if (!ec) impl->acceptor.set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl->acceptor.bind(ep, ec);
  if (!ec) impl->acceptor.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) {
    return absl::UnavailableError(absl::StrCat("listening on ", host, ":", port, ": ", ec.message()));
  }
  return std::unique_ptr<ControlListener>(new ControlListener(std::move(impl)));
}

uint16_t ControlListener::port() const { return impl_->acceptor.local_endpoint().port(); }

absl::StatusOr<std::unique_ptr<ControlChannel>> ControlListener::Accept(
    absl::Time deadline, const ControlChannelOptions& options) {
  auto channel = std::make_unique<ControlChannel::Impl>(options);
  bool done = false;
  boost::system::error_code accept_ec;
  impl_->acceptor.async_accept(channel->socket(), [&](const boost::system::error_code& e) {
    accept_ec = e;
    done = true;
  });
  impl_->io.restart();
  RunUntil(impl_->io, &done, deadline);
  if (!done) {
    impl_->acceptor.cancel();
    impl_->io.restart();
    while (!done) impl_->io.run_one();
    if (!accept_ec) {
      // Accepted in the race with the deadline: keep it.
    } else {
      return absl::DeadlineExceededError(absl::StrCat("no control connection on port ", port(),
                                                      " before the deadline"));
    }
  }
  if (accept_ec) return absl::UnavailableError(absl::StrCat("accept: ", accept_ec.message()));
  boost::system::error_code ec;
  auto remote = channel->socket().remote_endpoint(ec);
  std::string peer = ec ? "?" : absl::StrCat(remote.address().to_string(), ":", remote.port());
  channel->Start(peer);
  return std::unique_ptr<ControlChannel>(new ControlChannel(std::move(channel)));
}

}  // namespace pd::transport
