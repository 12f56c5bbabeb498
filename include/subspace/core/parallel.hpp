#pragma once
// Host threads: parallel_for, which spreads independent work over an executor's threads, and run_concurrently,
// which runs parts that wait for each other (the ranks of an in-process world) each on its own thread.
//
//   parallel_for(ex, n, [&](std::int64_t begin, std::int64_t end) { for (i = begin; i < end; ++i) ...; });
//
// parallel_for splits [0, n) into k = min(ex.concurrency(), n) contiguous chunks, the same ones on every call with
// the same n and k (chunk c starts at c * (n / k) + min(c, n % k); the first n % k chunks hold one more index), and
// runs body(begin, end) once per chunk, chunk 0 on the calling thread. for_flops(ex, flops) narrows an executor to
// the threads worth starting for a piece of work. Both functions join every thread they start before returning and
// then rethrow the first exception a chunk or a part threw (first in time); the others are dropped.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <exception>
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

/// Runs body(begin, end) on the chunks of [0, n) described at the top of this file, one thread per chunk.
template <class Body>
void parallel_for(const exec::host& ex, std::int64_t n, Body&& body) {
  if (n <= 0) return;
  const std::int64_t k = std::min<std::int64_t>(ex.concurrency(), n);
  if (k == 1) {
    body(std::int64_t(0), n);
    return;
  }
  const std::int64_t size = n / k, extra = n % k;
  const auto begin = [&](std::int64_t c) { return c * size + std::min(c, extra); };
  run_concurrently(int(k), [&](int c) { body(begin(c), begin(c + 1)); });
}

/// `ex` narrowed to the threads worth starting for `flops` of work: a thread costs tens of microseconds to start,
/// so each one gets at least ~4 MFLOP.
inline exec::host for_flops(const exec::host& ex, double flops) {
  const double by_work = std::max(1.0, std::floor(flops / 4.0e6));
  return exec::host{int(std::min(double(ex.concurrency()), by_work))};
}

}  // namespace subspace
