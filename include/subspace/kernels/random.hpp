#pragma once
// Random fills from the counter-based Philox stream (seed, offset) of core/rng.hpp.
//
// Element i of x, counted in row-major order whatever the strides, becomes
//   T(rng::uniform_at(seed, offset, i, lo, hi))   for fill_uniform,
//   T(rng::normal_at(seed, offset, i, mean, std)) for fill_normal,
// on the host and on the device alike, so host and CUDA fills are bit-identical. Give every fill its own
// offset (or seed): fills with the same (seed, offset) produce the same numbers.
//
// Host: one Philox block gives four consecutive elements (uniform4 / normal4). CUDA (detail/cuda/random.cuh):
// one thread per block of four, contiguous views only.

#include <cstdint>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/executor.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "elementwise.hpp"

namespace subspace {

namespace detail::random {

/// The uniform draws on [lo, hi): block b gives elements 4b .. 4b + 3.
struct uniform_draw {
  float lo, hi;
  SUBSPACE_HD void operator()(std::uint64_t seed, std::uint64_t offset, std::uint64_t block, float out[4]) const {
    rng::uniform4(seed, offset, block, lo, hi, out);
  }
};
/// The normal draws N(mean, std^2): block b gives elements 4b .. 4b + 3.
struct normal_draw {
  float mean, std;
  SUBSPACE_HD void operator()(std::uint64_t seed, std::uint64_t offset, std::uint64_t block, float out[4]) const {
    rng::normal4(seed, offset, block, mean, std, out);
  }
};

/// Writes draw's element i to the element of x at row-major position i, four at a time.
template <class T, class Draw>
void fill_random(view<T, host_space> x, std::uint64_t seed, std::uint64_t offset, Draw draw) {
  float block[4];
  std::uint64_t i = 0;
  for_each_offset(x.shape(), x.strides(), x.strides(), [&](std::int64_t a, std::int64_t) {
    if (i % 4 == 0) draw(seed, offset, i / 4, block);
    x.data()[a] = T(block[i % 4]);
    ++i;
  });
}

}  // namespace detail::random

/// Element i (row-major) of x <- T(rng::uniform_at(seed, offset, i, lo, hi)).
template <class T>
  requires is_element_v<T>
void fill_uniform(const exec::host&, view<T, host_space> x, std::uint64_t seed, std::uint64_t offset, float lo = 0.0f,
                  float hi = 1.0f) {
  detail::random::fill_random(x, seed, offset, detail::random::uniform_draw{lo, hi});
}

/// Element i (row-major) of x <- T(rng::normal_at(seed, offset, i, mean, std)).
template <class T>
  requires is_element_v<T>
void fill_normal(const exec::host&, view<T, host_space> x, std::uint64_t seed, std::uint64_t offset, float mean = 0.0f,
                 float std = 1.0f) {
  detail::random::fill_random(x, seed, offset, detail::random::normal_draw{mean, std});
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/random.cuh"
#endif
