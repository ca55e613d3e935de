// Small std + CUDA helpers for the kernel benchmarks: CUDA-event timing
// (median of many runs), a results table and a JSON writer.
#ifndef PD_BENCH_KERNELS_BENCH_UTIL_H_
#define PD_BENCH_KERNELS_BENCH_UTIL_H_

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace pd::bench {

inline void CudaCheck(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s:%d: %s: %s\n", file, line, what, cudaGetErrorString(e));
    std::exit(2);
  }
}
#define PD_BENCH_CUDA(expr) ::pd::bench::CudaCheck((expr), #expr, __FILE__, __LINE__)

// Times fn(rep) with CUDA events: `warmup` untimed calls, then `reps` timed
// calls, each bracketed by its own events; returns every time in ms (sorted).
inline std::vector<double> TimeMs(const std::function<void(int)>& fn, int warmup, int reps,
                                  cudaStream_t stream = 0) {
  for (int i = 0; i < warmup; ++i) fn(i);
  PD_BENCH_CUDA(cudaStreamSynchronize(stream));
  std::vector<cudaEvent_t> ev(2 * size_t(reps));
  for (auto& e : ev) PD_BENCH_CUDA(cudaEventCreate(&e));
  for (int i = 0; i < reps; ++i) {
    PD_BENCH_CUDA(cudaEventRecord(ev[2 * size_t(i)], stream));
    fn(warmup + i);
    PD_BENCH_CUDA(cudaEventRecord(ev[2 * size_t(i) + 1], stream));
  }
  PD_BENCH_CUDA(cudaStreamSynchronize(stream));
  PD_BENCH_CUDA(cudaGetLastError());
  std::vector<double> ms(static_cast<size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    float t = 0.0f;
    PD_BENCH_CUDA(cudaEventElapsedTime(&t, ev[2 * size_t(i)], ev[2 * size_t(i) + 1]));
    ms[size_t(i)] = t;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  std::sort(ms.begin(), ms.end());
  return ms;
}

inline double Median(const std::vector<double>& sorted) {
  if (sorted.empty()) return 0.0;
  const size_t n = sorted.size();
  return n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
}

// One result row: ordered string fields and numeric fields.
struct Row {
  std::vector<std::pair<std::string, std::string>> text;
  std::vector<std::pair<std::string, double>> num;
  Row& S(const std::string& k, const std::string& v) {
    text.emplace_back(k, v);
    return *this;
  }
  Row& N(const std::string& k, double v) {
    num.emplace_back(k, v);
    return *this;
  }
};

inline std::string JsonEscape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '"' || c == '\\') o += '\\';
    o += c;
  }
  return o;
}

// Writes {"meta": {...}, "rows": [{...}, ...]}.
inline bool WriteJson(const std::string& path, const std::map<std::string, std::string>& meta,
                      const std::vector<Row>& rows) {
  FILE* f = std::fopen(path.c_str(), "w");
  if (f == nullptr) return false;
  std::fprintf(f, "{\n  \"meta\": {");
  bool first = true;
  for (const auto& [k, v] : meta) {
    std::fprintf(f, "%s\n    \"%s\": \"%s\"", first ? "" : ",", JsonEscape(k).c_str(),
                 JsonEscape(v).c_str());
    first = false;
  }
  std::fprintf(f, "\n  },\n  \"rows\": [");
  for (size_t i = 0; i < rows.size(); ++i) {
    std::fprintf(f, "%s\n    {", i ? "," : "");
    bool f1 = true;
    for (const auto& [k, v] : rows[i].text) {
      std::fprintf(f, "%s\"%s\": \"%s\"", f1 ? "" : ", ", JsonEscape(k).c_str(),
                   JsonEscape(v).c_str());
      f1 = false;
    }
    for (const auto& [k, v] : rows[i].num) {
      std::fprintf(f, "%s\"%s\": %.6g", f1 ? "" : ", ", JsonEscape(k).c_str(), v);
      f1 = false;
    }
    std::fprintf(f, "}");
  }
  std::fprintf(f, "\n  ]\n}\n");
  std::fclose(f);
  return true;
}

}  // namespace pd::bench

#endif  // PD_BENCH_KERNELS_BENCH_UTIL_H_
