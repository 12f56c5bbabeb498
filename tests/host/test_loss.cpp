// lm_head_cross_entropy on the host: losses against a float64 reference (ignored targets included), gradients against
// central finite differences in double, dweight accumulating, chunked = unchunked, optional gradients, and errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include <subspace/core/rng.hpp>
#include <subspace/kernels/loss.hpp>

#include "support/attention_reference.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

/// Random targets in [0, vocab), with every `ignore_every`-th row (from row 1) set to -1.
host_tensor<std::int32_t> random_targets(std::int64_t n, std::int64_t vocab, std::uint64_t seed, int ignore_every) {
  host_tensor<std::int32_t> t({n});
  for (std::int64_t i = 0; i < n; ++i) {
    t.data()[i] = std::int32_t(rng::bits4(seed, 11, std::uint64_t(i)).v[0] % std::uint32_t(vocab));
    if (ignore_every > 0 && i % ignore_every == 1) t.data()[i] = -1;
  }
  return t;
}

/// Per-row losses in float64, the naive way: full logits, log-sum-exp, minus the target's logit (0 when ignored).
template <class T>
host_tensor<double> naive_losses(view<const T, host_space> h, view<const T, host_space> w,
                                 view<const std::int32_t, host_space> targets) {
  const std::int64_t n = h.dim(0), d = h.dim(1), vocab = w.dim(0);
  host_tensor<double> out({n});
  std::vector<double> z(static_cast<std::size_t>(vocab));
  for (std::int64_t i = 0; i < n; ++i) {
    double m = -INFINITY;
    for (std::int64_t j = 0; j < vocab; ++j) {
      double s = 0;
      for (std::int64_t e = 0; e < d; ++e) s += double(h(i, e)) * double(w(j, e));
      z[std::size_t(j)] = s;
      m = std::max(m, s);
    }
    double sum = 0;
    for (const double x : z) sum += std::exp(x - m);
    out(i) = targets(i) < 0 ? 0.0 : m + std::log(sum) - z[std::size_t(targets(i))];
  }
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("lm_head_cross_entropy (host): losses match a float64 reference, ignored targets give 0", T, double,
                   float) {
  const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-6;
  struct dims {
    std::int64_t n, d, vocab;
  };
  for (const dims c : {dims{37, 24, 101}, dims{1, 8, 2}, dims{64, 16, 300}}) {
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(c.n);
    CAPTURE(c.vocab);
    const auto h = testing::random_tensor<T>({c.n, c.d}, seed);
    const auto w = testing::random_tensor<T>({c.vocab, c.d}, seed + 1, 0.0f, 0.5f);
    const auto targets = random_targets(c.n, c.vocab, seed, 4);
    host_tensor<accum_t<T>> losses({c.n});
    lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), losses.v(), {}, {}, 1.0f);
    const auto want = naive_losses(cv(h), cv(w), cv(targets));
    // Relative to the losses' norm floored at 1 per row: a loss near 0 (a confident right answer) keeps the
    // logits' absolute rounding, which is relative to the logits, not to the loss (n 1, vocab 2 hit 2e-5).
    double err2 = 0, ref2 = 0;
    for (std::int64_t i = 0; i < c.n; ++i) {
      err2 += (double(losses(i)) - double(want(i))) * (double(losses(i)) - double(want(i)));
      ref2 += double(want(i)) * double(want(i));
    }
    CHECK(std::sqrt(err2) <= tol * std::max(std::sqrt(ref2), std::sqrt(double(c.n))));
    for (std::int64_t i = 0; i < c.n; ++i)
      if (targets(i) < 0) REQUIRE(losses(i) == 0);
  }
}

TEST_CASE("lm_head_cross_entropy (host): gradients match central finite differences, dweight accumulates") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 7, d = 5, vocab = 11;
  const float grad_scale = 0.37f;
  auto h = testing::random_tensor<double>({n, d}, seed);
  auto w = testing::random_tensor<double>({vocab, d}, seed + 1);
  const auto targets = random_targets(n, vocab, seed, 3);  // rows 1 and 4 ignored
  const auto dw0 = testing::random_tensor<double>({vocab, d}, seed + 2);
  host_tensor<double> losses({n}), dh({n, d}), dw({vocab, d});
  copy(exec::host{}, cv(dw0), dw.v());
  lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), losses.v(), dh.v(), dw.v(), grad_scale);
  host_tensor<double> dw_added({vocab, d});
  for (std::int64_t i = 0; i < dw.numel(); ++i) dw_added.data()[i] = dw.data()[i] - dw0.data()[i];

  const auto total = [&] {
    host_tensor<double> l({n});
    lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), l.v(), {}, {}, 1.0f);
    double s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += l(i);
    return double(grad_scale) * s;
  };
  const auto fd = [&](host_tensor<double>& x) {
    host_tensor<double> g(x.shape());
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      const double keep = x.data()[i], step = 1e-5;
      x.data()[i] = keep + step;
      const double up = total();
      x.data()[i] = keep - step;
      const double down = total();
      x.data()[i] = keep;
      g.data()[i] = (up - down) / (2 * step);
    }
    return g;
  };
  CHECK(testing::compare("dh", dh, fd(h), 1e-8) < 1e-8);
  CHECK(testing::compare("dweight (added)", dw_added, fd(w), 1e-8) < 1e-8);
  for (std::int64_t e = 0; e < d; ++e) {  // ignored rows get no gradient
    CHECK(dh(1, e) == 0.0);
    CHECK(dh(4, e) == 0.0);
  }
}

TEST_CASE("lm_head_cross_entropy (host): chunked equals unchunked, dh and dweight are each optional") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 53, d = 16, vocab = 97;
  const auto h = testing::random_tensor<double>({n, d}, seed);
  const auto w = testing::random_tensor<double>({vocab, d}, seed + 1);
  const auto targets = random_targets(n, vocab, seed, 5);
  host_tensor<double> l_all({n}), dh_all({n, d}), dw_all({vocab, d});
  for (std::int64_t i = 0; i < dw_all.numel(); ++i) dw_all.data()[i] = 0;
  lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), l_all.v(), dh_all.v(), dw_all.v(), 1.5f,
                        {n, std::size_t(0)});  // one chunk
  for (const lm_head_options opt :
       {lm_head_options{3}, lm_head_options{7}, lm_head_options{0, 1}, lm_head_options{0, 2000}}) {
    CAPTURE(opt.chunk_rows);
    CAPTURE(opt.chunk_bytes);
    host_tensor<double> l({n}), dh({n, d}), dw({vocab, d});
    for (std::int64_t i = 0; i < dw.numel(); ++i) dw.data()[i] = 0;
    lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), l.v(), dh.v(), dw.v(), 1.5f, opt);
    CHECK(testing::compare("losses", l, l_all, 1e-14) < 1e-14);
    CHECK(testing::compare("dh", dh, dh_all, 1e-14) < 1e-14);
    CHECK(testing::compare("dweight", dw, dw_all, 1e-13) < 1e-13);
  }
  SUBCASE("dh only, dweight only") {
    host_tensor<double> l({n}), dh({n, d}), dw({vocab, d});
    for (std::int64_t i = 0; i < dw.numel(); ++i) dw.data()[i] = 0;
    lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), l.v(), dh.v(), {}, 1.5f, {5});
    CHECK(testing::compare("dh alone", dh, dh_all, 1e-14) < 1e-14);
    lm_head_cross_entropy(exec::host{}, cv(h), cv(w), cv(targets), l.v(), {}, dw.v(), 1.5f, {5});
    CHECK(testing::compare("dweight alone", dw, dw_all, 1e-13) < 1e-13);
    CHECK(testing::compare("losses", l, l_all, 1e-14) < 1e-14);
  }
}

TEST_CASE("lm_head_cross_entropy (host): bad targets and shapes name the operand") {
  host_tensor<float> h({4, 8}), w({10, 8}), losses({4}), dh({4, 8}), dw({10, 8}), w_bad({10, 7}), dh_bad({4, 9});
  host_tensor<std::int32_t> targets({4}), targets_bad({5});
  for (std::int64_t i = 0; i < 4; ++i) targets(i) = std::int32_t(i);
  for (std::int64_t i = 0; i < h.numel(); ++i) h.data()[i] = 0.1f * float(i % 7);
  for (std::int64_t i = 0; i < w.numel(); ++i) w.data()[i] = 0.05f * float(i % 5);
  const auto run = [&](auto& hh, auto& ww, auto& tt, auto& ll, view<float, host_space> g, view<float, host_space> gw) {
    lm_head_cross_entropy(exec::host{}, cv(hh), cv(ww), cv(tt), ll.v(), g, gw, 1.0f);
  };
  CHECK_NOTHROW(run(h, w, targets, losses, dh.v(), dw.v()));
  targets(2) = 10;
  CHECK_THROWS_WITH_AS(run(h, w, targets, losses, dh.v(), dw.v()),
                       doctest::Contains("lm_head_cross_entropy: targets[2] = 10 is outside [0, 10)"),
                       invalid_argument);
  targets(2) = -2;
  CHECK_THROWS_WITH_AS(run(h, w, targets, losses, dh.v(), dw.v()), doctest::Contains("targets[2] = -2"),
                       invalid_argument);
  targets(2) = -1;
  CHECK_NOTHROW(run(h, w, targets, losses, dh.v(), dw.v()));
  CHECK_THROWS_WITH_AS(run(h, w_bad, targets, losses, dh.v(), dw.v()),
                       doctest::Contains("weight has shape [10, 7] but h has shape [4, 8]"), invalid_argument);
  CHECK_THROWS_WITH_AS(run(h, w, targets_bad, losses, dh.v(), dw.v()),
                       doctest::Contains("targets has shape [5], expected [4]"), invalid_argument);
  CHECK_THROWS_WITH_AS(run(h, w, targets, losses, dh_bad.v(), dw.v()),
                       doctest::Contains("dh has shape [4, 9], expected [4, 8]"), invalid_argument);
  CHECK_THROWS_WITH_AS(run(h, w, targets, losses, dh.v(), dh.v()),
                       doctest::Contains("dweight has shape [4, 8], expected [10, 8]"), invalid_argument);
}
