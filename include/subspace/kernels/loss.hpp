#pragma once
// The LM head fused with softmax cross-entropy (docs/llama-kernels.md):
//
//   lm_head_cross_entropy(ex, h[N, d], weight[V, d], targets[N], losses[N], dh[N, d], dweight[V, d], grad_scale)
//
// Row i has logits z = weight h_i (z_j = h_i . weight_j), loss_i = logsumexp(z) - z[targets[i]], and, when dh or
// dweight is given (a view with data; pass {} for none), the gradients of grad_scale * sum_i loss_i:
//
//   g_i = grad_scale * (softmax(z) - onehot(targets[i])),   dh_i = g_i weight (overwritten),   dweight += g^T h.
//
// A target of -1 is ignored: its loss is 0 and it adds no gradient. The rows are processed in chunks, so the N x V
// logits never exist at once: per chunk, the logits come from one gemm, a row pass turns them into losses and (in
// place) into g, and two more gemms give that chunk's dh rows and its share of dweight. The chunk has
// options.chunk_rows rows, or (0, the default) as many as fit options.chunk_bytes of logits.
//
// Host (this file): T = float or double (losses and the logits in accum_t<T>), the readable reference; a target
// outside [-1, V) throws invalid_argument. CUDA (detail/cuda/loss.cuh): T = bf16 (or float) h, weight and dh, fp32
// losses, fp32 dweight; logits per chunk in T (options.logits = input, the default) or fp32 (cuBLASLt, fp32
// accumulation), one block per row for the softmax statistics in fp32, g written in T over the logits it replaces;
// a target outside [-1, V) gives a NaN loss for its row and no gradient (the data loaders reject such tokens up
// front; the kernel stays asynchronous).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "../core/vector_math.hpp"
#include "gemm.hpp"

namespace subspace {

/// The type a chunk of logits is stored in on CUDA: h's type (bf16 logits for a bf16 model, as PyTorch's autocast
/// computes them before an fp32 cross-entropy), or fp32. The softmax statistics, losses and gradient arithmetic are
/// fp32 either way; the host keeps its logits in accum_t<T> (= T for its float and double).
enum class lm_head_logits { input, fp32 };

/// How lm_head_cross_entropy splits the rows: chunk_rows rows at a time, or (chunk_rows = 0) as many rows as keep
/// one chunk of logits within chunk_bytes (at least one row); and the type of the logits on CUDA.
struct lm_head_options {
  std::int64_t chunk_rows = 0;
  std::size_t chunk_bytes = std::size_t(1024) << 20;  // 1 GiB: 2 chunks of bf16 logits at 16K rows x 50K vocab
  lm_head_logits logits = lm_head_logits::input;
};

namespace detail::loss {

struct dims {
  std::int64_t rows = 0, width = 0, vocab = 0;
};

/// Checks every operand's shape (dh and dweight only when given); every message names the operation, the operand
/// and the shapes.
template <class VH, class VW, class VT, class VL, class VDH, class VDW>
dims check(const char* op, const VH& h, const VW& weight, const VT& targets, const VL& losses, const VDH& dh,
           const VDW& dweight) {
  require(h.rank() == 2,
          [&] { return std::string(op) + ": h must have rank 2 [N, d], got shape " + to_string(h.shape()); });
  require(weight.rank() == 2 && weight.dim(1) == h.dim(1), [&] {
    return std::string(op) + ": weight has shape " + to_string(weight.shape()) + " but h has shape " +
           to_string(h.shape()) + " (weight must be [V, d] with h's d)";
  });
  const dims d{h.dim(0), h.dim(1), weight.dim(0)};
  require(d.vocab > 0, [&] {
    return std::string(op) + ": weight has shape " + to_string(weight.shape()) + ": the vocabulary is empty";
  });
  require(targets.shape() == shape{d.rows}, [&] {
    return std::string(op) + ": targets has shape " + to_string(targets.shape()) + ", expected " +
           to_string(shape{d.rows});
  });
  require(losses.shape() == shape{d.rows}, [&] {
    return std::string(op) + ": losses has shape " + to_string(losses.shape()) + ", expected " +
           to_string(shape{d.rows});
  });
  require(targets.is_contiguous() && losses.is_contiguous(),
          [&] { return std::string(op) + ": targets and losses must be contiguous"; });
  if (dh.data() != nullptr)
    require(dh.shape() == h.shape(), [&] {
      return std::string(op) + ": dh has shape " + to_string(dh.shape()) + ", expected " + to_string(h.shape());
    });
  if (dweight.data() != nullptr)
    require(dweight.shape() == weight.shape(), [&] {
      return std::string(op) + ": dweight has shape " + to_string(dweight.shape()) + ", expected " +
             to_string(weight.shape());
    });
  return d;
}

/// The rows of one chunk: options.chunk_rows, or as many rows of `bytes_per_logit` logits as chunk_bytes holds
/// (a multiple of 128 when that is at least 128, which suits the gemms), within [1, rows].
inline std::int64_t chunk_rows(const dims& d, std::size_t bytes_per_logit, const lm_head_options& opt) {
  std::int64_t r = opt.chunk_rows;
  if (r <= 0) {
    r = std::int64_t(opt.chunk_bytes / (std::size_t(d.vocab) * bytes_per_logit));
    if (r >= 128) r -= r % 128;
  }
  return std::clamp<std::int64_t>(r, 1, std::max<std::int64_t>(d.rows, 1));
}

}  // namespace detail::loss

/// Per-row cross-entropy of softmax(h weight^T) and, when dh / dweight are given, the gradients of
/// grad_scale * sum(losses) (dh overwritten, dweight +=), on the host. See the top of the file.
template <class H>
  requires(std::is_same_v<std::remove_const_t<H>, float> || std::is_same_v<std::remove_const_t<H>, double>)
void lm_head_cross_entropy(const exec::host& ex, view<H, host_space> h,
                           view<const std::remove_const_t<H>, host_space> weight,
                           view<const std::int32_t, host_space> targets,
                           view<accum_t<std::remove_const_t<H>>, host_space> losses,
                           view<std::remove_const_t<H>, host_space> dh,
                           view<std::remove_const_t<H>, host_space> dweight, float grad_scale,
                           const lm_head_options& options = {}) {
  using T = std::remove_const_t<H>;
  using A = accum_t<T>;
  const char* name = "lm_head_cross_entropy";
  const detail::loss::dims d = detail::loss::check(name, h, weight, targets, losses, dh, dweight);
  for (std::int64_t i = 0; i < d.rows; ++i) {
    const std::int32_t t = targets.data()[i];
    require(t >= -1 && t < d.vocab, [&] {
      return std::string(name) + ": targets[" + std::to_string(i) + "] = " + std::to_string(t) + " is outside [0, " +
             std::to_string(d.vocab) + ") and is not -1 (ignored)";
    });
  }
  if (d.rows == 0) return;
  const bool want_dh = dh.data() != nullptr, want_dw = dweight.data() != nullptr, grads = want_dh || want_dw;
  const std::int64_t R = detail::loss::chunk_rows(d, sizeof(A), options);
  host_tensor<A> logits({R, d.vocab});

  for (std::int64_t r0 = 0; r0 < d.rows; r0 += R) {
    const std::int64_t n = std::min(R, d.rows - r0);
    const view<A, host_space> z = logits.v().slice(0, n);
    const auto h_rows = h.slice(r0, r0 + n);
    gemm(ex, op::none, op::transpose, 1.0f, h_rows, weight, 0.0f, z);
    // Rows are independent, each computed the same way on any thread: the loss, and the logits' gradient
    // grad_scale * (softmax - onehot) in place of the logits.
    parallel_for(for_flops(ex, 20.0 * double(n * d.vocab)), n, [&](std::int64_t first, std::int64_t last) {
      const exec::host one{1, ex.simd};
      for (std::int64_t i = first; i < last; ++i) {
        A* row = z.data() + i * d.vocab;
        const std::int32_t t = targets.data()[r0 + i];
        if (t < 0) {  // ignored
          losses.data()[r0 + i] = A(0);
          if (grads) std::fill(row, row + d.vocab, A(0));
          continue;
        }
        const A m = *std::max_element(row, row + d.vocab), zt = row[t];
        exp_shifted(one, row, d.vocab, m);  // row = e^(z - m)
        A sum = 0;
        for (std::int64_t j = 0; j < d.vocab; ++j) sum += row[j];
        losses.data()[r0 + i] = m + std::log(sum) - zt;
        if (!grads) continue;
        const A scale = A(grad_scale) / sum;
        for (std::int64_t j = 0; j < d.vocab; ++j) row[j] *= scale;
        row[t] -= A(grad_scale);
      }
    });
    if (want_dh) gemm(ex, op::none, op::none, 1.0f, view<const A, host_space>(z), weight, 0.0f, dh.slice(r0, r0 + n));
    if (want_dw) gemm(ex, op::transpose, op::none, 1.0f, view<const A, host_space>(z), h_rows, 1.0f, dweight);
  }
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/loss.cuh"
#endif
