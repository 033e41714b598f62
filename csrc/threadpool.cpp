#include "threadpool.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <system_error>

namespace shortrt {
namespace {

// True on pool workers and on a caller while it runs chunks: a nested
// parallel_for then runs serially instead of waiting on itself.
thread_local bool t_inside_pool = false;

// How long an idle worker (or a waiting caller) spins before it sleeps. Decode
// issues a matmul every few microseconds, so a short spin keeps the hand-off
// cheap; beyond that the CPU is better given back to the machine.
constexpr auto kSpinTime = std::chrono::microseconds(200);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() holds or kSpinTime has passed; returns pred().
template <class Pred>
bool spin_until(Pred pred) {
  auto start = std::chrono::steady_clock::now();
  for (int i = 1;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if (i % 64 == 0) {
      // Reading the clock costs more than a pause, so only every 64 rounds.
      if (std::chrono::steady_clock::now() - start > kSpinTime) return pred();
      // On an oversubscribed machine the thread we wait for may be waiting for
      // this core: let it run. With nothing else runnable this returns at once.
      std::this_thread::yield();
    }
  }
}

void run_serial(int64_t n, int64_t grain, void* ctx, void (*fn)(void*, int64_t, int64_t)) {
  for (int64_t begin = 0; begin < n; begin += grain) fn(ctx, begin, std::min(n, begin + grain));
}

// SHORTRT_TEST_FAIL_THREAD=k: the worker whose start is made to fail (0 = none).
int injected_thread_failure() {
  const char* env = std::getenv("SHORTRT_TEST_FAIL_THREAD");
  return env ? std::atoi(env) : 0;
}

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = static_cast<int>(std::thread::hardware_concurrency());
  n_threads_ = std::max(1, n_threads);
  const int n_workers = n_threads_ - 1, fail_at = injected_thread_failure();
  workers_.reserve(n_workers);
  for (int i = 1; i <= n_workers; ++i) {
    try {
      if (i == fail_at)
        throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again),
                                "SHORTRT_TEST_FAIL_THREAD");
      workers_.emplace_back([this] { worker_main(); });
    } catch (const std::system_error& e) {
      // A std::thread destroyed while joinable terminates the process: stop and
      // join the workers that did start before reporting.
      stop_workers();
      throw std::system_error(e.code(), "could not start worker thread " + std::to_string(i) + " of " +
                                            std::to_string(n_workers) + " for threads=" +
                                            std::to_string(n_threads_) + " (ask for fewer threads)");
    }
  }
}

ThreadPool::~ThreadPool() { stop_workers(); }

void ThreadPool::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_.store(true, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  for (auto& worker : workers_) worker.join();
  workers_.clear();
}

void ThreadPool::parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  using Fn = const std::function<void(int64_t, int64_t)>;
  run(n, grain, const_cast<void*>(static_cast<const void*>(&f)),
      [](void* ctx, int64_t begin, int64_t end) { (*static_cast<Fn*>(ctx))(begin, end); });
}

void ThreadPool::run(int64_t n, int64_t grain, void* ctx, ChunkFn fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  if (n_threads_ == 1 || n <= grain || t_inside_pool) {
    run_serial(n, grain, ctx, fn);
    return;
  }

  std::lock_guard<std::mutex> call_lock(call_mutex_);
  job_ctx_ = ctx;
  job_fn_ = fn;
  job_n_ = n;
  job_grain_ = grain;
  error_ = nullptr;
  next_.store(0, std::memory_order_relaxed);
  exits_.store(0, std::memory_order_relaxed);
  entry_.store(0, std::memory_order_release);  // open: publishes the job fields to joining workers
  {
    // Bumping under the mutex means a worker that is about to sleep either
    // sees the new generation or is already waiting when notify_all runs.
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();

  t_inside_pool = true;
  run_chunks();
  t_inside_pool = false;

  // No chunk is left to hand out. Close the job and wait for the workers that
  // joined it: they may still be running their last chunk, and they read the
  // job fields, which the next call overwrites.
  const uint32_t joined = entry_.fetch_or(kJobClosed, std::memory_order_acq_rel) & ~kJobClosed;
  // seq_cst load: with the store to caller_waiting_ below and the worker's
  // fetch_add + load, either this sees the last exit or that worker sees us waiting.
  auto all_done = [this, joined] { return exits_.load() == joined; };
  if (!spin_until(all_done)) {
    caller_waiting_.store(true);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, all_done);
    caller_waiting_.store(false, std::memory_order_relaxed);
  }
  if (error_) std::rethrow_exception(error_);
}

void ThreadPool::run_chunks() {
  const int64_t n = job_n_, grain = job_grain_;
  for (;;) {
    int64_t begin = next_.fetch_add(grain, std::memory_order_relaxed);
    if (begin >= n) return;
    try {
      job_fn_(job_ctx_, begin, std::min(n, begin + grain));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex_);
      if (!error_) error_ = std::current_exception();
      next_.store(n, std::memory_order_relaxed);  // skip the chunks not yet started
    }
  }
}

bool ThreadPool::try_join() {
  uint32_t state = entry_.load(std::memory_order_relaxed);
  while (!(state & kJobClosed))
    if (entry_.compare_exchange_weak(state, state + 1, std::memory_order_acquire, std::memory_order_relaxed))
      return true;
  return false;
}

void ThreadPool::worker_main() {
  t_inside_pool = true;
  uint64_t seen = 0;
  for (;;) {
    auto new_job = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(new_job)) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, new_job);
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stopping_.load(std::memory_order_relaxed)) return;
    // A worker that wakes late may find the job closed (skip it) or may join
    // the job posted after it: either way it only runs chunks of the open job.
    if (!try_join()) continue;
    run_chunks();
    exits_.fetch_add(1);  // seq_cst: either the caller sees this, or we see caller_waiting_
    if (caller_waiting_.load()) {
      std::lock_guard<std::mutex> lock(mutex_);
      done_.notify_one();
    }
  }
}

}  // namespace shortrt
