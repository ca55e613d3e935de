#include "common/status.h"

#include <cstdio>
#include <cstdlib>

namespace pd {

absl::Status Annotate(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

namespace internal {
void DieWithStatus(const char* file, int line, const absl::Status& status) {
  std::fprintf(stderr, "%s:%d: fatal: %s\n", file, line, status.ToString().c_str());
  std::fflush(stderr);
  std::abort();
}
}  // namespace internal
}  // namespace pd
