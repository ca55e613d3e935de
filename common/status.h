// Status helpers. Every module boundary returns absl::Status / absl::StatusOr<T>;
// the packaged abseil (20220623) has no ABSL_RETURN_IF_ERROR, so these are ours.
#ifndef PD_COMMON_STATUS_H_
#define PD_COMMON_STATUS_H_

#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

#define PD_STATUS_CONCAT_INNER_(a, b) a##b
#define PD_STATUS_CONCAT_(a, b) PD_STATUS_CONCAT_INNER_(a, b)

// Returns from the enclosing function when `expr` (an absl::Status) is not OK.
#define PD_RETURN_IF_ERROR(expr)                    \
  do {                                              \
    ::absl::Status pd_status_tmp_ = (expr);         \
    if (!pd_status_tmp_.ok()) return pd_status_tmp_; \
  } while (0)

// `PD_ASSIGN_OR_RETURN(auto x, Foo());` or `PD_ASSIGN_OR_RETURN(x, Foo());`
#define PD_ASSIGN_OR_RETURN(lhs, rexpr) \
  PD_ASSIGN_OR_RETURN_IMPL_(PD_STATUS_CONCAT_(pd_statusor_, __LINE__), lhs, rexpr)
#define PD_ASSIGN_OR_RETURN_IMPL_(tmp, lhs, rexpr) \
  auto tmp = (rexpr);                              \
  if (!tmp.ok()) return std::move(tmp).status();   \
  lhs = std::move(tmp).value()

// Aborts (via glog CHECK semantics) when the status is not OK. For main() and tests.
#define PD_CHECK_OK(expr)                                                      \
  do {                                                                         \
    ::absl::Status pd_status_chk_ = (expr);                                    \
    if (!pd_status_chk_.ok()) ::pd::internal::DieWithStatus(__FILE__, __LINE__, \
                                                            pd_status_chk_);   \
  } while (0)

namespace pd {

// Prefixes `status`'s message with `context` ("loading x: <original>"), keeping the code.
absl::Status Annotate(const absl::Status& status, absl::string_view context);

namespace internal {
[[noreturn]] void DieWithStatus(const char* file, int line, const absl::Status& status);
}  // namespace internal
}  // namespace pd

#endif  // PD_COMMON_STATUS_H_
