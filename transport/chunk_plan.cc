#include "transport/chunk_plan.h"

#include <algorithm>

#include "absl/strings/str_cat.h"

namespace pd::transport {
namespace {

using proto::ObjectKind;

absl::Status CheckSide(const SideLayout& s, const char* side, const PlanParams& p, bool need_pages) {
  const uint64_t pages = uint64_t(kernels::NumPages(int64_t(p.tokens)));
  if (need_pages && s.pages.size() < pages) {
    return absl::InvalidArgumentError(absl::StrCat(side, " page table has ", s.pages.size(),
                                                   " pages, ", p.tokens, " tokens need ", pages));
  }
  for (uint64_t i = 0; i < std::min<uint64_t>(pages, s.pages.size()); ++i) {
    if (s.pages[i] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(side, " page table entry ", i, " is negative (", s.pages[i], ")"));
    }
  }
  if (s.mla.size() != p.num_layers || s.index.size() != p.num_layers ||
      s.summary.size() != p.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        side, " offsets must list ", p.num_layers, " layers (mla ", s.mla.size(), ", index ",
        s.index.size(), ", summary ", s.summary.size(), ")"));
  }
  return absl::OkStatus();
}

// Appends [src, src+len) -> [dst, dst+len), merging with the previous segment
// when both ends continue it.
void AddSegment(std::vector<Segment>& segs, uint64_t src, uint64_t dst, uint64_t len, bool src_known) {
  if (!segs.empty()) {
    Segment& b = segs.back();
    if (b.dst + b.len == dst && (!src_known || b.src + b.len == src)) {
      b.len += len;
      return;
    }
  }
  segs.push_back({src_known ? src : 0, dst, len});
}

}  // namespace

std::vector<proto::ObjectLayout> WireLayouts(const kernels::KvLayout& l) {
  using proto::Dtype;
  std::vector<proto::ObjectLayout> v;
  v.push_back({ObjectKind::kMlaLatent, Dtype::kE4M3, uint32_t(l.kv_lora_rank), Dtype::kFp32,
               uint32_t(kernels::kQuantGroup), Dtype::kBf16, uint32_t(l.rope_dim), l.MlaTokenBytes(), 1,
               l.MlaPageBytes()});
  v.push_back({ObjectKind::kIndexKey, Dtype::kE4M3, uint32_t(l.index_head_dim), Dtype::kFp32,
               uint32_t(l.index_head_dim), Dtype::kNone, 0, l.IndexKeyTokenBytes(), 1,
               l.IndexPageBytes()});
  v.push_back({ObjectKind::kSummary, Dtype::kFp32, uint32_t(l.index_head_dim), Dtype::kNone, 0,
               Dtype::kNone, 0, l.SummaryBytes(), uint32_t(l.summary_block), 0});
  return v;
}

absl::StatusOr<ChunkPlan> MakeChunkPlan(const PlanParams& p, const SideLayout& src,
                                        const SideLayout& dst) {
  const kernels::KvLayout& l = p.layout;
  if (p.tokens == 0) return absl::InvalidArgumentError("a KV stream needs at least one token");
  if (p.max_chunk_bytes < l.MlaPageBytes() || p.max_chunk_bytes < l.SummaryBytes()) {
    return absl::InvalidArgumentError(absl::StrCat("max_chunk_bytes ", p.max_chunk_bytes,
                                                   " is below one MLA page (", l.MlaPageBytes(),
                                                   " bytes)"));
  }
  const bool src_known = !src.pages.empty();
  if (src_known) {
    if (absl::Status s = CheckSide(src, "sender", p, true); !s.ok()) return s;
  }
  if (absl::Status s = CheckSide(dst, "receiver", p, true); !s.ok()) return s;

  const uint64_t num_pages = uint64_t(kernels::NumPages(int64_t(p.tokens)));
  const uint64_t num_blocks = uint64_t(kernels::CeilDiv(int64_t(p.tokens), l.summary_block));
  ChunkPlan plan;
  auto add_paged = [&](uint32_t layer, ObjectKind kind, uint64_t page_bytes, uint64_t src_pool,
                       uint64_t dst_pool) {
    const uint64_t per_chunk = std::max<uint64_t>(1, p.max_chunk_bytes / page_bytes);
    for (uint64_t first = 0; first < num_pages; first += per_chunk) {
      const uint64_t count = std::min(per_chunk, num_pages - first);
      PlannedChunk c;
      c.id = uint32_t(plan.chunks.size());
      c.layer = layer;
      c.kind = kind;
      c.first = uint32_t(first);
      c.count = uint32_t(count);
      c.token_begin = first * kernels::kPageTokens;
      c.token_end = std::min<uint64_t>((first + count) * kernels::kPageTokens, p.tokens);
      c.bytes = count * page_bytes;
      for (uint64_t i = first; i < first + count; ++i) {
        uint64_t s = src_known ? src_pool + uint64_t(src.pages[i]) * page_bytes : 0;
        AddSegment(c.segments, s, dst_pool + uint64_t(dst.pages[i]) * page_bytes, page_bytes,
                   src_known);
      }
      plan.total_bytes += c.bytes;
      plan.chunks.push_back(std::move(c));
    }
  };
  for (uint32_t layer = 0; layer < p.num_layers; ++layer) {
    plan.layer_first.push_back(uint32_t(plan.chunks.size()));
    // Pooled summaries first: the decode router needs them before the keys.
    const uint64_t per_chunk = std::max<uint64_t>(1, p.max_chunk_bytes / l.SummaryBytes());
    for (uint64_t first = 0; first < num_blocks; first += per_chunk) {
      const uint64_t count = std::min(per_chunk, num_blocks - first);
      PlannedChunk c;
      c.id = uint32_t(plan.chunks.size());
      c.layer = layer;
      c.kind = ObjectKind::kSummary;
      c.first = uint32_t(first);
      c.count = uint32_t(count);
      c.token_begin = first * uint64_t(l.summary_block);
      c.token_end = std::min<uint64_t>((first + count) * uint64_t(l.summary_block), p.tokens);
      c.bytes = count * l.SummaryBytes();
      c.segments.push_back({src_known ? src.summary[layer] + first * l.SummaryBytes() : 0,
                            dst.summary[layer] + first * l.SummaryBytes(), c.bytes});
      plan.total_bytes += c.bytes;
      plan.chunks.push_back(std::move(c));
    }
    add_paged(layer, ObjectKind::kIndexKey, l.IndexPageBytes(), src_known ? src.index[layer] : 0,
              dst.index[layer]);
    add_paged(layer, ObjectKind::kMlaLatent, l.MlaPageBytes(), src_known ? src.mla[layer] : 0,
              dst.mla[layer]);
  }
  plan.layer_first.push_back(uint32_t(plan.chunks.size()));
  return plan;
}

}  // namespace pd::transport
