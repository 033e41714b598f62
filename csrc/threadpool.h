// One persistent pool of worker threads for the runtime's parallel loops.
//
// Workers are created once and live as long as the pool. Between jobs they
// spin for a short while (the next matmul of a decode step usually follows
// within microseconds) and then sleep on a condition variable, so an idle
// engine costs no CPU. Posting a job allocates nothing.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace shortrt {

class ThreadPool {
 public:
  // n_threads <= 0 -> std::thread::hardware_concurrency(). The thread that calls
  // parallel_for is one of the n_threads, so n_threads - 1 workers are started.
  // When the OS refuses a thread, the workers already started are stopped and
  // joined and std::system_error is thrown, naming the worker and the count.
  // Test hook: SHORTRT_TEST_FAIL_THREAD=k makes starting worker k (1-based)
  // fail that way, since tests run as root, where process limits never bite.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls f(begin, end) on disjoint chunks of at most `grain` items that together
  // cover [0, n). Chunks are handed out from an atomic counter to the workers and
  // the caller; the call runs serially on the caller when n <= grain, when
  // size() == 1, or when made from inside a chunk of a parallel_for (so nested
  // loops cannot deadlock).
  // Blocks until every chunk is done; rethrows the first exception f threw.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& f);

  // The same for any callable f(int64_t, int64_t), without wrapping it in a
  // std::function (which allocates when the lambda captures more than 16 bytes).
  template <class F, class = std::enable_if_t<!std::is_same_v<std::decay_t<F>, std::function<void(int64_t, int64_t)>>>>
  void parallel_for(int64_t n, int64_t grain, F&& f) {
    using Fn = std::remove_reference_t<F>;
    run(n, grain, const_cast<void*>(static_cast<const void*>(&f)),
        [](void* ctx, int64_t begin, int64_t end) { (*static_cast<Fn*>(ctx))(begin, end); });
  }

 private:
  using ChunkFn = void (*)(void* ctx, int64_t begin, int64_t end);

  void run(int64_t n, int64_t grain, void* ctx, ChunkFn fn);
  void run_chunks();  // take chunks of the current job until none is left
  bool try_join();    // a worker enters the current job unless it is closed
  void worker_main();
  void stop_workers();  // wake every worker to exit, and join them

  int n_threads_ = 1;
  std::vector<std::thread> workers_;

  std::mutex call_mutex_;  // one job at a time when several threads share the pool
  std::mutex mutex_;       // pairs with the two condition variables
  std::condition_variable wake_;  // workers sleep here between jobs
  std::condition_variable done_;  // the caller sleeps here until the last worker finishes

  // The current job. Written by the caller before generation_ is bumped
  // (release) and read by workers after they see the new generation (acquire).
  void* job_ctx_ = nullptr;
  ChunkFn job_fn_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_grain_ = 1;
  std::atomic<int64_t> next_{0};  // first item not yet handed out

  // A worker joins a job by incrementing `entry_` while kJobClosed is clear;
  // the caller, once it finds no chunk left, sets kJobClosed and waits only for
  // the workers that joined. A worker the OS has not scheduled yet therefore
  // never delays the caller (the machine may be shared and oversubscribed).
  static constexpr uint32_t kJobClosed = 1u << 31;
  std::atomic<uint32_t> entry_{kJobClosed};
  std::atomic<uint32_t> exits_{0};       // workers that joined and have left the job
  std::atomic<bool> caller_waiting_{false};  // the caller sleeps on done_: exiting workers must notify
  std::atomic<uint64_t> generation_{0};  // bumped once per job (and once at shutdown) to wake workers
  std::atomic<bool> stopping_{false};

  std::mutex error_mutex_;
  std::exception_ptr error_;  // first exception thrown by a chunk of the current job
};

}  // namespace shortrt
