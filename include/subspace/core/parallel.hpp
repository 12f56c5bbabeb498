#pragma once
// Host threads: parallel_for, which spreads independent work over an executor's threads, and run_concurrently,
// which runs parts that wait for each other (the ranks of an in-process world) each on its own thread.
//
//   parallel_for(ex, n, [&](std::int64_t begin, std::int64_t end) { for (i = begin; i < end; ++i) ...; });
//
// parallel_for splits [0, n) into k = min(ex.concurrency(), n) contiguous chunks, the same ones on every call with
// the same n and k (chunk c starts at c * (n / k) + min(c, n % k); the first n % k chunks hold one more index), and
// runs body(begin, end) once per chunk: the calling thread takes chunks, and so do the workers of a pool kept for
// the life of the process (hardware threads − 1 of them, started on first use), so a call costs a wake-up, not a
// thread start. The chunks must not wait for each other (run_concurrently is for parts that do). A call from inside
// a chunk, or from several threads at once, is fine: the caller runs whatever chunks of its own call no worker has
// taken. for_flops(ex, flops) narrows an executor to the threads worth using for a piece of work. Both functions
// return once every chunk or part has finished and then rethrow the first exception one threw (first in time); the
// others are dropped.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "executor.hpp"

namespace subspace {

/// Runs body(i) for every i in [0, n) at the same time, each on its own thread (i = 0 on the calling thread), so
/// the parts may wait for each other. Joins every thread, then rethrows the first exception a part threw.
template <class Body>
void run_concurrently(int n, Body&& body) {
  std::exception_ptr first;
  std::mutex first_mutex;
  const auto part = [&](int i) {
    try {
      body(i);
    } catch (...) {
      const std::lock_guard lock(first_mutex);
      if (!first) first = std::current_exception();
    }
  };
  {
    std::vector<std::jthread> threads;  // joined when the scope ends, also when starting one throws
    threads.reserve(std::size_t(std::max(n - 1, 0)));
    for (int i = 1; i < n; ++i) threads.emplace_back(part, i);
    if (n > 0) part(0);
  }
  if (first) std::rethrow_exception(first);
}

namespace detail {

/// One parallel_for call: k chunks, claimed one at a time by the caller and by the pool's workers. Shared with the
/// workers (a worker may pick the job up after its last chunk is claimed; it then finds nothing to do).
struct pool_job {
  void (*run)(void* body, std::int64_t chunk) = nullptr;
  void* body = nullptr;
  std::int64_t chunks = 0;
  std::atomic<std::int64_t> next{0}, done{0};
  std::exception_ptr first;
  std::mutex mutex;  // guards `first`; with `finished`, the caller's wait
  std::condition_variable finished;

  /// Runs chunks until none is left unclaimed.
  void work() {
    for (std::int64_t c = next++; c < chunks; c = next++) {
      try {
        run(body, c);
      } catch (...) {
        const std::lock_guard lock(mutex);
        if (!first) first = std::current_exception();
      }
      if (++done == chunks) {
        const std::lock_guard lock(mutex);
        finished.notify_all();
      }
    }
  }
};

/// The process's workers for parallel_for (hardware threads − 1; none on one core).
class host_pool {
 public:
  static host_pool& instance() {
    static host_pool pool(int(std::max(1u, std::thread::hardware_concurrency())) - 1);
    return pool;
  }
  host_pool(const host_pool&) = delete;
  host_pool& operator=(const host_pool&) = delete;
  ~host_pool() {
    {
      const std::lock_guard lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

  /// Runs job's chunks on the caller and on up to helpers workers; returns when every chunk has finished.
  void run(const std::shared_ptr<pool_job>& job, int helpers) {
    helpers = std::min(helpers, int(workers_.size()));
    if (helpers > 0) {
      {
        const std::lock_guard lock(mutex_);
        for (int i = 0; i < helpers; ++i) queue_.push_back(job);
      }
      if (helpers == 1) wake_.notify_one();
      else wake_.notify_all();
    }
    job->work();
    std::unique_lock lock(job->mutex);
    job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
  }

 private:
  explicit host_pool(int n) {
    for (int i = 0; i < n; ++i) workers_.emplace_back([this] { serve(); });
  }
  void serve() {
    for (;;) {
      std::shared_ptr<pool_job> job;
      {
        std::unique_lock lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job->work();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<pool_job>> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace detail

/// Runs body(begin, end) on the chunks of [0, n) described at the top of this file, on the caller and the pool.
template <class Body>
void parallel_for(const exec::host& ex, std::int64_t n, Body&& body) {
  if (n <= 0) return;
  const std::int64_t k = std::min<std::int64_t>(ex.concurrency(), n);
  if (k == 1) {
    body(std::int64_t(0), n);
    return;
  }
  const std::int64_t size = n / k, extra = n % k;
  struct chunked {
    Body& body;
    std::int64_t size, extra;
    std::int64_t begin(std::int64_t c) const { return c * size + std::min(c, extra); }
  } chunks{body, size, extra};
  auto job = std::make_shared<detail::pool_job>();
  job->run = [](void* p, std::int64_t c) {
    const auto& ch = *static_cast<chunked*>(p);
    ch.body(ch.begin(c), ch.begin(c + 1));
  };
  job->body = &chunks;
  job->chunks = k;
  detail::host_pool::instance().run(job, int(k - 1));
  if (job->first) std::rethrow_exception(job->first);
}

/// `ex` narrowed to the threads worth using for `flops` of work: handing a chunk to a worker costs microseconds,
/// so each one gets at least ~4 MFLOP.
inline exec::host for_flops(const exec::host& ex, double flops) {
  const double by_work = std::max(1.0, std::floor(flops / 4.0e6));
  return exec::host{int(std::min(double(ex.concurrency()), by_work))};
}

}  // namespace subspace
