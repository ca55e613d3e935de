// Contract checks for the CPU kernels (std only: kernels/ has no glog).
// A violated precondition is a programming error in the caller: the check
// prints the function, the condition and a formatted explanation to stderr and
// aborts, like glog's CHECK.
#ifndef PD_KERNELS_CPU_INTERNAL_CHECK_H_
#define PD_KERNELS_CPU_INTERNAL_CHECK_H_

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

namespace pd::kernels::cpu::internal {

[[noreturn]] __attribute__((format(printf, 4, 5), cold, noinline)) inline void CheckFailed(
    const char* file, int line, const char* cond, const char* fmt, ...) {
  std::fprintf(stderr, "%s:%d: check failed: %s: ", file, line, cond);
  va_list args;
  va_start(args, fmt);
  std::vfprintf(stderr, fmt, args);
  va_end(args);
  std::fputc('\n', stderr);
  std::fflush(stderr);
  std::abort();
}

}  // namespace pd::kernels::cpu::internal

// PD_KCHECK(cond, "printf format naming what is wrong", args...): aborts with the
// message when cond is false. Always on (also in Release builds).
#define PD_KCHECK(cond, ...)                                                             \
  do {                                                                                   \
    if (__builtin_expect(!(cond), 0))                                                    \
      ::pd::kernels::cpu::internal::CheckFailed(__FILE__, __LINE__, #cond, __VA_ARGS__); \
  } while (0)

#endif  // PD_KERNELS_CPU_INTERNAL_CHECK_H_
