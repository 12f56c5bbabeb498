// The selective SSM's CUDA kernels (adjoint/kernels/scan.hpp) against the fp64 host reference on the same random
// inputs, in fp32 and bf16: the norms, the bias and gate kernels, the column sums, the forward and reverse scans,
// the windowed accumulation and the shifted product.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>

#include <adjoint/kernels/scan.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

template <class T>
double tolerance() {
  return std::is_same_v<T, float> ? 1e-5 : 1e-2;
}

/// x rounded to T, on the device, and the rounded values back in double for the reference.
template <class T>
struct operand {
  tensor<T, device_space> device;
  host_tensor<double> exact;
  operand(const host_tensor<double>& x, const exec::cuda& ex) : device(x.shape()), exact(x.shape()) {
    host_tensor<T> rounded(x.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) rounded.data()[i] = T(float(x.data()[i]));
    for (std::int64_t i = 0; i < x.numel(); ++i) exact.data()[i] = double(float(rounded.data()[i]));
    copy(ex, view<const T, host_space>(rounded.v()), device.v());
    ex.synchronize();
  }
  view<const T, device_space> in() const { return device.v(); }
};

template <class T>
host_tensor<double> back(const exec::cuda& ex, const tensor<T, device_space>& d) {
  host_tensor<T> h(d.shape());
  copy(ex, view<const T, device_space>(d.v()), h.v());
  ex.synchronize();
  host_tensor<double> out(d.shape());
  for (std::int64_t i = 0; i < h.numel(); ++i) out.data()[i] = double(float(h.data()[i]));
  return out;
}

host_tensor<double> clone(const host_tensor<double>& x) {
  host_tensor<double> out(x.shape());
  copy(exec::host{}, view<const double, host_space>(x.v()), out.v());
  return out;
}

host_tensor<double> gates(const shape& s, std::uint64_t seed) {
  host_tensor<double> a = testing::random_tensor<double>(s, seed, 1.5f, 1.0f);
  for (std::int64_t i = 0; i < a.numel(); ++i) a.data()[i] = 1 / (1 + std::exp(-a.data()[i]));
  return a;
}

}  // namespace

TEST_CASE_TEMPLATE("ssm kernels (CUDA) equal the fp64 host reference", T, float, bf16) {
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const exec::host hx{};
  const std::int64_t seqs = 3, seq = 257, N = 5, P = 70, n = seqs * seq;
  const double tol = tolerance<T>();

  SUBCASE("unit RMSNorm forward and backward") {
    const operand<T> y(testing::random_tensor<double>({n, P}, seed), ex),
        g(testing::random_tensor<double>({n, P}, seed + 1), ex),
        dy0(testing::random_tensor<double>({n, P}, seed + 2), ex);
    tensor<T, device_space> yhat({n, P}), dy({n, P});
    tensor<float, device_space> rstd({n});
    adjoint::unit_rmsnorm_forward<T>(ex, y.in(), 1e-5f, yhat.v(), rstd.v());
    copy(ex, dy0.in(), dy.v());
    const operand<T> yhat_in(back(ex, yhat), ex);  // the backward reads the rounded ŷ
    adjoint::unit_rmsnorm_backward<T>(ex, yhat_in.in(), view<const float, device_space>(rstd.v()), g.in(), dy.v());
    host_tensor<double> yhat_ref({n, P}), rstd_ref({n}), dy_ref = clone(dy0.exact);
    adjoint::unit_rmsnorm_forward<double>(hx, y.exact.v(), 1e-5f, yhat_ref.v(), rstd_ref.v());
    adjoint::unit_rmsnorm_backward<double>(hx, yhat_in.exact.v(), rstd_ref.v(), g.exact.v(), dy_ref.v());
    CHECK(testing::rel_error(back(ex, yhat), yhat_ref) <= tol);
    CHECK(testing::rel_error(back(ex, dy), dy_ref) <= tol);
  }
  SUBCASE("bias rows, gates and column sums") {
    const operand<T> u(testing::random_tensor<double>({n, N}, seed), ex),
        bias(testing::random_tensor<double>({N}, seed + 1), ex),
        abar(testing::random_tensor<double>({n, N}, seed + 2), ex);
    tensor<T, device_space> a({n, N}), x({n, N}), du({n, N});
    tensor<float, device_space> db({N});
    adjoint::sigmoid_rows<T>(ex, u.in(), bias.in(), a.v());
    copy(ex, u.in(), x.v());
    adjoint::add_rows<T>(ex, bias.in(), x.v());
    const operand<T> a_in(back(ex, a), ex);
    adjoint::gate_backward<T>(ex, a_in.in(), abar.in(), du.v());
    fill(ex, db.v(), 0.5f);
    adjoint::column_sums(ex, abar.in(), db.v());
    host_tensor<double> a_ref({n, N}), x_ref = clone(u.exact), du_ref({n, N}), db_ref({N});
    adjoint::sigmoid_rows<double>(hx, u.exact.v(), bias.exact.v(), a_ref.v());
    adjoint::add_rows<double>(hx, bias.exact.v(), x_ref.v());
    adjoint::gate_backward<double>(hx, a_in.exact.v(), abar.exact.v(), du_ref.v());
    fill(hx, db_ref.v(), 0.5);
    adjoint::column_sums(hx, view<const double, host_space>(abar.exact.v()), db_ref.v());
    CHECK(testing::rel_error(back(ex, a), a_ref) <= tol);
    CHECK(testing::rel_error(back(ex, x), x_ref) <= tol);
    CHECK(testing::rel_error(back(ex, du), du_ref) <= tol);
    CHECK(testing::rel_error(back(ex, db), db_ref) <= 1e-5);  // fp32 sums of rounded inputs
  }
  SUBCASE("scans (one tile, many tiles, several channel groups, single channels), the window, the shifted product") {
    struct sizes {
      std::int64_t seqs, seq, N;
    };
    for (const sizes z :
         {sizes{seqs, seq, N}, sizes{2, 5000, 3}, sizes{1, 70001, 40}, sizes{3, 1, 8}, sizes{2, 3001, 136}}) {
      CAPTURE(z.seq);
      const std::int64_t rows = z.seqs * z.seq;
      const operand<T> a(gates({rows, z.N}, seed), ex), w(testing::random_tensor<double>({rows, z.N}, seed + 1), ex);
      tensor<T, device_space> h({rows, z.N}), mu({rows, z.N}), win({rows, z.N}), shifted({rows, z.N});
      adjoint::scan_forward<T>(ex, a.in(), w.in(), h.v(), z.seq);
      adjoint::scan_reverse<T>(ex, a.in(), w.in(), mu.v(), z.seq);
      adjoint::scan_window<T>(ex, a.in(), w.in(), win.v(), z.seq, 7);
      adjoint::shifted_product<T>(ex, w.in(), a.in(), shifted.v(), z.seq);
      host_tensor<double> h_ref({rows, z.N}), mu_ref({rows, z.N}), win_ref({rows, z.N}), shifted_ref({rows, z.N});
      adjoint::scan_forward<double>(hx, a.exact.v(), w.exact.v(), h_ref.v(), z.seq);
      adjoint::scan_reverse<double>(hx, a.exact.v(), w.exact.v(), mu_ref.v(), z.seq);
      adjoint::scan_window<double>(hx, a.exact.v(), w.exact.v(), win_ref.v(), z.seq, 7);
      adjoint::shifted_product<double>(hx, w.exact.v(), a.exact.v(), shifted_ref.v(), z.seq);
      CHECK(testing::rel_error(back(ex, h), h_ref) <= tol);
      CHECK(testing::rel_error(back(ex, mu), mu_ref) <= tol);
      CHECK(testing::rel_error(back(ex, win), win_ref) <= tol);
      CHECK(testing::rel_error(back(ex, shifted), shifted_ref) <= tol);
    }
  }
}
