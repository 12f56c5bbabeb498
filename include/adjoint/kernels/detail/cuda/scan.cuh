#pragma once
// The selective SSM's kernels on CUDA (the host versions in kernels/scan.hpp are their reference). Values are
// bf16 or fp32, everything is computed in fp32 and every scan carries its state in a register.
//
//   norms               one warp per row
//   element-wise        grid-stride over the elements
//   column_sums         one thread per column, walking the rows (adjacent threads read adjacent columns)
//   scan_forward,       one thread per (sequence, channel), walking the tokens; adjacent threads hold adjacent
//   scan_reverse        channels of one token, so each step reads one coalesced row
//   scan_window         one thread per (sequence, token, channel): its window of at most W terms
//
// The scans are one pass per channel: no chunking across the sequence yet.

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <subspace/core/cuda/error.cuh>
#include <subspace/kernels/detail/cuda/layer_common.cuh>

namespace adjoint {
namespace cuda_detail::scan {

using subspace::cuda_detail::layer::warp_sum;
inline constexpr int warps_per_block = 8;
inline constexpr unsigned threads = 256;

inline unsigned blocks_for(std::int64_t items) {
  const std::int64_t b = (items + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

template <class T>
__global__ void unit_norm_forward(const T* y, T* yhat, float* rstd, std::int64_t n, std::int64_t P, float eps) {
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; row < n;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    float ss = 0;
    for (std::int64_t j = lane; j < P; j += 32) ss += float(y[row * P + j]) * float(y[row * P + j]);
    const float r = __frcp_rn(__fsqrt_rn(warp_sum(ss) / float(P) + eps));
    if (lane == 0) rstd[row] = r;
    for (std::int64_t j = lane; j < P; j += 32) yhat[row * P + j] = T(float(y[row * P + j]) * r);
  }
}

template <class T>
__global__ void unit_norm_backward(const T* yhat, const float* rstd, const T* dyhat, T* dy, std::int64_t n,
                                   std::int64_t P) {
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; row < n;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    float dot = 0;
    for (std::int64_t j = lane; j < P; j += 32) dot += float(dyhat[row * P + j]) * float(yhat[row * P + j]);
    const float c = warp_sum(dot) / float(P), r = rstd[row];
    for (std::int64_t j = lane; j < P; j += 32) {
      const std::int64_t i = row * P + j;
      dy[i] = T(float(dy[i]) + r * (float(dyhat[i]) - float(yhat[i]) * c));
    }
  }
}

template <class T>
__global__ void add_rows(const T* bias, T* x, std::int64_t n, std::int64_t m) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * m;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = T(float(x[i]) + float(bias[i % m]));
}

template <class T, class G>
__global__ void column_sums(const T* dx, G* db, std::int64_t n, std::int64_t m) {
  for (std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m;
       j += std::int64_t(gridDim.x) * blockDim.x) {
    float s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += float(dx[i * m + j]);
    db[j] = G(float(db[j]) + s);
  }
}

template <class T>
__global__ void sigmoid_rows(const T* u, const T* bias, T* a, std::int64_t n, std::int64_t m) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * m;
       i += std::int64_t(gridDim.x) * blockDim.x)
    a[i] = T(1.0f / (1.0f + expf(-(float(u[i]) + float(bias[i % m])))));
}

template <class T>
__global__ void gate_backward(const T* a, const T* abar, T* du, std::int64_t count) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float s = float(a[i]);
    du[i] = T(float(abar[i]) * s * (1.0f - s));
  }
}

template <class T>
__global__ void shifted_product(const T* mu, const T* h, T* out, std::int64_t n, std::int64_t N, std::int64_t seq) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * N;
       i += std::int64_t(gridDim.x) * blockDim.x)
    out[i] = (i / N) % seq == 0 ? T(0.0f) : T(float(mu[i]) * float(h[i - N]));
}

template <class T>
__global__ void scan_forward(const T* a, const T* x, T* h, std::int64_t seqs, std::int64_t seq, std::int64_t N) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < seqs * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t b = k / N, c = k % N;
    float state = 0;
    for (std::int64_t t = 0; t < seq; ++t) {
      const std::int64_t i = (b * seq + t) * N + c;
      state = float(a[i]) * state + float(x[i]);
      h[i] = T(state);
    }
  }
}

template <class T>
__global__ void scan_reverse(const T* a, const T* w, T* mu, std::int64_t seqs, std::int64_t seq, std::int64_t N) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < seqs * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t b = k / N, c = k % N;
    float state = 0;
    for (std::int64_t t = seq; t-- > 0;) {
      const std::int64_t i = (b * seq + t) * N + c;
      const float m = float(w[i]) + state;
      mu[i] = T(m);
      state = m * float(a[i]);
    }
  }
}

template <class T>
__global__ void scan_window(const T* a, const T* w, T* mu, std::int64_t n, std::int64_t seq, std::int64_t N,
                            std::int64_t window) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t i = (k / N) % seq, end = min(seq, i + window) - i;
    float sum = float(w[k]), running = 1;
    for (std::int64_t d = 1; d < end; ++d) {
      running *= float(a[k + d * N]);
      sum += float(w[k + d * N]) * running;
    }
    mu[k] = T(sum);
  }
}

}  // namespace cuda_detail::scan

namespace detail::scan {
template <class T>
inline constexpr bool cuda_value_v = std::is_same_v<T, float> || std::is_same_v<T, subspace::bf16>;
}

using subspace::device_space;

template <class T>
void unit_rmsnorm_forward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> y,
                          float eps, view<T, device_space> yhat, std::type_identity_t<view<float, device_space>> rstd) {
  static_assert(detail::scan::cuda_value_v<T>, "unit_rmsnorm_forward (CUDA): T must be bf16 or float");
  const std::int64_t n = y.dim(0), P = y.dim(1);
  detail::scan::require_rows(y, n, P, "unit_rmsnorm_forward", "y");
  detail::scan::require_rows(yhat, n, P, "unit_rmsnorm_forward", "yhat");
  subspace::require(rstd.numel() == n, "unit_rmsnorm_forward: rstd must hold one value per row");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::unit_norm_forward<<<subspace::cuda_detail::layer::grid_for_rows(n, S::warps_per_block), 32 * S::warps_per_block, 0,
                         ex.stream>>>(y.data(), yhat.data(), rstd.data(), n, P, eps);
  subspace::cuda_check_launch();
}

template <class T>
void unit_rmsnorm_backward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> yhat,
                           std::type_identity_t<view<const float, device_space>> rstd,
                           std::type_identity_t<view<const T, device_space>> dyhat, view<T, device_space> dy) {
  const std::int64_t n = yhat.dim(0), P = yhat.dim(1);
  detail::scan::require_rows(dyhat, n, P, "unit_rmsnorm_backward", "dyhat");
  detail::scan::require_rows(dy, n, P, "unit_rmsnorm_backward", "dy");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::unit_norm_backward<<<subspace::cuda_detail::layer::grid_for_rows(n, S::warps_per_block), 32 * S::warps_per_block,
                          0, ex.stream>>>(yhat.data(), rstd.data(), dyhat.data(), dy.data(), n, P);
  subspace::cuda_check_launch();
}

template <class T>
void add_rows(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> bias,
              view<T, device_space> x) {
  const std::int64_t n = x.dim(0), m = x.dim(1);
  detail::scan::require_rows(x, n, m, "add_rows", "x");
  subspace::require(bias.numel() == m, "add_rows: bias must hold one value per column");
  if (n * m == 0) return;
  namespace S = cuda_detail::scan;
  S::add_rows<<<S::blocks_for(n * m), S::threads, 0, ex.stream>>>(bias.data(), x.data(), n, m);
  subspace::cuda_check_launch();
}

template <class T, class G>
void column_sums(const subspace::exec::cuda& ex, view<const T, device_space> dx, view<G, device_space> db) {
  const std::int64_t n = dx.dim(0), m = dx.dim(1);
  detail::scan::require_rows(dx, n, m, "column_sums", "dx");
  subspace::require(db.numel() == m, "column_sums: db must hold one value per column");
  if (m == 0) return;
  namespace S = cuda_detail::scan;
  S::column_sums<<<S::blocks_for(m), S::threads, 0, ex.stream>>>(dx.data(), db.data(), n, m);
  subspace::cuda_check_launch();
}

template <class T>
void sigmoid_rows(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> u,
                  std::type_identity_t<view<const T, device_space>> bias, view<T, device_space> a) {
  const std::int64_t n = u.dim(0), m = u.dim(1);
  detail::scan::require_rows(a, n, m, "sigmoid_rows", "a");
  subspace::require(bias.numel() == m, "sigmoid_rows: bias must hold one value per column");
  if (n * m == 0) return;
  namespace S = cuda_detail::scan;
  S::sigmoid_rows<<<S::blocks_for(n * m), S::threads, 0, ex.stream>>>(u.data(), bias.data(), a.data(), n, m);
  subspace::cuda_check_launch();
}

template <class T>
void gate_backward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                   std::type_identity_t<view<const T, device_space>> abar, view<T, device_space> du) {
  detail::scan::require_rows(abar, a.dim(0), a.dim(1), "gate_backward", "abar");
  detail::scan::require_rows(du, a.dim(0), a.dim(1), "gate_backward", "du");
  if (a.numel() == 0) return;
  namespace S = cuda_detail::scan;
  S::gate_backward<<<S::blocks_for(a.numel()), S::threads, 0, ex.stream>>>(a.data(), abar.data(), du.data(), a.numel());
  subspace::cuda_check_launch();
}

template <class T>
void scan_forward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                  std::type_identity_t<view<const T, device_space>> x, view<T, device_space> h, std::int64_t seq) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_forward");
  detail::scan::require_rows(x, n, N, "scan_forward", "x");
  detail::scan::require_rows(h, n, N, "scan_forward", "h");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::scan_forward<<<S::blocks_for(n / seq * N), S::threads, 0, ex.stream>>>(a.data(), x.data(), h.data(), n / seq, seq,
                                                                            N);
  subspace::cuda_check_launch();
}

template <class T>
void scan_reverse(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                  std::type_identity_t<view<const T, device_space>> w, view<T, device_space> mu, std::int64_t seq) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_reverse");
  detail::scan::require_rows(w, n, N, "scan_reverse", "w");
  detail::scan::require_rows(mu, n, N, "scan_reverse", "mu");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::scan_reverse<<<S::blocks_for(n / seq * N), S::threads, 0, ex.stream>>>(a.data(), w.data(), mu.data(), n / seq, seq,
                                                                            N);
  subspace::cuda_check_launch();
}

template <class T>
void scan_window(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                 std::type_identity_t<view<const T, device_space>> w, view<T, device_space> mu, std::int64_t seq,
                 std::int64_t window) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_window");
  detail::scan::require_rows(w, n, N, "scan_window", "w");
  detail::scan::require_rows(mu, n, N, "scan_window", "mu");
  subspace::require(window > 0,
                    [&] { return "scan_window: the window must be positive, got " + std::to_string(window); });
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::scan_window<<<S::blocks_for(n * N), S::threads, 0, ex.stream>>>(a.data(), w.data(), mu.data(), n, seq, N, window);
  subspace::cuda_check_launch();
}

template <class T>
void shifted_product(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> mu,
                     std::type_identity_t<view<const T, device_space>> h, view<T, device_space> out, std::int64_t seq) {
  const std::int64_t n = mu.dim(0), N = mu.dim(1);
  detail::scan::require_sequences(mu, seq, "shifted_product");
  detail::scan::require_rows(h, n, N, "shifted_product", "h");
  detail::scan::require_rows(out, n, N, "shifted_product", "out");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::shifted_product<<<S::blocks_for(n * N), S::threads, 0, ex.stream>>>(mu.data(), h.data(), out.data(), n, N, seq);
  subspace::cuda_check_launch();
}

}  // namespace adjoint
