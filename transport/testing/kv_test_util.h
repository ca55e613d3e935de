// Helpers shared by the transport tests, the peer binary and the benchmark:
// caches with small or DeepSeek-V3.2 shapes, deterministic fill, and an
// independent byte-exact comparison that reads the layout (kernels/kv_layout.h)
// directly rather than the transport's chunk plan.
#ifndef PD_TRANSPORT_TESTING_KV_TEST_UTIL_H_
#define PD_TRANSPORT_TESTING_KV_TEST_UTIL_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kvcache/kv_cache.h"

namespace pd::transport::testing {

// The DeepSeek-V3.2 cache layout (656 + 132 B per token) with `summary_block`
// tokens per pooled summary.
kernels::KvLayout V32Layout(int summary_block = 1024);

// A host cache with room for `sequences` sequences of `tokens` tokens.
absl::StatusOr<std::unique_ptr<kvcache::KvCache>> MakeCache(
    const kernels::KvLayout& layout, int layers, int64_t tokens, int sequences = 2,
    std::unique_ptr<kvcache::Allocator> allocator = kvcache::NewHostAllocator());

// Creates a sequence of `tokens` tokens and fills every byte of its pages (all
// layers, both page objects) and summary blocks from a seeded generator.
absl::StatusOr<int32_t> MakeFilledSequence(kvcache::KvCache& cache, int64_t tokens, uint64_t seed);

// OK when, for every layer, the MLA records and indexer keys (values and
// scales) of tokens [0, tokens) and the ceil(tokens / block) summary blocks of
// `b_seq` in `b` equal those of `a_seq` in `a`; otherwise DataLoss naming the
// first differing layer, object and token.
absl::Status CompareSequences(const kvcache::KvCache& a, int32_t a_seq, const kvcache::KvCache& b,
                              int32_t b_seq, int64_t tokens);

// Same comparison restricted to one layer.
absl::Status CompareLayer(const kvcache::KvCache& a, int32_t a_seq, const kvcache::KvCache& b,
                          int32_t b_seq, int64_t tokens, int layer);

}  // namespace pd::transport::testing

#endif  // PD_TRANSPORT_TESTING_KV_TEST_UTIL_H_
