#pragma once
// compress::kv_subspace_mixture on exec::cuda: the codec of a layer for bf16 K/V in device memory (fp32 θ, tables
// and accumulation). The products are the library's gemm (cuBLASLt: bf16 in, bf16 or fp32 out); the small parts
// are kernels here: the chunk mean and θ (ψ's bounded head), U(θ) from the fp32 tables, the contraction of a d_kv × r
// gradient to dθ, ψ's gradients and the rows' share of θ's gradient. The d_kv × r basis U(θ) is formed in bf16 per chunk (sender
// and receivers form the same bits); no d_kv × d_kv matrix is formed except the second moment of the warm-up.
// The host codec (compress/kv_subspace_mixture.hpp) is the reference the GPU tests compare with.

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../kernels/gemm.hpp"
#include "../../kv_subspace_mixture.hpp"

namespace subspace::compress {

namespace kv_kernels {

/// zbar[c] = mean over the n rows of z[:, c] (fp32).
static __global__ void column_mean(const __nv_bfloat16* z, std::int64_t n, std::int64_t d, float* zbar) {
  for (std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (std::int64_t i = 0; i < n; ++i) s += __bfloat162float(z[i * d + c]);
    zbar[c] = s / float(n);
  }
}

/// Block-wide sum of v (blockDim.x a multiple of 32, at most 1024).
__device__ inline float block_sum(float v) {
  __shared__ float partial[32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = int(threadIdx.x) % 32, warp = int(threadIdx.x) / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = int(threadIdx.x) < int(blockDim.x) / 32 ? partial[lane] : 0.0f;
  if (warp == 0)
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  __syncthreads();
  return v;  // in thread 0
}

/// theta[l] = bounded(b[l] + Σ_c w[l, c] zbar[c] / ‖zbar‖₁) (the sum taken as 0 when zbar is); one block per l.
static __global__ void theta_of(const __nv_bfloat16* w, const __nv_bfloat16* b, const float* zbar, std::int64_t d,
                                float theta_max, float* theta) {
  const std::int64_t l = blockIdx.x;
  float s = 0.0f, norm = 0.0f;
  for (std::int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    s += __bfloat162float(w[l * d + c]) * zbar[c];
    norm += fabsf(zbar[c]);
  }
  s = block_sum(s);
  norm = block_sum(norm);
  if (threadIdx.x == 0) theta[l] = bounded_theta((norm > 0.0f ? s / norm : 0.0f) + __bfloat162float(b[l]), theta_max);
}

/// u = U(θ) = U_0 + Σ θ_j P_j + ½ Σ θ_j θ_l Q_jl, rounded to bf16; tables [(1 + m + m²) · dr].
static __global__ void rotated_basis(const float* tables, const float* theta, int m, std::int64_t dr,
                                     __nv_bfloat16* u) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < dr;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    float x = tables[i];
    for (int j = 0; j < m; ++j) {
      x += theta[j] * tables[(1 + j) * dr + i];
      for (int l = 0; l < m; ++l) x += 0.5f * theta[j] * theta[l] * tables[(1 + m + j * m + l) * dr + i];
    }
    u[i] = __float2bfloat16(x);
  }
}

/// dtheta[l] (+)= ⟨G, ∂U/∂θ_l⟩, ∂U/∂θ_l = P_l + ½ Σ_k θ_k (Q_lk + Q_kl); one block per l.
static __global__ void contract(const float* g, const float* tables, const float* theta, int m, std::int64_t dr,
                                float* dtheta, bool accumulate) {
  const int l = int(blockIdx.x);
  float s = 0.0f;
  for (std::int64_t i = threadIdx.x; i < dr; i += blockDim.x) {
    float du = tables[(1 + l) * dr + i];
    for (int k = 0; k < m; ++k)
      du += 0.5f * theta[k] * (tables[(1 + m + l * m + k) * dr + i] + tables[(1 + m + k * m + l) * dr + i]);
    s += g[i] * du;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) dtheta[l] = accumulate ? dtheta[l] + s : s;
}

/// The head's backward, its scalars (one block): head = [‖z̄‖₁, dx·x, du_0 .. du_{m-1}] with du_l = dθ_l (1 −
/// (θ_l/θ_max)²), x = z̄ / ‖z̄‖₁ and dx = Wᵀ du.
static __global__ void theta_backward_scalars(const float* dtheta, const float* theta, const float* zbar,
                                              const __nv_bfloat16* w, int m, std::int64_t d, float theta_max,
                                              float* head) {
  float* du = head + 2;
  if (threadIdx.x == 0)
    for (int l = 0; l < m; ++l) du[l] = dtheta[l] * bounded_theta_slope(theta[l], theta_max);
  __syncthreads();
  float norm = 0.0f, dot = 0.0f;
  for (std::int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float dx = 0.0f;
    for (int l = 0; l < m; ++l) dx += __bfloat162float(w[l * d + c]) * du[l];
    norm += fabsf(zbar[c]);
    dot += dx * zbar[c];
  }
  norm = block_sum(norm);
  dot = block_sum(dot);
  if (threadIdx.x == 0) {
    head[0] = norm;
    head[1] = norm > 0.0f ? dot / norm : 0.0f;
  }
}

/// The head's backward, per column c: dw[l, c] += du_l x_c, db[l] += du_l, and every row of dz gets
/// (dx_c − (dx·x) sign(z̄_c)) / (‖z̄‖₁ n) (nothing when z̄ = 0); head from theta_backward_scalars.
static __global__ void theta_backward(const float* head, const float* zbar, const __nv_bfloat16* w, int m,
                                      std::int64_t n, std::int64_t d, float* dw, float* db, __nv_bfloat16* dz) {
  const float norm = head[0], dot = head[1];
  const float* du = head + 2;
  for (std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    const float x = norm > 0.0f ? zbar[c] / norm : 0.0f;
    float dx = 0.0f;
    for (int l = 0; l < m; ++l) {
      dw[l * d + c] += du[l] * x;
      dx += __bfloat162float(w[l * d + c]) * du[l];
    }
    if (c == 0)
      for (int l = 0; l < m; ++l) db[l] += du[l];
    if (norm == 0.0f) continue;
    const float sign = zbar[c] > 0.0f ? 1.0f : (zbar[c] < 0.0f ? -1.0f : 0.0f);
    const float add = (dx - dot * sign) / (norm * float(n));
    for (std::int64_t i = 0; i < n; ++i) dz[i * d + c] = __float2bfloat16(__bfloat162float(dz[i * d + c]) + add);
  }
}

inline const __nv_bfloat16* raw(const bf16* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }
inline __nv_bfloat16* raw(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

}  // namespace kv_kernels

/// One layer's K/V codec on the device (bf16 K/V, fp32 side channel; G the store's gradient type, fp32).
template <class G>
class kv_subspace_codec_cuda : public kv_subspace_phase {
  using T = bf16;
  using A = float;
  using S = device_space;

 public:
  using value_type = T;
  using kv_subspace_phase::kv_subspace_phase;

  template <class Store>
  void bind(Store& store) {
    if (is_final()) return;
    for (int p = 0; p < 2; ++p) {
      psi_w_[p] = store.value(psi_index(kv_part(p), false));
      psi_b_[p] = store.value(psi_index(kv_part(p), true));
      psi_dw_[p] = store.grad(psi_index(kv_part(p), false));
      psi_db_[p] = store.grad(psi_index(kv_part(p), true));
    }
  }

  void encode(const exec::cuda& ex, const kv_rows& r, view<const T, S> k, view<const T, S> v, view<T, S> values,
              view<A, S> side) {
    if (accumulating()) {
      accumulate(ex, r, k, kv_part::key);
      accumulate(ex, r, v, kv_part::value);
    }
    if (!compressing()) return dense_.encode(ex, r, k, v, values, side);
    refresh_tables(ex);
    for_each_unit(r, k.data(), v.data(), [&](kv_part p, std::int64_t, const T* z, std::int64_t c0, std::int64_t t0) {
      A* theta = side.data() + t0;
      chunk_theta(ex, r, p, z, theta);
      basis_of(ex, p, theta);
      gemm(ex, op::none, op::none, 1.0f, rows(z, r), ro(u_.v()), 0.0f, coefficients(values.data() + c0, r, p));
    });
  }

  void decode(const exec::cuda& ex, const kv_rows& r, view<const T, S> values, view<const A, S> side, view<T, S> k_hat,
              view<T, S> v_hat) {
    if (!compressing()) return dense_.decode(ex, r, values, side, k_hat, v_hat);
    refresh_tables(ex);
    for_each_unit(r, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                  [&](kv_part p, std::int64_t unit, const T*, std::int64_t c0, std::int64_t t0) {
                    basis_of(ex, p, side.data() + t0);
                    T* out = (p == kv_part::key ? k_hat : v_hat).data() + unit * r.chunk_rows * r.kv_dim();
                    gemm(ex, op::none, op::transpose, 1.0f, coefficients(values.data() + c0, r, p), ro(u_.v()), 0.0f,
                         view<T, S>(out, shape{r.chunk_rows, r.kv_dim()}));
                  });
  }

  void decode_backward(const exec::cuda& ex, const kv_rows& r, view<const T, S> values, view<const A, S> side,
                       view<const T, S> dk_hat, view<const T, S> dv_hat, view<T, S> grad_values, view<A, S> grad_side) {
    if (!compressing()) return dense_.decode_backward(ex, r, values, side, dk_hat, dv_hat, grad_values, grad_side);
    refresh_tables(ex);
    for_each_unit(r, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                  [&](kv_part p, std::int64_t unit, const T*, std::int64_t c0, std::int64_t t0) {
                    const A* theta = side.data() + t0;
                    basis_of(ex, p, theta);
                    const T* dz = (p == kv_part::key ? dk_hat : dv_hat).data() + unit * r.chunk_rows * r.kv_dim();
                    const view<const T, S> dzv(dz, shape{r.chunk_rows, r.kv_dim()});
                    const view<const T, S> c = coefficients(values.data() + c0, r, p);
                    gemm(ex, op::none, op::none, 1.0f, dzv, ro(u_.v()), 0.0f,
                         coefficients(grad_values.data() + c0, r, p));
                    g_ = sized(g_, shape{r.kv_dim(), rank(p)});
                    gemm(ex, op::transpose, op::none, 1.0f, dzv, c, 0.0f, g_.v());  // dẐᵀ C
                    contract(ex, p, theta, grad_side.data() + t0, false);
                  });
  }

  void encode_backward(const exec::cuda& ex, const kv_rows& r, view<const T, S> k, view<const T, S> v,
                       view<const T, S> values, view<const A, S> side, view<const T, S> grad_values,
                       view<const A, S> grad_side, view<T, S> dk, view<T, S> dv) {
    if (!compressing()) return dense_.encode_backward(ex, r, k, v, values, side, grad_values, grad_side, dk, dv);
    refresh_tables(ex);
    const std::int64_t m = o_.generators, n = r.chunk_rows, d = r.kv_dim();
    dtheta_ = sized(dtheta_, shape{m});
    head_ = sized(head_, shape{2 + m});
    zbar_ = sized(zbar_, shape{d});
    for_each_unit(
        r, k.data(), v.data(), [&](kv_part p, std::int64_t unit, const T* z, std::int64_t c0, std::int64_t t0) {
          const A* theta = side.data() + t0;
          basis_of(ex, p, theta);
          const view<const T, S> dc = coefficients(grad_values.data() + c0, r, p);
          T* dz = (p == kv_part::key ? dk : dv).data() + unit * n * d;
          gemm(ex, op::none, op::transpose, 1.0f, dc, ro(u_.v()), 0.0f, view<T, S>(dz, shape{n, d}));  // dZ = dC Uᵀ
          g_ = sized(g_, shape{d, rank(p)});
          gemm(ex, op::transpose, op::none, 1.0f, rows(z, r), dc, 0.0f, g_.v());  // Zᵀ dC
          copy(ex, view<const A, S>(grad_side.data() + t0, shape{m}), dtheta_.v());
          contract(ex, p, theta, dtheta_.data(), true);
          const int q = int(p);
          kv_kernels::column_mean<<<::subspace::cuda_detail::grid_for(d), ::subspace::cuda_detail::block_threads, 0,
                                    ex.stream>>>(kv_kernels::raw(z), n, d, zbar_.data());
          kv_kernels::theta_backward_scalars<<<1, 256, 0, ex.stream>>>(
              dtheta_.data(), theta, zbar_.data(), kv_kernels::raw(psi_w_[q].data()), int(m), d, float(o_.theta_max),
              head_.data());
          kv_kernels::theta_backward<<<::subspace::cuda_detail::grid_for(d), ::subspace::cuda_detail::block_threads, 0,
                                       ex.stream>>>(head_.data(), zbar_.data(), kv_kernels::raw(psi_w_[q].data()),
                                                    int(m), n, d, psi_dw_[q].data(), psi_db_[q].data(),
                                                    kv_kernels::raw(dz));
          cuda_check(cudaGetLastError());
        });
  }

 private:
  static_assert(std::is_same_v<G, float>, "kv_subspace_codec_cuda: the store's gradients are fp32 on the device");

  template <class U>
  static view<const U, S> ro(view<U, S> x) {
    return x;
  }
  template <class U>
  static tensor<U, S> sized(tensor<U, S>& t, const shape& s) {
    if (t.shape() == s) return std::move(t);
    return tensor<U, S>(s);
  }
  static view<const T, S> rows(const T* z, const kv_rows& r) {
    return view<const T, S>(z, shape{r.chunk_rows, r.kv_dim()});
  }
  template <class U>
  view<U, S> coefficients(U* at, const kv_rows& r, kv_part p) const {
    return view<U, S>(at, shape{r.chunk_rows, rank(p)});
  }

  /// The device copy of both parts' tables, refreshed after set_tables.
  void refresh_tables(const exec::cuda& ex) {
    if (device_version_ == tables_version()) return;
    for (int p = 0; p < 2; ++p) {
      const kv_tables& t = tables(kv_part(p));
      tables_[p] = tensor<float, S>(shape{t.data.numel()});
      copy(ex, view<const float, host_space>(t.data.v()), tables_[p].v());
    }
    cuda_check(cudaStreamSynchronize(ex.stream));  // the host tables may change at the next switch
    device_version_ = tables_version();
  }

  void chunk_theta(const exec::cuda& ex, const kv_rows& r, kv_part p, const T* z, A* theta) {
    const std::int64_t d = r.kv_dim();
    zbar_ = sized(zbar_, shape{d});
    const int q = int(p);
    kv_kernels::
        column_mean<<<::subspace::cuda_detail::grid_for(d), ::subspace::cuda_detail::block_threads, 0, ex.stream>>>(
            kv_kernels::raw(z), r.chunk_rows, d, zbar_.data());
    kv_kernels::theta_of<<<unsigned(o_.generators), 256, 0, ex.stream>>>(
        kv_kernels::raw(psi_w_[q].data()), kv_kernels::raw(psi_b_[q].data()), zbar_.data(), d, float(o_.theta_max),
        theta);
    cuda_check(cudaGetLastError());
  }
  void basis_of(const exec::cuda& ex, kv_part p, const A* theta) {
    const kv_tables& t = tables(p);
    u_ = sized(u_, shape{t.d, t.r});
    kv_kernels::rotated_basis<<<::subspace::cuda_detail::grid_for(t.d * t.r), ::subspace::cuda_detail::block_threads, 0,
                                ex.stream>>>(tables_[int(p)].data(), theta, int(t.m), t.d * t.r,
                                             kv_kernels::raw(u_.data()));
    cuda_check(cudaGetLastError());
  }
  /// dtheta (+)= ⟨g_, ∂U/∂θ⟩ for part p.
  void contract(const exec::cuda& ex, kv_part p, const A* theta, A* dtheta, bool accumulate) {
    const kv_tables& t = tables(p);
    kv_kernels::contract<<<unsigned(t.m), 256, 0, ex.stream>>>(g_.data(), tables_[int(p)].data(), theta, int(t.m),
                                                               t.d * t.r, dtheta, accumulate);
    cuda_check(cudaGetLastError());
  }
  /// Σ += Zᵀ Z over every row (fp32 on the device), added into the host second moment at once.
  void accumulate(const exec::cuda& ex, const kv_rows& r, view<const T, S> z, kv_part p) {
    const std::int64_t d = r.kv_dim();
    zz_ = sized(zz_, shape{d, d});
    const view<const T, S> all(z.data(), shape{r.batch * r.rows(), d});
    gemm(ex, op::transpose, op::none, 1.0f, all, all, 0.0f, zz_.v());
    const host_tensor<float> h = to_host(ex, view<const float, S>(zz_.v()));
    host_tensor<double>& s = sigma(p);
    for (std::int64_t i = 0; i < d * d; ++i) s.data()[i] += double(h.data()[i]);
  }

  kv_identity dense_;
  view<T, S> psi_w_[2], psi_b_[2];
  view<G, S> psi_dw_[2], psi_db_[2];
  tensor<float, S> tables_[2];
  std::uint64_t device_version_ = 0;
  tensor<T, S> u_;
  tensor<float, S> g_, zz_, zbar_, dtheta_, head_;
};

}  // namespace subspace::compress
