#pragma once
// gemm on CUDA through cuBLASLt: C = alpha * op_a(A) * op_b(B) + beta * C on device views, ordered on ex.stream.
//
// Types: A and B of one type, bf16, fp16 or float; C of that type or float. Compute type fp32 (CUBLAS_COMPUTE_32F:
// fp32 operands are multiplied in full fp32, never TF32), alpha and beta fp32.
//
// Layout. cuBLASLt is column-major; our views are row-major. A row-major C (m x n) is the column-major matrix
// C^T (n x m), so a row-major C is computed as C^T = op_b(B)^T op_a(A)^T, operands swapped; a column-major C (a
// transposed() view) is computed as it stands. Each operand then needs unit stride in one of its last two
// dimensions (the other stride is its leading dimension); the batch stride is stride(0) of a rank-3 view.
//
// Resources. One cuBLASLt handle per device; a 32 MiB workspace per (device, stream), created on first use and
// kept for the life of the process (streams never share one, so GEMMs may run concurrently on several streams);
// the heuristic's algorithm cached per (device, types, ops, sizes, leading dimensions, batch, alignments), so a
// training loop asks the heuristic once per distinct GEMM. All three are guarded by mutexes.

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
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
#include "../../gemm.hpp"

namespace subspace {
namespace cuda_detail::gemm_lt {

inline constexpr std::size_t workspace_bytes = std::size_t(32) << 20;

template <class T>
constexpr cudaDataType_t data_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, fp16>) return CUDA_R_16F;
  else static_assert(dependent_false<T>, "gemm (CUDA): no cuBLASLt data type for this element type");
}

/// The cuBLASLt handle of `device` (created on first use, kept for the life of the process).
inline cublasLtHandle_t handle(int device) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  const std::lock_guard lock(mutex);
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasLtHandle_t h = nullptr;
    cublas_check(cublasLtCreate(&h));
    it = handles.emplace(device, h).first;
  }
  return it->second;
}

/// The workspace of (device, stream): workspace_bytes of device memory, allocated on first use and never shared
/// with another stream.
inline void* workspace(int device, cudaStream_t stream) {
  static std::mutex mutex;
  static std::map<std::pair<int, std::uintptr_t>, void*> buffers;
  const std::lock_guard lock(mutex);
  const auto key = std::make_pair(device, reinterpret_cast<std::uintptr_t>(stream));
  auto it = buffers.find(key);
  if (it == buffers.end()) {
    void* p = nullptr;
    cuda_check(cudaMalloc(&p, workspace_bytes));
    it = buffers.emplace(key, p).first;
  }
  return it->second;
}

/// One operand in cuBLASLt's terms: the column-major matrix as stored (rows x cols, leading dimension ld), the
/// operation applied to it, its batch stride, pointer, type and the alignment its addresses guarantee.
struct operand {
  cublasOperation_t trans = CUBLAS_OP_N;
  std::int64_t rows = 0, cols = 0, ld = 0, batch_stride = 0;
  const void* ptr = nullptr;
  cudaDataType_t type = CUDA_R_32F;
  std::uint32_t align = 256;
};

/// The user's view behind an operand, for error messages.
struct origin {
  const char* name;
  shape dims;
  std::array<std::int64_t, max_rank> strides;
};

inline std::string describe(const origin& o) {
  std::string s = std::string(o.name) + " " + to_string(o.dims) + " with strides [";
  for (int i = 0; i < o.dims.rank; ++i) s += (i ? ", " : "") + std::to_string(o.strides[std::size_t(i)]);
  return s + "]";
}

/// Expresses the logical matrix L (rows x cols), L(i, j) = ptr[i * rs + j * cs], as op(column-major matrix).
/// Returns false when neither stride is 1 (or the other one is too small to be a leading dimension).
inline bool column_major(std::int64_t rows, std::int64_t cols, std::int64_t rs, std::int64_t cs, operand& out) {
  if ((rs == 1 || rows <= 1) && (cols <= 1 || cs >= std::max<std::int64_t>(rows, 1))) {
    out.trans = CUBLAS_OP_N;
    out.rows = rows;
    out.cols = cols;
    out.ld = cols <= 1 ? std::max<std::int64_t>(rows, 1) : cs;
    return true;
  }
  if ((cs == 1 || cols <= 1) && (rows <= 1 || rs >= std::max<std::int64_t>(cols, 1))) {
    out.trans = CUBLAS_OP_T;
    out.rows = cols;
    out.cols = rows;
    out.ld = rows <= 1 ? std::max<std::int64_t>(cols, 1) : rs;
    return true;
  }
  return false;
}

/// The largest power of two (at most 256) dividing the address of every batch entry.
inline std::uint32_t alignment(const void* p, std::int64_t batch_stride_bytes, bool batched) {
  std::uint64_t v = std::uint64_t(reinterpret_cast<std::uintptr_t>(p));
  if (batched) v |= std::uint64_t(batch_stride_bytes);
  if (v == 0) return 256;
  return std::uint32_t(std::min<std::uint64_t>(v & (~v + 1), 256));
}

/// The algorithm cache: the heuristic's first choice per distinct problem.
using algo_key = std::array<std::int64_t, 21>;
inline std::mutex& algo_mutex() {
  static std::mutex m;
  return m;
}
inline std::map<algo_key, cublasLtMatmulAlgo_t>& algo_cache() {
  static std::map<algo_key, cublasLtMatmulAlgo_t> cache;
  return cache;
}

/// A gemm in cuBLASLt's column-major terms: d (m x n) = op(a) (m x k) * op(b) (k x n), `batch` times.
struct call {
  operand a, b, d;
  std::int64_t m = 0, n = 0, k = 0, batch = 1;
};

/// One of the user's operands: where it is, its element type, and its view (for strides and messages).
struct input {
  const void* ptr;
  cudaDataType_t type;
  std::size_t elem_bytes;
  origin from;
};

/// Maps a checked row-major problem onto cuBLASLt. A row-major C (unit stride along a row) is the column-major
/// C^T, computed as C^T = op_b(B)^T op_a(A)^T; a column-major C is computed as C = op_a(A) op_b(B). Throws
/// invalid_argument, naming the operand, when one has no unit stride in its last two dimensions.
inline call plan(const detail::gemm_problem& pr, const input& A, const input& B, const input& C) {
  const auto fail = [](const origin& o) {
    return invalid_argument("gemm (CUDA): " + describe(o) +
                            ": cuBLASLt needs unit stride in one of the last two dimensions (and the other at least "
                            "the extent it steps over); copy the operand to a contiguous tensor first");
  };
  const bool batched = pr.batch > 1;
  const auto finish = [&](operand& o, const input& in, std::int64_t batch_stride) {
    o.ptr = in.ptr;
    o.type = in.type;
    o.batch_stride = batched ? batch_stride : 0;
    o.align = alignment(in.ptr, batch_stride * std::int64_t(in.elem_bytes), batched);
  };
  call c;
  c.k = pr.k;
  c.batch = pr.batch;
  if (column_major(pr.n, pr.m, pr.c.col, pr.c.row, c.d) && c.d.trans == CUBLAS_OP_N) {
    c.m = pr.n;
    c.n = pr.m;
    if (!column_major(pr.n, pr.k, pr.b.col, pr.b.row, c.a)) throw fail(B.from);  // op_b(B)^T: n x k
    if (!column_major(pr.k, pr.m, pr.a.col, pr.a.row, c.b)) throw fail(A.from);  // op_a(A)^T: k x m
    finish(c.a, B, pr.b.batch);
    finish(c.b, A, pr.a.batch);
  } else if (column_major(pr.m, pr.n, pr.c.row, pr.c.col, c.d) && c.d.trans == CUBLAS_OP_N) {
    c.m = pr.m;
    c.n = pr.n;
    if (!column_major(pr.m, pr.k, pr.a.row, pr.a.col, c.a)) throw fail(A.from);  // op_a(A): m x k
    if (!column_major(pr.k, pr.n, pr.b.row, pr.b.col, c.b)) throw fail(B.from);  // op_b(B): k x n
    finish(c.a, A, pr.a.batch);
    finish(c.b, B, pr.b.batch);
  } else {
    throw fail(C.from);
  }
  finish(c.d, C, pr.c.batch);
  return c;
}

/// Runs a planned call on `stream`: D = alpha * op(a) * op(b) + beta * D.
inline void matmul(cudaStream_t stream, const call& c, float alpha, float beta) {
  const operand &a = c.a, &b = c.b, &d = c.d;
  const std::int64_t m = c.m, n = c.n, k = c.k, batch = c.batch;
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const cublasLtHandle_t lt = handle(device);

  cublasLtMatmulDescOpaque_t desc_storage;
  const cublasLtMatmulDesc_t desc = &desc_storage;
  cublas_check(cublasLtMatmulDescInit(desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublas_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &a.trans, sizeof a.trans));
  cublas_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &b.trans, sizeof b.trans));

  cublasLtMatrixLayoutOpaque_t layout_storage[3];
  cublasLtMatrixLayout_t layouts[3] = {&layout_storage[0], &layout_storage[1], &layout_storage[2]};
  const operand* ops[3] = {&a, &b, &d};
  for (int i = 0; i < 3; ++i) {
    const operand& o = *ops[i];
    cublas_check(cublasLtMatrixLayoutInit(layouts[i], o.type, std::uint64_t(o.rows), std::uint64_t(o.cols), o.ld));
    if (batch > 1) {
      const std::int32_t count = std::int32_t(batch);
      cublas_check(
          cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof count));
      cublas_check(cublasLtMatrixLayoutSetAttribute(layouts[i], CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                    &o.batch_stride, sizeof o.batch_stride));
    }
  }

  const algo_key key{device,
                     std::int64_t(a.type),
                     std::int64_t(b.type),
                     std::int64_t(d.type),
                     a.trans,
                     b.trans,
                     m,
                     n,
                     k,
                     batch,
                     a.rows,
                     a.ld,
                     b.rows,
                     b.ld,
                     d.ld,
                     a.batch_stride,
                     b.batch_stride,
                     d.batch_stride,
                     a.align,
                     b.align,
                     d.align};
  cublasLtMatmulAlgo_t algo;
  bool cached = false;
  {
    const std::lock_guard lock(algo_mutex());
    const auto it = algo_cache().find(key);
    if (it != algo_cache().end()) {
      algo = it->second;
      cached = true;
    }
  }
  if (!cached) {
    cublasLtMatmulPreferenceOpaque_t pref_storage;
    const cublasLtMatmulPreference_t pref = &pref_storage;
    cublas_check(cublasLtMatmulPreferenceInit(pref));
    const std::uint64_t max_workspace = workspace_bytes;
    cublas_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                                      sizeof max_workspace));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, std::uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a.align},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b.align},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d.align},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d.align}};
    for (const auto& [attr, value] : aligns)
      cublas_check(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof value));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(lt, desc, layouts[0], layouts[1], layouts[2],
                                                                 layouts[2], pref, 1, &result, &found);
    if (status == CUBLAS_STATUS_NOT_SUPPORTED || (status == CUBLAS_STATUS_SUCCESS && found == 0))
      throw cuda_error("gemm (CUDA): cuBLASLt has no algorithm for m=" + std::to_string(m) + " n=" + std::to_string(n) +
                       " k=" + std::to_string(k) + " batch=" + std::to_string(batch) +
                       " (column-major terms), lda=" + std::to_string(a.ld) + " ldb=" + std::to_string(b.ld) +
                       " ldc=" + std::to_string(d.ld) + ", alignments " + std::to_string(a.align) + "/" +
                       std::to_string(b.align) + "/" + std::to_string(d.align) + " bytes");
    cublas_check(status);
    algo = result.algo;
    const std::lock_guard lock(algo_mutex());
    algo_cache().emplace(key, algo);
  }

  cublas_check(cublasLtMatmul(lt, desc, &alpha, a.ptr, layouts[0], b.ptr, layouts[1], &beta, d.ptr, layouts[2],
                              const_cast<void*>(d.ptr), layouts[2], &algo, workspace(device, stream), workspace_bytes,
                              stream));
}

/// C = beta * C (beta == 0 writes zeros): gemm when k == 0 or alpha == 0.
template <class T>
__global__ void scale_c(T* c, std::int64_t batch, std::int64_t m, std::int64_t n, std::int64_t sb, std::int64_t sr,
                        std::int64_t sc, float beta) {
  const std::int64_t total = batch * m * n;
  for (std::int64_t idx = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t j = idx % n, i = (idx / n) % m, b = idx / (m * n);
    T& x = c[b * sb + i * sr + j * sc];
    x = T(beta == 0.0f ? 0.0f : beta * float(x));
  }
}

}  // namespace cuda_detail::gemm_lt

/// C = alpha * op_a(A) * op_b(B) + beta * C on ex.stream (cuBLASLt). A and B: both bf16, both fp16 or both float
/// (const or not); C: the same type or float. Throws invalid_argument on rank, batch or shape mismatches and on
/// operands without a unit stride in one of their last two dimensions.
template <class TA, class TB, class TC>
void gemm(const exec::cuda& ex, op op_a, op op_b, float alpha, view<TA, device_space> A, view<TB, device_space> B,
          float beta, view<TC, device_space> C) {
  using a_t = std::remove_const_t<TA>;
  using b_t = std::remove_const_t<TB>;
  static_assert(std::is_same_v<a_t, b_t> &&
                    (std::is_same_v<a_t, bf16> || std::is_same_v<a_t, fp16> || std::is_same_v<a_t, float>),
                "gemm (CUDA): A and B must both hold bf16, both fp16 or both float");
  static_assert(!std::is_const_v<TC>, "gemm: C is written, so it must be a view of non-const elements");
  static_assert(std::is_same_v<TC, a_t> || std::is_same_v<TC, float>,
                "gemm (CUDA): C must hold the element type of A and B, or float");
  namespace lt = cuda_detail::gemm_lt;

  const detail::gemm_problem pr = detail::gemm_check(op_a, op_b, A, B, C);
  if (pr.batch == 0 || pr.m == 0 || pr.n == 0) return;
  require(pr.batch <= INT_MAX,
          [&] { return "gemm (CUDA): batch count " + std::to_string(pr.batch) + " above cuBLASLt's limit"; });
  if (pr.k == 0 || alpha == 0.0f) {
    const std::int64_t items = pr.batch * pr.m * pr.n;
    lt::scale_c<<<cuda_detail::grid_for(items), cuda_detail::block_threads, 0, ex.stream>>>(
        C.data(), pr.batch, pr.m, pr.n, pr.c.batch, pr.c.row, pr.c.col, beta);
    cuda_check_launch();
    return;
  }

  const lt::call call = lt::plan(pr, {A.data(), lt::data_type<a_t>(), sizeof(a_t), {"A", A.shape(), A.strides()}},
                                 {B.data(), lt::data_type<b_t>(), sizeof(b_t), {"B", B.shape(), B.strides()}},
                                 {C.data(), lt::data_type<TC>(), sizeof(TC), {"C", C.shape(), C.strides()}});
  lt::matmul(ex.stream, call, alpha, beta);
}

}  // namespace subspace
