// A minimal GoogleTest-style harness for the kernel tests, std only, so they build
// on the GPU host (no GoogleTest there). Supports TEST, EXPECT_/ASSERT_ {TRUE,
// FALSE, EQ, NE, LT, LE, GT, GE, NEAR} with `<< message` streaming, and
// GTEST_SKIP()-like MINITEST_SKIP(). Exit code 0 only when every test passed.
// A test binary links kernels_minitest_main (which defines main()).
// Filters: argv[1] (if given) is a substring a test's "Suite.Name" must contain.
#ifndef PD_KERNELS_TESTING_MINITEST_H_
#define PD_KERNELS_TESTING_MINITEST_H_

#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace pd::minitest {

struct TestCase {
  std::string name;
  std::function<void()> fn;
};

std::vector<TestCase>& Registry();
bool Register(const char* suite, const char* name, std::function<void()> fn);

// Failure recording for the running test.
void RecordFailure(const char* file, int line, const std::string& what);
void RecordSkip(const std::string& why);

class FailureStream {
 public:
  FailureStream(const char* file, int line, std::string what)
      : file_(file), line_(line), what_(std::move(what)) {}
  ~FailureStream() {
    std::string extra = msg_.str();
    RecordFailure(file_, line_, extra.empty() ? what_ : what_ + " -- " + extra);
  }
  template <typename T>
  FailureStream& operator<<(const T& v) {
    msg_ << v;
    return *this;
  }

 private:
  const char* file_;
  int line_;
  std::string what_;
  std::ostringstream msg_;
};

class SkipStream {
 public:
  ~SkipStream() { RecordSkip(msg_.str()); }
  template <typename T>
  SkipStream& operator<<(const T& v) {
    msg_ << v;
    return *this;
  }

 private:
  std::ostringstream msg_;
};

template <typename A, typename B>
std::string Describe(const char* op, const char* ea, const char* eb, const A& a, const B& b) {
  std::ostringstream s;
  s << "expected " << ea << " " << op << " " << eb << ", got " << a << " vs " << b;
  return s.str();
}

// Helper that swallows the stream when the condition holds.
struct Voidify {
  template <typename T>
  void operator&(T&&) {}
};

}  // namespace pd::minitest

#define MINITEST_CONCAT_INNER_(a, b) a##b
#define MINITEST_CONCAT_(a, b) MINITEST_CONCAT_INNER_(a, b)

#define TEST(suite, name)                                                             \
  static void MINITEST_CONCAT_(minitest_fn_, MINITEST_CONCAT_(suite, name))();        \
  static const bool MINITEST_CONCAT_(minitest_reg_, MINITEST_CONCAT_(suite, name)) =  \
      ::pd::minitest::Register(#suite, #name,                                         \
                               &MINITEST_CONCAT_(minitest_fn_, MINITEST_CONCAT_(suite, name))); \
  static void MINITEST_CONCAT_(minitest_fn_, MINITEST_CONCAT_(suite, name))()

#define MINITEST_CHECK_(cond, what, on_fail) \
  if (cond) {                                \
  } else                                     \
    on_fail ::pd::minitest::FailureStream(__FILE__, __LINE__, what)

#define MINITEST_EXPECT_ ::pd::minitest::Voidify() &
#define MINITEST_ASSERT_ return ::pd::minitest::Voidify() &

#define EXPECT_TRUE(c) MINITEST_CHECK_((c), "expected true: " #c, MINITEST_EXPECT_)
#define EXPECT_FALSE(c) MINITEST_CHECK_(!(c), "expected false: " #c, MINITEST_EXPECT_)
#define ASSERT_TRUE(c) MINITEST_CHECK_((c), "expected true: " #c, MINITEST_ASSERT_)
#define ASSERT_FALSE(c) MINITEST_CHECK_(!(c), "expected false: " #c, MINITEST_ASSERT_)

#define MINITEST_BINOP_(a, b, op, opname, kind)                                            \
  MINITEST_CHECK_(((a)op(b)), ::pd::minitest::Describe(opname, #a, #b, (a), (b)), kind)

#define EXPECT_EQ(a, b) MINITEST_BINOP_(a, b, ==, "==", MINITEST_EXPECT_)
#define EXPECT_NE(a, b) MINITEST_BINOP_(a, b, !=, "!=", MINITEST_EXPECT_)
#define EXPECT_LT(a, b) MINITEST_BINOP_(a, b, <, "<", MINITEST_EXPECT_)
#define EXPECT_LE(a, b) MINITEST_BINOP_(a, b, <=, "<=", MINITEST_EXPECT_)
#define EXPECT_GT(a, b) MINITEST_BINOP_(a, b, >, ">", MINITEST_EXPECT_)
#define EXPECT_GE(a, b) MINITEST_BINOP_(a, b, >=, ">=", MINITEST_EXPECT_)
#define ASSERT_EQ(a, b) MINITEST_BINOP_(a, b, ==, "==", MINITEST_ASSERT_)
#define ASSERT_NE(a, b) MINITEST_BINOP_(a, b, !=, "!=", MINITEST_ASSERT_)
#define ASSERT_LT(a, b) MINITEST_BINOP_(a, b, <, "<", MINITEST_ASSERT_)
#define ASSERT_LE(a, b) MINITEST_BINOP_(a, b, <=, "<=", MINITEST_ASSERT_)
#define ASSERT_GT(a, b) MINITEST_BINOP_(a, b, >, ">", MINITEST_ASSERT_)
#define ASSERT_GE(a, b) MINITEST_BINOP_(a, b, >=, ">=", MINITEST_ASSERT_)

#define EXPECT_NEAR(a, b, tol)                                                          \
  MINITEST_CHECK_(std::fabs(double(a) - double(b)) <= double(tol),                      \
                  ::pd::minitest::Describe("~=", #a, #b, (a), (b)) + " (tol " #tol ")", \
                  MINITEST_EXPECT_)
#define ASSERT_NEAR(a, b, tol)                                                          \
  MINITEST_CHECK_(std::fabs(double(a) - double(b)) <= double(tol),                      \
                  ::pd::minitest::Describe("~=", #a, #b, (a), (b)) + " (tol " #tol ")", \
                  MINITEST_ASSERT_)

// Marks the running test skipped (not failed) and returns from it.
#define MINITEST_SKIP() return ::pd::minitest::Voidify() & ::pd::minitest::SkipStream()

#endif  // PD_KERNELS_TESTING_MINITEST_H_
