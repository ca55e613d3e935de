// How a sequence's KV is cut into chunks: deterministic, so both ends compute
// the same plan from the manifest and the Accept. Chunk ids run layer by layer;
// within a layer the pooled summaries come first, then the indexer keys, then
// the MLA latents. A chunk covers whole pages (summaries: whole blocks) of one
// object of one layer and at most max_chunk_bytes; docs/kv-format.md has the
// byte layout.
#ifndef PD_TRANSPORT_CHUNK_PLAN_H_
#define PD_TRANSPORT_CHUNK_PLAN_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kv_layout.h"
#include "proto/kv_control.h"

namespace pd::transport {

// One contiguous copy: `len` bytes from offset `src` of the sender's region to
// offset `dst` of the receiver's region.
struct Segment {
  uint64_t src = 0;
  uint64_t dst = 0;
  uint64_t len = 0;
  bool operator==(const Segment&) const = default;
};

struct PlannedChunk {
  uint32_t id = 0;
  uint32_t layer = 0;
  proto::ObjectKind kind = proto::ObjectKind::kMlaLatent;
  uint32_t first = 0;  // first page-table index (summaries: first block)
  uint32_t count = 0;  // pages (summaries: blocks)
  uint64_t token_begin = 0, token_end = 0;
  uint64_t bytes = 0;
  std::vector<Segment> segments;  // in landing order; lengths sum to `bytes`
};

// Where one end keeps a sequence's objects, as byte offsets from the base of
// the memory region it streams from / into.
struct SideLayout {
  // Page table of the sequence. Empty on the receiver of a one-sided stream
  // (the sender's pages are then unknown: segments follow the receiver's pages
  // alone and `src` offsets are 0).
  std::vector<int32_t> pages;
  std::vector<uint64_t> mla;      // per layer: offset of the MLA page pool
  std::vector<uint64_t> index;    // per layer: offset of the indexer-key page pool
  std::vector<uint64_t> summary;  // per layer: offset of this sequence's summary blocks
};

struct PlanParams {
  kernels::KvLayout layout;
  uint32_t num_layers = 0;
  uint64_t tokens = 0;
  uint64_t max_chunk_bytes = 0;
};

struct ChunkPlan {
  std::vector<PlannedChunk> chunks;   // in id order
  std::vector<uint32_t> layer_first;  // num_layers + 1: layer L owns [layer_first[L], layer_first[L+1])
  uint64_t total_bytes = 0;
};

// InvalidArgument (naming the field) when the page tables do not cover the
// tokens, a page id is negative, an offset list has the wrong length, or
// max_chunk_bytes is smaller than one MLA page.
absl::StatusOr<ChunkPlan> MakeChunkPlan(const PlanParams& params, const SideLayout& src,
                                        const SideLayout& dst);

// The wire description of the three objects of `layout` (manifest.objects).
std::vector<proto::ObjectLayout> WireLayouts(const kernels::KvLayout& layout);

}  // namespace pd::transport

#endif  // PD_TRANSPORT_CHUNK_PLAN_H_
