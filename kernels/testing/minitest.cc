#include "kernels/testing/minitest.h"

#include <chrono>
#include <cstdio>
#include <cstring>

namespace pd::minitest {
namespace {
int g_failures = 0;
bool g_skipped = false;
std::string g_skip_reason;
}  // namespace

std::vector<TestCase>& Registry() {
  static std::vector<TestCase> r;
  return r;
}

bool Register(const char* suite, const char* name, std::function<void()> fn) {
  Registry().push_back({std::string(suite) + "." + name, std::move(fn)});
  return true;
}

void RecordFailure(const char* file, int line, const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "%s:%d: Failure: %s\n", file, line, what.c_str());
}

void RecordSkip(const std::string& why) {
  g_skipped = true;
  g_skip_reason = why;
}

}  // namespace pd::minitest

int main(int argc, char** argv) {
  using namespace pd::minitest;
  const char* filter = argc > 1 ? argv[1] : nullptr;
  int failed = 0, passed = 0, skipped = 0;
  for (auto& tc : Registry()) {
    if (filter && tc.name.find(filter) == std::string::npos) continue;
    std::printf("[ RUN      ] %s\n", tc.name.c_str());
    std::fflush(stdout);
    g_failures = 0;
    g_skipped = false;
    auto t0 = std::chrono::steady_clock::now();
    tc.fn();
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (g_failures) {
      ++failed;
      std::printf("[  FAILED  ] %s (%.0f ms)\n", tc.name.c_str(), ms);
    } else if (g_skipped) {
      ++skipped;
      std::printf("[  SKIPPED ] %s: %s\n", tc.name.c_str(), g_skip_reason.c_str());
    } else {
      ++passed;
      std::printf("[       OK ] %s (%.0f ms)\n", tc.name.c_str(), ms);
    }
    std::fflush(stdout);
  }
  std::printf("[==========] %d passed, %d failed, %d skipped\n", passed, failed, skipped);
  return failed ? 1 : 0;
}
