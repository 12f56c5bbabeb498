#pragma once
// gemm: C = alpha * op_a(A) * op_b(B) + beta * C, on rank-2 views (one matrix) or rank-3 views (a strided batch:
// dimension 0 is the batch, its stride the distance between matrices). Row-major semantics, like the tensors:
// element (i, j) of a rank-2 view is data[i * stride(0) + j * stride(1)], whatever those strides are.
//
//   gemm(exec::host{}, op::none, op::transpose, 1.0f, x.v(), w.v(), 0.0f, y.v());   // y = x w^T
//
// Element types may be const or not (a tensor passes as .v()). Products accumulate in accum_t: fp32 for bf16, fp16
// and fp32 operands, fp64 as soon as one operand is double. beta == 0 means C is written, not read (BLAS
// convention: whatever C held, NaN included, is overwritten); alpha == 0 skips the product.
//
// The host implementation below is both the readable reference and fast enough for CPU training demos: it packs
// blocks of op_a(A) and op_b(B) into contiguous panels (every transpose, stride and element type is handled
// there, converting to the accumulator type), runs a register-blocked micro-kernel written so that the compiler
// vectorises it at plain -O2 (no intrinsics), and spreads blocks of C over at most ex.concurrency() threads
// (core/parallel.hpp). Every block of C is computed the same way whichever thread runs it, so results do not depend
// on the thread count. In fp32 on x86-64, the micro-kernel is AVX-512's or AVX2's when the CPU has them
// (detail/gemm_x86.hpp; exec::host::simd = portable keeps the portable one): the same loop around a wider tile.
// The CUDA implementation (cuBLASLt) lives in detail/cuda/gemm.cuh and comes along under nvcc.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "detail/gemm_x86.hpp"

namespace subspace {

/// What gemm does to an operand before multiplying: use it as it is, or its transpose.
enum class op { none, transpose };

inline const char* to_string(op o) { return o == op::none ? "none" : "transpose"; }

/// The accumulator type of gemm on (TA, TB, TC): double when any of them is double, else float.
template <class TA, class TB, class TC>
using gemm_accum_t = std::conditional_t<std::is_same_v<accum_t<TA>, double> || std::is_same_v<accum_t<TB>, double> ||
                                            std::is_same_v<accum_t<TC>, double>,
                                        double, float>;

namespace detail {

/// A matrix as seen by the kernels: element (i, j) of batch entry b is data[b * batch + i * row + j * col].
struct gemm_operand {
  std::int64_t batch = 0, row = 0, col = 0;
};

/// The sizes of one gemm call, checked: C (m x n) = op_a(A) (m x k) * op_b(B) (k x n), `batch` times, and the
/// strides under which op_a(A), op_b(B) and C are addressed (transposes already applied).
struct gemm_problem {
  std::int64_t batch = 1, m = 0, n = 0, k = 0;
  gemm_operand a, b, c;
};

/// Rows and columns of op(X) for a rank-2 or rank-3 view, and the strides that address op(X).
template <class V>
gemm_operand gemm_op_strides(const V& x, op o, std::int64_t& rows, std::int64_t& cols) {
  const int r = x.rank();
  const std::int64_t batch = r == 3 ? x.stride(0) : 0;
  const std::int64_t s0 = x.stride(r - 2), s1 = x.stride(r - 1);
  rows = o == op::none ? x.dim(r - 2) : x.dim(r - 1);
  cols = o == op::none ? x.dim(r - 1) : x.dim(r - 2);
  return o == op::none ? gemm_operand{batch, s0, s1} : gemm_operand{batch, s1, s0};
}

inline std::string gemm_op_shape(std::int64_t rows, std::int64_t cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

/// Checks ranks, batch counts and shapes; every message names the operands and their shapes.
template <class VA, class VB, class VC>
gemm_problem gemm_check(op op_a, op op_b, const VA& A, const VB& B, const VC& C) {
  const auto rank_ok = [](int r) { return r == 2 || r == 3; };
  require(rank_ok(A.rank()) && rank_ok(B.rank()) && rank_ok(C.rank()) && A.rank() == B.rank() && B.rank() == C.rank(),
          [&] {
            return "gemm: A, B and C must all be rank 2, or all rank 3 (a strided batch in dimension 0); got A " +
                   to_string(A.shape()) + ", B " + to_string(B.shape()) + ", C " + to_string(C.shape());
          });
  gemm_problem p;
  if (A.rank() == 3) {
    require(A.dim(0) == B.dim(0) && B.dim(0) == C.dim(0), [&] {
      return "gemm: batch counts (dimension 0) differ: A " + to_string(A.shape()) + ", B " + to_string(B.shape()) +
             ", C " + to_string(C.shape());
    });
    p.batch = A.dim(0);
  }
  std::int64_t ar, ac, br, bc, cr, cc;
  p.a = gemm_op_strides(A, op_a, ar, ac);
  p.b = gemm_op_strides(B, op_b, br, bc);
  p.c = gemm_op_strides(C, op::none, cr, cc);
  require(ac == br, [&] {
    return std::string("gemm: inner dimensions differ: op_a(A) has shape ") + gemm_op_shape(ar, ac) + " (A " +
           to_string(A.shape()) + ", op_a = " + to_string(op_a) + ") but op_b(B) has shape " + gemm_op_shape(br, bc) +
           " (B " + to_string(B.shape()) + ", op_b = " + to_string(op_b) + ")";
  });
  require(cr == ar && cc == bc, [&] {
    return "gemm: C has shape " + to_string(C.shape()) + " but op_a(A) * op_b(B) has shape " + gemm_op_shape(ar, bc) +
           " (A " + to_string(A.shape()) + ", op_a = " + to_string(op_a) + "; B " + to_string(B.shape()) +
           ", op_b = " + to_string(op_b) + ")";
  });
  require(p.batch <= 1 || p.c.batch != 0 || cr * cc == 0, [&] {
    return "gemm: C " + to_string(C.shape()) + " has batch stride 0: the batch entries would overwrite each other";
  });
  p.m = ar;
  p.n = bc;
  p.k = ac;
  return p;
}

}  // namespace detail

namespace detail::gemm_host {

/// Register and cache blocking per accumulator type. mr x nr is the register tile of the micro-kernel (16
/// SSE2 registers: 8 x 8 floats is 16 accumulator vectors; 4 x 4 doubles is 8); a task computes an mc x nc
/// block of C, walking k in steps of kc, with an (mc x kc) panel of A (L2) and a (kc x nc) panel of B packed.
template <class Acc>
struct blocking {
  static_assert(dependent_false<Acc>, "gemm (host): no blocking for this accumulator type (float or double)");
};
template <>
struct blocking<float> {
  static constexpr int mr = 8, nr = 8, mc = 128, nc = 256, kc = 256;
};
template <>
struct blocking<double> {
  static constexpr int mr = 4, nr = 4, mc = 96, nc = 256, kc = 128;
};

/// One row of the register tile: acc[j] += a * b[j]. The loop has a fixed trip count, so it vectorises.
template <class Acc, int NR>
inline void micro_row(Acc (&acc)[NR], Acc a, const Acc* b) {
  for (int j = 0; j < NR; ++j) acc[j] += a * b[j];
}

/// c[mr x nr] (leading dimension ldc) = (add ? c : 0) + a_panel (kc x mr, packed) * b_panel (kc x nr; row p at
/// b + p * ldb: ldb = nr for a packed panel). The rows are unrolled with an index_sequence rather than a
/// compiler-specific pragma.
template <class Acc, int MR, int NR>
inline void micro_kernel(int kc, const Acc* a, const Acc* b, std::int64_t ldb, Acc* c, int ldc, bool add) {
  Acc acc[MR][NR] = {};
  for (int p = 0; p < kc; ++p) {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (micro_row<Acc, NR>(acc[I], a[p * MR + int(I)], b + p * ldb), ...);
    }(std::make_index_sequence<std::size_t(MR)>{});
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = add ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

/// Packs rows [i0, i0 + rows) and columns [p0, p0 + depth) of the matrix x(i, p) = data[i * row + p * col] into
/// panels of R rows: panel q holds x(i0 + q*R + r, p0 + p) at dst[q * R * depth + p * R + r], zero past `rows`.
/// Packing B uses the same routine on op_b(B)^T (panels of columns).
template <class Acc, int R, class T>
void pack(const T* data, std::int64_t row, std::int64_t col, std::int64_t i0, int rows, std::int64_t p0, int depth,
          Acc* dst) {
  for (int q = 0; q < rows; q += R, dst += std::size_t(R) * depth) {
    const int live = std::min(R, rows - q);
    const T* base = data + (i0 + q) * row + p0 * col;
    if (col == 1) {  // each row's depth is contiguous: read it in order (the common layouts of A and of B^T)
      for (int r = 0; r < live; ++r) {
        const T* src = base + r * row;
        for (int p = 0; p < depth; ++p) dst[p * R + r] = convert<Acc>(src[p]);
      }
      for (int r = live; r < R; ++r)
        for (int p = 0; p < depth; ++p) dst[p * R + r] = Acc(0);
      continue;
    }
    for (int p = 0; p < depth; ++p) {
      const T* src = base + p * col;
      int r = 0;
      for (; r < live; ++r) dst[p * R + r] = convert<Acc>(src[r * row]);
      for (; r < R; ++r) dst[p * R + r] = Acc(0);
    }
  }
}

/// An operand, or C, used in place by a kernel that works in the accumulator type: the pointer itself (its constness
/// kept) when T is Acc, else null (tiles of another type are always packed).
template <class Acc, class T>
auto in_place(T* p) {
  using out = std::conditional_t<std::is_const_v<T>, const Acc, Acc>;
  if constexpr (std::is_same_v<std::remove_const_t<T>, Acc>) return static_cast<out*>(p);
  else return static_cast<out*>(nullptr);
}

/// The portable tile: blocking<Acc> and micro_kernel, for the blocked loop below (detail/gemm_x86.hpp has the
/// vectorised ones).
template <class Acc>
struct portable_tile {
  using acc = Acc;
  static constexpr int mr = blocking<Acc>::mr, nr = blocking<Acc>::nr, mc = blocking<Acc>::mc, nc = blocking<Acc>::nc,
                       kc = blocking<Acc>::kc;
  static void micro(int kc_, const Acc* a, const Acc* b, std::int64_t ldb, Acc* c, int ldc, bool add) {
    micro_kernel<Acc, mr, nr>(kc_, a, b, ldb, c, ldc, add);
  }
};

/// The k panels of B a thread keeps packed: consecutive blocks of one column block (j0) reuse them, so B is packed
/// once per column block rather than once per block. Past this many panels only the current one is kept.
inline constexpr std::int64_t cached_b_panels = 4;

/// Per-thread buffers: packed panels of A and B, the mc x nc accumulator block of C, and which B panels are packed.
template <class Tile>
struct workspace {
  using Acc = typename Tile::acc;
  std::int64_t b_panels = 0;
  std::unique_ptr<Acc[]> a{new Acc[std::size_t(Tile::mc) * Tile::kc]};
  std::unique_ptr<Acc[]> b;
  std::unique_ptr<Acc[]> c{new Acc[std::size_t(Tile::mc) * Tile::nc]};
  std::int64_t b_batch = -1, b_col = -1;  // the (batch entry, j0) whose panels b holds; -1: none
};

/// This thread's workspace, kept between calls (a thread computing many small products, as attention's, allocates
/// and faults in its buffers once), with room for the B panels of a depth-k product and no B panel marked packed.
template <class Tile>
workspace<Tile>& thread_workspace(std::int64_t k) {
  thread_local workspace<Tile> ws;
  const std::int64_t panels = std::clamp<std::int64_t>((k + Tile::kc - 1) / Tile::kc, 1, cached_b_panels);
  if (panels > ws.b_panels) {
    ws.b.reset(new typename Tile::acc[std::size_t(panels) * Tile::kc * Tile::nc]);
    ws.b_panels = panels;
  }
  ws.b_batch = ws.b_col = -1;  // another call's B
  return ws;
}

/// Whether the kernels may write C's full tiles in place: fp32 C with contiguous rows, and C = A B (beta 0) or C +=
/// A B over one k panel (beta 1; over several the sum's order would differ from the accumulator's).
template <class Tile, class Acc, class TC>
bool writes_c_in_place(const gemm_problem& pr, Acc alpha, Acc beta) {
  return std::is_same_v<TC, Acc> && pr.c.col == 1 && pr.c.row <= std::numeric_limits<int>::max() && pr.k > 0 &&
         alpha == Acc(1) && (beta == Acc(0) || (beta == Acc(1) && pr.k <= Tile::kc));
}

/// Computes the (mb x nb) block of C at (i0, j0) of batch entry `bi` (mb <= mc rows, nb <= nc columns): the whole k
/// loop, then the epilogue for what the kernels did not write in place.
template <class Tile, class Acc, class TA, class TB, class TC>
void block(const gemm_problem& pr, const TA* A, const TB* B, TC* C, Acc alpha, Acc beta, std::int64_t bi,
           std::int64_t i0, std::int64_t j0, int mc, int nc, workspace<Tile>& ws) {
  using blk = Tile;
  const int mb = int(std::min<std::int64_t>(mc, pr.m - i0));
  const int nb = int(std::min<std::int64_t>(nc, pr.n - j0));
  const TA* a = A + bi * pr.a.batch;
  const TB* b = B + bi * pr.b.batch;
  TC* c = C + bi * pr.c.batch;
  Acc* acc = ws.c.get();  // ld = blk::nc; padded micro-tiles stay inside
  if (alpha == Acc(0) || pr.k == 0) std::fill(acc, acc + std::size_t(blk::mc) * blk::nc, Acc(0));
  // The full tiles of C the kernels write in place (saving a pass through the accumulator block); none: 0 x 0.
  const bool direct = writes_c_in_place<Tile, Acc, TC>(pr, alpha, beta);
  const int direct_rows = direct ? mb / blk::mr * blk::mr : 0, direct_cols = direct ? nb / blk::nr * blk::nr : 0;

  if (alpha != Acc(0)) {
    // Full tiles of fp32 operands laid out for the kernel are read in place where the tile has a kernel for it:
    // A's rows contiguous along k (micro_direct), B's rows contiguous along n (its row stride as ldb). The rest (a
    // last partial tile, other types and layouts) is packed.
    constexpr bool in_place_a = requires { &Tile::micro_direct; } && std::is_same_v<TA, Acc>;
    constexpr bool in_place_b = requires { &Tile::micro_direct; } && std::is_same_v<TB, Acc>;
    const int a_packed_from = in_place_a && pr.a.col == 1 ? mb / blk::mr * blk::mr : 0;
    const int b_packed_from = in_place_b && pr.b.col == 1 ? nb / blk::nr * blk::nr : 0;
    const std::int64_t panels = (pr.k + blk::kc - 1) / blk::kc;
    const bool keep = panels <= ws.b_panels;  // every packed panel of B fits: reuse them across this column block
    const bool packed = keep && ws.b_batch == bi && ws.b_col == j0;
    for (std::int64_t p0 = 0, panel = 0; p0 < pr.k; p0 += blk::kc, ++panel) {
      const int kb = int(std::min<std::int64_t>(blk::kc, pr.k - p0));
      Acc* bp = ws.b.get() + std::size_t(keep ? panel : 0) * blk::kc * blk::nc;
      if (a_packed_from < mb)
        pack<Acc, blk::mr>(a, pr.a.row, pr.a.col, i0 + a_packed_from, mb - a_packed_from, p0, kb, ws.a.get());
      if (!packed && b_packed_from < nb)  // op_b(B)^T: columns as rows
        pack<Acc, blk::nr>(b, pr.b.col, pr.b.row, j0 + b_packed_from, nb - b_packed_from, p0, kb, bp);
      for (int jr = 0; jr < nb; jr += blk::nr) {
        const bool b_here = jr < b_packed_from;
        const Acc* bt =
            b_here ? in_place<Acc>(b) + p0 * pr.b.row + (j0 + jr) : bp + std::size_t(jr - b_packed_from) * kb;
        const std::int64_t ldb = b_here ? pr.b.row : blk::nr;
        for (int ir = 0; ir < mb; ir += blk::mr) {
          const bool c_here = ir < direct_rows && jr < direct_cols;
          Acc* ctile =
              c_here ? in_place<Acc>(c) + (i0 + ir) * pr.c.row + (j0 + jr) : acc + std::size_t(ir) * blk::nc + jr;
          const int ldc = c_here ? int(pr.c.row) : blk::nc;
          const bool add = p0 > 0 || (c_here && beta == Acc(1));  // the first k panel writes
          if constexpr (requires { &Tile::micro_direct; }) {
            if (ir < a_packed_from) {
              Tile::micro_direct(kb, in_place<Acc>(a) + (i0 + ir) * pr.a.row + p0, pr.a.row, bt, ldb, ctile, ldc, add);
              continue;
            }
          }
          Tile::micro(kb, ws.a.get() + std::size_t(ir - a_packed_from) * kb, bt, ldb, ctile, ldc, add);
        }
      }
    }
    ws.b_batch = keep ? bi : -1;
    ws.b_col = keep ? j0 : -1;
  }

  for (int i = 0; i < mb; ++i) {
    TC* crow = c + (i0 + i) * pr.c.row + j0 * pr.c.col;
    const Acc* arow = acc + std::size_t(i) * blk::nc;
    if (pr.c.col == 1) {                                     // contiguous rows of C: the loops vectorise
      const int j0_row = i < direct_rows ? direct_cols : 0;  // columns before it were written in place
      if (beta == Acc(0))
        for (int j = j0_row; j < nb; ++j) crow[j] = convert<TC>(alpha * arow[j]);
      else
        for (int j = j0_row; j < nb; ++j) crow[j] = convert<TC>(alpha * arow[j] + beta * convert<Acc>(crow[j]));
    } else if (beta == Acc(0)) {
      for (int j = 0; j < nb; ++j) crow[j * pr.c.col] = convert<TC>(alpha * arow[j]);
    } else {
      for (int j = 0; j < nb; ++j)
        crow[j * pr.c.col] = convert<TC>(alpha * arow[j] + beta * convert<Acc>(crow[j * pr.c.col]));
    }
  }
}

/// Runs the problem's blocks of C on the threads of `ex` worth using for its size (parallel_for: each thread claims
/// blocks in order, the blocks of one column block in a row, with its own workspace). Blocks are
/// mc rows high, or fewer when that leaves threads without a block (the row blocking does not change any element's
/// arithmetic, so results still do not depend on the thread count).
template <class Tile, class Acc, class TA, class TB, class TC>
void run_tiled(const gemm_problem& pr, const TA* A, const TB* B, TC* C, Acc alpha, Acc beta, const exec::host& ex) {
  using blk = Tile;
  const double flops = 2.0 * double(pr.batch) * double(pr.m) * double(pr.n) * double(pr.k);
  const exec::host workers = for_flops(ex, flops);
  const std::int64_t threads = workers.concurrency();
  const auto round_up = [](std::int64_t x, int to) { return (x + to - 1) / to * to; };
  // Blocks of even size (n = 344 in two blocks of 192 and 152 rather than 256 and 88), and enough of them, in a
  // multiple of the threads where a few more suffice, that no thread is left idle while another finishes.
  const std::int64_t nblocks = (pr.n + blk::nc - 1) / blk::nc;
  const int nc = int(round_up((pr.n + nblocks - 1) / nblocks, blk::nr));
  std::int64_t mblocks = (pr.m + blk::mc - 1) / blk::mc;
  const std::int64_t most_mblocks = (pr.m + blk::mr - 1) / blk::mr;
  while (mblocks < most_mblocks && pr.batch * mblocks * nblocks < threads)
    mblocks = std::min(most_mblocks, 2 * mblocks);
  for (std::int64_t more = mblocks; more <= std::min(most_mblocks, mblocks + 3); ++more) {
    if (pr.batch * more * nblocks % threads == 0) {
      mblocks = more;
      break;
    }
  }
  const int mc = int(round_up((pr.m + mblocks - 1) / mblocks, blk::mr));
  mblocks = (pr.m + mc - 1) / mc;
  const std::int64_t tasks = pr.batch * mblocks * nblocks;
  // Each thread claims the next block until none is left, so a thread that starts late or runs slow takes fewer.
  std::atomic<std::int64_t> next{0};
  parallel_for(workers, std::min<std::int64_t>(tasks, workers.concurrency()), [&](std::int64_t, std::int64_t) {
    workspace<Tile>& w = thread_workspace<Tile>(pr.k);
    for (std::int64_t t = next++; t < tasks; t = next++) {
      const std::int64_t bi = t / (mblocks * nblocks), rest = t % (mblocks * nblocks);
      block<Tile>(pr, A, B, C, alpha, beta, bi, (rest % mblocks) * mc, (rest / mblocks) * nc, mc, nc, w);
    }
  });
}

/// The widest tile `ex` and the CPU allow, else the portable one.
template <class Acc, class TA, class TB, class TC>
void run(const gemm_problem& pr, const TA* A, const TB* B, TC* C, Acc alpha, Acc beta, const exec::host& ex) {
  const bool vectorised =
      run_vectorised<Acc>(ex, [&]<class Tile>(Tile) { run_tiled<Tile>(pr, A, B, C, alpha, beta, ex); });
  if (!vectorised) run_tiled<portable_tile<Acc>>(pr, A, B, C, alpha, beta, ex);
}

}  // namespace detail::gemm_host

/// C = alpha * op_a(A) * op_b(B) + beta * C on the host. A, B, C: float, double, bf16 or fp16, in any mix (A and B
/// const or not). Any strides. Throws invalid_argument on rank, batch or shape mismatches.
template <class TA, class TB, class TC>
void gemm(const exec::host& ex, op op_a, op op_b, float alpha, view<TA, host_space> A, view<TB, host_space> B,
          float beta, view<TC, host_space> C) {
  using a_t = std::remove_const_t<TA>;
  using b_t = std::remove_const_t<TB>;
  static_assert(is_element_v<a_t> && is_element_v<b_t> && is_element_v<std::remove_const_t<TC>>,
                "gemm (host): A, B and C must hold float, double, bf16 or fp16");
  static_assert(!std::is_const_v<TC>, "gemm: C is written, so it must be a view of non-const elements");
  using acc_t = gemm_accum_t<a_t, b_t, TC>;

  const detail::gemm_problem pr = detail::gemm_check(op_a, op_b, A, B, C);
  if (pr.batch == 0 || pr.m == 0 || pr.n == 0) return;
  detail::gemm_host::run<acc_t>(pr, static_cast<const a_t*>(A.data()), static_cast<const b_t*>(B.data()), C.data(),
                                acc_t(alpha), acc_t(beta), ex);
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/gemm.cuh"
#endif
