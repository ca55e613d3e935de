// Byte layout of the paged KV cache: what the kernels read and write, what
// kvcache/ allocates and what the transport ships. docs/kv-format.md documents it
// with the byte offsets for the DeepSeek-V3.2 shapes. Host and device, std only.
#ifndef PD_KERNELS_KV_LAYOUT_H_
#define PD_KERNELS_KV_LAYOUT_H_

#include <cstddef>
#include <cstdint>

#include "kernels/numeric.h"

namespace pd::kernels {

inline constexpr int kPageTokens = 64;  // tokens per page, every object

// Layout of one layer's cache objects. All three objects of a layer share the
// sequence's page table (page p of the MLA pool and page p of the key pool hold
// the same 64 tokens). Summaries are indexed by block: block b of a sequence
// covers tokens [b*summary_block, (b+1)*summary_block).
struct KvLayout {
  int kv_lora_rank = 512;    // latent width (multiple of 128)
  int rope_dim = 64;         // k_pe width (bf16)
  int index_head_dim = 128;  // indexer key width (e4m3), one fp32 scale per key
  int summary_block = 1024;  // tokens per pooled summary (misa_k_block_size)

  // --- MLA latent record: one per token, contiguous within a page (FlashMLA). ---
  // [0, r)              c_kv, e4m3
  // [r, r + 4*r/128)    fp32 scales, one per 128 values (ue8m0 powers of two)
  // [.., + 2*rope_dim)  k_pe, bf16
  PD_HD int MlaScaleCount() const { return kv_lora_rank / kQuantGroup; }
  PD_HD size_t MlaScaleOffset() const { return size_t(kv_lora_rank); }
  PD_HD size_t MlaRopeOffset() const { return MlaScaleOffset() + 4u * MlaScaleCount(); }
  PD_HD size_t MlaTokenBytes() const { return MlaRopeOffset() + 2u * rope_dim; }
  PD_HD size_t MlaPageBytes() const { return kPageTokens * MlaTokenBytes(); }

  // --- Indexer key page (DeepGEMM paged layout): the page's 64 x D e4m3 values
  // first (token-major), then its 64 fp32 scales. ---
  PD_HD size_t IndexKeyTokenBytes() const { return size_t(index_head_dim) + 4u; }
  PD_HD size_t IndexPageBytes() const { return kPageTokens * IndexKeyTokenBytes(); }
  PD_HD size_t IndexValueOffset(int slot) const { return size_t(slot) * index_head_dim; }
  PD_HD size_t IndexScaleOffset(int slot) const {
    return size_t(kPageTokens) * index_head_dim + 4u * slot;
  }

  // --- Pooled-key summary: per block, the fp32 SUM of the dequantised indexer
  // keys (k8 * scale) of the block's tokens, accumulated in token order. The
  // mean is sum / count, count = min(summary_block, tokens - b*summary_block). ---
  PD_HD size_t SummaryBytes() const { return 4u * index_head_dim; }

  PD_HD size_t TokenBytes() const { return MlaTokenBytes() + IndexKeyTokenBytes(); }
};

PD_HD int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
PD_HD int64_t NumPages(int64_t tokens) { return CeilDiv(tokens, kPageTokens); }

// Token count of block `b` for a sequence holding `tokens` tokens.
PD_HD int64_t BlockCount(int64_t tokens, int64_t b, int block) {
  int64_t n = tokens - b * block;
  return n < 0 ? 0 : (n > block ? block : n);
}

}  // namespace pd::kernels

#endif  // PD_KERNELS_KV_LAYOUT_H_
