#pragma once
// orthonormalize and svd on CUDA through cuSOLVER, ordered on ex.stream; stream-ordered scratch memory.
//
// orthonormalize: the input is widened to a column-major double matrix, factorised by cusolverDnDgeqrf, Q formed
// by cusolverDnDorgqr, and written with the sign fix (the signs of R's diagonal, read between the two calls)
// into q, rounded to q's element type. In double, so Q agrees with the host's Householder Q to double rounding
// before the final rounding to fp32.
//
// svd: a row-major a (m x n) is the column-major a^T (n x m); it is widened on the device to a column-major
// double n x m matrix, which cusolverDnDgesvdj (Jacobi, fp64, economy size, tolerance = double machine accuracy,
// up to 100 sweeps) factorises as a^T = U' S V'^T, so a = V' S U'^T: a's U is V' and a's V is U'. One block per
// requested singular pair then finds the sign (the convention of kernels/linalg.hpp) in double and writes s, u
// and vt in the caller's layout, rounded once to fp32. In fp32 gesvdj stops at ~1e-5 relative accuracy (singular
// values and orthonormality), far from the host's fp64 Jacobi; in fp64 the only error left is the final rounding
// (~1e-7). GaLore refreshes only every tau steps, so the fp64 cost is small.
//
// Resources: one cuSOLVER handle (and one gesvdj parameter object) per (device, stream), created on first use
// and kept for the life of the process. Neither call synchronizes the stream: cuSOLVER's `info` outputs stay on
// the device (argument errors are reported through the status codes, which are checked).

#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <climits>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../elementwise.hpp"
#include "../../linalg.hpp"
#include "elementwise.cuh"

namespace subspace {

/// Throws cuda_error naming the call site and cuSOLVER's status unless it is CUSOLVER_STATUS_SUCCESS.
inline void cusolver_check(cusolverStatus_t status, const std::source_location& loc = std::source_location::current()) {
  if (status == CUSOLVER_STATUS_SUCCESS) return;
  const char* name = "unknown status";
  switch (status) {
    case CUSOLVER_STATUS_NOT_INITIALIZED: name = "CUSOLVER_STATUS_NOT_INITIALIZED"; break;
    case CUSOLVER_STATUS_ALLOC_FAILED: name = "CUSOLVER_STATUS_ALLOC_FAILED"; break;
    case CUSOLVER_STATUS_INVALID_VALUE: name = "CUSOLVER_STATUS_INVALID_VALUE"; break;
    case CUSOLVER_STATUS_ARCH_MISMATCH: name = "CUSOLVER_STATUS_ARCH_MISMATCH"; break;
    case CUSOLVER_STATUS_EXECUTION_FAILED: name = "CUSOLVER_STATUS_EXECUTION_FAILED"; break;
    case CUSOLVER_STATUS_INTERNAL_ERROR: name = "CUSOLVER_STATUS_INTERNAL_ERROR"; break;
    case CUSOLVER_STATUS_NOT_SUPPORTED: name = "CUSOLVER_STATUS_NOT_SUPPORTED"; break;
    case CUSOLVER_STATUS_INVALID_WORKSPACE: name = "CUSOLVER_STATUS_INVALID_WORKSPACE"; break;
    default: break;
  }
  throw cuda_error(detail::where(loc) + ": cuSOLVER error " + std::to_string(int(status)) + ": " + name);
}

namespace detail {

/// Stream-ordered scratch memory on exec::cuda (cuda_detail::stream_scratch): work already queued on ex.stream may
/// still use it after it goes out of scope.
template <class T>
struct scratch<exec::cuda, T> {
  cuda_detail::stream_scratch memory;
  shape dims;
  T* ptr;

  scratch(const exec::cuda& ex, const shape& s)
      : memory(std::size_t(s.numel()) * sizeof(T), ex.stream), dims(s), ptr(memory.as<T>()) {}
  view<T, device_space> v() { return view<T, device_space>(ptr, dims); }
};

}  // namespace detail

namespace cuda_detail::linalg {

/// The cuSOLVER handle and gesvdj parameters of one (device, stream).
struct solver {
  cusolverDnHandle_t handle = nullptr;
  gesvdjInfo_t gesvdj = nullptr;
};

inline solver& solver_for(cudaStream_t stream) {
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  static std::mutex mutex;
  static std::map<std::pair<int, std::uintptr_t>, solver> solvers;
  const std::lock_guard lock(mutex);
  const auto key = std::make_pair(device, reinterpret_cast<std::uintptr_t>(stream));
  auto it = solvers.find(key);
  if (it == solvers.end()) {
    solver s;
    cusolver_check(cusolverDnCreate(&s.handle));
    cusolver_check(cusolverDnSetStream(s.handle, stream));
    cusolver_check(cusolverDnCreateGesvdjInfo(&s.gesvdj));
    cusolver_check(cusolverDnXgesvdjSetSortEig(s.gesvdj, 1));      // descending singular values (the default, pinned)
    cusolver_check(cusolverDnXgesvdjSetTolerance(s.gesvdj, 0.0));  // 0: machine accuracy of the precision (fp64)
    cusolver_check(cusolverDnXgesvdjSetMaxSweeps(s.gesvdj, 100));
    it = solvers.emplace(key, s).first;
  }
  return it->second;
}

inline int as_int(std::int64_t x, const char* what) {
  require(x <= INT_MAX,
          [&] { return std::string(what) + " = " + std::to_string(x) + " exceeds cuSOLVER's 32-bit limit"; });
  return int(x);
}

/// w (rows x cols, column-major) <- double(a(i, j)), for any strides of a.
template <class TA>
__global__ void to_colmajor_double(const TA* a, std::int64_t s0, std::int64_t s1, std::int64_t rows, std::int64_t cols,
                                   double* w) {
  const std::int64_t total = rows * cols, stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t idx = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const std::int64_t i = idx % rows, j = idx / rows;
    w[idx] = convert<double>(a[i * s0 + j * s1]);
  }
}

/// diag[j] = w(j, j) for j < cols (the diagonal of R after geqrf).
template <class T>
__global__ void read_diagonal(const T* w, std::int64_t rows, std::int64_t cols, T* diag) {
  for (std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < cols;
       j += std::int64_t(gridDim.x) * blockDim.x)
    diag[j] = w[j * rows + j];
}

/// q(i, j) <- TQ(sign(diag[j]) * w(i, j)), q at any strides (sign(0) = +1).
template <class TQ>
__global__ void write_signed(const double* w, std::int64_t rows, std::int64_t cols, const double* diag, TQ* q,
                             std::int64_t s0, std::int64_t s1) {
  const std::int64_t total = rows * cols, stride = std::int64_t(gridDim.x) * blockDim.x;
  for (std::int64_t idx = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const std::int64_t i = idx % rows, j = idx / rows;
    const double x = diag[j] < 0.0 ? -w[idx] : w[idx];
    q[i * s0 + j * s1] = convert<TQ>(x);
  }
}

/// Q with the sign fix of w (rows x cols, column-major double, overwritten), into q (rows x cols, any strides).
template <class TQ>
void orthonormalize_colmajor(const exec::cuda& ex, double* w, std::int64_t rows64, std::int64_t cols64,
                             view<TQ, device_space> q) {
  if (rows64 == 0 || cols64 == 0) return;
  const int rows = as_int(rows64, "orthonormalize (CUDA): rows"), cols = as_int(cols64, "orthonormalize (CUDA): cols");
  solver& sv = solver_for(ex.stream);
  cusolver_check(cusolverDnSetStream(sv.handle, ex.stream));
  detail::scratch<exec::cuda, double> tau(ex, {cols64}), diag(ex, {cols64});
  detail::scratch<exec::cuda, int> info(ex, {1});
  int lwork_qr = 0, lwork_q = 0;
  cusolver_check(cusolverDnDgeqrf_bufferSize(sv.handle, rows, cols, w, rows, &lwork_qr));
  cusolver_check(cusolverDnDorgqr_bufferSize(sv.handle, rows, cols, cols, w, rows, tau.ptr, &lwork_q));
  detail::scratch<exec::cuda, double> work(ex, {std::int64_t(std::max({lwork_qr, lwork_q, 1}))});
  const int lwork = int(work.dims.numel());
  cusolver_check(cusolverDnDgeqrf(sv.handle, rows, cols, w, rows, tau.ptr, work.ptr, lwork, info.ptr));
  read_diagonal<<<grid_for(cols64), block_threads, 0, ex.stream>>>(w, rows64, cols64, diag.ptr);
  cuda_check_launch();
  cusolver_check(cusolverDnDorgqr(sv.handle, rows, cols, cols, w, rows, tau.ptr, work.ptr, lwork, info.ptr));
  write_signed<<<grid_for(rows64 * cols64), block_threads, 0, ex.stream>>>(w, rows64, cols64, diag.ptr, q.data(),
                                                                           q.stride(0), q.stride(1));
  cuda_check_launch();
}

inline constexpr int svd_threads = 256;

/// One block per singular pair j < pairs. a's U is vl (m x k, column-major, ld m), a's V is vr (n x k, ld n).
/// Finds the sign from the shorter-side vector (vr when m >= n) and writes s[j], u(:, j), vt(j, :) where wanted.
template <class T>
__global__ void __launch_bounds__(svd_threads)
    write_svd(const double* sigma, const double* vl, const double* vr, std::int64_t m, std::int64_t n, T* s,
              std::int64_t s_count, std::int64_t s_stride, T* u, std::int64_t u_cols, std::int64_t u_s0,
              std::int64_t u_s1, T* vt, std::int64_t vt_rows, std::int64_t vt_s0, std::int64_t vt_s1) {
  const std::int64_t j = blockIdx.x;
  const bool tall = m >= n;
  const double* shortv = tall ? vr + j * n : vl + j * m;
  const std::int64_t len = tall ? n : m;
  // argmax |x| over the short vector; ties go to the lower index (as the host's first-maximum scan).
  double best = -1.0;
  std::int64_t best_i = 0;
  for (std::int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    const double a = fabs(shortv[i]);
    if (a > best) {
      best = a;
      best_i = i;
    }
  }
  __shared__ double s_best[svd_threads];
  __shared__ std::int64_t s_idx[svd_threads];
  s_best[threadIdx.x] = best;
  s_idx[threadIdx.x] = best_i;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (int(threadIdx.x) < half) {
      const double ob = s_best[threadIdx.x + half];
      const std::int64_t oi = s_idx[threadIdx.x + half];
      if (ob > s_best[threadIdx.x] || (ob == s_best[threadIdx.x] && oi < s_idx[threadIdx.x])) {
        s_best[threadIdx.x] = ob;
        s_idx[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  const double sign = shortv[s_idx[0]] < 0.0 ? -1.0 : 1.0;
  if (threadIdx.x == 0 && j < s_count) s[j * s_stride] = convert<T>(sigma[j]);
  if (j < u_cols)
    for (std::int64_t i = threadIdx.x; i < m; i += blockDim.x)
      u[i * u_s0 + j * u_s1] = convert<T>(sign * vl[j * m + i]);
  if (j < vt_rows)
    for (std::int64_t i = threadIdx.x; i < n; i += blockDim.x)
      vt[j * vt_s0 + i * vt_s1] = convert<T>(sign * vr[j * n + i]);
}

}  // namespace cuda_detail::linalg

/// Q of the thin QR of a (rows x cols, rows >= cols, float or double, any strides) with the sign fix, into q
/// (float or double, any strides), on ex.stream: cuSOLVER geqrf + orgqr in double. See kernels/linalg.hpp.
template <class TA, class TQ>
  requires((std::is_same_v<std::remove_const_t<TA>, float> || std::is_same_v<std::remove_const_t<TA>, double>) &&
           (std::is_same_v<TQ, float> || std::is_same_v<TQ, double>))
void orthonormalize(const exec::cuda& ex, view<TA, device_space> a, view<TQ, device_space> q) {
  namespace la = cuda_detail::linalg;
  detail::orthonormalize_check(a, q);
  const std::int64_t rows = a.dim(0), cols = a.dim(1);
  if (rows == 0 || cols == 0) return;
  detail::scratch<exec::cuda, double> w(ex, {cols, rows});  // column-major rows x cols
  la::to_colmajor_double<<<cuda_detail::grid_for(rows * cols), cuda_detail::block_threads, 0, ex.stream>>>(
      a.data(), a.stride(0), a.stride(1), rows, cols, w.ptr);
  cuda_check_launch();
  la::orthonormalize_colmajor(ex, w.ptr, rows, cols, q);
}

/// Thin SVD of a (m x n, float or bf16, contiguous) on ex.stream with cuSOLVER's gesvdj in fp64; outputs and
/// sign convention as the host svd in kernels/linalg.hpp (s, u, vt float views, any strides, empty = skipped).
template <class TA, class T>
  requires((std::is_same_v<std::remove_const_t<TA>, float> || std::is_same_v<std::remove_const_t<TA>, bf16>) &&
           std::is_same_v<T, float>)
void svd(const exec::cuda& ex, view<TA, device_space> a, view<T, device_space> s, view<T, device_space> u,
         view<T, device_space> vt) {
  namespace la = cuda_detail::linalg;
  using A = std::remove_const_t<TA>;
  detail::svd_check(a, s, u, vt);
  detail::elementwise::require_contiguous(a, "svd (CUDA)");
  const std::int64_t m = a.dim(0), n = a.dim(1), k = std::min(m, n);
  const std::int64_t pairs = std::max({s.data() ? s.dim(0) : 0, u.data() ? u.dim(1) : 0, vt.data() ? vt.dim(0) : 0});
  if (k == 0 || pairs == 0) return;
  const int mi = la::as_int(m, "svd (CUDA): rows"), ni = la::as_int(n, "svd (CUDA): cols");
  la::as_int(m * n, "svd (CUDA): elements");

  // at = a^T as a column-major n x m matrix (at(i, j) = a(j, i)), widened to fp64 (gesvdj overwrites it).
  detail::scratch<exec::cuda, double> at(ex, {m, n});
  la::to_colmajor_double<<<cuda_detail::grid_for(m * n), cuda_detail::block_threads, 0, ex.stream>>>(
      static_cast<const A*>(a.data()), a.stride(1), a.stride(0), n, m, at.ptr);
  cuda_check_launch();
  detail::scratch<exec::cuda, double> sigma(ex, {k}), ur(ex, {k, n}), vl(ex, {k, m});  // ur: a's V, vl: a's U
  detail::scratch<exec::cuda, int> info(ex, {1});

  la::solver& sv = la::solver_for(ex.stream);
  cusolver_check(cusolverDnSetStream(sv.handle, ex.stream));
  int lwork = 0;
  cusolver_check(cusolverDnDgesvdj_bufferSize(sv.handle, CUSOLVER_EIG_MODE_VECTOR, 1, ni, mi, at.ptr, ni, sigma.ptr,
                                              ur.ptr, ni, vl.ptr, mi, &lwork, sv.gesvdj));
  detail::scratch<exec::cuda, double> work(ex, {std::int64_t(std::max(lwork, 1))});
  cusolver_check(cusolverDnDgesvdj(sv.handle, CUSOLVER_EIG_MODE_VECTOR, 1, ni, mi, at.ptr, ni, sigma.ptr, ur.ptr, ni,
                                   vl.ptr, mi, work.ptr, int(work.dims.numel()), info.ptr, sv.gesvdj));
  la::write_svd<<<unsigned(pairs), la::svd_threads, 0, ex.stream>>>(
      sigma.ptr, vl.ptr, ur.ptr, m, n, s.data(), s.data() ? s.dim(0) : 0, s.data() ? s.stride(0) : 0, u.data(),
      u.data() ? u.dim(1) : 0, u.data() ? u.stride(0) : 0, u.data() ? u.stride(1) : 0, vt.data(),
      vt.data() ? vt.dim(0) : 0, vt.data() ? vt.stride(0) : 0, vt.data() ? vt.stride(1) : 0);
  cuda_check_launch();
}

}  // namespace subspace
