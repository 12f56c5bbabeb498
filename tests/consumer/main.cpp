// A host-only consumer: includes the umbrella headers and runs a few primitives.
#include <adjoint/adjoint.hpp>
#include <decent/decent.hpp>
#include <subspace/subspace.hpp>

#include <cstdio>

int main() {
  using namespace subspace;
  host_tensor<float> a({16, 8}), b({8, 4}), c({16, 4});
  fill_normal(exec::host{}, a.v(), 1, 0);
  fill_normal(exec::host{}, b.v(), 1, 1);
  gemm(exec::host{}, op::none, op::none, 1.0f, a.v(), b.v(), 0.0f, c.v());
  const float norm = squared_norm(exec::host{}, c.v());
  std::printf("consumer_host: |A B|^2 = %g\n", double(norm));
  return norm > 0 ? 0 : 1;
}
