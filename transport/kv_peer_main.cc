// kv_peer: one end of a KV stream as a standalone process, for multi-process,
// multi-namespace and kill tests, and for trying the transport by hand.
//
//   kv_peer --role=receiver --listen=HOST:PORT [common flags]
//   kv_peer --role=sender   --connect=HOST:PORT [--layer_delay_ms=N] [common flags]
// common: --backend=ucx|loopback  --layers=N --tokens=N --seed=N
//         --fingerprint=HEX --chunk_bytes=N --staged=0|1
// receiver: --quarantine_grace_ms=N (page quarantine after a dead sender)
//
// Both ends generate the same deterministic KV from --seed; the receiver
// checks every byte that landed against it. Output lines (stdout):
//   LISTENING <port>            receiver, once bound (port 0 picks one)
//   LAYER <l> READY | SENT      per layer
//   STREAM <CODE>               as soon as the stream ended (OK, UNAVAILABLE, ...)
//   RESULT OK | RESULT <CODE> <message>
//   RESOURCES <counters after the stream was torn down>
// Exit status 0 only for RESULT OK.
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "transport/kv_stream.h"
#include "transport/loopback_backend.h"
#include "transport/resource_counters.h"
#include "transport/testing/kv_test_util.h"
#include "transport/ucx/ucx_backend.h"

namespace pd::transport {
namespace {

struct Flags {
  std::map<std::string, std::string> kv;
  std::string Get(const std::string& k, const std::string& def) const {
    auto it = kv.find(k);
    return it == kv.end() ? def : it->second;
  }
  int64_t Int(const std::string& k, int64_t def) const {
    int64_t v = def;
    if (kv.count(k) && !absl::SimpleAtoi(kv.at(k), &v)) {
      std::fprintf(stderr, "kv_peer: --%s=%s is not an integer\n", k.c_str(), kv.at(k).c_str());
      std::exit(2);
    }
    return v;
  }
};

void Print(const std::string& line) {
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

bool SplitHostPort(const std::string& s, std::string* host, uint16_t* port) {
  size_t colon = s.rfind(':');
  uint32_t p = 0;
  if (colon == std::string::npos || !absl::SimpleAtoi(s.substr(colon + 1), &p) || p > 65535) return false;
  *host = s.substr(0, colon);
  *port = uint16_t(p);
  return true;
}

int Finish(const absl::Status& st) {
  Print(st.ok() ? "RESULT OK"
                : absl::StrCat("RESULT ", absl::StatusCodeToString(st.code()), " ", st.message()));
  return st.ok() ? 0 : 1;
}

int Run(const Flags& f) {
  const std::string role = f.Get("role", "");
  const int layers = int(f.Int("layers", 4));
  const int64_t tokens = f.Int("tokens", 4096);
  const uint64_t seed = uint64_t(f.Int("seed", 1));
  const std::string fingerprint = f.Get("fingerprint", "00112233445566778899aabbccddeeff");
  std::unique_ptr<Backend> backend;
  const std::string backend_name = f.Get("backend", "ucx");
  if (backend_name == "ucx") {
    auto b = NewUcxBackend();
    if (!b.ok()) return Finish(b.status());
    backend = std::move(*b);
  } else if (backend_name == "loopback") {
    backend = NewLoopbackBackend();
  } else {
    return Finish(absl::InvalidArgumentError(absl::StrCat("unknown --backend=", backend_name)));
  }
  auto cache = testing::MakeCache(testing::V32Layout(), layers, tokens);
  if (!cache.ok()) return Finish(cache.status());
  absl::Status result;
  if (role == "receiver") {
    std::string host;
    uint16_t port = 0;
    if (!SplitHostPort(f.Get("listen", "127.0.0.1:0"), &host, &port)) {
      return Finish(absl::InvalidArgumentError("--listen must be HOST:PORT"));
    }
    auto listener = ControlListener::Listen(host, port);
    if (!listener.ok()) return Finish(listener.status());
    Print(absl::StrCat("LISTENING ", (*listener)->port()));
    auto ch = (*listener)->Accept(absl::Now() + absl::Seconds(f.Int("accept_timeout_s", 30)));
    if (!ch.ok()) return Finish(ch.status());
    ReceiverOptions o;
    o.model_fingerprint = fingerprint;
    o.quarantine_grace = absl::Milliseconds(f.Int("quarantine_grace_ms", 2000));
    {
      auto rx = KvReceiver::Accept(*backend, std::move(*ch), **cache, o);
      if (!rx.ok()) return Finish(rx.status());
      for (int l = 0; l < layers && result.ok(); ++l) {
        result = (*rx)->WaitLayer(l, absl::Now() + absl::Seconds(60));
        if (result.ok()) Print(absl::StrCat("LAYER ", l, " READY"));
      }
      if (result.ok()) result = (*rx)->WaitDone(absl::Now() + absl::Seconds(60));
      Print(absl::StrCat("STREAM ", absl::StatusCodeToString(result.code())));
      if (result.ok()) {
        // Regenerate the sender's bytes and compare.
        auto expect = testing::MakeCache(testing::V32Layout(), layers, tokens);
        auto seq = expect.ok() ? testing::MakeFilledSequence(**expect, tokens, seed)
                               : absl::StatusOr<int32_t>(expect.status());
        result = seq.ok() ? testing::CompareSequences(**expect, *seq, **cache, (*rx)->sequence(), tokens)
                          : seq.status();
      }
    }
  } else if (role == "sender") {
    std::string host;
    uint16_t port = 0;
    if (!SplitHostPort(f.Get("connect", ""), &host, &port)) {
      return Finish(absl::InvalidArgumentError("--connect must be HOST:PORT"));
    }
    auto seq = testing::MakeFilledSequence(**cache, tokens, seed);
    if (!seq.ok()) return Finish(seq.status());
    auto ch = ControlChannel::Connect(host, port, absl::Now() + absl::Seconds(10));
    if (!ch.ok()) return Finish(ch.status());
    SenderOptions o;
    o.max_chunk_bytes = uint64_t(f.Int("chunk_bytes", 4 << 20));
    o.staged = f.Int("staged", 0) != 0;
    {
      auto tx = KvSender::Start(*backend, std::move(*ch), **cache,
                                {f.Get("request", "peer-req"), fingerprint, *seq, tokens}, o);
      if (!tx.ok()) return Finish(tx.status());
      const int64_t delay_ms = f.Int("layer_delay_ms", 0);
      for (int l = 0; l < layers && result.ok(); ++l) {
        if (delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
        result = (*tx)->SendLayer(l);
        if (result.ok()) Print(absl::StrCat("LAYER ", l, " SENT"));
      }
      if (result.ok()) result = (*tx)->Finish(absl::Now() + absl::Seconds(60));
      Print(absl::StrCat("STREAM ", absl::StatusCodeToString(result.code())));
    }
  } else {
    return Finish(absl::InvalidArgumentError("--role must be sender or receiver"));
  }
  backend.reset();
  Print(absl::StrCat("RESOURCES ", GetResourceCounters().ToString()));
  return Finish(result);
}

}  // namespace
}  // namespace pd::transport

int main(int argc, char** argv) {
  pd::InitLogging(argv[0]);
  pd::transport::Flags f;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    size_t eq = a.find('=');
    if (a.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::fprintf(stderr, "kv_peer: arguments are --key=value, got '%s'\n", a.c_str());
      return 2;
    }
    f.kv[a.substr(2, eq - 2)] = a.substr(eq + 1);
  }
  return pd::transport::Run(f);
}
