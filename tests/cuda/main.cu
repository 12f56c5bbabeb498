// The CUDA suite's entry point. Queries (--list-test-cases, --count, --help, ...) answer without a device, so
// CTest discovers the cases on any machine; a run without a usable CUDA device exits 77 (CTest: Skipped).
#define DOCTEST_CONFIG_IMPLEMENT
#include <cuda_runtime.h>
#include <doctest/doctest.h>

#include <cstdio>

int main(int argc, char** argv) {
  // Line-buffered, so a log cut short by a timeout ends at the test that was really running.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  doctest::Context context(argc, argv);
  context.setAsDefaultForAssertsOutOfTestCases();  // makes the parsed options readable below
  const doctest::ContextOptions& options = *doctest::getContextOptions();
  const bool query = options.help || options.version || options.count || options.list_test_cases ||
                     options.list_test_suites || options.list_reporters || options.no_run;
  if (query) return context.run();

  int devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&devices);
  if (status != cudaSuccess || devices == 0) {
    std::printf("subspace_cuda_tests: no CUDA device (%s); skipping\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "0 devices");
    return 77;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("subspace_cuda_tests: running on %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
  return context.run();
}
