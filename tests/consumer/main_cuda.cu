// A CUDA consumer: the same umbrella header brings the CUDA path in a .cu translation unit.
#include <subspace/subspace.hpp>

#include <cstdio>

int main() {
  using namespace subspace;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("consumer_cuda: built; no CUDA device to run on\n");
    return 0;
  }
  exec::cuda ex{};
  device_tensor<bf16> a({64, 32}), b({32, 16}), c({64, 16});
  fill_normal(ex, a.v(), 1, 0);
  fill_normal(ex, b.v(), 1, 1);
  gemm(ex, op::none, op::none, 1.0f, a.v(), b.v(), 0.0f, c.v());
  const float norm = squared_norm(ex, c.v());
  std::printf("consumer_cuda: |A B|^2 = %g\n", double(norm));
  return norm > 0 ? 0 : 1;
}
