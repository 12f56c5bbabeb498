#pragma once
// Engine 1 of adjoint::selective_ssm on the host: the literal recurrence, token by token. The forward runs every
// layer of token t before token t + 1 and stores every intermediate; the backward walks the exact reverse program
// order (t from last to first, and within t the layers from top to bottom), carrying each layer's dL/dh to the
// previous token. Plain loops over raw memory, written to be read against docs/ssm.md, not to be fast.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace adjoint::detail {

/// One layer's parameters and gradients (row-major [out, in] matrices; a: N×P, b: NP×P, c: PN×P).
template <class T, class G>
struct layer_refs {
  const T *a_w, *a_b, *b_w, *b_b, *c_w, *c_b;
  G *da_w, *da_b, *db_w, *db_b, *dc_w, *dc_b;
};

/// What the BPTT forward stores per (token, layer): the layer's input y, ŷ, C·h, the gate's pre-activation u,
/// a, h, B (N×P) and C (P×N), and 1/rms.
template <class T, class A>
struct bptt_tape {
  T *y, *yhat, *out, *u, *a, *h, *b, *c;
  A* rstd;
};

template <class A, class T>
A dot_row(const T* w, const T* x, std::int64_t n) {
  A s = 0;
  for (std::int64_t j = 0; j < n; ++j) s += A(w[j]) * A(x[j]);
  return s;
}

/// Forward of layers [0, L) of `seqs` sequences of `seq` tokens: y [rows, P] enters holding the stream and
/// leaves holding the top layer's output. tape[l] points at layer l's [rows, ·] buffers.
template <class T, class G, class A>
void bptt_forward(std::int64_t seqs, std::int64_t seq, std::int64_t P, std::int64_t N, A eps,
                  const std::vector<layer_refs<T, G>>& layers, const std::vector<bptt_tape<T, A>>& tape, T* y) {
  const std::int64_t NP = N * P;
  std::vector<A> bx(static_cast<std::size_t>(N));
  for (std::int64_t s = 0; s < seqs; ++s)
    for (std::int64_t t = 0; t < seq; ++t) {
      const std::int64_t r = s * seq + t;
      T* yr = y + r * P;
      for (std::size_t l = 0; l < layers.size(); ++l) {
        const layer_refs<T, G>& w = layers[l];
        const bptt_tape<T, A>& tp = tape[l];
        std::copy(yr, yr + P, tp.y + r * P);
        const A rs = A(1) / std::sqrt(dot_row<A>(yr, yr, P) / A(P) + eps);
        tp.rstd[r] = rs;
        T* yh = tp.yhat + r * P;
        for (std::int64_t j = 0; j < P; ++j) yh[j] = T(A(yr[j]) * rs);
        T* b = tp.b + r * NP;
        T* c = tp.c + r * NP;
        for (std::int64_t i = 0; i < NP; ++i) {
          b[i] = T(dot_row<A>(w.b_w + i * P, yh, P) + A(w.b_b[i]));
          c[i] = T(dot_row<A>(w.c_w + i * P, yh, P) + A(w.c_b[i]));
        }
        for (std::int64_t n = 0; n < N; ++n) {
          const A u = dot_row<A>(w.a_w + n * P, yh, P);
          tp.u[r * N + n] = T(u);
          const A a = A(1) / (A(1) + std::exp(-(u + A(w.a_b[n]))));
          tp.a[r * N + n] = T(a);
          bx[std::size_t(n)] = dot_row<A>(b + n * P, yh, P);
          const A prev = t > 0 ? A(tp.h[(r - 1) * N + n]) : A(0);
          tp.h[r * N + n] = T(a * prev + bx[std::size_t(n)]);
        }
        for (std::int64_t p = 0; p < P; ++p) {
          const A o = dot_row<A>(c + p * N, tp.h + r * N, N);
          tp.out[r * P + p] = T(o);
          yr[p] = T(A(yr[p]) + o);
        }
      }
    }
}

/// Backward of the same layers: dy [rows, P] enters holding dL/d(top output) per token and leaves holding
/// dL/d(stream entering layer 0). Parameter gradients accumulate.
template <class T, class G, class A>
void bptt_backward(std::int64_t seqs, std::int64_t seq, std::int64_t P, std::int64_t N,
                   const std::vector<layer_refs<T, G>>& layers, const std::vector<bptt_tape<T, A>>& tape, T* dy) {
  const std::int64_t NP = N * P;
  const std::size_t L = layers.size();
  std::vector<A> carry(L * static_cast<std::size_t>(N)), dh(static_cast<std::size_t>(N)),
      dyh(static_cast<std::size_t>(P)), d(static_cast<std::size_t>(P));
  for (std::int64_t s = 0; s < seqs; ++s) {
    std::fill(carry.begin(), carry.end(), A(0));  // dL/dh_l^{t} from token t + 1, already multiplied by a^{t+1}
    for (std::int64_t t = seq; t-- > 0;) {
      const std::int64_t r = s * seq + t;
      for (std::int64_t p = 0; p < P; ++p) d[std::size_t(p)] = A(dy[r * P + p]);
      for (std::size_t l = L; l-- > 0;) {
        const layer_refs<T, G>& w = layers[l];
        const bptt_tape<T, A>& tp = tape[l];
        const T* yh = tp.yhat + r * P;
        const T* b = tp.b + r * NP;
        const T* c = tp.c + r * NP;
        const T* h = tp.h + r * N;
        std::fill(dyh.begin(), dyh.end(), A(0));
        // y_l = y_{l-1} + C h:  dC = d hᵀ, dh += Cᵀ d
        for (std::int64_t n = 0; n < N; ++n) dh[std::size_t(n)] = carry[l * std::size_t(N) + std::size_t(n)];
        for (std::int64_t p = 0; p < P; ++p)
          for (std::int64_t n = 0; n < N; ++n) {
            const std::int64_t i = p * N + n;
            const A dc = d[std::size_t(p)] * A(h[n]);
            dh[std::size_t(n)] += d[std::size_t(p)] * A(c[i]);
            w.dc_b[i] = G(A(w.dc_b[i]) + dc);
            for (std::int64_t j = 0; j < P; ++j) {
              w.dc_w[i * P + j] = G(A(w.dc_w[i * P + j]) + dc * A(yh[j]));
              dyh[std::size_t(j)] += dc * A(w.c_w[i * P + j]);
            }
          }
        // h = a ⊙ h_prev + B ŷ
        for (std::int64_t n = 0; n < N; ++n) {
          const A g = dh[std::size_t(n)], a = A(tp.a[r * N + n]);
          const A prev = t > 0 ? A(tp.h[(r - 1) * N + n]) : A(0);
          const A du = g * prev * a * (A(1) - a);
          w.da_b[n] = G(A(w.da_b[n]) + du);
          for (std::int64_t j = 0; j < P; ++j) {
            const std::int64_t i = n * P + j;
            w.da_w[i] = G(A(w.da_w[i]) + du * A(yh[j]));
            dyh[std::size_t(j)] += du * A(w.a_w[i]) + g * A(b[i]);
            const A db = g * A(yh[j]);
            w.db_b[i] = G(A(w.db_b[i]) + db);
            for (std::int64_t q = 0; q < P; ++q) {
              w.db_w[i * P + q] = G(A(w.db_w[i * P + q]) + db * A(yh[q]));
              dyh[std::size_t(q)] += db * A(w.b_w[i * P + q]);
            }
          }
          carry[l * std::size_t(N) + std::size_t(n)] = g * a;
        }
        // ŷ = y · rstd:  d += rstd · (dŷ − ŷ · mean(dŷ ⊙ ŷ))
        A dot = 0;
        for (std::int64_t j = 0; j < P; ++j) dot += dyh[std::size_t(j)] * A(yh[j]);
        const A rs = tp.rstd[r], m = dot / A(P);
        for (std::int64_t j = 0; j < P; ++j) d[std::size_t(j)] += rs * (dyh[std::size_t(j)] - A(yh[j]) * m);
      }
      for (std::int64_t p = 0; p < P; ++p) dy[r * P + p] = T(d[std::size_t(p)]);
    }
  }
}

}  // namespace adjoint::detail
