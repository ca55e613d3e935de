// Internal pieces of the CPU indexer (kernels/cpu/indexer.cc) that its tests
// exercise directly. Not part of the kernel API.
#ifndef PD_KERNELS_CPU_INTERNAL_INDEXER_INTERNAL_H_
#define PD_KERNELS_CPU_INTERNAL_INDEXER_INTERNAL_H_

#include <cstdint>
#include <cstring>

namespace pd::kernels::cpu::internal {

// Keys per tile of the blocked scorer: tile values are stored [D][kKeyTile]
// (key index fastest), so one query value multiplies kKeyTile keys at once.
inline constexpr int kKeyTile = 16;
// Queries per tile of the blocked scorer (each key tile is reused by all of them).
inline constexpr int kQueryTile = 16;

enum class TopKOrder : uint8_t {
  kByScore,  // score descending, ties to the lower index (cpu::TopK's order)
  kByIndex,  // the same set, in ascending index order
};

// Same contract as cpu::TopK (ops.h): the min(k, n) best indices of scores[0, n)
// by score descending, ties to the lower index, NaN last, then -1 up to k;
// returns the number of valid indices. Uses a threshold from strided group
// maxima (the k-th largest group maximum is a lower bound of the k-th largest
// score) so only a few candidates are sorted. With kByIndex the valid indices
// (the same set) are written in ascending index order.
int FastTopK(const float* scores, int64_t n, int k, int32_t* out,
             TopKOrder order = TopKOrder::kByScore);

// Sort key for the order above: a smaller key is a better (score, index) pair.
// +0 and -0 compare equal; NaN is worse than every number.
inline uint64_t ScoreOrderKey(float score, int32_t index) {
  uint32_t key = 0xffffffffu;  // NaN
  if (!(score != score)) {
    uint32_t u;
    const float x = score == 0.0f ? 0.0f : score;  // -0 ties with +0
    std::memcpy(&u, &x, 4);
    const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    key = ~ascending;
  }
  return (uint64_t(key) << 32) | uint32_t(index);
}

}  // namespace pd::kernels::cpu::internal

#endif  // PD_KERNELS_CPU_INTERNAL_INDEXER_INTERNAL_H_
