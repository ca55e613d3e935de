// The control channel of a KV stream: Cap'n Proto frames (proto/kv_control.h)
// over one TCP connection, with heartbeats so that a dead or silent peer is
// reported as Unavailable within `peer_timeout` (default 1.5 s).
//
// Threads: each channel owns one I/O thread (Boost.Asio, private to the .cc)
// that reads frames into an inbox, writes queued frames and runs the heartbeat
// timer. Public methods are thread-safe.
#ifndef PD_TRANSPORT_CONTROL_CHANNEL_H_
#define PD_TRANSPORT_CONTROL_CHANNEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/kv_control.h"

namespace pd::transport {

struct ControlChannelOptions {
  absl::Duration heartbeat_interval = absl::Milliseconds(200);
  // No frame from the peer for this long closes the channel with Unavailable.
  absl::Duration peer_timeout = absl::Milliseconds(1500);
  // More queued, unread messages than this closes the channel (ResourceExhausted).
  size_t max_inbox_messages = 1 << 16;
};

class ControlChannel {
 public:
  // Connects to host:port (numeric address or name). DeadlineExceeded at the
  // deadline, Unavailable when refused or unreachable.
  static absl::StatusOr<std::unique_ptr<ControlChannel>> Connect(
      const std::string& host, uint16_t port, absl::Time deadline,
      const ControlChannelOptions& options = {});
  ~ControlChannel();  // Close(), then joins the I/O thread
  ControlChannel(const ControlChannel&) = delete;
  ControlChannel& operator=(const ControlChannel&) = delete;

  // Queues `msg` for sending. The channel's close status once closed, or the
  // encoder's error. When a write fails (the peer closed or reset the
  // connection) the channel first delivers what the peer sent before that
  // (at most 200 ms; messages queued meanwhile are dropped), then closes
  // with the write's error.
  absl::Status Send(const proto::ControlMessage& msg);
  // The next message (heartbeats are consumed internally). Messages that
  // arrived before the channel closed are still delivered; then the close
  // status. DeadlineExceeded at the deadline.
  absl::StatusOr<proto::ControlMessage> Receive(absl::Time deadline);
  // Non-blocking Receive: nullopt when nothing is queued and the channel is open.
  absl::StatusOr<std::optional<proto::ControlMessage>> TryReceive();
  // `fn` runs on the I/O thread after each queued message and when the channel
  // closes. It must not block or call back into the channel's Receive.
  void SetNotify(std::function<void()> fn);
  // Flushes queued frames (for at most 500 ms) and closes. Idempotent.
  void Close();
  // Test hook: drops the connection at once with a TCP reset, as if this
  // process had been killed.
  void Sever();
  // OK while open; otherwise why the channel closed.
  absl::Status status() const;
  const std::string& peer() const;

  class Impl;

 private:
  explicit ControlChannel(std::unique_ptr<Impl> impl);
  friend class ControlListener;
  std::unique_ptr<Impl> impl_;
};

// Accepts control channels on a TCP port.
class ControlListener {
 public:
  // Binds host:port (port 0 picks a free one). Errors name the address.
  static absl::StatusOr<std::unique_ptr<ControlListener>> Listen(const std::string& host,
                                                                 uint16_t port);
  ~ControlListener();
  uint16_t port() const;
  // The next connection. DeadlineExceeded at the deadline. One caller at a time.
  absl::StatusOr<std::unique_ptr<ControlChannel>> Accept(absl::Time deadline,
                                                         const ControlChannelOptions& options = {});

  class Impl;

 private:
  explicit ControlListener(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pd::transport

#endif  // PD_TRANSPORT_CONTROL_CHANNEL_H_
