#include "kvcache/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace pd::kvcache {
namespace {

class HostAllocator final : public Allocator {
 public:
  absl::StatusOr<void*> Allocate(size_t bytes) override {
    if (bytes == 0) return absl::InvalidArgumentError("zero-byte KV arena");
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      return absl::ResourceExhaustedError(
          absl::StrCat("mmap of ", bytes, " bytes for the KV arena failed: ", std::strerror(errno)));
    }
    return p;
  }
  void Free(void* p, size_t bytes) override {
    if (p != nullptr) ::munmap(p, bytes);
  }
  bool on_device() const override { return false; }
};

size_t AlignUp(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace

const char* KvObjectName(KvObject o) {
  switch (o) {
    case KvObject::kMlaLatent: return "mla_latent";
    case KvObject::kIndexKey: return "index_key";
    case KvObject::kSummary: return "summary";
  }
  return "?";
}

std::unique_ptr<Allocator> NewHostAllocator() { return std::make_unique<HostAllocator>(); }

size_t PageBytesAllLayers(const KvCacheOptions& o) {
  return size_t(o.num_layers) * (o.layout.MlaPageBytes() + o.layout.IndexPageBytes());
}

size_t SummaryBytesPerSequence(const KvCacheOptions& o) {
  int64_t blocks = kernels::CeilDiv(o.max_tokens_per_sequence, o.layout.summary_block);
  return size_t(o.num_layers) * size_t(blocks) * o.layout.SummaryBytes();
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::Create(const KvCacheOptions& o,
                                                         std::unique_ptr<Allocator> allocator) {
  const KvLayout& l = o.layout;
  if (o.num_layers <= 0 || o.num_pages <= 0 || o.max_sequences <= 0 ||
      o.max_tokens_per_sequence <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "KV cache options must be positive: layers=", o.num_layers, " pages=", o.num_pages,
        " max_sequences=", o.max_sequences, " max_tokens=", o.max_tokens_per_sequence));
  }
  if (l.kv_lora_rank <= 0 || l.kv_lora_rank % kernels::kQuantGroup != 0 || l.rope_dim <= 0 ||
      l.index_head_dim <= 0 || l.summary_block <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "bad KV layout: kv_lora_rank=", l.kv_lora_rank, " (multiple of 128), rope_dim=",
        l.rope_dim, " index_head_dim=", l.index_head_dim, " summary_block=", l.summary_block));
  }
  if (o.num_pages > INT32_MAX) return absl::InvalidArgumentError("num_pages exceeds int32");
  if (allocator == nullptr) return absl::InvalidArgumentError("null allocator");
  const size_t kAlign = 4096;
  int64_t max_blocks = kernels::CeilDiv(o.max_tokens_per_sequence, l.summary_block);
  size_t mla = AlignUp(size_t(o.num_pages) * l.MlaPageBytes(), kAlign);
  size_t idx = AlignUp(size_t(o.num_pages) * l.IndexPageBytes(), kAlign);
  size_t summ = AlignUp(size_t(o.max_sequences) * size_t(max_blocks) * l.SummaryBytes(), kAlign);
  size_t layer_stride = mla + idx + summ;
  size_t total = layer_stride * size_t(o.num_layers);
  PD_ASSIGN_OR_RETURN(void* mem, allocator->Allocate(total));
  auto cache = std::unique_ptr<KvCache>(
      new KvCache(o, std::move(allocator), static_cast<uint8_t*>(mem), total));
  cache->max_blocks_ = max_blocks;
  cache->layer_stride_ = layer_stride;
  cache->mla_pool_bytes_ = mla;
  cache->index_pool_bytes_ = idx;
  cache->summary_region_bytes_ = size_t(max_blocks) * l.SummaryBytes();
  return cache;
}

KvCache::KvCache(const KvCacheOptions& options, std::unique_ptr<Allocator> allocator,
                 uint8_t* arena, size_t arena_bytes)
    : options_(options), allocator_(std::move(allocator)), arena_(arena), arena_bytes_(arena_bytes) {
  absl::MutexLock lock(&mu_);
  free_pages_.reserve(size_t(options_.num_pages));
  // Pop from the back: hand out low page ids first.
  for (int64_t p = options_.num_pages - 1; p >= 0; --p) free_pages_.push_back(int32_t(p));
  seqs_.resize(size_t(options_.max_sequences));
}

KvCache::~KvCache() { allocator_->Free(arena_, arena_bytes_); }

absl::Status KvCache::CheckSeq(int32_t seq) const {
  if (seq < 0 || seq >= int32_t(seqs_.size()) || !seqs_[size_t(seq)].live) {
    return absl::NotFoundError(absl::StrCat("no live KV sequence ", seq));
  }
  return absl::OkStatus();
}

absl::StatusOr<int32_t> KvCache::CreateSequence() {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < seqs_.size(); ++i) {
    if (!seqs_[i].live) {
      seqs_[i] = Sequence{true, 0, {}};
      return int32_t(i);
    }
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", seqs_.size(), " KV sequence slots are in use"));
}

absl::Status KvCache::Reserve(int32_t seq, int64_t tokens) {
  absl::MutexLock lock(&mu_);
  PD_RETURN_IF_ERROR(CheckSeq(seq));
  if (tokens > options_.max_tokens_per_sequence) {
    return absl::ResourceExhaustedError(absl::StrCat(tokens, " tokens exceed the per-sequence limit of ",
                                                     options_.max_tokens_per_sequence));
  }
  Sequence& s = seqs_[size_t(seq)];
  int64_t need = kernels::NumPages(tokens) - int64_t(s.pages.size());
  if (need <= 0) return absl::OkStatus();
  if (need > int64_t(free_pages_.size())) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: need ", need, " pages, ",
                                                     free_pages_.size(), " free"));
  }
  for (int64_t i = 0; i < need; ++i) {
    s.pages.push_back(free_pages_.back());
    free_pages_.pop_back();
  }
  return absl::OkStatus();
}

absl::Status KvCache::Release(int32_t seq) {
  absl::MutexLock lock(&mu_);
  PD_RETURN_IF_ERROR(CheckSeq(seq));
  Sequence& s = seqs_[size_t(seq)];
  for (auto it = s.pages.rbegin(); it != s.pages.rend(); ++it) free_pages_.push_back(*it);
  s = Sequence{};
  return absl::OkStatus();
}

absl::Status KvCache::SetLength(int32_t seq, int64_t tokens) {
  absl::MutexLock lock(&mu_);
  PD_RETURN_IF_ERROR(CheckSeq(seq));
  Sequence& s = seqs_[size_t(seq)];
  if (tokens < 0 || tokens > int64_t(s.pages.size()) * kernels::kPageTokens) {
    return absl::OutOfRangeError(absl::StrCat("length ", tokens, " outside the reserved ",
                                              s.pages.size() * kernels::kPageTokens, " tokens"));
  }
  s.length = tokens;
  return absl::OkStatus();
}

int64_t KvCache::Length(int32_t seq) const {
  absl::ReaderMutexLock lock(&mu_);
  if (!CheckSeq(seq).ok()) return 0;
  return seqs_[size_t(seq)].length;
}

bool KvCache::IsLive(int32_t seq) const {
  absl::ReaderMutexLock lock(&mu_);
  return CheckSeq(seq).ok();
}

int64_t KvCache::Capacity(int32_t seq) const {
  absl::ReaderMutexLock lock(&mu_);
  if (!CheckSeq(seq).ok()) return 0;
  return int64_t(seqs_[size_t(seq)].pages.size()) * kernels::kPageTokens;
}

int64_t KvCache::free_pages() const {
  absl::ReaderMutexLock lock(&mu_);
  return int64_t(free_pages_.size());
}

int KvCache::live_sequences() const {
  absl::ReaderMutexLock lock(&mu_);
  return int(std::count_if(seqs_.begin(), seqs_.end(), [](const Sequence& s) { return s.live; }));
}

std::vector<int32_t> KvCache::PageTable(int32_t seq) const {
  absl::ReaderMutexLock lock(&mu_);
  if (!CheckSeq(seq).ok()) return {};
  return seqs_[size_t(seq)].pages;
}

const int32_t* KvCache::PageTableData(int32_t seq) const {
  absl::ReaderMutexLock lock(&mu_);
  if (!CheckSeq(seq).ok()) return nullptr;
  return seqs_[size_t(seq)].pages.data();
}

uint8_t* KvCache::MlaPool(int layer) const { return arena_ + size_t(layer) * layer_stride_; }

uint8_t* KvCache::IndexPool(int layer) const { return MlaPool(layer) + mla_pool_bytes_; }

float* KvCache::Summaries(int layer, int32_t seq) const {
  uint8_t* base = IndexPool(layer) + index_pool_bytes_ + size_t(seq) * summary_region_bytes_;
  return reinterpret_cast<float*>(base);
}

kernels::MlaCacheView KvCache::MlaView(int32_t seq, int layer, int64_t tokens) const {
  kernels::MlaCacheView v;
  v.pool = MlaPool(layer);
  v.page_table = PageTableData(seq);
  v.num_tokens = tokens >= 0 ? tokens : Length(seq);
  v.layout = options_.layout;
  return v;
}

kernels::MlaCacheRef KvCache::MlaRef(int32_t seq, int layer) const {
  kernels::MlaCacheRef r;
  r.pool = MlaPool(layer);
  r.page_table = PageTableData(seq);
  r.layout = options_.layout;
  return r;
}

kernels::IndexKeyCacheView KvCache::IndexView(int32_t seq, int layer, int64_t tokens) const {
  kernels::IndexKeyCacheView v;
  v.pool = IndexPool(layer);
  v.page_table = PageTableData(seq);
  v.num_tokens = tokens >= 0 ? tokens : Length(seq);
  v.summary_sums = Summaries(layer, seq);
  v.layout = options_.layout;
  return v;
}

kernels::IndexKeyCacheRef KvCache::IndexRef(int32_t seq, int layer) const {
  kernels::IndexKeyCacheRef r;
  r.pool = IndexPool(layer);
  r.page_table = PageTableData(seq);
  r.summary_sums = Summaries(layer, seq);
  r.layout = options_.layout;
  return r;
}

absl::StatusOr<ScopedSequence> ScopedSequence::Create(KvCache* cache, int64_t tokens) {
  PD_ASSIGN_OR_RETURN(int32_t seq, cache->CreateSequence());
  ScopedSequence owned(cache, seq);
  PD_RETURN_IF_ERROR(cache->Reserve(seq, tokens));
  return owned;
}

ScopedSequence& ScopedSequence::operator=(ScopedSequence&& other) noexcept {
  if (this != &other) {
    if (cache_ != nullptr) (void)cache_->Release(seq_);
    cache_ = other.cache_;
    seq_ = other.seq_;
    other.cache_ = nullptr;
  }
  return *this;
}

ScopedSequence::~ScopedSequence() {
  if (cache_ != nullptr) (void)cache_->Release(seq_);
}

}  // namespace pd::kvcache
