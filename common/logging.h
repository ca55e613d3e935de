// Logging: glog's LOG / VLOG / CHECK (the same macros abseil later adopted).
#ifndef PD_COMMON_LOGGING_H_
#define PD_COMMON_LOGGING_H_

#include <glog/logging.h>

namespace pd {
// Initialises glog for a binary: logs to stderr, no log files unless the user
// sets GLOG_log_dir. Call once at the start of main().
void InitLogging(const char* argv0);
}  // namespace pd

#endif  // PD_COMMON_LOGGING_H_
