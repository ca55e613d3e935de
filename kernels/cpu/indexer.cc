// CPU backend of the DSA lightning indexer and its selection modes
// (kernels/indexer.h; formulas in shared/docs/algorithms.md sections 3-5).
//
// Exactness: every (query vector, key) dot product is ONE fp32 fma chain over
// d = 0..D-1 starting from +0 (products of two e4m3 values are exact in fp32, so
// fma and mul+add agree), and every head sum is the fma chain
//   acc = 0; for each head in ascending order: acc = fma(w, max(dot, 0), acc)
// followed by one multiply by the key scale. The blocked tile kernel (keys in
// SIMD lanes), the gathered-row kernel (heads in SIMD lanes) and the scalar
// fallbacks all evaluate exactly these operations, so a score does not depend on
// which mode or code path computed it: MISA with h = H, MISA-dagger with C >=
// pos+1 and HISA keeping every block reproduce dense DSA bit for bit.
#include "kernels/indexer.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PD_INDEXER_AVX2 1
#else
#define PD_INDEXER_AVX2 0
#endif

#include "kernels/cpu/internal/indexer_internal.h"
#include "kernels/numeric.h"
#include "kernels/ops.h"

namespace pd::kernels {

const char* SelectionModeName(SelectionMode m) {
  switch (m) {
    case SelectionMode::kDense: return "dense";
    case SelectionMode::kMisa: return "misa";
    case SelectionMode::kMisaDagger: return "misa_dagger";
    case SelectionMode::kHisa: return "hisa";
  }
  return "?";
}

bool ParseSelectionMode(std::string_view s, SelectionMode* out) {
  static constexpr SelectionMode kAll[] = {SelectionMode::kDense, SelectionMode::kMisa,
                                           SelectionMode::kMisaDagger, SelectionMode::kHisa};
  for (SelectionMode m : kAll) {
    if (s == SelectionModeName(m)) {
      *out = m;
      return true;
    }
  }
  return false;
}

namespace {

std::string Msg(const char* what, int64_t value) {
  return std::string(what) + " (got " + std::to_string(value) + ")";
}

bool IsPow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace

std::string ValidateIndexerPrep(const IndexerPrepInputs& in, int heads,
                                const IndexKeyCacheRef& cache) {
  const int d = cache.layout.index_head_dim;
  if (in.num_tokens < 0) return Msg("IndexerPrep: num_tokens must be >= 0", in.num_tokens);
  if (heads < 1) return Msg("IndexerPrep: heads must be >= 1", heads);
  if (!IsPow2(d)) {
    return Msg("IndexerPrep: layout.index_head_dim must be a power of two (Hadamard)", d);
  }
  if (in.rope_dim < 0 || in.rope_dim > d || in.rope_dim % 2 != 0) {
    return Msg("IndexerPrep: rope_dim must be even and in [0, index_head_dim]", in.rope_dim);
  }
  if (in.num_tokens == 0) return "";
  if (in.q_proj == nullptr) return "IndexerPrep: q_proj is null";
  if (in.k_proj == nullptr) return "IndexerPrep: k_proj is null";
  if (in.w_proj == nullptr) return "IndexerPrep: w_proj is null";
  if (in.ln_gamma == nullptr) return "IndexerPrep: ln_gamma is null";
  if (in.ln_beta == nullptr) return "IndexerPrep: ln_beta is null";
  if (in.positions == nullptr) return "IndexerPrep: positions is null";
  if (in.rope_dim > 0 && in.inv_freq == nullptr) return "IndexerPrep: inv_freq is null";
  if (!(in.ln_eps >= 0.0f)) return "IndexerPrep: ln_eps must be >= 0";
  if (cache.pool == nullptr) return "IndexerPrep: cache.pool is null";
  if (cache.page_table == nullptr) return "IndexerPrep: cache.page_table is null";
  for (int64_t t = 0; t < in.num_tokens; ++t) {
    if (in.positions[t] < 0) {
      return Msg(("IndexerPrep: positions[" + std::to_string(t) + "] must be >= 0").c_str(),
                 in.positions[t]);
    }
  }
  return "";
}

std::string ValidateSelectTokens(const SelectionConfig& cfg, const IndexKeyCacheView& cache,
                                 const IndexerQueries& queries) {
  const KvLayout& l = cache.layout;
  if (cfg.heads < 1) return Msg("SelectTokens: cfg.heads must be >= 1", cfg.heads);
  if (cfg.head_dim < 1 || cfg.head_dim != l.index_head_dim) {
    return Msg(("SelectTokens: cfg.head_dim must equal cache.layout.index_head_dim (" +
                std::to_string(l.index_head_dim) + ")")
                   .c_str(),
               cfg.head_dim);
  }
  if (cfg.topk < 1) return Msg("SelectTokens: cfg.topk must be >= 1", cfg.topk);
  const bool misa = cfg.mode == SelectionMode::kMisa || cfg.mode == SelectionMode::kMisaDagger;
  if (misa) {
    if (cfg.misa_heads < 1 || cfg.misa_heads > cfg.heads) {
      return Msg("SelectTokens: cfg.misa_heads must be in [1, heads]", cfg.misa_heads);
    }
    if (cfg.misa_block < 1 || cfg.misa_block != l.summary_block) {
      return Msg(("SelectTokens: cfg.misa_block must equal cache.layout.summary_block (" +
                  std::to_string(l.summary_block) + ")")
                     .c_str(),
                 cfg.misa_block);
    }
    if (cache.num_tokens > 0 && cache.summary_sums == nullptr) {
      return "SelectTokens: cache.summary_sums is null (MISA needs the pooled summaries)";
    }
  }
  if (cfg.mode == SelectionMode::kMisaDagger && cfg.dagger_candidates < cfg.topk) {
    return Msg("SelectTokens: cfg.dagger_candidates must be >= cfg.topk",
               cfg.dagger_candidates);
  }
  if (cfg.mode == SelectionMode::kHisa) {
    if (cfg.hisa_block < 1) return Msg("SelectTokens: cfg.hisa_block must be >= 1", cfg.hisa_block);
    if (cfg.hisa_topk_blocks < 1) {
      return Msg("SelectTokens: cfg.hisa_topk_blocks must be >= 1", cfg.hisa_topk_blocks);
    }
  }
  if (cache.num_tokens < 0) return Msg("SelectTokens: cache.num_tokens must be >= 0", cache.num_tokens);
  if (cache.num_tokens > std::numeric_limits<int32_t>::max()) {
    return Msg("SelectTokens: cache.num_tokens exceeds int32 indices", cache.num_tokens);
  }
  if (cache.num_tokens > 0 && (cache.pool == nullptr || cache.page_table == nullptr)) {
    return "SelectTokens: cache.pool or cache.page_table is null";
  }
  if (queries.num_queries < 0) {
    return Msg("SelectTokens: queries.num_queries must be >= 0", queries.num_queries);
  }
  if (queries.num_queries == 0) return "";
  if (queries.q8 == nullptr || queries.weights == nullptr || queries.positions == nullptr) {
    return "SelectTokens: queries.q8, queries.weights or queries.positions is null";
  }
  for (int64_t t = 0; t < queries.num_queries; ++t) {
    const int64_t p = queries.positions[t];
    if (p < 0 || p >= cache.num_tokens) {
      return Msg(("SelectTokens: queries.positions[" + std::to_string(t) +
                  "] must be in [0, cache.num_tokens = " + std::to_string(cache.num_tokens) + ")")
                     .c_str(),
                 p);
    }
  }
  return "";
}

namespace cpu {
namespace internal {
namespace {

[[noreturn]] void Fail(const std::string& msg) {
  std::fprintf(stderr, "pd::kernels::cpu indexer: %s\n", msg.c_str());
  std::fflush(stderr);
  std::abort();
}

void Require(bool ok, const char* msg) {
  if (!ok) Fail(msg);
}

// e4m3 code -> float (Fp8E4M3ToFloat for all 256 codes).
const float* Fp8Table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i) t[size_t(i)] = Fp8E4M3ToFloat(uint8_t(i));
    return t;
  }();
  return table.data();
}

// ---------------------------------------------------------------------------
// Key cache access (kernels/kv_layout.h): token s lives in page page_table[s/64],
// slot s%64; its D values at IndexValueOffset(slot), its fp32 scale (unaligned)
// at IndexScaleOffset(slot).

const uint8_t* KeyPage(const uint8_t* pool, const int32_t* page_table, const KvLayout& l,
                       int64_t s) {
  return pool + size_t(page_table[s / kPageTokens]) * l.IndexPageBytes();
}

const uint8_t* KeyValues(const IndexKeyCacheView& c, int64_t s) {
  return KeyPage(c.pool, c.page_table, c.layout, s) +
         c.layout.IndexValueOffset(int(s % kPageTokens));
}

float KeyScale(const IndexKeyCacheView& c, int64_t s) {
  float f;
  std::memcpy(&f, KeyPage(c.pool, c.page_table, c.layout, s) +
                      c.layout.IndexScaleOffset(int(s % kPageTokens)),
              4);
  return f;
}

IndexKeyCacheView AsView(const IndexKeyCacheRef& r, int64_t num_tokens) {
  IndexKeyCacheView v;
  v.pool = r.pool;
  v.page_table = r.page_table;
  v.num_tokens = num_tokens;
  v.summary_sums = r.summary_sums;
  v.layout = r.layout;
  return v;
}

// sum[d] += e4m3(values[d]) * scale (fp32; the product is exact for ue8m0 scales).
void AccumulateKey(const uint8_t* values, float scale, int d_count, float* sum) {
  const float* lut = Fp8Table();
  for (int d = 0; d < d_count; ++d) sum[d] += lut[values[d]] * scale;
}

void DecodeVector(const uint8_t* q8, int64_t count, float* out) {
  const float* lut = Fp8Table();
  for (int64_t i = 0; i < count; ++i) out[i] = lut[q8[i]];
}

// Keys [t*16, t*16+16) of tiles [t0, t1) into tiles[t][d][16] (raw e4m3 values,
// unscaled) and scales[s]; keys >= n are zero with scale 0.
void DecodeKeyTiles(const IndexKeyCacheView& c, int64_t n, int64_t t0, int64_t t1,
                    float* tiles, float* scales) {
  const int d_count = c.layout.index_head_dim;
  const float* lut = Fp8Table();
  for (int64_t t = t0; t < t1; ++t) {
    float* tile = tiles + t * d_count * kKeyTile;
    for (int i = 0; i < kKeyTile; ++i) {
      const int64_t s = t * kKeyTile + i;
      if (s < n) {
        const uint8_t* v = KeyValues(c, s);
        for (int d = 0; d < d_count; ++d) tile[d * kKeyTile + i] = lut[v[d]];
        scales[s] = KeyScale(c, s);
      } else {
        for (int d = 0; d < d_count; ++d) tile[d * kKeyTile + i] = 0.0f;
        scales[s] = 0.0f;
      }
    }
  }
}

// Keys [s0, s1) into rows[s][d] (raw values).
void DecodeKeyRows(const IndexKeyCacheView& c, int64_t s0, int64_t s1, float* rows) {
  const int d_count = c.layout.index_head_dim;
  for (int64_t s = s0; s < s1; ++s) DecodeVector(KeyValues(c, s), d_count, rows + s * d_count);
}

// ---------------------------------------------------------------------------
// The two dot kernels. Both compute each dot as the fma chain over d ascending.

// Query vectors per call of the tile kernel (12 accumulators + 2 key registers
// + 1 broadcast of the 16 AVX2 registers).
constexpr int kTileVectors = 6;

// out[v][i] = sum_d q[v][d] * tile[d][i], v < NV, i < 16.
template <int NV>
void DotTile(const float* const* q, const float* tile, int d_count, float* out) {
  static_assert(NV >= 1 && NV <= kTileVectors);
#if PD_INDEXER_AVX2
  // Named accumulators (not an array) so that they stay in registers.
  const __m256 zero = _mm256_setzero_ps();
  __m256 a00 = zero, a01 = zero, a10 = zero, a11 = zero, a20 = zero, a21 = zero;
  __m256 a30 = zero, a31 = zero, a40 = zero, a41 = zero, a50 = zero, a51 = zero;
  const float* q0 = q[0];
  const float* q1 = q[NV > 1 ? 1 : 0];
  const float* q2 = q[NV > 2 ? 2 : 0];
  const float* q3 = q[NV > 3 ? 3 : 0];
  const float* q4 = q[NV > 4 ? 4 : 0];
  const float* q5 = q[NV > 5 ? 5 : 0];
#define PD_DOT_STEP(v)                                  \
  {                                                     \
    const __m256 b = _mm256_broadcast_ss(q##v + d);     \
    a##v##0 = _mm256_fmadd_ps(b, k0, a##v##0);          \
    a##v##1 = _mm256_fmadd_ps(b, k1, a##v##1);          \
  }
#pragma GCC unroll 2
  for (int d = 0; d < d_count; ++d) {
    const __m256 k0 = _mm256_loadu_ps(tile + d * kKeyTile);
    const __m256 k1 = _mm256_loadu_ps(tile + d * kKeyTile + 8);
    PD_DOT_STEP(0)
    if constexpr (NV > 1) PD_DOT_STEP(1)
    if constexpr (NV > 2) PD_DOT_STEP(2)
    if constexpr (NV > 3) PD_DOT_STEP(3)
    if constexpr (NV > 4) PD_DOT_STEP(4)
    if constexpr (NV > 5) PD_DOT_STEP(5)
  }
#undef PD_DOT_STEP
  const __m256 acc[2 * kTileVectors] = {a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51};
  for (int v = 0; v < NV; ++v) {
    _mm256_storeu_ps(out + v * kKeyTile, acc[2 * v]);
    _mm256_storeu_ps(out + v * kKeyTile + 8, acc[2 * v + 1]);
  }
#else
  for (int v = 0; v < NV; ++v) {
    for (int i = 0; i < kKeyTile; ++i) {
      float acc = 0.0f;
      for (int d = 0; d < d_count; ++d) acc = std::fma(q[v][d], tile[d * kKeyTile + i], acc);
      out[v * kKeyTile + i] = acc;
    }
  }
#endif
}

void DotTileN(int nv, const float* const* q, const float* tile, int d_count, float* out) {
  switch (nv) {
    case 6: DotTile<6>(q, tile, d_count, out); break;
    case 5: DotTile<5>(q, tile, d_count, out); break;
    case 4: DotTile<4>(q, tile, d_count, out); break;
    case 3: DotTile<3>(q, tile, d_count, out); break;
    case 2: DotTile<2>(q, tile, d_count, out); break;
    case 1: DotTile<1>(q, tile, d_count, out); break;
    default: break;
  }
}

constexpr int kLanes = 8;  // query vectors per lane group of the row kernel
constexpr int kRows = 8;   // keys per call of the row kernel

// out[r][l] = sum_d qt[d][l] * rows[r][d], r < 8, l < 8 (qt: [D][8] query
// vectors in lanes).
void DotRows(const float* qt, const float* const* rows, int d_count, float* out) {
#if PD_INDEXER_AVX2
  __m256 a[kRows];
  for (int r = 0; r < kRows; ++r) a[r] = _mm256_setzero_ps();
  for (int d = 0; d < d_count; ++d) {
    const __m256 qv = _mm256_loadu_ps(qt + d * kLanes);
    for (int r = 0; r < kRows; ++r) a[r] = _mm256_fmadd_ps(qv, _mm256_broadcast_ss(rows[r] + d), a[r]);
  }
  for (int r = 0; r < kRows; ++r) _mm256_storeu_ps(out + r * kLanes, a[r]);
#else
  for (int r = 0; r < kRows; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      float acc = 0.0f;
      for (int d = 0; d < d_count; ++d) acc = std::fma(qt[d * kLanes + l], rows[r][d], acc);
      out[r * kLanes + l] = acc;
    }
  }
#endif
}

float Relu(float x) { return x > 0.0f ? x : 0.0f; }

// acc[i] = fma(w, relu(dot[i]), acc[i]) for the 16 keys of a tile.
void AccumulateHead(float w, const float* dot, float* acc) {
#if PD_INDEXER_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  const __m256 zero = _mm256_setzero_ps();
  for (int h = 0; h < kKeyTile; h += 8) {
    const __m256 r = _mm256_max_ps(_mm256_loadu_ps(dot + h), zero);  // NaN, -0 -> +0
    _mm256_storeu_ps(acc + h, _mm256_fmadd_ps(wv, r, _mm256_loadu_ps(acc + h)));
  }
#else
  for (int i = 0; i < kKeyTile; ++i) acc[i] = std::fma(w, Relu(dot[i]), acc[i]);
#endif
}

// The same for 8 values (the rows of the gathered-row kernel).
void AccumulateHead8(float w, const float* dot, float* acc) {
#if PD_INDEXER_AVX2
  const __m256 r = _mm256_max_ps(_mm256_loadu_ps(dot), _mm256_setzero_ps());
  _mm256_storeu_ps(acc, _mm256_fmadd_ps(_mm256_set1_ps(w), r, _mm256_loadu_ps(acc)));
#else
  for (int i = 0; i < 8; ++i) acc[i] = std::fma(w, Relu(dot[i]), acc[i]);
#endif
}

// ---------------------------------------------------------------------------
// Top-k.

}  // namespace

namespace {

// Appends, in index order, the order keys of a superset of the top k of
// s[0, n) (k < n) to *keys; returns their number. Strided groups j, j+G,
// j+2G, ...: the k-th largest group maximum m is a lower bound of the k-th
// largest score (k groups each hold a score >= m), so {s >= m} holds the top k.
// NaN never becomes a maximum nor a candidate.
size_t CollectCandidates(const float* s, int64_t n, int k, std::vector<uint64_t>* keys) {
  keys->resize(size_t(n));
  uint64_t* out = keys->data();
  if (n < 4 * int64_t(k)) {
    for (int64_t i = 0; i < n; ++i) out[i] = ScoreOrderKey(s[i], int32_t(i));
    return size_t(n);
  }
  // G = 2k groups (rounded down to a multiple of 8 when large; always >= k):
  // for independent scores about G * ln(G / (G - k)) = 1.39k candidates pass.
  thread_local std::vector<float> maxima;
  int64_t groups = 2 * int64_t(k);
  if (groups >= 16) groups = groups / 8 * 8;
  groups = std::max<int64_t>(groups, k);
  maxima.assign(size_t(groups), -std::numeric_limits<float>::infinity());
  float* m = maxima.data();
  int64_t base = 0;
  for (; base + groups <= n; base += groups) {
    const float* row = s + base;
    int64_t j = 0;
#if PD_INDEXER_AVX2
    for (; j + 8 <= groups; j += 8) {
      _mm256_storeu_ps(m + j, _mm256_max_ps(_mm256_loadu_ps(row + j), _mm256_loadu_ps(m + j)));
    }
#endif
    for (; j < groups; ++j) m[j] = row[j] > m[j] ? row[j] : m[j];
  }
  for (int64_t j = 0; base + j < n; ++j) m[j] = s[base + j] > m[j] ? s[base + j] : m[j];
  std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<float>());
  const float thr = maxima[size_t(k - 1)];
  size_t count = 0;
  int64_t i = 0;
#if PD_INDEXER_AVX2
  const __m256 tv = _mm256_set1_ps(thr);
  for (; i + 8 <= n; i += 8) {
    unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), tv, _CMP_GE_OQ)));
    while (mask != 0) {
      const int b = __builtin_ctz(mask);
      mask &= mask - 1;
      out[count++] = ScoreOrderKey(s[i + b], int32_t(i + b));
    }
  }
#endif
  for (; i < n; ++i) {
    if (s[i] >= thr) out[count++] = ScoreOrderKey(s[i], int32_t(i));
  }
  return count;
}

}  // namespace

int FastTopK(const float* s, int64_t n, int k, int32_t* out, TopKOrder order) {
  if (k <= 0) return 0;
  n = std::max<int64_t>(n, 0);
  const int valid = int(std::min<int64_t>(k, n));
  std::fill(out + valid, out + k, -1);
  if (valid == n && order == TopKOrder::kByIndex) {
    for (int i = 0; i < valid; ++i) out[i] = i;
    return valid;
  }
  thread_local std::vector<uint64_t> keys, scratch;
  const size_t count = valid == n ? [&] {
    keys.resize(size_t(n));
    for (int64_t i = 0; i < n; ++i) keys[size_t(i)] = ScoreOrderKey(s[i], int32_t(i));
    return size_t(n);
  }()
                                  : CollectCandidates(s, n, k, &keys);
  if (count < size_t(valid)) {  // NaN-heavy input: fewer numbers than k above the bound
    TopK(s, n, k, out);
    if (order == TopKOrder::kByIndex) std::sort(out, out + valid);
    return valid;
  }
  if (order == TopKOrder::kByScore) {
    if (size_t(valid) < count) {
      std::nth_element(keys.begin(), keys.begin() + (valid - 1), keys.begin() + int64_t(count));
    }
    std::sort(keys.begin(), keys.begin() + valid);
    for (int r = 0; r < valid; ++r) out[r] = int32_t(keys[size_t(r)] & 0xffffffffu);
    return valid;
  }
  // By index: the valid-th best key is the cut; keys are unique and in index order.
  scratch.assign(keys.begin(), keys.begin() + int64_t(count));
  std::nth_element(scratch.begin(), scratch.begin() + (valid - 1), scratch.end());
  const uint64_t cut = scratch[size_t(valid - 1)];
  int r = 0;
  for (size_t c = 0; c < count; ++c) {
    if (keys[c] <= cut) out[r++] = int32_t(keys[c] & 0xffffffffu);
  }
  return valid;
}

namespace {

// ---------------------------------------------------------------------------
// Scoring a tile of queries against contiguous key tiles.

// One tile of queries: per query slot a list of entries (query vector, weight)
// in ascending head order.
struct TileQueries {
  int64_t q0 = 0;                      // first query of the tile
  int nq = 0;
  int stride = 0;                      // entries capacity per slot
  const float* const* eq = nullptr;    // [nq][stride] query vectors (fp32, D values)
  const float* ew = nullptr;           // [nq][stride] weights
  const int* ne = nullptr;             // [nq] entry counts
  const int64_t* last_key = nullptr;   // [nq] keys s <= last_key are needed
  const uint8_t* kept = nullptr;       // HISA: [nq][kept_stride] kept blocks; else null
  int64_t kept_stride = 0;
  int hisa_block = 0;
  float* rows = nullptr;               // [nq][row_stride] output scores
  int64_t row_stride = 0;
};

bool TileKept(const TileQueries& tq, int i, int64_t s0) {
  const int64_t hi = std::min<int64_t>(s0 + kKeyTile - 1, tq.last_key[i]);
  const uint8_t* kept = tq.kept + i * tq.kept_stride;
  for (int64_t b = s0 / tq.hisa_block; b <= hi / tq.hisa_block; ++b) {
    if (kept[b]) return true;
  }
  return false;
}

// rows[i][s] for the keys s of tiles [kt0, kt1) that query slot i needs.
void ScoreRange(const float* tiles, const float* scales, int d_count, const TileQueries& tq,
                int64_t kt0, int64_t kt1) {
  alignas(32) float acc[kQueryTile * kKeyTile];
  alignas(32) float dots[kTileVectors * kKeyTile];
  const float* qp[kTileVectors];
  float wt[kTileVectors];
  int slot[kTileVectors];
  int part[kQueryTile];
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const int64_t s0 = kt * kKeyTile;
    const float* tile = tiles + kt * d_count * kKeyTile;
    int np = 0, pending = 0;
    auto flush = [&] {
      DotTileN(pending, qp, tile, d_count, dots);
      for (int e = 0; e < pending; ++e) {
        AccumulateHead(wt[e], dots + e * kKeyTile, acc + slot[e] * kKeyTile);
      }
      pending = 0;
    };
    for (int i = 0; i < tq.nq; ++i) {
      if (tq.last_key[i] < s0) continue;
      if (tq.kept != nullptr && !TileKept(tq, i, s0)) continue;
      part[np++] = i;
      std::fill(acc + i * kKeyTile, acc + (i + 1) * kKeyTile, 0.0f);
      for (int e = 0; e < tq.ne[i]; ++e) {
        qp[pending] = tq.eq[i * tq.stride + e];
        wt[pending] = tq.ew[i * tq.stride + e];
        slot[pending] = i;
        if (++pending == kTileVectors) flush();
      }
    }
    if (pending > 0) flush();
    const float* sc = scales + s0;
    for (int p = 0; p < np; ++p) {
      const int i = part[p];
      float* row = tq.rows + i * tq.row_stride + s0;
      const float* a = acc + i * kKeyTile;
      for (int l = 0; l < kKeyTile; ++l) row[l] = a[l] * sc[l];
    }
  }
}

// out[c] = scale(key_c) * (fma chain over entries e of w[e] * relu(q[e] . key_c)),
// key_c = keys ? keys[c] : c, its values at rows + key_c * D.
void ScoreRows(const float* const* q, const float* w, int ne, int d_count, const float* rows,
               const float* scales, const int32_t* keys, int64_t n, float* out,
               std::vector<float>* qt_buf) {
  if (n <= 0) return;
  const int groups = (ne + kLanes - 1) / kLanes;
  qt_buf->assign(size_t(groups) * d_count * kLanes, 0.0f);
  float* qt = qt_buf->data();
  for (int e = 0; e < ne; ++e) {
    float* g = qt + size_t(e / kLanes) * d_count * kLanes + e % kLanes;
    for (int d = 0; d < d_count; ++d) g[d * kLanes] = q[e][d];
  }
  alignas(32) float dots[kRows * kLanes];
  alignas(32) float acc[kRows];
  // dots transposed: [entry][row], so the head sum runs across the rows.
  thread_local std::vector<float> by_entry;
  by_entry.resize(size_t(groups) * kLanes * kRows);
  const float* rp[kRows];
  for (int64_t c0 = 0; c0 < n; c0 += kRows) {
    const int nr = int(std::min<int64_t>(kRows, n - c0));
    for (int r = 0; r < kRows; ++r) {
      const int64_t c = c0 + std::min(r, nr - 1);
      rp[r] = rows + int64_t(keys ? keys[c] : c) * d_count;
    }
    for (int g = 0; g < groups; ++g) {
      DotRows(qt + size_t(g) * d_count * kLanes, rp, d_count, dots);
      float* t = by_entry.data() + size_t(g) * kLanes * kRows;
      for (int r = 0; r < kRows; ++r) {
        for (int l = 0; l < kLanes; ++l) t[l * kRows + r] = dots[r * kLanes + l];
      }
    }
    std::fill(acc, acc + kRows, 0.0f);
    for (int e = 0; e < ne; ++e) AccumulateHead8(w[e], by_entry.data() + size_t(e) * kRows, acc);
    for (int r = 0; r < nr; ++r) {
      const int64_t c = c0 + r;
      out[c] = acc[r] * scales[keys ? keys[c] : c];
    }
  }
}

// Block means as key tiles: tiles[b/16][d][b%16] = means of blocks b < nb, zero after.
void MeanTiles(const float* means, int64_t nb, int d_count, std::vector<float>* tiles) {
  const int64_t nt = CeilDiv(nb, kKeyTile);
  tiles->assign(size_t(nt) * d_count * kKeyTile, 0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    float* t = tiles->data() + (b / kKeyTile) * d_count * kKeyTile + b % kKeyTile;
    for (int d = 0; d < d_count; ++d) t[d * kKeyTile] = means[b * d_count + d];
  }
}

// MISA summaries kbar[b] = sum[b] / count_b for blocks [0, nb), as tiles.
void SummaryMeanTiles(const IndexKeyCacheView& c, int64_t nb, std::vector<float>* tiles) {
  const int d_count = c.layout.index_head_dim;
  std::vector<float> means(size_t(nb) * d_count);
  for (int64_t b = 0; b < nb; ++b) {
    const float count = float(BlockCount(c.num_tokens, b, c.layout.summary_block));
    for (int d = 0; d < d_count; ++d) {
      means[b * d_count + d] = c.summary_sums[b * d_count + d] / count;
    }
  }
  MeanTiles(means.data(), nb, d_count, tiles);
}

// HISA block means over the keys present: mean of k8 * scale over
// [b*hb, min((b+1)*hb, num_tokens)), summed in token order.
void HisaMeanTiles(const IndexKeyCacheView& c, int hb, int64_t nb, ThreadPool* pool,
                   std::vector<float>* tiles) {
  const int d_count = c.layout.index_head_dim;
  std::vector<float> means(size_t(nb) * d_count, 0.0f);
  ParallelFor(pool, nb, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* m = means.data() + b * d_count;
      const int64_t s1 = std::min<int64_t>((b + 1) * hb, c.num_tokens);
      for (int64_t s = b * hb; s < s1; ++s) AccumulateKey(KeyValues(c, s), KeyScale(c, s), d_count, m);
      const float count = float(BlockCount(c.num_tokens, b, hb));
      for (int d = 0; d < d_count; ++d) m[d] /= count;
    }
  });
  MeanTiles(means.data(), nb, d_count, tiles);
}

// r[j] = |w[j]| * sum_{b < nb} relu(q[j] . kbar[b]) (blocks ascending), j < heads.
void RouterScores(const float* qf, const float* w, int heads, int d_count, const float* kbar_tiles,
                  int64_t nb, float* r) {
  alignas(32) float dots[kTileVectors * kKeyTile];
  const float* qp[kTileVectors];
  for (int j = 0; j < heads; ++j) r[j] = 0.0f;
  for (int64_t bt = 0; bt * kKeyTile < nb; ++bt) {
    const float* tile = kbar_tiles + bt * d_count * kKeyTile;
    const int nl = int(std::min<int64_t>(kKeyTile, nb - bt * kKeyTile));
    for (int j0 = 0; j0 < heads; j0 += kTileVectors) {
      const int nv = std::min(kTileVectors, heads - j0);
      for (int v = 0; v < nv; ++v) qp[v] = qf + size_t(j0 + v) * d_count;
      DotTileN(nv, qp, tile, d_count, dots);
      for (int v = 0; v < nv; ++v) {
        for (int l = 0; l < nl; ++l) r[j0 + v] += Relu(dots[v * kKeyTile + l]);
      }
    }
  }
  for (int j = 0; j < heads; ++j) r[j] = std::fabs(w[j]) * r[j];
}

// HISA block scores bs[b] = fma chain over heads of w[j] * relu(q[j] . mean_b), b < nb.
void BlockScores(const float* qf, const float* w, int heads, int d_count, const float* mean_tiles,
                 int64_t nb, float* bs) {
  alignas(32) float dots[kTileVectors * kKeyTile];
  alignas(32) float acc[kKeyTile];
  const float* qp[kTileVectors];
  for (int64_t bt = 0; bt * kKeyTile < nb; ++bt) {
    const float* tile = mean_tiles + bt * d_count * kKeyTile;
    std::fill(acc, acc + kKeyTile, 0.0f);
    for (int j0 = 0; j0 < heads; j0 += kTileVectors) {
      const int nv = std::min(kTileVectors, heads - j0);
      for (int v = 0; v < nv; ++v) qp[v] = qf + size_t(j0 + v) * d_count;
      DotTileN(nv, qp, tile, d_count, dots);
      for (int v = 0; v < nv; ++v) AccumulateHead(w[j0 + v], dots + v * kKeyTile, acc);
    }
    const int nl = int(std::min<int64_t>(kKeyTile, nb - bt * kKeyTile));
    for (int l = 0; l < nl; ++l) bs[bt * kKeyTile + l] = acc[l];
  }
}

// kept[b] for b < nvis: block 0 and block nvis-1 (both kept even when budget <
// 2), plus the best other blocks (score descending, ties to the lower index) up
// to `budget` blocks in all.
void KeepBlocks(const float* bs, int64_t nvis, int budget, uint8_t* kept,
                std::vector<uint64_t>* order) {
  std::fill(kept, kept + nvis, uint8_t(0));
  kept[0] = 1;
  kept[nvis - 1] = 1;
  const int64_t fixed = nvis > 1 ? 2 : 1;
  const int64_t extra = std::min<int64_t>(std::max<int64_t>(budget - fixed, 0), nvis - fixed);
  if (extra <= 0) return;
  order->clear();
  for (int64_t b = 1; b + 1 < nvis; ++b) order->push_back(ScoreOrderKey(bs[b], int32_t(b)));
  std::nth_element(order->begin(), order->begin() + (extra - 1), order->end());
  for (int64_t e = 0; e < extra; ++e) kept[(*order)[size_t(e)] & 0xffffffffu] = 1;
}

// ---------------------------------------------------------------------------
// SelectTokens.

// Buffers shared by all threads of one call (thread_local in the calling
// thread, reused across calls: about 2 * n_keys * D * 4 bytes for MISA-dagger,
// half that otherwise). Workers keep their own TileScratch (score rows of
// kQueryTile queries) and FinishScratch.
struct CallBuffers {
  std::vector<float> tiles, scales;  // decoded keys [tiles][D][16], scales [tiles*16]
  std::vector<float> rows;           // decoded keys [n][D] (MISA-dagger re-score)
  std::vector<float> kbar;           // MISA summaries as tiles
  std::vector<float> hmean;          // HISA block means as tiles
};

// Per query tile.
struct TileScratch {
  std::vector<float> qf;             // [nq][H][D] decoded queries
  std::vector<const float*> eq;      // [nq][H]
  std::vector<float> ew;             // [nq][H]
  std::vector<int> ne;               // [nq]
  std::vector<int64_t> last;         // [nq]
  std::vector<uint8_t> kept;         // HISA [nq][hisa_blocks]
  std::vector<float> r;              // router / block scores
  std::vector<int32_t> active;
  std::vector<uint64_t> order;
  std::vector<float> rows;           // [nq][row_stride]
};

// Per thread, for the per-query finish.
struct FinishScratch {
  std::vector<int32_t> cand, sel;
  std::vector<float> cscore, qt;
  std::vector<const float*> qv;
};

TileScratch& LocalTileScratch() {
  thread_local TileScratch s;
  return s;
}

FinishScratch& LocalFinishScratch() {
  thread_local FinishScratch s;
  return s;
}

struct Selector {
  const SelectionConfig& cfg;
  const IndexKeyCacheView& cache;
  const IndexerQueries& queries;
  int heads = 0, d_count = 0;
  int64_t n_keys = 0;       // keys decoded: [0, n_keys)
  int64_t key_tiles = 0;
  int64_t kbar_blocks = 0;  // MISA summaries in use
  int64_t hisa_blocks = 0;  // HISA blocks in use
  CallBuffers* buf = nullptr;

  Selector(const SelectionConfig& c, const IndexKeyCacheView& v, const IndexerQueries& q)
      : cfg(c), cache(v), queries(q), heads(c.heads), d_count(c.head_dim) {}

  bool Misa() const {
    return cfg.mode == SelectionMode::kMisa || cfg.mode == SelectionMode::kMisaDagger;
  }

  void Prepare(ThreadPool* pool) {
    int64_t max_pos = 0;
    for (int64_t t = 0; t < queries.num_queries; ++t) max_pos = std::max(max_pos, queries.positions[t]);
    n_keys = max_pos + 1;
    if (cfg.mode == SelectionMode::kHisa) {
      hisa_blocks = std::min(CeilDiv(cache.num_tokens, cfg.hisa_block), max_pos / cfg.hisa_block + 1);
    }
    if (Misa()) {
      kbar_blocks = std::min(CeilDiv(cache.num_tokens, cfg.misa_block), max_pos / cfg.misa_block + 1);
    }
    key_tiles = CeilDiv(n_keys, kKeyTile);
    thread_local CallBuffers call_buffers;
    buf = &call_buffers;
    buf->tiles.resize(size_t(key_tiles) * d_count * kKeyTile);
    buf->scales.resize(size_t(key_tiles) * kKeyTile);
    ParallelFor(pool, key_tiles, 64, [&](int64_t t0, int64_t t1) {
      DecodeKeyTiles(cache, n_keys, t0, t1, buf->tiles.data(), buf->scales.data());
    });
    if (cfg.mode == SelectionMode::kMisaDagger) {
      buf->rows.resize(size_t(n_keys) * d_count);
      ParallelFor(pool, n_keys, 1024, [&](int64_t s0, int64_t s1) {
        DecodeKeyRows(cache, s0, s1, buf->rows.data());
      });
    }
    if (Misa()) SummaryMeanTiles(cache, kbar_blocks, &buf->kbar);
    if (cfg.mode == SelectionMode::kHisa) HisaMeanTiles(cache, cfg.hisa_block, hisa_blocks, pool, &buf->hmean);
  }

  // Decodes the tile's queries and picks their heads (MISA) or blocks (HISA).
  TileQueries PrepareTile(int64_t q0, int nq, TileScratch& s) const {
    const size_t hd = size_t(heads) * d_count;
    s.qf.resize(size_t(nq) * hd);
    s.eq.resize(size_t(nq) * heads);
    s.ew.resize(size_t(nq) * heads);
    s.ne.resize(size_t(nq));
    s.last.resize(size_t(nq));
    s.r.resize(size_t(std::max<int64_t>(heads, hisa_blocks)));
    s.active.resize(size_t(heads));
    if (cfg.mode == SelectionMode::kHisa) s.kept.resize(size_t(nq) * hisa_blocks);
    int64_t max_pos = 0;
    for (int i = 0; i < nq; ++i) {
      const int64_t t = q0 + i;
      const int64_t pos = queries.positions[t];
      max_pos = std::max(max_pos, pos);
      s.last[i] = pos;
      float* qf = s.qf.data() + i * hd;
      const float* w = queries.weights + t * heads;
      DecodeVector(queries.q8 + t * hd, int64_t(hd), qf);
      int nh = heads;
      for (int j = 0; j < heads; ++j) s.active[j] = j;
      if (Misa()) {
        const int64_t nb = std::min(kbar_blocks, pos / cfg.misa_block + 1);
        RouterScores(qf, w, heads, d_count, buf->kbar.data(), nb, s.r.data());
        MisaActiveHeads(s.r.data(), heads, cfg.misa_heads, s.active.data());
        nh = cfg.misa_heads;
      }
      if (cfg.mode == SelectionMode::kHisa) {
        const int64_t nvis = pos / cfg.hisa_block + 1;
        BlockScores(qf, w, heads, d_count, buf->hmean.data(), nvis, s.r.data());
        KeepBlocks(s.r.data(), nvis, cfg.hisa_topk_blocks, s.kept.data() + i * hisa_blocks, &s.order);
      }
      s.ne[i] = nh;
      for (int e = 0; e < nh; ++e) {
        s.eq[i * heads + e] = qf + size_t(s.active[e]) * d_count;
        s.ew[i * heads + e] = w[s.active[e]];
      }
    }
    const int64_t row_stride = CeilDiv(max_pos + 1, kKeyTile) * kKeyTile;
    s.rows.resize(size_t(nq) * row_stride);
    TileQueries tq;
    tq.q0 = q0;
    tq.nq = nq;
    tq.stride = heads;
    tq.eq = s.eq.data();
    tq.ew = s.ew.data();
    tq.ne = s.ne.data();
    tq.last_key = s.last.data();
    if (cfg.mode == SelectionMode::kHisa) {
      tq.kept = s.kept.data();
      tq.kept_stride = hisa_blocks;
      tq.hisa_block = cfg.hisa_block;
    }
    tq.rows = s.rows.data();
    tq.row_stride = row_stride;
    return tq;
  }

  // Top-k (and the second stage of MISA-dagger / the HISA compaction) of query
  // slot i of the tile; writes out[0, topk).
  void Finish(const TileQueries& tq, const TileScratch& s, int i, int32_t* out) const {
    const int64_t n = tq.last_key[i] + 1;
    const float* row = tq.rows + i * tq.row_stride;
    FinishScratch& f = LocalFinishScratch();
    switch (cfg.mode) {
      case SelectionMode::kDense:
      case SelectionMode::kMisa:
        FastTopK(row, n, cfg.topk, out);
        return;
      case SelectionMode::kMisaDagger: {
        int64_t nc = std::min<int64_t>(n, cfg.dagger_candidates);
        f.cand.resize(size_t(std::max<int64_t>(nc, 1)));
        if (nc == n) {
          for (int64_t c = 0; c < n; ++c) f.cand[size_t(c)] = int32_t(c);
        } else {
          FastTopK(row, n, int(nc), f.cand.data(), TopKOrder::kByIndex);
        }
        // Stage 2: the exact DSA score of each candidate, all heads in order.
        const float* qf = s.qf.data() + size_t(i) * heads * d_count;
        f.qv.resize(size_t(heads));
        for (int j = 0; j < heads; ++j) f.qv[size_t(j)] = qf + size_t(j) * d_count;
        f.cscore.resize(size_t(nc));
        ScoreRows(f.qv.data(), queries.weights + (tq.q0 + i) * heads, heads, d_count,
                  buf->rows.data(), buf->scales.data(), f.cand.data(), nc, f.cscore.data(), &f.qt);
        f.sel.resize(size_t(cfg.topk));
        const int valid = FastTopK(f.cscore.data(), nc, cfg.topk, f.sel.data());
        for (int r = 0; r < valid; ++r) out[r] = f.cand[size_t(f.sel[size_t(r)])];
        std::fill(out + valid, out + cfg.topk, -1);
        return;
      }
      case SelectionMode::kHisa: {
        const uint8_t* kept = tq.kept + i * tq.kept_stride;
        const int64_t nvis = (n - 1) / cfg.hisa_block + 1;
        f.cand.clear();
        f.cscore.clear();
        for (int64_t b = 0; b < nvis; ++b) {
          if (!kept[b]) continue;
          const int64_t e = std::min<int64_t>((b + 1) * cfg.hisa_block, n);
          for (int64_t k = b * cfg.hisa_block; k < e; ++k) {
            f.cand.push_back(int32_t(k));
            f.cscore.push_back(row[k]);
          }
        }
        f.sel.resize(size_t(cfg.topk));
        const int valid = FastTopK(f.cscore.data(), int64_t(f.cscore.size()), cfg.topk, f.sel.data());
        for (int r = 0; r < valid; ++r) out[r] = f.cand[size_t(f.sel[size_t(r)])];
        std::fill(out + valid, out + cfg.topk, -1);
        return;
      }
    }
  }
};

}  // namespace
}  // namespace internal

using internal::FastTopK;
using internal::kKeyTile;
using internal::kQueryTile;

// ---------------------------------------------------------------------------

void IndexerPrep(const IndexerPrepInputs& in, int heads, const IndexKeyCacheRef& cache,
                 uint8_t* q8, float* weights) {
  const std::string err = ValidateIndexerPrep(in, heads, cache);
  if (!err.empty()) internal::Fail(err);
  if (in.num_tokens > 0) {
    internal::Require(q8 != nullptr, "IndexerPrep: q8 output is null");
    internal::Require(weights != nullptr, "IndexerPrep: weights output is null");
  }
  const KvLayout& l = cache.layout;
  const int d_count = l.index_head_dim;
  const int half = in.rope_dim / 2;
  const float d_scale = float(1.0 / std::sqrt(double(d_count)));
  const float h_scale = float(1.0 / std::sqrt(double(heads)));
  std::vector<float> x(d_count), cs(half), sn(half);
  std::vector<uint8_t> q(d_count);

  // RoPE (half-split pairs (i, i + half)), Hadamard * D^-0.5, FP8 e4m3 with one
  // ue8m0 scale; returns the scale. Every multiply-add is an explicit fma so the
  // bits do not depend on the compiler's contraction or the target ISA.
  auto finish_vector = [&](float* v, uint8_t* out) {
    for (int i = 0; i < half; ++i) {
      const float a = v[i], b = v[i + half];
      v[i] = std::fma(a, cs[size_t(i)], -(b * sn[size_t(i)]));
      v[i + half] = std::fma(a, sn[size_t(i)], b * cs[size_t(i)]);
    }
    for (int h = 1; h < d_count; h <<= 1) {
      for (int i = 0; i < d_count; i += 2 * h) {
        for (int j = i; j < i + h; ++j) {
          const float a = v[j], b = v[j + h];
          v[j] = a + b;
          v[j + h] = a - b;
        }
      }
    }
    float amax = 0.0f;
    for (int d = 0; d < d_count; ++d) {
      v[d] *= d_scale;
      amax = std::max(amax, std::fabs(v[d]));
    }
    const float scale = Fp8Scale(amax, true);
    for (int d = 0; d < d_count; ++d) out[d] = FloatToFp8E4M3(v[d] / scale);
    return scale;
  };

  for (int64_t t = 0; t < in.num_tokens; ++t) {
    const int64_t pos = in.positions[t];
    for (int i = 0; i < half; ++i) {
      const float angle = float(pos) * in.inv_freq[i];
      cs[size_t(i)] = std::cos(angle);
      sn[size_t(i)] = std::sin(angle);
    }
    // Key: LayerNorm (biased variance; statistics accumulated in double).
    const float* kp = in.k_proj + t * d_count;
    double mean = 0.0;
    for (int d = 0; d < d_count; ++d) mean += kp[d];
    mean /= d_count;
    double var = 0.0;
    for (int d = 0; d < d_count; ++d) var = std::fma(kp[d] - mean, kp[d] - mean, var);
    var /= d_count;
    const float mean_f = float(mean);
    const float rstd = float(1.0 / std::sqrt(var + double(in.ln_eps)));
    for (int d = 0; d < d_count; ++d) {
      x[size_t(d)] = std::fma((kp[d] - mean_f) * rstd, in.ln_gamma[d], in.ln_beta[d]);
    }
    const float k_scale = finish_vector(x.data(), q.data());
    uint8_t* page = cache.pool + size_t(cache.page_table[pos / kPageTokens]) * l.IndexPageBytes();
    const int slot = int(pos % kPageTokens);
    std::memcpy(page + l.IndexValueOffset(slot), q.data(), size_t(d_count));
    std::memcpy(page + l.IndexScaleOffset(slot), &k_scale, 4);
    // Queries, one scale per head.
    for (int j = 0; j < heads; ++j) {
      const size_t o = (size_t(t) * heads + j) * d_count;
      std::copy(in.q_proj + o, in.q_proj + o + d_count, x.begin());
      const float q_scale = finish_vector(x.data(), q8 + o);
      weights[t * heads + j] = in.w_proj[t * heads + j] * h_scale * q_scale * d_scale;
    }
  }
}

void UpdateSummaries(const IndexKeyCacheRef& cache, int64_t from, int64_t to) {
  if (to <= from) return;
  internal::Require(from >= 0, "UpdateSummaries: from must be >= 0");
  internal::Require(cache.pool != nullptr && cache.page_table != nullptr,
                    "UpdateSummaries: cache.pool or cache.page_table is null");
  internal::Require(cache.summary_sums != nullptr, "UpdateSummaries: cache.summary_sums is null");
  internal::Require(cache.layout.summary_block >= 1, "UpdateSummaries: layout.summary_block must be >= 1");
  const IndexKeyCacheView v = internal::AsView(cache, to);
  const int d_count = cache.layout.index_head_dim;
  const int block = cache.layout.summary_block;
  for (int64_t s = from; s < to; ++s) {
    float* sum = cache.summary_sums + (s / block) * d_count;
    if (s % block == 0) std::fill(sum, sum + d_count, 0.0f);
    internal::AccumulateKey(internal::KeyValues(v, s), internal::KeyScale(v, s), d_count, sum);
  }
}

void RoutedScores(const IndexKeyCacheView& cache, const uint8_t* q8, const float* w,
                  const int32_t* head_list, int num_heads, const int32_t* keys, int64_t n,
                  float* out) {
  if (n <= 0) return;
  internal::Require(n <= cache.num_tokens || keys != nullptr,
                    "RoutedScores: n exceeds cache.num_tokens");
  internal::Require(q8 != nullptr && w != nullptr && out != nullptr,
                    "RoutedScores: q8, w or out is null");
  internal::Require(num_heads >= 0 && (num_heads == 0 || head_list != nullptr),
                    "RoutedScores: head_list is null or num_heads < 0");
  const int d_count = cache.layout.index_head_dim;
  std::vector<float> qf(size_t(num_heads) * d_count);
  std::vector<const float*> qv(num_heads);
  std::vector<float> wv(num_heads);
  for (int e = 0; e < num_heads; ++e) {
    internal::Require(head_list[e] >= 0 && (e == 0 || head_list[e] > head_list[e - 1]),
                      "RoutedScores: head_list must be ascending, non-negative, distinct");
    internal::DecodeVector(q8 + size_t(head_list[e]) * d_count, d_count, qf.data() + size_t(e) * d_count);
    qv[size_t(e)] = qf.data() + size_t(e) * d_count;
    wv[size_t(e)] = w[head_list[e]];
  }
  if (keys != nullptr) {
    std::vector<float> rows(size_t(n) * d_count), scales(n);
    for (int64_t c = 0; c < n; ++c) {
      internal::Require(keys[c] >= 0 && keys[c] < cache.num_tokens,
                        "RoutedScores: keys[] must be in [0, cache.num_tokens)");
      internal::DecodeVector(internal::KeyValues(cache, keys[c]), d_count, rows.data() + c * d_count);
      scales[size_t(c)] = internal::KeyScale(cache, keys[c]);
    }
    std::vector<float> qt;
    internal::ScoreRows(qv.data(), wv.data(), num_heads, d_count, rows.data(), scales.data(), nullptr,
                        n, out, &qt);
    return;
  }
  const int64_t key_tiles = CeilDiv(n, kKeyTile);
  std::vector<float> tiles(size_t(key_tiles) * d_count * kKeyTile), scales(size_t(key_tiles) * kKeyTile);
  internal::DecodeKeyTiles(cache, n, 0, key_tiles, tiles.data(), scales.data());
  std::vector<float> row(size_t(key_tiles) * kKeyTile);
  const int64_t last = n - 1;
  const int ne = num_heads;
  internal::TileQueries tq;
  tq.nq = 1;
  tq.stride = std::max(num_heads, 1);
  tq.eq = qv.data();
  tq.ew = wv.data();
  tq.ne = &ne;
  tq.last_key = &last;
  tq.rows = row.data();
  tq.row_stride = int64_t(row.size());
  internal::ScoreRange(tiles.data(), scales.data(), d_count, tq, 0, key_tiles);
  std::copy(row.begin(), row.begin() + n, out);
}

void DenseScores(const IndexKeyCacheView& cache, const uint8_t* q8, const float* w, int heads,
                 int64_t n, float* out) {
  std::vector<int32_t> all(size_t(std::max(heads, 0)));
  for (int j = 0; j < heads; ++j) all[size_t(j)] = j;
  RoutedScores(cache, q8, w, all.data(), heads, nullptr, n, out);
}

void MisaRouterScores(const IndexKeyCacheView& cache, const uint8_t* q8, const float* w,
                      int heads, int64_t pos, float* r) {
  internal::Require(heads >= 1, "MisaRouterScores: heads must be >= 1");
  internal::Require(pos >= 0, "MisaRouterScores: pos must be >= 0");
  internal::Require(cache.layout.summary_block >= 1, "MisaRouterScores: layout.summary_block must be >= 1");
  const int d_count = cache.layout.index_head_dim;
  const int64_t nb = std::min(CeilDiv(cache.num_tokens, cache.layout.summary_block),
                              pos / cache.layout.summary_block + 1);
  internal::Require(nb <= 0 || cache.summary_sums != nullptr, "MisaRouterScores: cache.summary_sums is null");
  std::vector<float> qf(size_t(heads) * d_count), tiles;
  internal::DecodeVector(q8, int64_t(heads) * d_count, qf.data());
  internal::SummaryMeanTiles(cache, std::max<int64_t>(nb, 0), &tiles);
  internal::RouterScores(qf.data(), w, heads, d_count, tiles.data(), std::max<int64_t>(nb, 0), r);
}

void MisaActiveHeads(const float* r, int heads, int h, int32_t* active) {
  h = std::clamp(h, 0, std::max(heads, 0));
  std::vector<uint64_t> keys(size_t(std::max(heads, 0)));
  for (int j = 0; j < heads; ++j) keys[size_t(j)] = internal::ScoreOrderKey(r[j], j);
  std::partial_sort(keys.begin(), keys.begin() + h, keys.end());
  for (int e = 0; e < h; ++e) active[e] = int32_t(keys[size_t(e)] & 0xffffffffu);
  std::sort(active, active + h);
}

void SelectTokens(const SelectionConfig& cfg, const IndexKeyCacheView& cache,
                  const IndexerQueries& queries, int32_t* out, ThreadPool* pool) {
  const std::string err = ValidateSelectTokens(cfg, cache, queries);
  if (!err.empty()) internal::Fail(err);
  const int64_t num_q = queries.num_queries;
  if (num_q == 0) return;
  internal::Require(out != nullptr, "SelectTokens: out is null");
  internal::Selector sel(cfg, cache, queries);
  sel.Prepare(pool);
  const int64_t q_tiles = CeilDiv(num_q, kQueryTile);
  const int threads = pool == nullptr ? 1 : pool->num_threads();
  if (threads == 1 || q_tiles >= 2 * threads) {
    // Prefill: query tiles in parallel, each scores its keys and runs its top-k.
    ParallelFor(pool, q_tiles, 1, [&](int64_t t0, int64_t t1) {
      internal::TileScratch& s = internal::LocalTileScratch();
      for (int64_t qt = t0; qt < t1; ++qt) {
        const int64_t q0 = qt * kQueryTile;
        const int nq = int(std::min<int64_t>(kQueryTile, num_q - q0));
        const internal::TileQueries tq = sel.PrepareTile(q0, nq, s);
        internal::ScoreRange(sel.buf->tiles.data(), sel.buf->scales.data(), sel.d_count, tq, 0,
                             CeilDiv(tq.row_stride, kKeyTile));
        for (int i = 0; i < nq; ++i) sel.Finish(tq, s, i, out + (q0 + i) * cfg.topk);
      }
    });
    return;
  }
  // Few queries (decode): split each tile's keys across the threads.
  internal::TileScratch& s = internal::LocalTileScratch();
  for (int64_t qt = 0; qt < q_tiles; ++qt) {
    const int64_t q0 = qt * kQueryTile;
    const int nq = int(std::min<int64_t>(kQueryTile, num_q - q0));
    const internal::TileQueries tq = sel.PrepareTile(q0, nq, s);
    const int64_t kt = CeilDiv(tq.row_stride, kKeyTile);
    const int64_t grain = std::max<int64_t>(16, kt / (4 * threads));
    ParallelFor(pool, kt, grain, [&](int64_t a, int64_t b) {
      internal::ScoreRange(sel.buf->tiles.data(), sel.buf->scales.data(), sel.d_count, tq, a, b);
    });
    ParallelFor(pool, nq, 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) sel.Finish(tq, s, int(i), out + (q0 + i) * cfg.topk);
    });
  }
}

}  // namespace cpu
}  // namespace pd::kernels
