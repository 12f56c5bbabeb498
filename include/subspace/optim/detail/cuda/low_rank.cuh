#pragma once
// optim::galore / optim::golore on exec::cuda: the element loops of the projected Adam step as kernels (the same
// element functions as the host, detail::subspace_adam_update and detail::decayed), and the projection, which
// widens bf16 gradients to fp32 in stream-ordered scratch first (cuBLASLt multiplies operands of one type).
//
// A projected step on CUDA is: [bf16 -> fp32 cast], GEMM R = project(G), one Adam kernel over R, M, V, GEMM
// W += back_project(N) (beta = 1), and one kernel for decay and the working copy (skipped when there is neither).
// A refresh adds the SVD (cuSOLVER gesvdj, fp64) or the Gaussian fill and QR (cuSOLVER geqrf/orgqr, fp64), and
// the r x r change of basis and GEMM of the reprojection. Nothing synchronizes the stream.

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../kernels/detail/cuda/elementwise.cuh"
#include "../../../kernels/detail/cuda/gemm.cuh"
#include "../../../kernels/detail/cuda/linalg.cuh"
#include "../low_rank.hpp"
#include "adamw.cuh"
#include "projector.cuh"

namespace subspace::optim::detail {

template <class T>
__global__ void subspace_adam_kernel(T* __restrict__ r, T* __restrict__ m, T* __restrict__ v, std::int64_t n,
                                     subspace_adam_coefficients<T> c) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    T mi = m[i], vi = v[i];
    r[i] = subspace_adam_update(r[i], mi, vi, c);
    m[i] = mi;
    v[i] = vi;
  }
}

template <class T>
__global__ void finish_kernel(T* __restrict__ w, bf16* __restrict__ working, std::int64_t n, bool decay, T neg_lr_wd) {
  const std::int64_t stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    T x = w[i];
    if (decay) {
      x = decayed(x, neg_lr_wd);
      w[i] = x;
    }
    if (working) working[i] = bf16(float(x));
  }
}

template <>
struct low_rank_impl<exec::cuda> {
  template <class G, class T>
  static void project(const exec::cuda& ex, const projection& p, view<G, device_space> grad,
                      view<const T, device_space> P, view<T, device_space> R) {
    using GT = std::remove_const_t<G>;
    static_assert(std::is_same_v<T, float>, "optim::galore/golore (CUDA): the projected state is fp32");
    if constexpr (std::is_same_v<GT, float>) {
      optim::project(ex, p, grad, P, R);
    } else {
      subspace::detail::scratch<exec::cuda, float> wide(ex, grad.shape());
      cast(ex, grad, wide.v());
      optim::project(ex, p, view<const float, device_space>(wide.v()), P, R);
    }
  }

  template <class T>
  static void adam(const exec::cuda& ex, view<T, device_space> R, view<T, device_space> M, view<T, device_space> V,
                   const subspace_adam_coefficients<T>& c) {
    const std::int64_t n = R.numel();
    if (n == 0) return;
    subspace_adam_kernel<T>
        <<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, ex.stream>>>(R.data(), M.data(), V.data(), n, c);
    cuda_check_launch();
  }

  template <class T>
  static void finish(const exec::cuda& ex, view<T, device_space> W, bool decay, T neg_lr_wd,
                     view<bf16, device_space> working) {
    const std::int64_t n = W.numel();
    if (n == 0) return;
    finish_kernel<T><<<cuda_detail::grid_for(n), cuda_detail::block_threads, 0, ex.stream>>>(W.data(), working.data(),
                                                                                             n, decay, neg_lr_wd);
    cuda_check_launch();
  }
};

}  // namespace subspace::optim::detail
