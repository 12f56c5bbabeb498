// attention on the host: the forward pass against a naive float64 softmax(QK^T)V (causal and not, GQA ratios 1, 2
// and 4, global-position offsets, rows that see no key), lse, the backward pass against central finite differences
// in double, the merge of two KV blocks (how context parallelism uses lse), thread-count independence, and errors.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include <subspace/kernels/attention.hpp>

#include "support/attention_reference.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using testing::attention_case;

namespace {

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

/// Fresh random q, k, v for a case (T), and room for out and lse.
template <class T>
struct operands {
  host_tensor<T> q, k, v, out;
  host_tensor<accum_t<T>> lse;
  operands(const attention_case& c, std::uint64_t seed)
      : q(testing::random_tensor<T>(c.q_shape(), seed)),
        k(testing::random_tensor<T>(c.kv_shape(), seed + 1)),
        v(testing::random_tensor<T>(c.kv_shape(), seed + 2)),
        out(c.q_shape()),
        lse(c.lse_shape()) {}
};

const attention_case forward_cases[] = {
    {2, 37, 37, 2, 2, 16, true},          // GQA ratio 1, causal
    {2, 37, 37, 4, 2, 16, false},         // ratio 2, no mask
    {1, 29, 41, 8, 2, 32, true, 12, 0},   // ratio 4; the query block starts 12 positions after the keys
    {2, 23, 19, 4, 1, 8, true, 0, 5},     // ratio 4; rows 0-4 see no key
    {1, 1, 1, 1, 1, 16, true},            // one row, one key
    {1, 9, 30, 2, 1, 8, false, 100, 0},   // offsets are ignored without the mask
    {1, 16, 16, 2, 1, 16, true, 0, 100},  // every row sees nothing
};

}  // namespace

TEST_CASE_TEMPLATE("attention_forward (host) matches a float64 softmax(QK^T)V, lse included", T, double, float) {
  const double tol = std::is_same_v<T, double> ? 1e-12 : 2e-6;
  for (const attention_case& c : forward_cases) {
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(c.text());
    operands<T> x(c, seed);
    attention_forward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), x.out.v(), x.lse.v(), c.params());
    const auto want = testing::naive_attention(cv(x.q), cv(x.k), cv(x.v), c.params());
    bool all_masked = true;
    for (std::int64_t i = 0; i < want.lse.numel(); ++i)
      all_masked = all_masked && want.lse.data()[i] == testing::neg_inf;
    if (all_masked) {  // out must be exactly zero
      for (std::int64_t i = 0; i < x.out.numel(); ++i) REQUIRE(double(x.out.data()[i]) == 0.0);
    } else {
      CHECK(testing::compare("out", x.out, want.out, tol) < tol);
    }
    CHECK(testing::lse_error("lse", x.lse, want.lse, 10 * tol) <= 10 * tol);
  }
}

TEST_CASE("attention_forward (host): a row that sees no key gets out = 0 and lse = -inf exactly") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const attention_case c{2, 11, 13, 4, 2, 16, true, 3, 7};  // rows 0-3 see nothing, row 4 sees key 0 only
  operands<double> x(c, seed);
  attention_forward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), x.out.v(), x.lse.v(), c.params());
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 4; ++h) {
      for (std::int64_t i = 0; i < 4; ++i) {
        CHECK(x.lse(b, h, i) == -std::numeric_limits<double>::infinity());
        for (std::int64_t e = 0; e < 16; ++e) REQUIRE(x.out(b, i, h, e) == 0.0);
      }
      // Row 4 sees key 0 alone: out = v[key 0], lse = the single score.
      double s = 0;
      for (std::int64_t e = 0; e < 16; ++e) s += x.q(b, 4, h, e) * x.k(b, 0, h / 2, e);
      CHECK(x.lse(b, h, 4) == doctest::Approx(s * double(c.params().scale)).epsilon(1e-14));
      for (std::int64_t e = 0; e < 16; ++e)
        CHECK(x.out(b, 4, h, e) == doctest::Approx(x.v(b, 0, h / 2, e)).epsilon(1e-14));
    }
}

TEST_CASE("attention_backward (host) matches central finite differences in double") {
  const attention_case cases[] = {
      {2, 6, 7, 4, 2, 8, true, 0, 2},   // GQA 2, causal, rows 0-1 see no key
      {1, 5, 9, 4, 1, 4, false, 0, 0},  // GQA 4, no mask, Skv > S
      {1, 7, 4, 2, 2, 8, true, 3, 0},   // ratio 1, the queries after the keys
  };
  for (const attention_case& c : cases) {
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(c.text());
    attention_params p = c.params();
    p.scale = 0.8f;  // sharper than 1/sqrt(hd): the softmax is far from uniform
    operands<double> x(c, seed);
    const auto w = testing::random_tensor<double>(c.q_shape(), seed + 3);  // loss = sum(out * w), so dout = w
    const auto loss = [&] {
      host_tensor<double> out(c.q_shape()), lse(c.lse_shape());
      attention_forward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), out.v(), lse.v(), p);
      double s = 0;
      for (std::int64_t i = 0; i < out.numel(); ++i) s += out.data()[i] * w.data()[i];
      return s;
    };
    attention_forward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), x.out.v(), x.lse.v(), p);
    host_tensor<double> dq(c.q_shape()), dk(c.kv_shape()), dv(c.kv_shape());
    attention_backward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), cv(x.out), cv(x.lse), cv(w), dq.v(), dk.v(), dv.v(), p);
    const auto fd = [&](host_tensor<double>& t) {
      host_tensor<double> g(t.shape());
      const double h = 1e-5;
      for (std::int64_t i = 0; i < t.numel(); ++i) {
        const double keep = t.data()[i];
        t.data()[i] = keep + h;
        const double up = loss();
        t.data()[i] = keep - h;
        const double down = loss();
        t.data()[i] = keep;
        g.data()[i] = (up - down) / (2 * h);
      }
      return g;
    };
    CHECK(testing::compare("dq", dq, fd(x.q), 1e-7) < 1e-7);
    CHECK(testing::compare("dk", dk, fd(x.k), 1e-7) < 1e-7);
    CHECK(testing::compare("dv", dv, fd(x.v), 1e-7) < 1e-7);
  }
}

TEST_CASE("attention (host): the full KV equals the merge of two KV blocks, forward and backward") {
  // How a context-parallel trainer uses it: each KV block gives out and lse; they merge by log-sum-exp; the backward
  // of each block, given the merged out and lse, yields that block's share: dq adds up, dk and dv concatenate.
  const attention_case cases[] = {
      {2, 24, 24, 4, 2, 16, true, 0, 0},  // causal: early rows see nothing of the second block
      {1, 13, 30, 4, 1, 8, true, 20, 0},  // queries later than every key of the first block
      {2, 17, 21, 2, 2, 8, false, 0, 0},
  };
  for (const attention_case& c : cases) {
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(c.text());
    const attention_params p = c.params();
    operands<double> x(c, seed);
    attention_forward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), x.out.v(), x.lse.v(), p);

    const std::int64_t split = c.seq_kv / 2 + 1;
    testing::attention_result part[2];
    for (int blk = 0; blk < 2; ++blk) {
      const std::int64_t s0 = blk == 0 ? 0 : split, s1 = blk == 0 ? split : c.seq_kv;
      attention_params pb = p;
      pb.kv_pos0 = p.kv_pos0 + s0;
      host_tensor<double> out(c.q_shape()), lse(c.lse_shape());
      attention_forward(exec::host{}, cv(x.q), testing::seq_slice(cv(x.k), s0, s1), testing::seq_slice(cv(x.v), s0, s1),
                        out.v(), lse.v(), pb);
      part[blk] = {std::move(out), std::move(lse)};
    }
    const auto merged = testing::merge(part[0], part[1]);
    CHECK(testing::compare("merged out", x.out, merged.out, 1e-13) < 1e-13);
    CHECK(testing::lse_error("merged lse", x.lse, merged.lse, 1e-12) <= 1e-12);

    const auto dout = testing::random_tensor<double>(c.q_shape(), seed + 3);
    host_tensor<double> dq(c.q_shape()), dk(c.kv_shape()), dv(c.kv_shape());
    attention_backward(exec::host{}, cv(x.q), cv(x.k), cv(x.v), cv(x.out), cv(x.lse), cv(dout), dq.v(), dk.v(), dv.v(),
                       p);
    host_tensor<double> dq_sum(c.q_shape()), dq_part(c.q_shape()), dk_cat(c.kv_shape()), dv_cat(c.kv_shape());
    for (std::int64_t i = 0; i < dq_sum.numel(); ++i) dq_sum.data()[i] = 0.0;
    for (int blk = 0; blk < 2; ++blk) {
      const std::int64_t s0 = blk == 0 ? 0 : split, s1 = blk == 0 ? split : c.seq_kv;
      attention_params pb = p;
      pb.kv_pos0 = p.kv_pos0 + s0;
      attention_backward(exec::host{}, cv(x.q), testing::seq_slice(cv(x.k), s0, s1),
                         testing::seq_slice(cv(x.v), s0, s1), cv(merged.out), cv(merged.lse), cv(dout), dq_part.v(),
                         testing::seq_slice(dk_cat.v(), s0, s1), testing::seq_slice(dv_cat.v(), s0, s1), pb);
      for (std::int64_t i = 0; i < dq_sum.numel(); ++i) dq_sum.data()[i] += dq_part.data()[i];
    }
    CHECK(testing::compare("dq (sum of blocks)", dq_sum, dq, 1e-12) < 1e-12);
    CHECK(testing::compare("dk (blocks side by side)", dk_cat, dk, 1e-12) < 1e-12);
    CHECK(testing::compare("dv (blocks side by side)", dv_cat, dv, 1e-12) < 1e-12);
  }
}

TEST_CASE("attention (host): float agrees with double, and results do not depend on the thread count") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const attention_case c{2, 33, 33, 4, 2, 32, true, 0, 0};
  operands<float> f(c, seed);
  const auto qd = testing::to_double(f.q), kd = testing::to_double(f.k), vd = testing::to_double(f.v);
  host_tensor<double> out_d(c.q_shape()), lse_d(c.lse_shape());
  attention_forward(exec::host{}, cv(qd), cv(kd), cv(vd), out_d.v(), lse_d.v(), c.params());

  attention_forward(exec::host{1}, cv(f.q), cv(f.k), cv(f.v), f.out.v(), f.lse.v(), c.params());
  host_tensor<float> out3(c.q_shape()), lse3(c.lse_shape());
  attention_forward(exec::host{3}, cv(f.q), cv(f.k), cv(f.v), out3.v(), lse3.v(), c.params());
  CHECK(testing::rel_error(cv(out3), cv(f.out)) == 0.0);
  CHECK(testing::rel_error(cv(lse3), cv(f.lse)) == 0.0);
  CHECK(testing::compare("out float vs double", f.out, out_d, 2e-6) < 2e-6);

  const auto dout = testing::random_tensor<float>(c.q_shape(), seed + 3);
  const auto doutd = testing::to_double(dout);
  host_tensor<double> dqd(c.q_shape()), dkd(c.kv_shape()), dvd(c.kv_shape());
  attention_backward(exec::host{}, cv(qd), cv(kd), cv(vd), cv(out_d), cv(lse_d), cv(doutd), dqd.v(), dkd.v(), dvd.v(),
                     c.params());
  host_tensor<float> dq1(c.q_shape()), dk1(c.kv_shape()), dv1(c.kv_shape());
  host_tensor<float> dq3(c.q_shape()), dk3(c.kv_shape()), dv3(c.kv_shape());
  attention_backward(exec::host{1}, cv(f.q), cv(f.k), cv(f.v), cv(f.out), cv(f.lse), cv(dout), dq1.v(), dk1.v(),
                     dv1.v(), c.params());
  attention_backward(exec::host{3}, cv(f.q), cv(f.k), cv(f.v), cv(f.out), cv(f.lse), cv(dout), dq3.v(), dk3.v(),
                     dv3.v(), c.params());
  CHECK(testing::rel_error(cv(dq3), cv(dq1)) == 0.0);
  CHECK(testing::rel_error(cv(dk3), cv(dk1)) == 0.0);
  CHECK(testing::rel_error(cv(dv3), cv(dv1)) == 0.0);
  CHECK(testing::compare("dq float vs double", dq1, dqd, 1e-5) < 1e-5);
  CHECK(testing::compare("dk float vs double", dk1, dkd, 1e-5) < 1e-5);
  CHECK(testing::compare("dv float vs double", dv1, dvd, 1e-5) < 1e-5);
}

TEST_CASE("attention (host): shape mismatches name the operation, the operand and the shapes") {
  host_tensor<float> q({2, 5, 4, 8}), k({2, 6, 2, 8}), v({2, 6, 2, 8}), out({2, 5, 4, 8}), lse({2, 4, 5});
  host_tensor<float> k_bad_batch({3, 6, 2, 8}), k_bad_heads({2, 6, 3, 8}), v_bad({2, 7, 2, 8}), lse_bad({2, 5, 4});
  host_tensor<float> out_bad({2, 5, 4, 16}), q3({2, 5, 32});
  const attention_params p{0.35f};
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q), cv(k_bad_batch), cv(v), out.v(), lse.v(), p),
                       doctest::Contains("attention_forward: k has shape [3, 6, 2, 8] but q has shape [2, 5, 4, 8]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q), cv(k_bad_heads), cv(k_bad_heads), out.v(), lse.v(), p),
                       doctest::Contains("must be a positive multiple of the KV heads (3"), invalid_argument);
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q), cv(k), cv(v_bad), out.v(), lse.v(), p),
                       doctest::Contains("attention_forward: v has shape [2, 7, 2, 8], expected [2, 6, 2, 8]"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q), cv(k), cv(v), out.v(), lse_bad.v(), p),
                       doctest::Contains("lse [B, Hq, S] has shape [2, 5, 4], expected [2, 4, 5]"), invalid_argument);
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q), cv(k), cv(v), out_bad.v(), lse.v(), p),
                       doctest::Contains("out has shape [2, 5, 4, 16], expected [2, 5, 4, 8]"), invalid_argument);
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q3), cv(k), cv(v), out.v(), lse.v(), p),
                       doctest::Contains("q must have rank 4"), invalid_argument);
  host_tensor<float> dq({2, 5, 4, 8}), dk({2, 6, 2, 8}), dv_bad({2, 6, 2, 4});
  CHECK_THROWS_WITH_AS(
      attention_backward(exec::host{}, cv(q), cv(k), cv(v), cv(out), cv(lse), cv(out), dq.v(), dk.v(), dv_bad.v(), p),
      doctest::Contains("attention_backward: dv has shape [2, 6, 2, 4], expected [2, 6, 2, 8]"), invalid_argument);
  const attention_params nan_scale{std::numeric_limits<float>::quiet_NaN()};
  CHECK_THROWS_WITH_AS(attention_forward(exec::host{}, cv(q), cv(k), cv(v), out.v(), lse.v(), nan_scale),
                       doctest::Contains("params.scale must be finite"), invalid_argument);
}
