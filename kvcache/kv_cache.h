// The paged KV cache of one node: per layer, the FP8 MLA latents, the FP8
// indexer keys and the pooled-key summaries, laid out as kernels/kv_layout.h
// says (docs/kv-format.md has the byte offsets).
#ifndef PD_KVCACHE_KV_CACHE_H_
#define PD_KVCACHE_KV_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "kernels/indexer.h"
#include "kernels/kv_layout.h"
#include "kernels/mla.h"

namespace pd::kvcache {

using kernels::KvLayout;

// The three objects a layer's KV consists of (also the transport's object ids).
enum class KvObject : uint8_t { kMlaLatent = 0, kIndexKey = 1, kSummary = 2 };
const char* KvObjectName(KvObject o);

// Where the arena lives. Host memory for the CPU backend; the GPU backend
// supplies a device allocator (kernels/cuda). Implementations are thread-safe.
class Allocator {
 public:
  virtual ~Allocator() = default;
  // Returns `bytes` of memory aligned to at least 4096 bytes, zero-filled.
  virtual absl::StatusOr<void*> Allocate(size_t bytes) = 0;
  virtual void Free(void* p, size_t bytes) = 0;
  // True when the memory is device memory (not dereferenceable on the host).
  virtual bool on_device() const = 0;
};

// Page-aligned, zero-filled host memory (mmap), released with munmap.
std::unique_ptr<Allocator> NewHostAllocator();

struct KvCacheOptions {
  KvLayout layout;
  int num_layers = 0;
  int64_t num_pages = 0;                  // pages per layer, shared by all sequences
  int max_sequences = 0;                  // live sequences at once
  int64_t max_tokens_per_sequence = 0;    // sizes each sequence's summary region
};

// Capacity arithmetic for sizing a cache from a byte budget.
size_t PageBytesAllLayers(const KvCacheOptions& o);     // one page in every layer, both objects
size_t SummaryBytesPerSequence(const KvCacheOptions& o);  // all layers

// Owns one arena holding, for each layer in order: the MLA page pool
// [num_pages, MlaPageBytes], the indexer-key page pool [num_pages,
// IndexPageBytes] and the summary regions [max_sequences, max_blocks, D] fp32.
// One arena means one memory registration for the transport.
//
// Sequences are numbered 0..max_sequences-1 and reused after Release. Page
// tables grow with Reserve; a page belongs to exactly one sequence. Metadata
// calls are thread-safe; the KV bytes themselves are synchronised by callers
// (one writer per sequence at a time).
class KvCache {
 public:
  static absl::StatusOr<std::unique_ptr<KvCache>> Create(
      const KvCacheOptions& options, std::unique_ptr<Allocator> allocator = NewHostAllocator());
  ~KvCache();
  KvCache(const KvCache&) = delete;
  KvCache& operator=(const KvCache&) = delete;

  const KvCacheOptions& options() const { return options_; }
  const KvLayout& layout() const { return options_.layout; }
  int64_t max_blocks_per_sequence() const { return max_blocks_; }
  bool on_device() const { return allocator_->on_device(); }

  // A new empty sequence. ResourceExhausted when max_sequences are live.
  absl::StatusOr<int32_t> CreateSequence();
  // Grows `seq`'s page table to cover `tokens` tokens. ResourceExhausted when
  // the pages run out or tokens > max_tokens_per_sequence (nothing changes then).
  absl::Status Reserve(int32_t seq, int64_t tokens);
  // Returns the sequence's pages to the pool. Summary blocks are not cleared:
  // writers zero a block when they first touch it (kernels UpdateSummaries).
  absl::Status Release(int32_t seq);
  // Tokens whose KV is valid (the caller advances it after writing).
  absl::Status SetLength(int32_t seq, int64_t tokens);
  int64_t Length(int32_t seq) const;
  bool IsLive(int32_t seq) const;
  int64_t Capacity(int32_t seq) const;  // tokens covered by reserved pages
  int64_t free_pages() const;
  int live_sequences() const;

  // A copy of the page table, and a pointer that stays valid until the next
  // Reserve or Release of that sequence.
  std::vector<int32_t> PageTable(int32_t seq) const;
  const int32_t* PageTableData(int32_t seq) const;

  // Raw memory, for the transport (registration, remote addressing).
  uint8_t* arena() const { return arena_; }
  size_t arena_bytes() const { return arena_bytes_; }
  uint8_t* MlaPool(int layer) const;
  uint8_t* IndexPool(int layer) const;
  float* Summaries(int layer, int32_t seq) const;  // [max_blocks, D]

  // Kernel views of one sequence and layer (length = Length(seq) unless given).
  kernels::MlaCacheView MlaView(int32_t seq, int layer, int64_t tokens = -1) const;
  kernels::MlaCacheRef MlaRef(int32_t seq, int layer) const;
  kernels::IndexKeyCacheView IndexView(int32_t seq, int layer, int64_t tokens = -1) const;
  kernels::IndexKeyCacheRef IndexRef(int32_t seq, int layer) const;

 private:
  struct Sequence {
    bool live = false;
    int64_t length = 0;
    std::vector<int32_t> pages;
  };

  KvCache(const KvCacheOptions& options, std::unique_ptr<Allocator> allocator, uint8_t* arena,
          size_t arena_bytes);
  absl::Status CheckSeq(int32_t seq) const ABSL_SHARED_LOCKS_REQUIRED(mu_);

  const KvCacheOptions options_;
  const std::unique_ptr<Allocator> allocator_;
  uint8_t* const arena_;
  const size_t arena_bytes_;
  int64_t max_blocks_ = 0;
  size_t layer_stride_ = 0, mla_pool_bytes_ = 0, index_pool_bytes_ = 0, summary_region_bytes_ = 0;

  mutable absl::Mutex mu_;
  std::vector<int32_t> free_pages_ ABSL_GUARDED_BY(mu_);
  std::vector<Sequence> seqs_ ABSL_GUARDED_BY(mu_);
};

// Owns one KV sequence of a cache: created by Create, released on destruction.
// Move-only. The cache must outlive it.
class ScopedSequence {
 public:
  // A new sequence with room reserved for `tokens` tokens.
  static absl::StatusOr<ScopedSequence> Create(KvCache* cache, int64_t tokens);
  ScopedSequence(ScopedSequence&& other) noexcept : cache_(other.cache_), seq_(other.seq_) {
    other.cache_ = nullptr;
  }
  ScopedSequence& operator=(ScopedSequence&& other) noexcept;
  ScopedSequence(const ScopedSequence&) = delete;
  ScopedSequence& operator=(const ScopedSequence&) = delete;
  ~ScopedSequence();

  int32_t id() const { return seq_; }

 private:
  ScopedSequence(KvCache* cache, int32_t seq) : cache_(cache), seq_(seq) {}
  KvCache* cache_;
  int32_t seq_;
};

}  // namespace pd::kvcache

#endif  // PD_KVCACHE_KV_CACHE_H_
