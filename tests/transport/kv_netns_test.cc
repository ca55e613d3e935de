// Prefill and decode ends in two network namespaces joined by a veth pair,
// with real TCP between them (control channel and UCX's tcp transport). Needs
// root (CI runs as root); skips with a message otherwise. Namespaces are
// always removed, also when a check fails.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "tests/transport/peer_process.h"

namespace pd::transport {
namespace {

using testing::PeerProcess;

int Sh(const std::string& cmd) { return std::system((cmd + " >/dev/null 2>&1").c_str()); }

// Two namespaces, S (sender, 10.213.N.1) and R (receiver, 10.213.N.2).
class NetnsPair {
 public:
  NetnsPair() {
    const int id = int(::getpid() % 10000);
    s_ = absl::StrCat("pdkv_s_", id);
    r_ = absl::StrCat("pdkv_r_", id);
    vs_ = absl::StrCat("pdvs", id);
    vr_ = absl::StrCat("pdvr", id);
    const std::string net = absl::StrCat("10.213.", id % 250, ".");
    s_addr_ = net + "1";
    r_addr_ = net + "2";
    Cleanup();
    const std::string cmds[] = {
        "ip netns add " + s_,
        "ip netns add " + r_,
        absl::StrCat("ip link add ", vs_, " type veth peer name ", vr_),
        absl::StrCat("ip link set ", vs_, " netns ", s_),
        absl::StrCat("ip link set ", vr_, " netns ", r_),
        absl::StrCat("ip -n ", s_, " addr add ", s_addr_, "/24 dev ", vs_),
        absl::StrCat("ip -n ", r_, " addr add ", r_addr_, "/24 dev ", vr_),
        absl::StrCat("ip -n ", s_, " link set ", vs_, " up"),
        absl::StrCat("ip -n ", r_, " link set ", vr_, " up"),
        absl::StrCat("ip -n ", s_, " link set lo up"),
        absl::StrCat("ip -n ", r_, " link set lo up"),
    };
    for (const std::string& c : cmds) {
      if (Sh(c) != 0) {
        error_ = "'" + c + "' failed";
        return;
      }
    }
    ok_ = true;
  }
  ~NetnsPair() { Cleanup(); }
  void Cleanup() {
    Sh("ip netns del " + s_);
    Sh("ip netns del " + r_);
  }
  bool ok() const { return ok_; }
  const std::string& error() const { return error_; }
  // argv prefix running a command inside namespace S or R with UCX on the veth.
  std::vector<std::string> In(bool sender) const {
    return {"ip", "netns", "exec", sender ? s_ : r_, "env", "UCX_TLS=tcp",
            "UCX_NET_DEVICES=" + (sender ? vs_ : vr_)};
  }
  void CutLink() const { Sh(absl::StrCat("ip -n ", s_, " link set ", vs_, " down")); }
  const std::string& receiver_addr() const { return r_addr_; }

 private:
  std::string s_, r_, vs_, vr_, s_addr_, r_addr_, error_;
  bool ok_ = false;
};

std::vector<std::string> Peer(std::vector<std::string> prefix, std::vector<std::string> args) {
  prefix.push_back(KV_PEER_PATH);
  for (const char* a : {"--backend=ucx", "--layers=8", "--tokens=8192", "--seed=9"}) prefix.push_back(a);
  prefix.insert(prefix.end(), args.begin(), args.end());
  return prefix;
}

class NetnsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root to create network namespaces (ip netns add)";
    if (Sh("ip -V") != 0) GTEST_SKIP() << "the 'ip' tool (iproute2) is not installed";
    pair_ = std::make_unique<NetnsPair>();
    if (!pair_->ok()) {
      GTEST_SKIP() << "network namespaces are not allowed here: " << pair_->error();
    }
  }
  std::unique_ptr<NetnsPair> pair_;
};

TEST_F(NetnsTest, StreamCrossesVethByteExact) {
  PeerProcess rx(Peer(pair_->In(false), {"--role=receiver",
                                          absl::StrCat("--listen=", pair_->receiver_addr(), ":0")}));
  std::string line = rx.WaitForLine("LISTENING", absl::Seconds(10));
  uint32_t port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(std::min<size_t>(10, line.size())), &port)) << line;
  PeerProcess tx(Peer(pair_->In(true), {"--role=sender", absl::StrCat("--connect=", pair_->receiver_addr(),
                                                                       ":", port)}));
  EXPECT_EQ(tx.WaitForLine("RESULT", absl::Seconds(30)), "RESULT OK");
  EXPECT_EQ(rx.WaitForLine("RESULT", absl::Seconds(30)), "RESULT OK");  // receiver verified every byte
  EXPECT_EQ(tx.Wait(), 0);
  EXPECT_EQ(rx.Wait(), 0);
}

// The link between the hosts goes down mid-stream: no RST, no FIN, just
// silence. Both ends report Unavailable within 2 s (heartbeat timeout) and
// end with no transport resource held.
TEST_F(NetnsTest, CutLinkIsUnavailableWithinTwoSeconds) {
  PeerProcess rx(Peer(pair_->In(false), {"--role=receiver",
                                          absl::StrCat("--listen=", pair_->receiver_addr(), ":0")}));
  std::string line = rx.WaitForLine("LISTENING", absl::Seconds(10));
  uint32_t port = 0;
  ASSERT_TRUE(absl::SimpleAtoi(line.substr(std::min<size_t>(10, line.size())), &port)) << line;
  PeerProcess tx(Peer(pair_->In(true), {"--role=sender", "--layer_delay_ms=400",
                                         absl::StrCat("--connect=", pair_->receiver_addr(), ":", port)}));
  ASSERT_FALSE(rx.WaitForLine("LAYER 1 READY", absl::Seconds(20)).empty());
  const absl::Time cut = absl::Now();
  pair_->CutLink();
  EXPECT_EQ(rx.WaitForLine("STREAM", absl::Seconds(10)), "STREAM UNAVAILABLE");
  EXPECT_LT(absl::Now() - cut, absl::Seconds(2));
  EXPECT_EQ(tx.WaitForLine("STREAM", absl::Seconds(10)), "STREAM UNAVAILABLE");
  EXPECT_LT(absl::Now() - cut, absl::Seconds(2.5));
  const std::string none =
      "RESOURCES registered_region=0 remote_key=0 pinned_buffer=0 endpoint=0 communicator=0 stream=0 "
      "quarantined_stream=0 pinned_bytes=0 registered_bytes=0";
  EXPECT_EQ(rx.WaitForLine("RESOURCES", absl::Seconds(10)), none);
  EXPECT_EQ(tx.WaitForLine("RESOURCES", absl::Seconds(10)), none);
  EXPECT_NE(rx.Wait(), 0);
  EXPECT_NE(tx.Wait(), 0);
}

}  // namespace
}  // namespace pd::transport
