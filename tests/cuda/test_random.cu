// CUDA random fills are bit-identical to the host fills (and so to rng::uniform_at / normal_at) for odd sizes,
// large seeds and offsets, and misaligned starts; and the portable normal draws themselves are the host's bit for
// bit for 10^6 (seed, counter) pairs, counters near 2^32 and 2^64 among them.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>

#include <subspace/kernels/random.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

using testing::first_difference;
using testing::stream_guard;

/// out[4i .. 4i + 3] = rng::normal4(seeds[i], offsets[i], blocks[i]).
template <class Unused = void>
__global__ void normal4_kernel(std::int64_t n, const std::uint64_t* seeds, const std::uint64_t* offsets,
                               const std::uint64_t* blocks, float* out) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    rng::normal4(seeds[i], offsets[i], blocks[i], 0.0f, 1.0f, out + 4 * i);
}

}  // namespace

TEST_CASE_TEMPLATE("cuda fill_uniform and fill_normal are bit-identical to the host", T, float, bf16, fp16, double) {
  const std::uint64_t seed = testing::fresh_seed() | (std::uint64_t(1) << 63);  // above 2^32: both key words used
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const exec::host hx;
  for (const std::uint64_t offset :
       {std::uint64_t(0), std::uint64_t(7), (std::uint64_t(1) << 32) + 5, std::uint64_t(0xfedcba9876543210ull)}) {
    for (const std::int64_t n : {1, 2, 3, 4, 5, 4097, (1 << 20) + 5}) {
      for (const bool shifted : {false, true}) {
        CAPTURE(offset);
        CAPTURE(n);
        CAPTURE(shifted);
        device_tensor<T> storage({n + 1});
        const view<T, device_space> d(storage.data() + (shifted ? 1 : 0), {n});
        host_tensor<T> h({n});

        fill_uniform(hx, h.v(), seed, offset);
        fill_uniform(ex, d, seed, offset);
        CHECK(first_difference(to_host(ex, d), h) == -1);

        fill_uniform(hx, h.v(), seed, offset, -0.5f, 3.0f);
        fill_uniform(ex, d, seed, offset, -0.5f, 3.0f);
        CHECK(first_difference(to_host(ex, d), h) == -1);

        fill_normal(hx, h.v(), seed, offset);
        fill_normal(ex, d, seed, offset);
        CHECK(first_difference(to_host(ex, d), h) == -1);

        fill_normal(hx, h.v(), seed, offset, 1.0f, 0.02f);
        fill_normal(ex, d, seed, offset, 1.0f, 0.02f);
        const auto got = to_host(ex, d);
        CHECK(first_difference(got, h) == -1);
        // And directly against the reference definition, at both ends.
        CHECK(std::memcmp(got.data(), &h(0), sizeof(T)) == 0);
        const T last = T(rng::normal_at(seed, offset, std::uint64_t(n - 1), 1.0f, 0.02f));
        CHECK(std::memcmp(got.data() + (n - 1), &last, sizeof(T)) == 0);
      }
    }
  }
}

TEST_CASE("cuda random fills of a multi-dimensional tensor count elements in row-major order") {
  const std::uint64_t seed = testing::fresh_seed(), offset = 3ull << 40;
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  device_tensor<bf16> d({3, 5, 7});
  fill_normal(ex, d.v(), seed, offset);
  host_tensor<bf16> h({3, 5, 7});
  fill_normal(exec::host{}, h.v(), seed, offset);
  CHECK(first_difference(to_host(ex, d.v()), h) == -1);
  CHECK(float(h(2, 4, 6)) == float(bf16(rng::normal_at(seed, offset, 3 * 5 * 7 - 1))));
}

TEST_CASE("cuda random fills reject strided views and accept empty ones") {
  stream_guard s;
  const exec::cuda ex{s.stream};
  device_tensor<float> a({4, 6});
  CHECK_THROWS_WITH_AS(fill_uniform(ex, a.v().transposed(), 1, 0),
                       doctest::Contains("fill_uniform: the CUDA path needs a contiguous view; "
                                         "got a strided view of shape [6, 4]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(fill_normal(ex, a.v().transposed(), 1, 0), doctest::Contains("fill_normal: the CUDA path"),
                       invalid_argument);
  CHECK_NOTHROW(fill_normal(ex, device_tensor<float>({0, 4}).v(), 1, 0));
  ex.synchronize();
}

TEST_CASE("portable normal: 10^6 (seed, counter) pairs give the host's bits on the device, counters near 2^32 too") {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  stream_guard s;
  const exec::cuda ex{s.stream};
  const std::int64_t n = 1'000'000;
  host_tensor<std::uint64_t> seeds({n}), offsets({n}), blocks({n});
  for (std::int64_t i = 0; i < n; ++i) {
    const rng::u32x4 r = rng::bits4(seed, 99, std::uint64_t(i));
    const std::uint64_t wide = (std::uint64_t(r.v[0]) << 32) | r.v[1], near = std::uint64_t(r.v[2] % 2048) - 1024;
    const std::uint64_t around_2_32 = (std::uint64_t(1) << 32) + near;
    seeds(i) = (std::uint64_t(r.v[3]) << 32) | r.v[2];
    // Four kinds of (offset, block): random; the block around 2^32; the block around 0 and (wrapped) 2^64; the
    // offset around 2^32.
    const int kind = int(i % 4);
    offsets(i) = kind == 0 ? r.v[2] : kind == 1 ? r.v[3] : kind == 2 ? wide : around_2_32;
    blocks(i) = kind == 0 ? wide : kind == 1 ? around_2_32 : kind == 2 ? near : std::uint64_t(r.v[0]);
  }
  host_tensor<float> want({n, 4});
  for (std::int64_t i = 0; i < n; ++i) rng::normal4(seeds(i), offsets(i), blocks(i), 0.0f, 1.0f, &want(i, 0));
  const auto seeds_d = to_device(ex, seeds.v()), offsets_d = to_device(ex, offsets.v()),
             blocks_d = to_device(ex, blocks.v());
  device_tensor<float> got({n, 4});
  normal4_kernel<<<1024, 256, 0, ex.stream>>>(n, seeds_d.data(), offsets_d.data(), blocks_d.data(), got.data());
  cuda_check_launch();
  const std::int64_t first = first_difference(to_host(ex, got.v()), want);
  CAPTURE(first);
  CHECK(first == -1);
}
