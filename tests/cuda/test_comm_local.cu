// comm::local on device memory: 4 ranks as threads on one GPU, each with its own stream. Every operation on odd
// sizes against the same operations on host memory (bit for bit: both reduce in the same type and rank order)
// and against directly computed values; stream ordering through events (a slow producer kernel, no host sync);
// compute overlapping an operation; split groups on the device; the world's own streams; a host/device mismatch.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/subspace.hpp>

#include "host/conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using namespace std::chrono_literals;

namespace {

constexpr int ranks = 4;

/// Streams owned by a test, one per rank.
struct rank_streams {
  std::vector<cudaStream_t> s;
  explicit rank_streams(int n) : s(static_cast<std::size_t>(n)) {
    for (auto& x : s) cuda_check(cudaStreamCreateWithFlags(&x, cudaStreamNonBlocking));
  }
  ~rank_streams() {
    for (auto x : s) {
      cudaStreamSynchronize(x);
      cudaStreamDestroy(x);
    }
  }
  rank_streams(const rank_streams&) = delete;
  rank_streams& operator=(const rank_streams&) = delete;
  comm::local_options options(std::chrono::milliseconds timeout = 30s) const {
    comm::local_options o;
    o.timeout = timeout;
    o.streams.assign(s.begin(), s.end());
    return o;
  }
};

template <class T>
host_tensor<T> rank_values(std::uint64_t seed, int r, const shape& s) {
  host_tensor<T> t(s);
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = T(rng::normal_at(seed + std::uint64_t(r) * 7919u, 0, std::uint64_t(i), 0.0f, 1.0f));
  return t;
}

template <class T>
bool same_bits(const host_tensor<T>& a, const host_tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

/// Sleeps on the GPU for about `ns` nanoseconds, then writes value to x[0 .. n).
template <class T>
__global__ void slow_fill(T* x, std::int64_t n, float value, unsigned ns) {
  if (blockIdx.x == 0 && threadIdx.x == 0)
    for (unsigned waited = 0; waited < ns; waited += 1000) __nanosleep(1000);
  __syncthreads();
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = T(value);
}

template <class T>
__global__ void add_one(T* x, std::int64_t n) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = T(float(x[i]) + 1.0f);
}

/// The outputs of one pass of every operation, host copies.
template <class T>
struct outputs {
  std::vector<host_tensor<T>> sum, avg, mx, gathered, scattered, bcast, received;
};

/// Runs every operation on `space` memory for `ranks` ranks and m elements; returns host copies of the results.
template <class T, class Space>
outputs<T> run_all(std::uint64_t seed, std::int64_t m) {
  rank_streams streams(ranks);
  auto comms = comm::local::world(ranks, streams.options());
  outputs<T> out;
  for (auto* v : {&out.sum, &out.avg, &out.mx, &out.gathered, &out.scattered, &out.bcast, &out.received})
    v->resize(ranks);
  const int root = 1;
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    const auto ru = std::size_t(r);
    [[maybe_unused]] const exec::cuda ex{static_cast<cudaStream_t>(c.stream())};
    auto x = rank_values<T>(seed, r, {m});
    auto big = rank_values<T>(seed + 1, r, {ranks * m});
    auto b = rank_values<T>(seed + 2, r, {m});
    if constexpr (std::is_same_v<Space, host_space>) {
      host_tensor<T> s = rank_values<T>(seed, r, {m}), a = rank_values<T>(seed, r, {m});
      host_tensor<T> x2 = rank_values<T>(seed, r, {m});
      host_tensor<T> g({ranks, m}), sc({m}), got({m});
      std::vector<comm::local::request> q;
      q.push_back(c.all_reduce(s.v(), comm::reduce_op::sum));
      q.push_back(c.all_reduce(a.v(), comm::reduce_op::avg));
      q.push_back(c.all_reduce(x2.v(), comm::reduce_op::max));
      q.push_back(c.all_gather(x.v(), g.v()));
      q.push_back(c.reduce_scatter(big.v(), sc.v(), comm::reduce_op::sum));
      q.push_back(c.broadcast(b.v(), root));
      c.group_start();
      q.push_back(c.send(x.v(), (r + 1) % ranks));
      q.push_back(c.recv(got.v(), (r + ranks - 1) % ranks));
      c.group_end();
      for (auto& x_ : q) x_.wait();
      out.sum[ru] = std::move(s);
      out.avg[ru] = std::move(a);
      out.mx[ru] = std::move(x2);
      out.gathered[ru] = std::move(g);
      out.scattered[ru] = std::move(sc);
      out.bcast[ru] = std::move(b);
      out.received[ru] = std::move(got);
    } else {
      auto s = to_device(ex, x.v()), a = to_device(ex, x.v()), x2 = to_device(ex, x.v()), xd = to_device(ex, x.v());
      auto bigd = to_device(ex, big.v()), bd = to_device(ex, b.v());
      device_tensor<T> g({ranks, m}), sc({m}), got({m});
      std::vector<comm::local::request> q;
      q.push_back(c.all_reduce(s.v(), comm::reduce_op::sum));
      q.push_back(c.all_reduce(a.v(), comm::reduce_op::avg));
      q.push_back(c.all_reduce(x2.v(), comm::reduce_op::max));
      q.push_back(c.all_gather(xd.v(), g.v()));
      q.push_back(c.reduce_scatter(bigd.v(), sc.v(), comm::reduce_op::sum));
      q.push_back(c.broadcast(bd.v(), root));
      c.group_start();
      q.push_back(c.send(xd.v(), (r + 1) % ranks));
      q.push_back(c.recv(got.v(), (r + ranks - 1) % ranks));
      c.group_end();
      for (auto& x_ : q) x_.wait();  // orders the rank's stream after each
      out.sum[ru] = to_host(ex, s.v());
      out.avg[ru] = to_host(ex, a.v());
      out.mx[ru] = to_host(ex, x2.v());
      out.gathered[ru] = to_host(ex, g.v());
      out.scattered[ru] = to_host(ex, sc.v());
      out.bcast[ru] = to_host(ex, bd.v());
      out.received[ru] = to_host(ex, got.v());
    }
  });
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("comm::local on device memory: 4 ranks on one GPU match host memory bit for bit", T, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const std::int64_t m : {std::int64_t(1), std::int64_t(37), std::int64_t(1001), std::int64_t(100003)}) {
    CAPTURE(m);
    const auto dev = run_all<T, device_space>(seed, m);
    const auto host = run_all<T, host_space>(seed, m);
    for (int r = 0; r < ranks; ++r) {
      CAPTURE(r);
      const auto ru = std::size_t(r);
      CHECK(same_bits(dev.sum[ru], host.sum[ru]));
      CHECK(same_bits(dev.avg[ru], host.avg[ru]));
      CHECK(same_bits(dev.mx[ru], host.mx[ru]));
      CHECK(same_bits(dev.gathered[ru], host.gathered[ru]));
      CHECK(same_bits(dev.scattered[ru], host.scattered[ru]));
      CHECK(same_bits(dev.bcast[ru], host.bcast[ru]));
      CHECK(same_bits(dev.received[ru], host.received[ru]));
      // and the direct values, in double
      // (each rank's values generated once: regenerating them per element made this O(m^2), minutes at m = 100003)
      host_tensor<double> expected({m}), magnitude({m});
      for (std::int64_t i = 0; i < m; ++i) expected(i) = magnitude(i) = 0;
      for (int q = 0; q < ranks; ++q) {
        const auto xq = rank_values<T>(seed, q, {m});
        for (std::int64_t i = 0; i < m; ++i) {
          expected(i) += double(float(xq(i)));
          magnitude(i) += std::abs(double(float(xq(i))));
        }
      }
      // A rounded sum's error is bounded by (ranks - 1) u sum |x|, not by a multiple of |sum x|: relative to the
      // sum, one cancelling element (m = 1) can be off by any factor (1.5e-6 was seen).
      double error = 0, scale = 0;
      for (std::int64_t i = 0; i < m; ++i) {
        const double off = double(float(dev.sum[ru](i))) - expected(i);
        error += off * off;
        scale += magnitude(i) * magnitude(i);
      }
      CHECK(std::sqrt(error / scale) <= (std::is_same_v<T, float> ? 1e-6 : 1e-2));
      const auto prev = rank_values<T>(seed, (r + ranks - 1) % ranks, {m});
      CHECK(same_bits(dev.received[ru], prev));
      CHECK(same_bits(dev.bcast[ru], rank_values<T>(seed + 2, 1, {m})));
    }
  }
}

TEST_CASE("comm::local on device memory: data moves in stream order — a slow producer, no host synchronisation") {
  rank_streams streams(2);
  auto comms = comm::local::world(2, streams.options());
  const std::int64_t n = 1 << 20;
  host_tensor<float> result;
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    cudaStream_t s = static_cast<cudaStream_t>(c.stream());
    device_tensor<float> buf({n});
    cuda_check(cudaMemsetAsync(buf.data(), 0, buf.bytes(), s));
    if (r == 0) {
      // ~20 ms on the GPU before the data exists; the send is posted at once.
      slow_fill<<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, s>>>(buf.data(), n, 7.0f, 20'000'000u);
      cuda_check_launch();
      auto q = c.send(buf.v(), 1);
      q.wait();  // returns before the GPU is done; buf stays alive until the stream syncs below
      cuda_check(cudaStreamSynchronize(s));
    } else {
      auto q = c.recv(buf.v(), 0);
      q.wait();
      add_one<<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, s>>>(buf.data(), n);  // after the copy
      cuda_check_launch();
      result = to_host(exec::cuda{s}, buf.v());
    }
  });
  bool all = true;
  for (std::int64_t i = 0; i < n; ++i) all = all && result(i) == 8.0f;
  CHECK(all);
}

TEST_CASE("comm::local on device memory: compute overlaps an all_reduce, the world's own streams, split groups") {
  auto comms = comm::local::world(ranks);  // no streams given: the world creates one per rank
  std::vector<host_tensor<float>> reduced(ranks), sub_reduced(ranks), computed(ranks);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    const auto ru = std::size_t(r);
    cudaStream_t s = comm::stream_of(c);
    CHECK(s != nullptr);
    CHECK(c.stream() == static_cast<void*>(s));
    const exec::cuda ex{s};
    auto grad = to_device(ex, testing::conformance::filled<float>({4097}, float(r + 1)).v());
    auto other = to_device(ex, testing::conformance::filled<float>({4097}, 0.0f).v());
    auto q = c.all_reduce(grad.v(), comm::reduce_op::sum);
    // Independent work on the stream while the reduction is in flight.
    add_one<<<cuda_detail::grid_for(other.numel()), cuda_detail::block_threads, 0, s>>>(other.data(), other.numel());
    cuda_check_launch();
    q.wait();
    reduced[ru] = to_host(ex, grad.v());
    computed[ru] = to_host(ex, other.v());
    comm::local sub = c.split(r % 2, r);
    CHECK(comm::stream_of(sub) == s);  // a rank keeps its stream in every group
    auto mine = to_device(ex, testing::conformance::filled<float>({3}, float(r)).v());
    sub.all_reduce(mine.v(), comm::reduce_op::max).wait();
    sub_reduced[ru] = to_host(ex, mine.v());
  });
  for (int r = 0; r < ranks; ++r) {
    const auto ru = std::size_t(r);
    CHECK(reduced[ru](0) == 10.0f);
    CHECK(reduced[ru](4096) == 10.0f);
    CHECK(computed[ru](17) == 1.0f);
    CHECK(sub_reduced[ru](2) == float(r % 2 == 0 ? 2 : 3));
  }
}

TEST_CASE("comm::local: a device send meeting a host recv is a mismatch on both ranks") {
  comm::local_options o;
  o.timeout = 2s;
  auto comms = comm::local::world(2, o);
  std::vector<std::string> m(2);
  comm::local::run_ranks(comms, [&](comm::local& c) {
    const int r = c.rank();
    device_tensor<float> d({4});
    host_tensor<float> h({4});
    try {
      if (r == 0) c.send(d.v(), 1).wait();
      else c.recv(h.v(), 0).wait();
    } catch (const comm::mismatch_error& e) {
      m[std::size_t(r)] = e.what();
    }
    cuda_check(cudaDeviceSynchronize());
  });
  for (const auto& s : m) CHECK(s.find("one is in host memory and the other in device memory") != std::string::npos);
}
