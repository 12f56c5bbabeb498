#pragma once
// The selective SSM's own kernels (docs/ssm.md), host implementations: the reference for the CUDA ones.
//
// Rows are tokens, sequence-major: row b·S + t is token t of sequence b, so a [B·S, N] view holds the state
// channels of every token and the scans run along t within each sequence (seq = S). Values are T (float or
// double on the host); everything is computed in accum_t<T> and the scans carry their state in it.
//
//   unit_rmsnorm_forward   ŷ = y · r, r = 1 / sqrt(mean(y²) + eps) (no gain); r is saved
//   unit_rmsnorm_backward  dy += r · (dŷ − ŷ · mean(dŷ ⊙ ŷ))
//   add_rows               x[i, :] += bias
//   column_sums            db += Σ_i dx[i, :]
//   sigmoid_rows           a = sigmoid(u + bias)
//   gate_backward          du = ā ⊙ a ⊙ (1 − a)
//   scan_forward           h_t = a_t ⊙ h_{t−1} + x_t,            h_{−1} = 0
//   scan_reverse           μ_t = w_t + a_{t+1} ⊙ μ_{t+1},        μ_S = 0
//   scan_window            μ_i = Σ_{t=i}^{min(S−1, i+W−1)} w_t ⊙ Π_{j=i+1}^{t} a_j   (O(S·W) per channel)
//   shifted_product        out_t = μ_t ⊙ h_{t−1},                h_{−1} = 0

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/parallel.hpp>
#include <subspace/core/tensor.hpp>

namespace adjoint {

namespace detail::scan {

template <class V>
void require_rows(const V& v, std::int64_t rows, std::int64_t cols, const char* op, const char* name) {
  subspace::require(v.rank() == 2 && v.dim(0) == rows && v.dim(1) == cols && v.is_contiguous(), [&] {
    return std::string(op) + ": " + name + " must be a contiguous [" + std::to_string(rows) + ", " +
           std::to_string(cols) + "] view, got shape " + subspace::to_string(v.shape());
  });
}
template <class V>
void require_sequences(const V& v, std::int64_t seq, const char* op) {
  subspace::require(v.rank() == 2 && seq > 0 && v.dim(0) % seq == 0, [&] {
    return std::string(op) + ": " + std::to_string(v.rank() == 2 ? v.dim(0) : -1) +
           " rows are not whole sequences of " + std::to_string(seq) + " tokens";
  });
}

}  // namespace detail::scan

using subspace::accum_t;
using subspace::host_space;
using subspace::view;

template <class T>
void unit_rmsnorm_forward(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> y, float eps,
                          view<T, host_space> yhat, std::type_identity_t<view<accum_t<T>, host_space>> rstd) {
  using A = accum_t<T>;
  const std::int64_t n = y.dim(0), P = y.dim(1);
  detail::scan::require_rows(y, n, P, "unit_rmsnorm_forward", "y");
  detail::scan::require_rows(yhat, n, P, "unit_rmsnorm_forward", "yhat");
  subspace::require(rstd.numel() == n, "unit_rmsnorm_forward: rstd must hold one value per row");
  subspace::parallel_for(ex, n, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i) {
      const T* yr = y.data() + i * P;
      A ss = 0;
      for (std::int64_t j = 0; j < P; ++j) ss += A(yr[j]) * A(yr[j]);
      const A r = A(1) / std::sqrt(ss / A(P) + A(eps));
      rstd.data()[i] = r;
      for (std::int64_t j = 0; j < P; ++j) yhat.data()[i * P + j] = subspace::convert<T>(A(yr[j]) * r);
    }
  });
}

template <class T>
void unit_rmsnorm_backward(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> yhat,
                           std::type_identity_t<view<const accum_t<T>, host_space>> rstd,
                           std::type_identity_t<view<const T, host_space>> dyhat, view<T, host_space> dy) {
  using A = accum_t<T>;
  const std::int64_t n = yhat.dim(0), P = yhat.dim(1);
  detail::scan::require_rows(dyhat, n, P, "unit_rmsnorm_backward", "dyhat");
  detail::scan::require_rows(dy, n, P, "unit_rmsnorm_backward", "dy");
  subspace::parallel_for(ex, n, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i) {
      const T* x = yhat.data() + i * P;
      const T* g = dyhat.data() + i * P;
      A dot = 0;
      for (std::int64_t j = 0; j < P; ++j) dot += A(g[j]) * A(x[j]);
      const A c = dot / A(P), r = rstd.data()[i];
      for (std::int64_t j = 0; j < P; ++j)
        dy.data()[i * P + j] = subspace::convert<T>(A(dy.data()[i * P + j]) + r * (A(g[j]) - A(x[j]) * c));
    }
  });
}

template <class T>
void add_rows(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> bias,
              view<T, host_space> x) {
  using A = accum_t<T>;
  const std::int64_t n = x.dim(0), m = x.dim(1);
  detail::scan::require_rows(x, n, m, "add_rows", "x");
  subspace::require(bias.numel() == m, "add_rows: bias must hold one value per column");
  subspace::parallel_for(ex, n, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i)
      for (std::int64_t j = 0; j < m; ++j)
        x.data()[i * m + j] = subspace::convert<T>(A(x.data()[i * m + j]) + A(bias.data()[j]));
  });
}

template <class T, class G>
void column_sums(const subspace::exec::host&, view<const T, host_space> dx, view<G, host_space> db) {
  using A = std::conditional_t<std::is_same_v<accum_t<T>, double> || std::is_same_v<accum_t<G>, double>, double, float>;
  const std::int64_t n = dx.dim(0), m = dx.dim(1);
  detail::scan::require_rows(dx, n, m, "column_sums", "dx");
  subspace::require(db.numel() == m, "column_sums: db must hold one value per column");
  for (std::int64_t j = 0; j < m; ++j) {
    A s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += A(dx.data()[i * m + j]);
    db.data()[j] = subspace::convert<G>(A(db.data()[j]) + s);
  }
}

template <class T>
void sigmoid_rows(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> u,
                  std::type_identity_t<view<const T, host_space>> bias, view<T, host_space> a) {
  using A = accum_t<T>;
  const std::int64_t n = u.dim(0), m = u.dim(1);
  detail::scan::require_rows(a, n, m, "sigmoid_rows", "a");
  subspace::require(bias.numel() == m, "sigmoid_rows: bias must hold one value per column");
  subspace::parallel_for(ex, n, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i)
      for (std::int64_t j = 0; j < m; ++j) {
        const A z = A(u.data()[i * m + j]) + A(bias.data()[j]);
        a.data()[i * m + j] = subspace::convert<T>(A(1) / (A(1) + std::exp(-z)));
      }
  });
}

template <class T>
void gate_backward(const subspace::exec::host&, std::type_identity_t<view<const T, host_space>> a,
                   std::type_identity_t<view<const T, host_space>> abar, view<T, host_space> du) {
  using A = accum_t<T>;
  detail::scan::require_rows(abar, a.dim(0), a.dim(1), "gate_backward", "abar");
  detail::scan::require_rows(du, a.dim(0), a.dim(1), "gate_backward", "du");
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const A s = A(a.data()[i]);
    du.data()[i] = subspace::convert<T>(A(abar.data()[i]) * s * (A(1) - s));
  }
}

/// Runs body(b, c) for every (sequence, channel) pair over ex's threads.
template <class Body>
void for_each_channel(const subspace::exec::host& ex, std::int64_t sequences, std::int64_t channels, Body&& body) {
  subspace::parallel_for(ex, sequences * channels, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t i = first; i < last; ++i) body(i / channels, i % channels);
  });
}

template <class T>
void scan_forward(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> a,
                  std::type_identity_t<view<const T, host_space>> x, view<T, host_space> h, std::int64_t seq) {
  using A = accum_t<T>;
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_forward");
  detail::scan::require_rows(x, n, N, "scan_forward", "x");
  detail::scan::require_rows(h, n, N, "scan_forward", "h");
  for_each_channel(ex, n / seq, N, [&](std::int64_t b, std::int64_t c) {
    A state = 0;
    for (std::int64_t t = 0; t < seq; ++t) {
      const std::int64_t i = (b * seq + t) * N + c;
      state = A(a.data()[i]) * state + A(x.data()[i]);
      h.data()[i] = subspace::convert<T>(state);
    }
  });
}

template <class T>
void scan_reverse(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> a,
                  std::type_identity_t<view<const T, host_space>> w, view<T, host_space> mu, std::int64_t seq) {
  using A = accum_t<T>;
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_reverse");
  detail::scan::require_rows(w, n, N, "scan_reverse", "w");
  detail::scan::require_rows(mu, n, N, "scan_reverse", "mu");
  for_each_channel(ex, n / seq, N, [&](std::int64_t b, std::int64_t c) {
    A state = 0;  // μ_{t+1} ⊙ a_{t+1}, carried down
    for (std::int64_t t = seq; t-- > 0;) {
      const std::int64_t i = (b * seq + t) * N + c;
      const A m = A(w.data()[i]) + state;
      mu.data()[i] = subspace::convert<T>(m);
      state = m * A(a.data()[i]);
    }
  });
}

template <class T>
void scan_window(const subspace::exec::host& ex, std::type_identity_t<view<const T, host_space>> a,
                 std::type_identity_t<view<const T, host_space>> w, view<T, host_space> mu, std::int64_t seq,
                 std::int64_t window) {
  using A = accum_t<T>;
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_window");
  detail::scan::require_rows(w, n, N, "scan_window", "w");
  detail::scan::require_rows(mu, n, N, "scan_window", "mu");
  subspace::require(window > 0,
                    [&] { return "scan_window: the window must be positive, got " + std::to_string(window); });
  for_each_channel(ex, n / seq, N, [&](std::int64_t b, std::int64_t c) {
    const auto at = [&](std::int64_t t) { return (b * seq + t) * N + c; };
    for (std::int64_t i = 0; i < seq; ++i) {
      A sum = A(w.data()[at(i)]), running = 1;  // running = Π_{j=i+1}^{t} a_j
      for (std::int64_t t = i + 1; t < std::min(seq, i + window); ++t) {
        running *= A(a.data()[at(t)]);
        sum += A(w.data()[at(t)]) * running;
      }
      mu.data()[at(i)] = subspace::convert<T>(sum);
    }
  });
}

template <class T>
void shifted_product(const subspace::exec::host&, std::type_identity_t<view<const T, host_space>> mu,
                     std::type_identity_t<view<const T, host_space>> h, view<T, host_space> out, std::int64_t seq) {
  using A = accum_t<T>;
  const std::int64_t n = mu.dim(0), N = mu.dim(1);
  detail::scan::require_sequences(mu, seq, "shifted_product");
  detail::scan::require_rows(h, n, N, "shifted_product", "h");
  detail::scan::require_rows(out, n, N, "shifted_product", "out");
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t c = 0; c < N; ++c)
      out.data()[r * N + c] =
          r % seq == 0 ? T(0) : subspace::convert<T>(A(mu.data()[r * N + c]) * A(h.data()[(r - 1) * N + c]));
}

}  // namespace adjoint

#if defined(__CUDACC__)
#include "detail/cuda/scan.cuh"
#endif
