#pragma once
// The gradient engines of adjoint::selective_ssm, a policy of the model (docs/ssm.md):
//
//   adjoint::bptt            backpropagation through a stored graph. On the host, the reference: the forward runs
//                            token by token (all layers of token t, then t + 1), storing every intermediate, and
//                            the backward walks the exact reverse program order. On a device the same graph (B
//                            and C of every token and layer included) is kept and walked layer by layer.
//   adjoint::exact_adjoint   layer by layer: one reverse scan per layer for the adjoint state μ, then every
//                            token's cotangents at once and the maps' vector-Jacobian products as GEMMs. Exact
//                            (equals bptt); stores a, h, ŷ, 1/rms and C per token and layer (recompute_c: C is
//                            evaluated again from ŷ in the backward instead).
//   adjoint::sharded_adjoint the paper's method: every layer's adjoint state is driven by g = dl/dy_K, the head's
//                            cotangent through the residual path alone, so the layers need nothing from each
//                            other in the backward and can run on different ranks at once. Exact only for the
//                            top layer (and K = 1 except the embedding); `window` T̄ > 0 keeps only the pairs
//                            (t, i) with t − i < T̄ in the gate and B terms.
//
// Sharding: a model is built as one stage (a contiguous range of layers) per rank and trained by
// pipeline::pipeline_trainer; exact_adjoint hands δ down from stage to stage like any pipeline backward, and
// sharded_adjoint hands g down unchanged, and splits its backward (backward_input hands g on, backward_weight does
// the layers), so under a zero-bubble schedule the ranks work on their layers at the same time.

#include <cstdint>
#include <type_traits>

namespace adjoint {

struct bptt {
  static constexpr const char* name = "bptt";
};

struct exact_adjoint {
  static constexpr const char* name = "exact";
  bool recompute_c = false;  // evaluate C again in the backward instead of storing it (P·N values per token)
};

struct sharded_adjoint {
  static constexpr const char* name = "sharded";
  std::int64_t window = 0;   // T̄: 0 keeps every pair (no truncation)
  bool recompute_c = false;  // as exact_adjoint's
};

/// Whether the engine stores C per token (bptt always does).
template <class Engine>
bool stores_c(const Engine& e) {
  if constexpr (requires { e.recompute_c; }) return !e.recompute_c;
  else return true;
}

/// Activation values per sequence of T tokens for K layers of width P and state N (parameters, optimizer state
/// and logits excluded), as docs/ssm.md derives them: bptt T·K·(2NP + 3N + 3P); the adjoint engines
/// layers·T·(2N + P + 1 [+ PN]) plus T·P for the cotangent handed down and T·P (exact: the next one) or T·N
/// (sharded: the adjoint state).
template <class Engine>
double activation_values(const Engine& e, std::int64_t T, std::int64_t layers, std::int64_t P, std::int64_t N) {
  const double t = double(T), k = double(layers), p = double(P), n = double(N);
  if constexpr (std::is_same_v<Engine, bptt>) {
    return t * k * (2 * n * p + 3 * n + 3 * p);
  } else {
    const double per = 2 * n + p + 1 + (stores_c(e) ? p * n : 0.0);
    return k * t * per + t * p + (std::is_same_v<Engine, sharded_adjoint> ? t * n : t * p);
  }
}

/// The paper's vjp count for one layer's gate (or B) map: Σ over t of the pairs (t, i ≤ t) within the window
/// (0: none): (1 + T)·T / 2, or T̄·T − T̄·(T̄ − 1) / 2 when T̄ ≤ T.
inline std::int64_t literal_vjps(std::int64_t T, std::int64_t window) {
  if (window <= 0 || window >= T) return (1 + T) * T / 2;
  return window * T - window * (window - 1) / 2;
}

}  // namespace adjoint
