// Exact top-k with a total order: score descending, then index ascending; NaN last.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "kernels/ops.h"

namespace pd::kernels::cpu {

int TopK(const float* scores, int64_t n, int k, int32_t* out) {
  if (k <= 0) return 0;
  const int valid = int(std::min<int64_t>(k, std::max<int64_t>(n, 0)));
  auto better = [scores](int32_t a, int32_t b) {
    float sa = scores[a], sb = scores[b];
    bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na != nb) return nb;  // non-NaN first
    if (!na && sa != sb) return sa > sb;
    return a < b;
  };
  if (valid > 0) {
    thread_local std::vector<int32_t> idx;
    idx.resize(size_t(n));
    std::iota(idx.begin(), idx.end(), 0);
    if (valid < n) {
      std::nth_element(idx.begin(), idx.begin() + valid, idx.end(), better);
    }
    std::sort(idx.begin(), idx.begin() + valid, better);
    std::copy(idx.begin(), idx.begin() + valid, out);
  }
  std::fill(out + valid, out + k, -1);
  return valid;
}

}  // namespace pd::kernels::cpu
