#pragma once
// The selective SSM's kernels on CUDA (the host versions in kernels/scan.hpp are their reference). Values are
// bf16 or fp32, everything is computed in fp32 and every scan carries its state in a register.
//
//   norms               one warp per row
//   element-wise        grid-stride over the elements
//   column_sums         one thread per column, walking the rows (adjacent threads read adjacent columns)
//   scan_forward,       three passes over chunks of the sequence (chunk_tokens long, enough of them to fill the
//   scan_reverse        GPU): each (sequence, chunk, channel) thread composes its chunk into one affine map
//                       s ↦ A s + X (fp32); one warp per (sequence, channel) scans those maps across the chunks
//                       with shuffles, giving the state entering each chunk; then every chunk is scanned again from
//                       its entering state. Adjacent threads hold adjacent channels of one token, so every step
//                       reads coalesced rows. The inputs are read twice: 5 units of traffic for the 3 of one pass.
//   scan_window         one thread per (sequence, token, channel): its window of at most W terms

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include <subspace/core/cuda/error.cuh>
#include <subspace/core/cuda/memory.cuh>
#include <subspace/kernels/detail/cuda/layer_common.cuh>

#include "../../scan.hpp"

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

/// Rows each scan thread loads before it computes (memory-level parallelism).
inline constexpr int unroll = 8;

/// Tokens per chunk of the chunked scans: enough chunks that sequences × chunks × channels give about 2^17
/// threads, at least 16 tokens a chunk, at most the sequence.
inline std::int64_t chunk_tokens(std::int64_t seqs, std::int64_t seq, std::int64_t N) {
  const std::int64_t want = (seqs * seq * N) >> 17;
  return want < 16 ? (seq < 16 ? seq : 16) : (want > seq ? seq : want);
}

/// Pass 1 of the forward scan: per (sequence, chunk, channel), the chunk's product of a and its end state from
/// zero, at index (b · chunks + j) · N + c.
template <class T>
__global__ void forward_aggregate(const T* a, const T* x, float* A, float* X, std::int64_t seqs, std::int64_t seq,
                                  std::int64_t N, std::int64_t len, std::int64_t chunks) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < seqs * chunks * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t c = k % N, j = (k / N) % chunks, b = k / (N * chunks);
    const std::int64_t t0 = j * len, t1 = min(seq, t0 + len);
    float prod = 1, state = 0;
    for (std::int64_t t = t0; t < t1; t += unroll) {
      float av[unroll], xv[unroll];
#pragma unroll
      for (int u = 0; u < unroll; ++u) {  // the loads first: `unroll` rows in flight
        const bool in = t + u < t1;
        av[u] = in ? float(a[(b * seq + t + u) * N + c]) : 1.0f;
        xv[u] = in ? float(x[(b * seq + t + u) * N + c]) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        state = av[u] * state + xv[u];
        prod *= av[u];
      }
    }
    A[k] = prod;
    X[k] = state;
  }
}

/// Pass 1 of the reverse scan: per chunk [t0, t1), μ at t0 from μ_{t1} = 0, and Π_{i=t0+1}^{t1} a_i (a_seq = 0).
template <class T>
__global__ void reverse_aggregate(const T* a, const T* w, float* A, float* M, std::int64_t seqs, std::int64_t seq,
                                  std::int64_t N, std::int64_t len, std::int64_t chunks) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < seqs * chunks * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t c = k % N, j = (k / N) % chunks, b = k / (N * chunks);
    const std::int64_t t0 = j * len, t1 = min(seq, t0 + len);
    float prod = 1, m = 0;
    for (std::int64_t top = t1; top > t0; top -= unroll) {  // tokens top - 1 down to top - unroll
      float nv[unroll], wv[unroll];
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        const std::int64_t t = top - 1 - u;
        const bool in = t >= t0;
        nv[u] = in && t + 1 < seq ? float(a[(b * seq + t + 1) * N + c]) : 0.0f;  // a_{t+1}
        wv[u] = in ? float(w[(b * seq + t) * N + c]) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        const std::int64_t t = top - 1 - u;
        if (t < t0) break;
        m = wv[u] + (t + 1 < t1 ? nv[u] * m : 0.0f);
        prod *= nv[u];
      }
    }
    A[k] = prod;
    M[k] = m;
  }
}

/// Pass 2: one warp per (sequence, channel) scans the chunks' (A, X) pairs, 32 at a time (in reverse order for
/// the reverse scan), composing s ↦ A s + X; X[chunk] is replaced by the state entering the chunk.
static __global__ void chunk_carries(const float* A, float* X, std::int64_t seqs, std::int64_t N, std::int64_t chunks,
                                     bool reverse) {
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t k = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; k < seqs * N;
       k += std::int64_t(gridDim.x) * blockDim.x / 32) {
    const std::int64_t b = k / N, c = k % N;
    float carry = 0;  // the state entering this group of 32 chunks
    for (std::int64_t j0 = 0; j0 < chunks; j0 += 32) {
      const std::int64_t step = j0 + lane, j = reverse ? chunks - 1 - step : step;
      const std::int64_t idx = (b * chunks + j) * N + c;
      float Aj = step < chunks ? A[idx] : 1.0f, Xj = step < chunks ? X[idx] : 0.0f;
      for (int off = 1; off < 32; off <<= 1) {  // inclusive: lane l composes steps j0..j0+l
        const float Ap = __shfl_up_sync(0xffffffffu, Aj, off), Xp = __shfl_up_sync(0xffffffffu, Xj, off);
        if (lane >= off) {
          Xj = Aj * Xp + Xj;
          Aj = Aj * Ap;
        }
      }
      const float Ae = __shfl_up_sync(0xffffffffu, Aj, 1), Xe = __shfl_up_sync(0xffffffffu, Xj, 1);
      if (step < chunks) X[idx] = lane == 0 ? carry : Ae * carry + Xe;
      carry = __shfl_sync(0xffffffffu, Aj * carry + Xj, 31);
    }
  }
}

/// Pass 3 of the forward scan: each chunk again, from the state entering it.
template <class T>
__global__ void forward_final(const T* a, const T* x, T* h, const float* entering, std::int64_t seqs, std::int64_t seq,
                              std::int64_t N, std::int64_t len, std::int64_t chunks) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < seqs * chunks * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t c = k % N, j = (k / N) % chunks, b = k / (N * chunks);
    const std::int64_t t0 = j * len, t1 = min(seq, t0 + len);
    float state = entering[k];
    for (std::int64_t t = t0; t < t1; t += unroll) {
      float av[unroll], xv[unroll];
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        const bool in = t + u < t1;
        av[u] = in ? float(a[(b * seq + t + u) * N + c]) : 1.0f;
        xv[u] = in ? float(x[(b * seq + t + u) * N + c]) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        state = av[u] * state + xv[u];
        if (t + u < t1) h[(b * seq + t + u) * N + c] = T(state);
      }
    }
  }
}

/// Pass 3 of the reverse scan: each chunk again, from μ at its end.
template <class T>
__global__ void reverse_final(const T* a, const T* w, T* mu, const float* entering, std::int64_t seqs, std::int64_t seq,
                              std::int64_t N, std::int64_t len, std::int64_t chunks) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < seqs * chunks * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t c = k % N, j = (k / N) % chunks, b = k / (N * chunks);
    const std::int64_t t0 = j * len, t1 = min(seq, t0 + len);
    float m = entering[k];
    for (std::int64_t top = t1; top > t0; top -= unroll) {
      float nv[unroll], wv[unroll];
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        const std::int64_t t = top - 1 - u;
        const bool in = t >= t0;
        nv[u] = in && t + 1 < seq ? float(a[(b * seq + t + 1) * N + c]) : 0.0f;
        wv[u] = in ? float(w[(b * seq + t) * N + c]) : 0.0f;
      }
#pragma unroll
      for (int u = 0; u < unroll; ++u) {
        const std::int64_t t = top - 1 - u;
        if (t < t0) break;
        m = wv[u] + nv[u] * m;
        mu[(b * seq + t) * N + c] = T(m);
      }
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

using subspace::device_space;

template <class T>
void unit_rmsnorm_forward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> y,
                          float eps, view<T, device_space> yhat, std::type_identity_t<view<float, device_space>> rstd) {
  static_assert(subspace::cuda_detail::layer::is_activation_v<T>,
                "unit_rmsnorm_forward (CUDA): T must be bf16, fp16 or float");
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

/// The three passes of a chunked scan (forward or reverse) on [seqs · seq, N].
template <class T>
void chunked_scan(const subspace::exec::cuda& ex, const T* a, const T* x, T* out, std::int64_t n, std::int64_t seq,
                  std::int64_t N, bool reverse) {
  namespace S = cuda_detail::scan;
  const std::int64_t seqs = n / seq, len = S::chunk_tokens(seqs, seq, N), chunks = (seq + len - 1) / len;
  const std::size_t count = std::size_t(seqs * chunks * N);
  const subspace::cuda_detail::stream_scratch A(count * sizeof(float), ex.stream), X(count * sizeof(float), ex.stream);
  const unsigned grid = S::blocks_for(seqs * chunks * N);
  if (reverse)
    S::reverse_aggregate<<<grid, S::threads, 0, ex.stream>>>(a, x, A.as<float>(), X.as<float>(), seqs, seq, N, len,
                                                             chunks);
  else
    S::forward_aggregate<<<grid, S::threads, 0, ex.stream>>>(a, x, A.as<float>(), X.as<float>(), seqs, seq, N, len,
                                                             chunks);
  subspace::cuda_check_launch();
  S::chunk_carries<<<S::blocks_for(seqs * N * 32), S::threads, 0, ex.stream>>>(A.as<float>(), X.as<float>(), seqs, N,
                                                                               chunks, reverse);
  subspace::cuda_check_launch();
  if (reverse)
    S::reverse_final<<<grid, S::threads, 0, ex.stream>>>(a, x, out, X.as<float>(), seqs, seq, N, len, chunks);
  else S::forward_final<<<grid, S::threads, 0, ex.stream>>>(a, x, out, X.as<float>(), seqs, seq, N, len, chunks);
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
  chunked_scan<T>(ex, a.data(), x.data(), h.data(), n, seq, N, false);
}

template <class T>
void scan_reverse(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                  std::type_identity_t<view<const T, device_space>> w, view<T, device_space> mu, std::int64_t seq) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_reverse");
  detail::scan::require_rows(w, n, N, "scan_reverse", "w");
  detail::scan::require_rows(mu, n, N, "scan_reverse", "mu");
  if (n == 0) return;
  chunked_scan<T>(ex, a.data(), w.data(), mu.data(), n, seq, N, true);
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
