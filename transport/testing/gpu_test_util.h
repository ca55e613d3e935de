// GPU test and benchmark helpers: mirror a host KV cache into a device cache
// of the same options and back, so that device streams can be filled and
// checked with the host helpers of kv_test_util.h. Built with CUDA only.
#ifndef PD_TRANSPORT_TESTING_GPU_TEST_UTIL_H_
#define PD_TRANSPORT_TESTING_GPU_TEST_UTIL_H_

#include "absl/status/status.h"
#include "kvcache/kv_cache.h"

namespace pd::transport::testing {

// Copies `from`'s whole arena into `to`'s (device to host, host to device, or
// device to device). Both caches must have equal options, hence the same
// layout; page tables match when both saw the same sequence operations.
// InvalidArgument when the arenas differ in size.
absl::Status CopyArena(const kvcache::KvCache& from, kvcache::KvCache& to);

}  // namespace pd::transport::testing

#endif  // PD_TRANSPORT_TESTING_GPU_TEST_UTIL_H_
