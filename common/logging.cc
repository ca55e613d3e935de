#include "common/logging.h"

#include <cstdlib>

namespace pd {
void InitLogging(const char* argv0) {
  if (std::getenv("GLOG_log_dir") == nullptr) FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv0);
}
}  // namespace pd
