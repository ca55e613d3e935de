// Identifiers shared by the daemons.
#ifndef PD_COMMON_IDS_H_
#define PD_COMMON_IDS_H_

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"

namespace pd {

// A request id: 32 lowercase hex characters from a process-wide random source.
// Thread-safe.
std::string NewRequestId();

// Returns true if `id` is a syntactically valid request id (1..128 chars of
// [A-Za-z0-9._-]); ids from clients are checked with this before use.
bool IsValidRequestId(absl::string_view id);

}  // namespace pd

#endif  // PD_COMMON_IDS_H_
