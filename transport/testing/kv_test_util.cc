#include "transport/testing/kv_test_util.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace pd::transport::testing {
namespace {

uint64_t SplitMix(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void Fill(uint8_t* p, size_t n, uint64_t& state) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t v = SplitMix(state);
    std::memcpy(p + i, &v, 8);
  }
  for (; i < n; ++i) p[i] = uint8_t(SplitMix(state));
}

absl::Status Diff(const uint8_t* x, const uint8_t* y, size_t n, int layer, const char* what,
                  int64_t unit) {
  if (std::memcmp(x, y, n) == 0) return absl::OkStatus();
  size_t at = 0;
  while (at < n && x[at] == y[at]) ++at;
  return absl::DataLossError(absl::StrCat("layer ", layer, " ", what, " ", unit, " differs at byte ",
                                          at, " (", int(x[at]), " vs ", int(y[at]), ")"));
}

}  // namespace

kernels::KvLayout V32Layout(int summary_block) {
  kernels::KvLayout l;
  l.kv_lora_rank = 512;
  l.rope_dim = 64;
  l.index_head_dim = 128;
  l.summary_block = summary_block;
  return l;
}

absl::StatusOr<std::unique_ptr<kvcache::KvCache>> MakeCache(
    const kernels::KvLayout& layout, int layers, int64_t tokens, int sequences,
    std::unique_ptr<kvcache::Allocator> allocator) {
  kvcache::KvCacheOptions o;
  o.layout = layout;
  o.num_layers = layers;
  o.num_pages = kernels::NumPages(tokens) * sequences;
  o.max_sequences = sequences;
  o.max_tokens_per_sequence = tokens;
  return kvcache::KvCache::Create(o, std::move(allocator));
}

absl::StatusOr<int32_t> MakeFilledSequence(kvcache::KvCache& cache, int64_t tokens, uint64_t seed) {
  PD_ASSIGN_OR_RETURN(int32_t seq, cache.CreateSequence());
  PD_RETURN_IF_ERROR(cache.Reserve(seq, tokens));
  PD_RETURN_IF_ERROR(cache.SetLength(seq, tokens));
  const kernels::KvLayout& l = cache.layout();
  std::vector<int32_t> pages = cache.PageTable(seq);
  uint64_t state = seed;
  const int64_t blocks = kernels::CeilDiv(tokens, l.summary_block);
  for (int layer = 0; layer < cache.options().num_layers; ++layer) {
    for (int32_t p : pages) {
      Fill(cache.MlaPool(layer) + size_t(p) * l.MlaPageBytes(), l.MlaPageBytes(), state);
      Fill(cache.IndexPool(layer) + size_t(p) * l.IndexPageBytes(), l.IndexPageBytes(), state);
    }
    Fill(reinterpret_cast<uint8_t*>(cache.Summaries(layer, seq)), size_t(blocks) * l.SummaryBytes(),
         state);
  }
  return seq;
}

absl::Status CompareLayer(const kvcache::KvCache& a, int32_t a_seq, const kvcache::KvCache& b,
                          int32_t b_seq, int64_t tokens, int layer) {
  const kernels::KvLayout& l = a.layout();
  std::vector<int32_t> pa = a.PageTable(a_seq), pb = b.PageTable(b_seq);
  if (int64_t(pa.size()) < kernels::NumPages(tokens) || int64_t(pb.size()) < kernels::NumPages(tokens)) {
    return absl::DataLossError(absl::StrCat("page tables too short for ", tokens, " tokens"));
  }
  for (int64_t t = 0; t < tokens; ++t) {
    const size_t page = size_t(t / kernels::kPageTokens);
    const int slot = int(t % kernels::kPageTokens);
    const uint8_t* ma = a.MlaPool(layer) + size_t(pa[page]) * l.MlaPageBytes() + slot * l.MlaTokenBytes();
    const uint8_t* mb = b.MlaPool(layer) + size_t(pb[page]) * l.MlaPageBytes() + slot * l.MlaTokenBytes();
    PD_RETURN_IF_ERROR(Diff(ma, mb, l.MlaTokenBytes(), layer, "MLA record of token", t));
    const uint8_t* ia = a.IndexPool(layer) + size_t(pa[page]) * l.IndexPageBytes();
    const uint8_t* ib = b.IndexPool(layer) + size_t(pb[page]) * l.IndexPageBytes();
    PD_RETURN_IF_ERROR(Diff(ia + l.IndexValueOffset(slot), ib + l.IndexValueOffset(slot),
                            size_t(l.index_head_dim), layer, "indexer key of token", t));
    PD_RETURN_IF_ERROR(Diff(ia + l.IndexScaleOffset(slot), ib + l.IndexScaleOffset(slot), 4, layer,
                            "indexer scale of token", t));
  }
  const int64_t blocks = kernels::CeilDiv(tokens, l.summary_block);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const uint8_t* sa = reinterpret_cast<const uint8_t*>(a.Summaries(layer, a_seq)) + blk * l.SummaryBytes();
    const uint8_t* sb = reinterpret_cast<const uint8_t*>(b.Summaries(layer, b_seq)) + blk * l.SummaryBytes();
    PD_RETURN_IF_ERROR(Diff(sa, sb, l.SummaryBytes(), layer, "summary block", blk));
  }
  return absl::OkStatus();
}

absl::Status CompareSequences(const kvcache::KvCache& a, int32_t a_seq, const kvcache::KvCache& b,
                              int32_t b_seq, int64_t tokens) {
  if (a.options().num_layers != b.options().num_layers) {
    return absl::DataLossError("caches have different layer counts");
  }
  for (int layer = 0; layer < a.options().num_layers; ++layer) {
    PD_RETURN_IF_ERROR(CompareLayer(a, a_seq, b, b_seq, tokens, layer));
  }
  return absl::OkStatus();
}

}  // namespace pd::transport::testing
