#include "transport/control_channel.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <thread>

namespace pd::transport {
namespace {

struct Pair {
  std::unique_ptr<ControlChannel> a, b;
};

Pair Connected(const ControlChannelOptions& o = {}) {
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  EXPECT_TRUE(listener.ok()) << listener.status();
  std::unique_ptr<ControlChannel> accepted;
  std::thread t([&] {
    auto c = (*listener)->Accept(absl::Now() + absl::Seconds(5), o);
    ASSERT_TRUE(c.ok()) << c.status();
    accepted = std::move(*c);
  });
  auto c = ControlChannel::Connect("127.0.0.1", (*listener)->port(), absl::Now() + absl::Seconds(5), o);
  t.join();
  EXPECT_TRUE(c.ok()) << c.status();
  return {std::move(*c), std::move(accepted)};
}

TEST(ControlChannelTest, MessagesArriveInOrder) {
  Pair p = Connected();
  for (uint32_t i = 0; i < 100; ++i) ASSERT_TRUE(p.a->Send(proto::LayerReady{i}).ok());
  for (uint32_t i = 0; i < 100; ++i) {
    auto m = p.b->Receive(absl::Now() + absl::Seconds(5));
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(std::get<proto::LayerReady>(*m).layer, i);
  }
  ASSERT_TRUE(p.b->Send(proto::Done{3, 4}).ok());
  auto m = p.a->Receive(absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(std::get<proto::Done>(*m), (proto::Done{3, 4}));
  auto none = p.a->TryReceive();
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->has_value());
}

TEST(ControlChannelTest, ReceiveHonoursDeadline) {
  Pair p = Connected();
  absl::Time t0 = absl::Now();
  auto m = p.a->Receive(t0 + absl::Milliseconds(100));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
}

TEST(ControlChannelTest, QueuedMessagesSurviveClose) {
  Pair p = Connected();
  ASSERT_TRUE(p.a->Send(proto::Abort{14, "bye"}).ok());
  p.a->Close();
  auto m = p.b->Receive(absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(std::get<proto::Abort>(*m).message, "bye");
  auto closed = p.b->Receive(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(closed.status().code(), absl::StatusCode::kUnavailable) << closed.status();
}

TEST(ControlChannelTest, SeveredPeerIsUnavailableQuickly) {
  Pair p = Connected();
  absl::Time t0 = absl::Now();
  p.a->Sever();
  auto m = p.b->Receive(t0 + absl::Seconds(5));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(2));
  EXPECT_FALSE(p.b->Send(proto::Heartbeat{1}).ok());
}

// A peer that accepts the connection but never sends a byte (a hung process, a
// cut cable) is detected by the heartbeat timeout.
TEST(ControlChannelTest, SilentPeerIsUnavailableWithinTwoSeconds) {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  absl::Time t0 = absl::Now();
  auto c = ControlChannel::Connect("127.0.0.1", ntohs(addr.sin_port), t0 + absl::Seconds(5));
  ASSERT_TRUE(c.ok()) << c.status();
  auto m = (*c)->Receive(t0 + absl::Seconds(5));
  absl::Duration took = absl::Now() - t0;
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
  EXPECT_NE(m.status().message().find("silent"), std::string::npos) << m.status();
  EXPECT_LT(took, absl::Seconds(2));
  EXPECT_GT(took, absl::Milliseconds(1400));
  ::close(fd);
}

// A peer that sends its last message and closes while this end is writing
// (the peer never read: closing then resets the connection) must not lose
// that message: this end's write fails, but what the peer sent is still in
// the socket and is delivered before the close status. (With the write
// blocked on a full socket, the reset completes the write before the read
// for the same event: the channel used to close at once, losing the frame.)
TEST(ControlChannelTest, LastMessageOfAPeerThatResetsWhileWeWriteIsDelivered) {
  int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(lfd, 1), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
  auto c = ControlChannel::Connect("127.0.0.1", ntohs(addr.sin_port), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(c.ok()) << c.status();
  int fd = ::accept(lfd, nullptr, nullptr);
  ASSERT_GE(fd, 0);
  // Fill both socket buffers (the peer reads nothing): a write stays pending.
  const proto::Abort big{2, std::string(1 << 20, 'x')};
  for (int i = 0; i < 64; ++i) ASSERT_TRUE((*c)->Send(big).ok());
  absl::SleepFor(absl::Milliseconds(200));
  auto frame = proto::EncodeFrame(proto::Abort{14, "bye"});
  ASSERT_TRUE(frame.ok());
  ASSERT_EQ(::write(fd, frame->data(), frame->size()), ssize_t(frame->size()));
  ::close(fd);  // unread data: a reset
  auto m = (*c)->Receive(absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_TRUE(std::holds_alternative<proto::Abort>(*m));
  EXPECT_EQ(std::get<proto::Abort>(*m).message, "bye");
  auto closed = (*c)->Receive(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(closed.status().code(), absl::StatusCode::kUnavailable) << closed.status();
  ::close(lfd);
}

TEST(ControlChannelTest, GarbageFromPeerClosesWithNamedError) {
  int lfd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::bind(lfd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::listen(lfd, 1), 0);
  socklen_t len = sizeof(addr);
  ::getsockname(lfd, reinterpret_cast<sockaddr*>(&addr), &len);
  auto c = ControlChannel::Connect("127.0.0.1", ntohs(addr.sin_port), absl::Now() + absl::Seconds(5));
  ASSERT_TRUE(c.ok());
  int fd = ::accept(lfd, nullptr, nullptr);
  ASSERT_GE(fd, 0);
  const char junk[] = "GET / HTTP/1.1\r\n\r\n";
  ASSERT_GT(::write(fd, junk, sizeof(junk)), 0);
  auto m = (*c)->Receive(absl::Now() + absl::Seconds(5));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << m.status();
  EXPECT_NE(m.status().message().find("magic"), std::string::npos) << m.status();
  ::close(fd);
  ::close(lfd);
}

TEST(ControlChannelTest, ConnectErrorsAreNamed) {
  auto listener = ControlListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(listener.ok());
  uint16_t port = (*listener)->port();
  listener->reset();  // nothing listens there now
  auto c = ControlChannel::Connect("127.0.0.1", port, absl::Now() + absl::Seconds(2));
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnavailable) << c.status();
  auto l2 = ControlListener::Listen("127.0.0.1", 0);
  ASSERT_TRUE(l2.ok());
  absl::Time t0 = absl::Now();
  auto a = (*l2)->Accept(t0 + absl::Milliseconds(100));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_LT(absl::Now() - t0, absl::Seconds(1));
  EXPECT_EQ(ControlListener::Listen("not-an-ip", 0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pd::transport
