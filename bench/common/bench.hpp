#pragma once
// What the CUDA benchmarks share: flags through examples::cli (switches with cli.toggle), the exit codes of
// examples::guarded_main, the JSON document's header and its atomic write, threads per rank, and the timing and
// comparison helpers that several of them use.
//
//   int run(int argc, char** argv) {
//     bench::cli cli("bench_x", "what it measures");
//     cli.flag("reps", o.reps, "timed calls").toggle("no-reference", no_ref, "ours only");
//     bench::output_flags(cli, o.out, o.commit);
//     if (!cli.parse(argc, argv)) return 0;  // --help
//     bench::check_range("reps", o.reps, 1);
//     ...
//     io::json doc = bench::document("x", bench::device_properties().name, o.commit);
//     doc.set("config", ...);
//     doc.set("results", ...);
//     bench::write_document(o.out, doc);
//   }
//   int main(int argc, char** argv) { return bench::guarded_main("bench_x", [&] { return run(argc, argv); }); }
//
// guarded_main: exit status 2 with "bench_x: message" for a bad flag (cli_error), 1 with "bench_x: error: message"
// for any other failure.
#include <cuda_runtime.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

#include <subspace/core/cuda/error.cuh>
#include <subspace/core/cuda/launch.cuh>
#include <subspace/core/parallel.hpp>
#include <subspace/core/rng.hpp>
#include <subspace/data/tokens.hpp>
#include <subspace/util/file.hpp>
#include <subspace/util/json.hpp>

#include "common/cli.hpp"
#include "common/device.hpp"

namespace subspace::bench {

using examples::cli;
using examples::cli_error;
using examples::guarded_main;

// ---- Flags ------------------------------------------------------------------------------------------------------

/// Declares the flags every benchmark has: --out FILE (the JSON results) and --commit SHA.
inline cli& output_flags(cli& c, std::string& out, std::string& commit) {
  return c.flag("out", out, "write results as JSON (a temporary file, then renamed)")
      .flag("commit", commit, "commit recorded in the JSON");
}

/// cli_error unless lo <= value <= hi.
inline void check_range(const char* flag, long long value, long long lo, long long hi = 1000000) {
  if (value < lo || value > hi)
    throw cli_error(std::string("--") + flag + ": got " + std::to_string(value) + ", expected an integer in [" +
                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

/// cli_error unless value is finite and positive.
inline void check_positive(const char* flag, double value) {
  if (!(value > 0) || !std::isfinite(value)) {
    char got[32];
    std::snprintf(got, sizeof got, "%g", value);
    throw cli_error(std::string("--") + flag + ": got " + got + ", expected a positive number");
  }
}

/// The non-empty items of a `sep`-separated list; cli_error when there are none.
inline std::vector<std::string> split_list(const char* flag, const std::string& list, char sep = ',') {
  std::vector<std::string> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, sep))
    if (!item.empty()) out.push_back(item);
  if (out.empty()) throw cli_error(std::string("--") + flag + ": empty list");
  return out;
}

/// The items of a `sep`-separated list of integers; cli_error naming the item that is not one.
inline std::vector<std::int64_t> split_ints(const char* flag, const std::string& list, char sep = ',') {
  std::vector<std::int64_t> out;
  for (const std::string& item : split_list(flag, list, sep)) {
    std::int64_t v = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (ec != std::errc{} || end != item.data() + item.size())
      throw cli_error(std::string("--") + flag + ": got '" + item + "' in '" + list + "', expected integers");
    out.push_back(v);
  }
  return out;
}

// ---- The JSON document ------------------------------------------------------------------------------------------

/// The current CUDA device's properties.
inline cudaDeviceProp device_properties() {
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  cuda_check(cudaGetDeviceProperties(&prop, device));
  return prop;
}

/// Now, as 2026-11-24T09:30:00Z.
inline std::string iso_date_utc() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

/// A result document's header {benchmark, device, date, commit}; the benchmark sets "config" and "results".
inline io::json document(const std::string& benchmark, const std::string& device, const std::string& commit) {
  return io::json::object({{"benchmark", benchmark}, {"device", device}, {"date", iso_date_utc()}, {"commit", commit}});
}

/// Writes `doc` to `path` atomically (a temporary file, then renamed), two-space indented, and says so.
inline void write_document(const std::string& path, const io::json& doc) {
  io::atomic_write_text(path, doc.dump(2) + "\n");
  std::printf("wrote %s\n", path.c_str());
}

// ---- Data -------------------------------------------------------------------------------------------------------

/// A temporary llm.c shard of `tokens` uniform random ids below `vocab` (Philox stream (seed, 0)); removed when
/// this goes out of scope.
class random_shard {
 public:
  random_shard(const std::string& tag, std::uint64_t tokens, std::int64_t vocab, std::uint64_t seed)
      : path_(std::filesystem::temp_directory_path() / ("bench." + std::to_string(::getpid()) + "." + tag + ".bin")) {
    std::vector<std::int32_t> ids(tokens);
    for (std::uint64_t block = 0; 4 * block < tokens; ++block) {
      const rng::u32x4 r = rng::bits4(seed, 0, block);
      for (std::uint64_t j = 0; j < 4 && 4 * block + j < tokens; ++j)  // multiply-shift: uniform in [0, vocab)
        ids[4 * block + j] = std::int32_t((std::uint64_t(r.v[j]) * std::uint64_t(vocab)) >> 32);
    }
    data::write_llmc_tokens(path_, ids, vocab <= 65536 ? 1 : 7);
  }
  ~random_shard() {
    std::error_code ignored;
    std::filesystem::remove(path_, ignored);
  }
  random_shard(const random_shard&) = delete;
  random_shard& operator=(const random_shard&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

// ---- Ranks and time ---------------------------------------------------------------------------------------------

/// Runs body(rank) on a thread per rank; rethrows the first failure. Only bench/gossip still calls it: new code
/// runs its ranks with comm::local::run_ranks.
inline void on_ranks(int n, const std::function<void(int)>& body) { run_concurrently(n, body); }

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <class T>
double median(std::vector<T> v) {
  std::sort(v.begin(), v.end());
  const std::size_t h = v.size() / 2;
  return v.size() % 2 ? double(v[h]) : 0.5 * (double(v[h - 1]) + double(v[h]));
}

struct pair_timing {
  double ours_ms = 0, ref_ms = 0;
};

/// Times ours() and ref() on `stream`: `warmup` untimed calls of each, then `reps` calls each timed alone with CUDA
/// events, alternating so that clock and thermal drift hit both alike; the medians.
template <class A, class B>
pair_timing time_alternating(cudaStream_t stream, int warmup, int reps, A&& ours, B&& ref) {
  for (int i = 0; i < warmup; ++i) {
    ours();
    ref();
  }
  std::vector<cudaEvent_t> events(4 * std::size_t(reps));
  for (auto& e : events) cuda_check(cudaEventCreate(&e));
  for (int r = 0; r < reps; ++r) {
    cudaEvent_t* e = &events[4 * std::size_t(r)];
    cuda_check(cudaEventRecord(e[0], stream));
    ours();
    cuda_check(cudaEventRecord(e[1], stream));
    cuda_check(cudaEventRecord(e[2], stream));
    ref();
    cuda_check(cudaEventRecord(e[3], stream));
  }
  cuda_check(cudaStreamSynchronize(stream));
  std::vector<float> t_ours(events.size() / 4), t_ref(events.size() / 4);
  for (int r = 0; r < reps; ++r) {
    const cudaEvent_t* e = &events[4 * std::size_t(r)];
    cuda_check(cudaEventElapsedTime(&t_ours[std::size_t(r)], e[0], e[1]));
    cuda_check(cudaEventElapsedTime(&t_ref[std::size_t(r)], e[2], e[3]));
  }
  for (auto& e : events) cuda_check(cudaEventDestroy(e));
  return {median(t_ours), median(t_ref)};
}

// ---- Data and comparison kernels --------------------------------------------------------------------------------

/// Fills x with N(0, 1) draws from the Philox stream (seed, offset), four per thread step.
template <class T>
__global__ void fill_normal_kernel(T* x, std::int64_t n, std::uint64_t seed, std::uint64_t offset) {
  const std::int64_t blocks = (n + 3) / 4;
  for (std::int64_t b = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < blocks;
       b += std::int64_t(gridDim.x) * blockDim.x) {
    float v[4];
    rng::normal4(seed, offset, std::uint64_t(b), 0.0f, 1.0f, v);
    for (int i = 0; i < 4; ++i)
      if (4 * b + i < n) x[4 * b + i] = T(v[i]);
  }
}

template <class T>
void fill_normal(T* x, std::int64_t n, std::uint64_t seed, std::uint64_t offset, cudaStream_t stream) {
  fill_normal_kernel<<<cuda_detail::grid_for((n + 3) / 4), cuda_detail::block_threads, 0, stream>>>(x, n, seed, offset);
  cuda_check_launch();
}

/// sums[0] += sum (a - b)^2, sums[1] += sum b^2, in double.
template <class T>
__global__ void diff_norms_kernel(const T* a, const T* b, std::int64_t n, double* sums) {
  double num = 0, den = 0;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const double x = double(float(a[i])), y = double(float(b[i]));
    num += (x - y) * (x - y);
    den += y * y;
  }
  for (int off = 16; off > 0; off /= 2) {
    num += __shfl_down_sync(0xffffffffu, num, off);
    den += __shfl_down_sync(0xffffffffu, den, off);
  }
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&sums[0], num);
    atomicAdd(&sums[1], den);
  }
}

/// ||a - b|| / ||b|| over n device elements (0 when b is zero).
template <class T>
double rel_diff(const T* a, const T* b, std::int64_t n, cudaStream_t stream) {
  double* sums = nullptr;
  cuda_check(cudaMalloc(&sums, 2 * sizeof(double)));
  cuda_check(cudaMemsetAsync(sums, 0, 2 * sizeof(double), stream));
  diff_norms_kernel<<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, stream>>>(a, b, n, sums);
  cuda_check_launch();
  double host[2] = {0, 0};
  cuda_check(cudaMemcpyAsync(host, sums, sizeof host, cudaMemcpyDeviceToHost, stream));
  cuda_check(cudaStreamSynchronize(stream));
  cuda_check(cudaFree(sums));
  return host[1] > 0 ? std::sqrt(host[0] / host[1]) : 0.0;
}

}  // namespace subspace::bench
