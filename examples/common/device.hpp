#pragma once
// The --device flag (auto|host|cuda) of the example programs, and their exit codes.
//
//   return examples::guarded_main("my_example", [&] {
//     if (!cli.parse(argc, argv)) return 0;
//     const examples::device_choice d = examples::choose_device(o.device);
//   #if defined(__CUDACC__)
//     if (d.cuda) return run(exec::cuda{}, o, d.name);
//   #endif
//     return run(exec::host{o.threads}, o, d.name);
//   });
//
// An example compiles as C++ (host only) or, in a CUDA build, as CUDA; `auto` picks CUDA when a GPU is present.

#include <cstdio>
#include <exception>
#include <string>

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#include <subspace/core/cuda/error.cuh>
#endif

#include "cli.hpp"

namespace examples {

/// Where an example runs: CUDA device 0 (with its name) or the host.
struct device_choice {
  bool cuda = false;
  std::string name = "host";
};

/// The device --device `flag` selects in this build; cli_error for cuda without a GPU or without a CUDA build.
inline device_choice choose_device(const std::string& flag) {
#if defined(__CUDACC__)
  int devices = 0;
  const bool have_gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  if (flag == "cuda" && !have_gpu) throw cli_error("--device cuda: no CUDA device is present");
  if (flag == "cuda" || (flag == "auto" && have_gpu)) {
    cudaDeviceProp prop{};
    subspace::cuda_check(cudaGetDeviceProperties(&prop, 0));
    return {true, prop.name};
  }
#else
  if (flag == "cuda") throw cli_error("--device cuda: this build has no CUDA path (configure with the cuda preset)");
#endif
  return {};
}

/// Runs body() and turns its exceptions into the examples' exit codes: a cli_error (bad flags) prints
/// "program: message" and returns 2; any other exception prints "program: error: message" and returns 1 — a
/// tool_error as it is, a library error with its "file:line: " prefix.
template <class Body>
int guarded_main(const char* program, Body&& body) {
  try {
    return body();
  } catch (const cli_error& e) {
    std::fprintf(stderr, "%s: %s\n", program, e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: error: %s\n", program, e.what());
    return 1;
  }
}

}  // namespace examples
