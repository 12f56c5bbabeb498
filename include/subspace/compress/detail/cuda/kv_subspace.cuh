#pragma once
// compress::kv_subspace_mixture on exec::cuda: the codec of a layer for bf16 K/V in device memory (fp32 θ, tables
// and accumulation). The products are the library's gemm (cuBLASLt: bf16 in, bf16 or fp32 out); the small parts
// are kernels here: the chunk means and θ (ψ's bounded head), U(θ) from the fp32 tables, the contraction of a d_kv × r
// gradient to dθ, ψ's gradients and the rows' share of θ's gradient. Every launch covers all the chunks of K (or V)
// at once. The d_kv × r basis U(θ) is formed in bf16 per chunk (sender and receivers form the same bits); no
// d_kv × d_kv matrix is formed except the second moment of the warm-up.
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

// Every kernel works on all the units (chunks of sequences) of one part at once: blockIdx.y, or the element index,
// says the unit. Unit u's rows are z[u, n, d], its θ theta[u, m], its basis u[u, d, r].

inline constexpr int mean_columns = 32, mean_rows = 32;  // column_mean's block: 32 columns × 32 row lanes

/// zbar[u, c] = mean over the n rows of z[u, :, c] (fp32). Block (mean_columns, mean_rows): a warp reads 32
/// adjacent columns of a row; the row lanes' partial sums are added in shared memory.
static __global__ void column_mean(const __nv_bfloat16* z, std::int64_t n, std::int64_t d, float* zbar) {
  __shared__ float partial[mean_rows][mean_columns + 1];
  const std::int64_t u = blockIdx.y, c = std::int64_t(blockIdx.x) * mean_columns + threadIdx.x;
  const __nv_bfloat16* zu = z + u * n * d;
  float s = 0.0f;
  if (c < d) {
#pragma unroll 4
    for (std::int64_t i = threadIdx.y; i < n; i += mean_rows) s += __bfloat162float(zu[i * d + c]);
  }
  partial[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || c >= d) return;
  for (int y = 1; y < mean_rows; ++y) s += partial[y][threadIdx.x];
  zbar[u * d + c] = s / float(n);
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

/// theta[u, l] = bounded(b[l] + Σ_c w[l, c] zbar[u, c] / ‖zbar[u]‖₁) (the sum taken as 0 when zbar[u] is);
/// one block per (l, u).
static __global__ void theta_of(const __nv_bfloat16* w, const __nv_bfloat16* b, const float* zbar, int m,
                                std::int64_t d, float theta_max, float* theta) {
  const std::int64_t l = blockIdx.x, u = blockIdx.y;
  const float* zu = zbar + u * d;
  float s = 0.0f, norm = 0.0f;
  for (std::int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    s += __bfloat162float(w[l * d + c]) * zu[c];
    norm += fabsf(zu[c]);
  }
  s = block_sum(s);
  norm = block_sum(norm);
  if (threadIdx.x == 0)
    theta[u * m + l] = bounded_theta((norm > 0.0f ? s / norm : 0.0f) + __bfloat162float(b[l]), theta_max);
}

/// u[v] = U(θ_v) = U_0 + Σ θ_j P_j + ½ Σ θ_j θ_l Q_jl for every unit v, rounded to bf16; tables [(1 + m + m²) · dr].
static __global__ void rotated_basis(const float* tables, const float* theta, int m, std::int64_t dr,
                                     std::int64_t units, __nv_bfloat16* u) {
  for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < units * dr;
       e += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t i = e % dr;
    const float* th = theta + (e / dr) * m;
    float x = tables[i];
    for (int j = 0; j < m; ++j) {
      x += th[j] * tables[(1 + j) * dr + i];
      for (int l = 0; l < m; ++l) x += 0.5f * th[j] * th[l] * tables[(1 + m + j * m + l) * dr + i];
    }
    u[e] = __float2bfloat16(x);
  }
}

/// dtheta[u, l] (+)= ⟨g[u], ∂U/∂θ_l⟩ at θ_u, ∂U/∂θ_l = P_l + ½ Σ_k θ_k (Q_lk + Q_kl); one block per (l, u).
static __global__ void contract(const float* g, const float* tables, const float* theta, int m, std::int64_t dr,
                                float* dtheta, bool accumulate) {
  const int l = int(blockIdx.x);
  const std::int64_t u = blockIdx.y;
  const float* gu = g + u * dr;
  const float* th = theta + u * m;
  float s = 0.0f;
  for (std::int64_t i = threadIdx.x; i < dr; i += blockDim.x) {
    float du = tables[(1 + l) * dr + i];
    for (int k = 0; k < m; ++k)
      du += 0.5f * th[k] * (tables[(1 + m + l * m + k) * dr + i] + tables[(1 + m + k * m + l) * dr + i]);
    s += gu[i] * du;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) dtheta[u * m + l] = accumulate ? dtheta[u * m + l] + s : s;
}

/// The head's backward, its scalars; one block per unit u: head[u] = [‖z̄_u‖₁, dx·x, du_0 .. du_{m-1}] with du_l =
/// dθ_l (1 − (θ_l/θ_max)²), x = z̄_u / ‖z̄_u‖₁ and dx = Wᵀ du.
static __global__ void theta_backward_scalars(const float* dtheta, const float* theta, const float* zbar,
                                              const __nv_bfloat16* w, int m, std::int64_t d, float theta_max,
                                              float* head) {
  const std::int64_t u = blockIdx.x;
  const float* zu = zbar + u * d;
  float* hu = head + u * (2 + m);
  float* du = hu + 2;
  if (threadIdx.x == 0)
    for (int l = 0; l < m; ++l) du[l] = dtheta[u * m + l] * bounded_theta_slope(theta[u * m + l], theta_max);
  __syncthreads();
  float norm = 0.0f, dot = 0.0f;
  for (std::int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float dx = 0.0f;
    for (int l = 0; l < m; ++l) dx += __bfloat162float(w[l * d + c]) * du[l];
    norm += fabsf(zu[c]);
    dot += dx * zu[c];
  }
  norm = block_sum(norm);
  dot = block_sum(dot);
  if (threadIdx.x == 0) {
    hu[0] = norm;
    hu[1] = norm > 0.0f ? dot / norm : 0.0f;
  }
}

/// The head's backward, per column c, summed over the units: dw[l, c] += Σ_u du_{u,l} x_{u,c}, db[l] += Σ_u du_{u,l};
/// and row_add[u, c] = (dx_c − (dx·x) sign(z̄_{u,c})) / (‖z̄_u‖₁ n), what every row of unit u's dz gets (0 when
/// z̄_u = 0). head from theta_backward_scalars.
static __global__ void theta_backward(const float* head, const float* zbar, const __nv_bfloat16* w, int m,
                                      std::int64_t units, std::int64_t n, std::int64_t d, float* dw, float* db,
                                      float* row_add) {
  for (std::int64_t c = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < d;
       c += std::int64_t(gridDim.x) * blockDim.x) {
    for (std::int64_t u = 0; u < units; ++u) {
      const float* hu = head + u * (2 + m);
      const float norm = hu[0], dot = hu[1], z = zbar[u * d + c];
      const float* du = hu + 2;
      const float x = norm > 0.0f ? z / norm : 0.0f;
      float dx = 0.0f;
      for (int l = 0; l < m; ++l) {
        dw[l * d + c] += du[l] * x;
        dx += __bfloat162float(w[l * d + c]) * du[l];
      }
      if (c == 0)
        for (int l = 0; l < m; ++l) db[l] += du[l];
      const float sign = z > 0.0f ? 1.0f : (z < 0.0f ? -1.0f : 0.0f);
      row_add[u * d + c] = norm > 0.0f ? (dx - dot * sign) / (norm * float(n)) : 0.0f;
    }
  }
}

/// dz[u, i, c] += row_add[u, c] for every unit u and row i.
static __global__ void add_to_rows(const float* row_add, std::int64_t units, std::int64_t n, std::int64_t d,
                                   __nv_bfloat16* dz) {
  for (std::int64_t e = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < units * n * d;
       e += std::int64_t(gridDim.x) * blockDim.x)
    dz[e] = __float2bfloat16(__bfloat162float(dz[e]) + row_add[(e / (n * d)) * d + e % d]);
}

inline const __nv_bfloat16* raw(const bf16* p) { return reinterpret_cast<const __nv_bfloat16*>(p); }
inline __nv_bfloat16* raw(bf16* p) { return reinterpret_cast<__nv_bfloat16*>(p); }

}  // namespace kv_kernels

/// One layer's K/V codec on the device (bf16 K/V, fp32 side channel; G the store's gradient type, fp32). Each call
/// works part by part (K, then V), every unit of the part in the same launches: the GEMMs as strided batches.
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
    for_each_part(r, [&](kv_part p, std::int64_t c0, std::int64_t t0) {
      const T* z = (p == kv_part::key ? k : v).data();
      A* theta = side.data() + t0;
      chunk_theta(ex, r, p, z, theta);
      gemm(ex, op::none, op::none, 1.0f, rows(z, r), basis_of(ex, r, p, theta), 0.0f,
           coefficients(values.data() + c0, r, p));
    });
  }

  void decode(const exec::cuda& ex, const kv_rows& r, view<const T, S> values, view<const A, S> side, view<T, S> k_hat,
              view<T, S> v_hat) {
    if (!compressing()) return dense_.decode(ex, r, values, side, k_hat, v_hat);
    refresh_tables(ex);
    for_each_part(r, [&](kv_part p, std::int64_t c0, std::int64_t t0) {
      const view<const T, S> u = basis_of(ex, r, p, side.data() + t0);
      T* out = (p == kv_part::key ? k_hat : v_hat).data();
      gemm(ex, op::none, op::transpose, 1.0f, coefficients(values.data() + c0, r, p), u, 0.0f, rows(out, r));
    });
  }

  void decode_backward(const exec::cuda& ex, const kv_rows& r, view<const T, S> values, view<const A, S> side,
                       view<const T, S> dk_hat, view<const T, S> dv_hat, view<T, S> grad_values, view<A, S> grad_side) {
    if (!compressing()) return dense_.decode_backward(ex, r, values, side, dk_hat, dv_hat, grad_values, grad_side);
    refresh_tables(ex);
    for_each_part(r, [&](kv_part p, std::int64_t c0, std::int64_t t0) {
      const A* theta = side.data() + t0;
      const view<const T, S> u = basis_of(ex, r, p, theta);
      const view<const T, S> dz = rows((p == kv_part::key ? dk_hat : dv_hat).data(), r);
      const view<const T, S> c = coefficients(values.data() + c0, r, p);
      gemm(ex, op::none, op::none, 1.0f, dz, u, 0.0f, coefficients(grad_values.data() + c0, r, p));
      const view<float, S> g = scratch_view(g_, shape{units(r), r.kv_dim(), rank(p)});
      gemm(ex, op::transpose, op::none, 1.0f, dz, c, 0.0f, g);  // dẐᵀ C
      contract(ex, r, p, g, theta, grad_side.data() + t0, false);
    });
  }

  void encode_backward(const exec::cuda& ex, const kv_rows& r, view<const T, S> k, view<const T, S> v,
                       view<const T, S> values, view<const A, S> side, view<const T, S> grad_values,
                       view<const A, S> grad_side, view<T, S> dk, view<T, S> dv) {
    if (!compressing()) return dense_.encode_backward(ex, r, k, v, values, side, grad_values, grad_side, dk, dv);
    refresh_tables(ex);
    const std::int64_t m = o_.generators, n = r.chunk_rows, d = r.kv_dim(), nu = units(r);
    const view<float, S> dtheta = scratch_view(dtheta_, shape{nu, m});
    const view<float, S> head = scratch_view(head_, shape{nu, 2 + m});
    const view<float, S> row_add = scratch_view(row_add_, shape{nu, d});
    for_each_part(r, [&](kv_part p, std::int64_t c0, std::int64_t t0) {
      const A* theta = side.data() + t0;
      const T* z = (p == kv_part::key ? k : v).data();
      const view<const T, S> u = basis_of(ex, r, p, theta);
      const view<const T, S> dc = coefficients(grad_values.data() + c0, r, p);
      T* dz = (p == kv_part::key ? dk : dv).data();
      gemm(ex, op::none, op::transpose, 1.0f, dc, u, 0.0f, rows(dz, r));  // dZ = dC Uᵀ
      const view<float, S> g = scratch_view(g_, shape{nu, d, rank(p)});
      gemm(ex, op::transpose, op::none, 1.0f, rows(z, r), dc, 0.0f, g);  // Zᵀ dC
      copy(ex, view<const A, S>(grad_side.data() + t0, shape{nu, m}), dtheta);
      contract(ex, r, p, g, theta, dtheta.data(), true);
      const int q = int(p);
      const float* zbar = column_mean(ex, r, z);
      kv_kernels::theta_backward_scalars<<<unsigned(nu), 256, 0, ex.stream>>>(
          dtheta.data(), theta, zbar, kv_kernels::raw(psi_w_[q].data()), int(m), d, float(o_.theta_max), head.data());
      kv_kernels::theta_backward<<<::subspace::cuda_detail::grid_for(d), ::subspace::cuda_detail::block_threads, 0,
                                   ex.stream>>>(head.data(), zbar, kv_kernels::raw(psi_w_[q].data()), int(m), nu, n,
                                                d, psi_dw_[q].data(), psi_db_[q].data(), row_add.data());
      kv_kernels::add_to_rows<<<::subspace::cuda_detail::grid_for(nu * n * d), ::subspace::cuda_detail::block_threads,
                                0, ex.stream>>>(row_add.data(), nu, n, d, kv_kernels::raw(dz));
      cuda_check(cudaGetLastError());
    });
  }

 private:
  static_assert(std::is_same_v<G, float>, "kv_subspace_codec_cuda: the store's gradients are fp32 on the device");

  static std::int64_t units(const kv_rows& r) { return r.batch * r.chunks; }
  /// The rows of every unit of a part, [units, chunk_rows, d_kv].
  template <class U>
  static view<U, S> rows(U* z, const kv_rows& r) {
    return view<U, S>(z, shape{units(r), r.chunk_rows, r.kv_dim()});
  }
  /// The coefficients of every unit of part p, [units, chunk_rows, r].
  template <class U>
  view<U, S> coefficients(U* at, const kv_rows& r, kv_part p) const {
    return view<U, S>(at, shape{units(r), r.chunk_rows, rank(p)});
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

  /// The mean row of each unit of z, [units, d_kv] (in zbar_).
  const float* column_mean(const exec::cuda& ex, const kv_rows& r, const T* z) {
    const std::int64_t d = r.kv_dim();
    float* zbar = scratch_view(zbar_, shape{units(r), d}).data();
    const dim3 grid(unsigned((d + kv_kernels::mean_columns - 1) / kv_kernels::mean_columns), unsigned(units(r)));
    kv_kernels::column_mean<<<grid, dim3(kv_kernels::mean_columns, kv_kernels::mean_rows), 0, ex.stream>>>(
        kv_kernels::raw(z), r.chunk_rows, d, zbar);
    cuda_check(cudaGetLastError());
    return zbar;
  }
  /// theta [units, m] of part p's rows z.
  void chunk_theta(const exec::cuda& ex, const kv_rows& r, kv_part p, const T* z, A* theta) {
    const float* zbar = column_mean(ex, r, z);
    const int q = int(p);
    kv_kernels::theta_of<<<dim3(unsigned(o_.generators), unsigned(units(r))), 256, 0, ex.stream>>>(
        kv_kernels::raw(psi_w_[q].data()), kv_kernels::raw(psi_b_[q].data()), zbar, int(o_.generators), r.kv_dim(),
        float(o_.theta_max), theta);
    cuda_check(cudaGetLastError());
  }
  /// U(θ) of every unit of part p, [units, d_kv, r] (in u_).
  view<const T, S> basis_of(const exec::cuda& ex, const kv_rows& r, kv_part p, const A* theta) {
    const kv_tables& t = tables(p);
    const view<T, S> u = scratch_view(u_, shape{units(r), t.d, t.r});
    kv_kernels::rotated_basis<<<::subspace::cuda_detail::grid_for(units(r) * t.d * t.r),
                                ::subspace::cuda_detail::block_threads, 0, ex.stream>>>(
        tables_[int(p)].data(), theta, int(t.m), t.d * t.r, units(r), kv_kernels::raw(u.data()));
    cuda_check(cudaGetLastError());
    return u;
  }
  /// dtheta [units, m] (+)= ⟨g[u], ∂U/∂θ⟩ for part p.
  void contract(const exec::cuda& ex, const kv_rows& r, kv_part p, view<const float, S> g, const A* theta, A* dtheta,
                bool accumulate) {
    const kv_tables& t = tables(p);
    kv_kernels::contract<<<dim3(unsigned(t.m), unsigned(units(r))), 256, 0, ex.stream>>>(
        g.data(), tables_[int(p)].data(), theta, int(t.m), t.d * t.r, dtheta, accumulate);
    cuda_check(cudaGetLastError());
  }
  /// Σ += Zᵀ Z over every row (fp32 on the device), added into the host second moment at once.
  void accumulate(const exec::cuda& ex, const kv_rows& r, view<const T, S> z, kv_part p) {
    const std::int64_t d = r.kv_dim();
    const view<float, S> zz = scratch_view(zz_, shape{d, d});
    const view<const T, S> all(z.data(), shape{r.batch * r.rows(), d});
    gemm(ex, op::transpose, op::none, 1.0f, all, all, 0.0f, zz);
    const host_tensor<float> h = to_host(ex, view<const float, S>(zz));
    host_tensor<double>& s = sigma(p);
    for (std::int64_t i = 0; i < d * d; ++i) s.data()[i] += double(h.data()[i]);
  }

  kv_identity dense_;
  view<T, S> psi_w_[2], psi_b_[2];
  view<G, S> psi_dw_[2], psi_db_[2];
  tensor<float, S> tables_[2];
  std::uint64_t device_version_ = 0;
  // Scratch, grown only (scratch_view): K and V differ in rank, so u_ and g_ change shape within every call.
  tensor<T, S> u_;
  tensor<float, S> g_, zz_, zbar_, dtheta_, head_, row_add_;
};

}  // namespace subspace::compress
