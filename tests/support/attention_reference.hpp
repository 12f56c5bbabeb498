#pragma once
// Shared by the host and CUDA attention and loss tests (host code only): naive float64 references, the merge of two
// KV blocks' attention results, lse comparisons that treat -inf, and a report of the first mismatching elements.

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <subspace/core/tensor.hpp>
#include <subspace/kernels/attention.hpp>

#include "support/numeric.hpp"

namespace subspace::testing {

inline constexpr double neg_inf = -std::numeric_limits<double>::infinity();

/// The configuration of one attention test case.
struct attention_case {
  std::int64_t batch, seq, seq_kv, heads, kv_heads, head_dim;
  bool causal;
  std::int64_t q_pos0 = 0, kv_pos0 = 0;

  shape q_shape() const { return {batch, seq, heads, head_dim}; }
  shape kv_shape() const { return {batch, seq_kv, kv_heads, head_dim}; }
  shape lse_shape() const { return {batch, heads, seq}; }
  attention_params params() const { return {float(1.0 / std::sqrt(double(head_dim))), causal, q_pos0, kv_pos0}; }
  std::string text() const {
    char buf[200];
    std::snprintf(buf, sizeof buf, "B=%lld S=%lld Skv=%lld Hq=%lld Hkv=%lld hd=%lld %s q_pos0=%lld kv_pos0=%lld",
                  (long long)batch, (long long)seq, (long long)seq_kv, (long long)heads, (long long)kv_heads,
                  (long long)head_dim, causal ? "causal" : "full", (long long)q_pos0, (long long)kv_pos0);
    return buf;
  }
};

/// A double copy of any host view.
template <class T>
host_tensor<double> to_double(view<const T, host_space> x) {
  host_tensor<double> out(x.shape());
  std::int64_t n = 0;
  for_each_offset(x.shape(), x.strides(), x.strides(),
                  [&](std::int64_t a, std::int64_t) { out.data()[n++] = double(x.data()[a]); });
  return out;
}
template <class T>
host_tensor<double> to_double(const host_tensor<T>& x) {
  return to_double(view<const T, host_space>(x.v()));
}

/// Positions [s0, s1) of dimension 1 (the sequence) of a [B, S, H, hd] view, as a strided view.
template <class T>
view<T, host_space> seq_slice(view<T, host_space> x, std::int64_t s0, std::int64_t s1) {
  shape s = x.shape();
  s.dims[1] = s1 - s0;
  return view<T, host_space>(x.data() + s0 * x.stride(1), s, x.strides());
}

struct attention_result {
  host_tensor<double> out, lse;
};

/// softmax(scale * q k^T + mask) v the naive way, in float64: the whole score matrix of each (batch, head), masked
/// entries -inf, a row max, exponentials, the normalised probabilities, then P v.
template <class TQ, class TK, class TV>
attention_result naive_attention(view<const TQ, host_space> q, view<const TK, host_space> k,
                                 view<const TV, host_space> v, const attention_params& p) {
  const std::int64_t B = q.dim(0), S = q.dim(1), H = q.dim(2), hd = q.dim(3), Skv = k.dim(1), Hkv = k.dim(2);
  attention_result r{host_tensor<double>(q.shape()), host_tensor<double>({B, H, S})};
  std::vector<double> P(std::size_t(S * Skv));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t hk = h / (H / Hkv);
      for (std::int64_t i = 0; i < S; ++i) {
        double m = neg_inf;
        for (std::int64_t j = 0; j < Skv; ++j) {
          double s = neg_inf;
          if (!p.causal || p.q_pos0 + i >= p.kv_pos0 + j) {
            s = 0;
            for (std::int64_t e = 0; e < hd; ++e) s += double(q(b, i, h, e)) * double(k(b, j, hk, e));
            s *= double(p.scale);
          }
          P[std::size_t(i * Skv + j)] = s;
          m = std::max(m, s);
        }
        double sum = 0;
        for (std::int64_t j = 0; j < Skv; ++j) {
          double& x = P[std::size_t(i * Skv + j)];
          x = m == neg_inf ? 0.0 : std::exp(x - m);
          sum += x;
        }
        for (std::int64_t j = 0; j < Skv; ++j)
          P[std::size_t(i * Skv + j)] = sum > 0 ? P[std::size_t(i * Skv + j)] / sum : 0.0;
        r.lse(b, h, i) = sum > 0 ? m + std::log(sum) : neg_inf;
      }
      for (std::int64_t i = 0; i < S; ++i)
        for (std::int64_t e = 0; e < hd; ++e) {
          double o = 0;
          for (std::int64_t j = 0; j < Skv; ++j) o += P[std::size_t(i * Skv + j)] * double(v(b, j, hk, e));
          r.out(b, i, h, e) = o;
        }
    }
  return r;
}

/// The merge of two KV blocks' results: lse = logaddexp(lse1, lse2), out = sum_b exp(lse_b - lse) out_b.
inline attention_result merge(const attention_result& x, const attention_result& y) {
  attention_result r{host_tensor<double>(x.out.shape()), host_tensor<double>(x.lse.shape())};
  const std::int64_t B = x.out.dim(0), S = x.out.dim(1), H = x.out.dim(2), hd = x.out.dim(3);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < S; ++i) {
        const double l1 = x.lse(b, h, i), l2 = y.lse(b, h, i), m = std::max(l1, l2);
        const double w1 = m == neg_inf ? 0.0 : std::exp(l1 - m), w2 = m == neg_inf ? 0.0 : std::exp(l2 - m);
        const double l = m == neg_inf ? neg_inf : m + std::log(w1 + w2);
        r.lse(b, h, i) = l;
        for (std::int64_t e = 0; e < hd; ++e)
          r.out(b, i, h, e) = m == neg_inf ? 0.0 : (w1 * x.out(b, i, h, e) + w2 * y.out(b, i, h, e)) / (w1 + w2);
      }
  return r;
}

/// A row-major index of `s` as text: "(1, 4, 0, 13)".
inline std::string index_text(const shape& s, std::int64_t flat) {
  std::vector<std::int64_t> idx(std::size_t(s.rank));
  for (int d = s.rank - 1; d >= 0; --d) {
    idx[std::size_t(d)] = flat % s[d];
    flat /= s[d];
  }
  std::string t = "(";
  for (std::size_t d = 0; d < idx.size(); ++d) t += (d ? ", " : "") + std::to_string(idx[d]);
  return t + ")";
}

/// ||got - want|| / ||want|| over the contiguous tensors, like rel_error; when it exceeds `tol`, prints what was
/// compared and the first few elements that differ by more than 3 * tol * rms(want) (or are not finite on one side
/// only), with their indices, so a failure on a remote GPU says where it went wrong.
template <class G, class W>
double compare(const char* what, const host_tensor<G>& got, const host_tensor<W>& want, double tol) {
  REQUIRE(got.shape() == want.shape());
  const double err = rel_error(view<const G, host_space>(got.v()), view<const W, host_space>(want.v()));
  if (!(err <= tol)) {
    double ss = 0;
    for (std::int64_t i = 0; i < want.numel(); ++i)
      if (std::isfinite(double(want.data()[i]))) ss += double(want.data()[i]) * double(want.data()[i]);
    const double rms = std::sqrt(ss / double(std::max<std::int64_t>(1, want.numel())));
    std::printf("  %s: relative error %.3e above %.1e (shape %s, rms of the reference %.3e); first differences:\n",
                what, err, tol, to_string(want.shape()).c_str(), rms);
    int shown = 0;
    for (std::int64_t i = 0; i < want.numel() && shown < 8; ++i) {
      const double g = double(got.data()[i]), w = double(want.data()[i]);
      const bool bad = std::isfinite(g) != std::isfinite(w) || std::isnan(g) || std::isnan(w) ||
                       (std::isfinite(w) && std::abs(g - w) > 3 * tol * rms) || (!std::isfinite(w) && g != w);
      if (!bad) continue;
      std::printf("    at %s: got %.6g, expected %.6g\n", index_text(want.shape(), i).c_str(), g, w);
      ++shown;
    }
    if (shown == 0) std::printf("    (the error is spread thinly; no single element stands out)\n");
  }
  return err;
}

/// lse comparison: the -inf entries (rows that see no key) must agree exactly; the error over the finite ones is
/// max |got - want| (lse is a log, so absolute error is what matters). +inf when the patterns differ or a NaN shows.
template <class G>
double lse_error(const char* what, const host_tensor<G>& got, const host_tensor<double>& want, double tol) {
  REQUIRE(got.shape() == want.shape());
  double worst = 0;
  std::int64_t first_bad = -1;
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    const double g = double(got.data()[i]), w = want.data()[i];
    double e;
    if (w == neg_inf || g == neg_inf) e = (g == w) ? 0.0 : std::numeric_limits<double>::infinity();
    else if (!std::isfinite(g) || !std::isfinite(w)) e = std::numeric_limits<double>::infinity();
    else e = std::abs(g - w);
    if (!(e <= tol) && first_bad < 0) first_bad = i;
    if (!(e <= worst)) worst = e;
  }
  if (first_bad >= 0) {
    std::printf("  %s: max |error| %.3e above %.1e (shape %s); first differences:\n", what, worst, tol,
                to_string(want.shape()).c_str());
    int shown = 0;
    for (std::int64_t i = first_bad; i < want.numel() && shown < 8; ++i) {
      const double g = double(got.data()[i]), w = want.data()[i];
      const bool same = (g == w) || (std::isfinite(g) && std::isfinite(w) && std::abs(g - w) <= tol);
      if (same) continue;
      std::printf("    at %s: got %.8g, expected %.8g\n", index_text(want.shape(), i).c_str(), g, w);
      ++shown;
    }
  }
  return worst;
}

}  // namespace subspace::testing
