// A child process (kv_peer) with its stdout piped back, for the multi-process
// transport tests. Owns the pid: the destructor kills (SIGKILL) and reaps it.
#ifndef PD_TESTS_TRANSPORT_PEER_PROCESS_H_
#define PD_TESTS_TRANSPORT_PEER_PROCESS_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace pd::transport::testing {

class PeerProcess {
 public:
  // Runs argv[0] with `argv` and extra environment `env` ("K=V").
  PeerProcess(const std::vector<std::string>& argv, const std::vector<std::string>& env = {}) {
    int fds[2];
    if (::pipe(fds) != 0) return;
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(fds[1], 1);
      ::close(fds[0]);
      ::close(fds[1]);
      for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
    ::close(fds[1]);
    out_ = fds[0];
  }
  ~PeerProcess() {
    Kill();
    if (out_ >= 0) ::close(out_);
  }
  PeerProcess(const PeerProcess&) = delete;
  PeerProcess& operator=(const PeerProcess&) = delete;

  bool started() const { return pid_ > 0; }
  // Reads lines until one starts with `prefix`; returns it ("" at EOF or deadline).
  std::string WaitForLine(const std::string& prefix, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      size_t nl;
      while ((nl = buf_.find('\n')) != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        lines_.push_back(line);
        if (line.rfind(prefix, 0) == 0) return line;
      }
      int left = int(absl::ToInt64Milliseconds(deadline - absl::Now()));
      if (left <= 0) return "";
      pollfd p{out_, POLLIN, 0};
      if (::poll(&p, 1, left) <= 0) continue;
      char tmp[4096];
      ssize_t n = ::read(out_, tmp, sizeof(tmp));
      if (n <= 0) return "";
      buf_.append(tmp, size_t(n));
    }
  }
  void Kill() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    Wait();
  }
  // Waits for exit; returns the exit status (-1 if killed by a signal).
  int Wait() {
    if (pid_ <= 0) return status_;
    int st = 0;
    ::waitpid(pid_, &st, 0);
    pid_ = -1;
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    return status_;
  }
  const std::vector<std::string>& lines() const { return lines_; }

 private:
  pid_t pid_ = -1;
  int out_ = -1;
  int status_ = -1;
  std::string buf_;
  std::vector<std::string> lines_;
};

}  // namespace pd::transport::testing

#endif  // PD_TESTS_TRANSPORT_PEER_PROCESS_H_
