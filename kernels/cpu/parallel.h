// A fixed pool of worker threads for the CPU backend (std only).
#ifndef PD_KERNELS_CPU_PARALLEL_H_
#define PD_KERNELS_CPU_PARALLEL_H_

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace pd::kernels::cpu {

// Runs ParallelFor loops on `num_threads` threads (the caller's thread is one of
// them). One ParallelFor at a time per pool: concurrent calls from different
// threads are serialised. Nested ParallelFor on the same pool runs inline.
class ThreadPool {
 public:
  // num_threads <= 0 means std::thread::hardware_concurrency() (at least 1), or
  // the PD_CPU_THREADS environment variable when set.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Calls fn(begin, end) over disjoint chunks covering [0, n), chunks of at most
  // `grain` items, dynamically scheduled. Returns when all chunks are done.
  void ParallelFor(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

  // The process-wide default pool.
  static ThreadPool* Default();

 private:
  void WorkerLoop();
  void RunChunks();

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // serialises ParallelFor callers
  std::mutex mu_;
  std::condition_variable cv_work_;
  std::condition_variable cv_done_;
  // Current job, guarded by mu_ (next_ is claimed under mu_ too).
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, grain_ = 1, next_ = 0;
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// ParallelFor on `pool`, or inline when pool is null.
inline void ParallelFor(ThreadPool* pool, int64_t n, int64_t grain,
                        const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (pool == nullptr || pool->num_threads() == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  pool->ParallelFor(n, grain, fn);
}

}  // namespace pd::kernels::cpu

#endif  // PD_KERNELS_CPU_PARALLEL_H_
