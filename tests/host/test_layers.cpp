// The Llama layer kernels on the host (embedding, RMSNorm, RoPE, SwiGLU): forward against direct float64
// formulas, backward against central finite differences in double, accumulation (+=) of weight gradients, and
// the errors the contract promises. Every test draws fresh random inputs (seed printed on failure).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numbers>
#include <string>
#include <vector>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/embedding.hpp>
#include <subspace/kernels/norm.hpp>
#include <subspace/kernels/rope.hpp>
#include <subspace/kernels/swiglu.hpp>

#include "support/numeric.hpp"

using namespace subspace;

namespace {

const exec::host ex{};

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

/// sum(a * b) over all elements, in double.
template <class A, class B>
double dot(const host_tensor<A>& a, const host_tensor<B>& b) {
  REQUIRE(a.numel() == b.numel());
  double s = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) s += double(a.data()[i]) * double(b.data()[i]);
  return s;
}

/// Central finite differences of `loss` with respect to every element of x (in place perturbation), compared
/// with `grad`: returns ||fd - grad|| / ||fd||.
double fd_error(host_tensor<double>& x, const host_tensor<double>& grad, const std::function<double()>& loss,
                double h = 1e-5) {
  host_tensor<double> fd(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double keep = x.data()[i];
    x.data()[i] = keep + h;
    const double up = loss();
    x.data()[i] = keep - h;
    const double down = loss();
    x.data()[i] = keep;
    fd.data()[i] = (up - down) / (2 * h);
  }
  return testing::rel_error(cv(grad), cv(fd));
}

std::int32_t token_at(std::uint64_t seed, std::int64_t i, std::int64_t vocab) {
  return std::int32_t(rng::bits4(seed, 7, std::uint64_t(i)).v[0] % std::uint32_t(vocab));
}

/// A message check: calling f throws invalid_argument whose text contains every fragment.
template <class F>
void check_throws_with(F&& f, std::initializer_list<const char*> fragments) {
  try {
    f();
    FAIL("expected invalid_argument");
  } catch (const invalid_argument& e) {
    const std::string what = e.what();
    for (const char* frag : fragments) {
      CAPTURE(what);
      CHECK(what.find(frag) != std::string::npos);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("embedding (host): forward gathers rows, backward scatter-adds (repeated tokens accumulate)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 23, vocab = 7, d = 13;  // more tokens than vocabulary: repeats are certain
  host_tensor<std::int32_t> tokens({n});
  for (std::int64_t i = 0; i < n; ++i) tokens(i) = token_at(seed, i, vocab);
  auto table = testing::random_tensor<double>({vocab, d}, seed + 1);
  host_tensor<double> out({n, d});
  embedding_forward(ex, cv(tokens), table.v(), out.v());
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t j = 0; j < d; ++j) REQUIRE(out(i, j) == table(tokens(i), j));

  // The gradient of L = sum(out * R) with respect to the table, accumulated onto a non-zero start.
  auto r = testing::random_tensor<double>({n, d}, seed + 2);
  auto dtable = testing::random_tensor<double>({vocab, d}, seed + 3);
  host_tensor<double> start({vocab, d});
  copy(ex, cv(dtable), start.v());
  embedding_backward(ex, cv(tokens), cv(r), dtable.v());
  host_tensor<double> grad({vocab, d});
  for (std::int64_t i = 0; i < grad.numel(); ++i) grad.data()[i] = dtable.data()[i] - start.data()[i];
  const double err = fd_error(table, grad, [&] {
    embedding_forward(ex, cv(tokens), table.v(), out.v());
    return dot(out, r);
  });
  CHECK(err < 1e-9);

  // float rows and bf16 activations with fp32 gradients (the CUDA types) run through the same reference.
  host_tensor<bf16> table16({vocab, d}), out16({n, d});
  cast(ex, cv(table), table16.v());
  embedding_forward(ex, cv(tokens), table16.v(), out16.v());
  host_tensor<float> dt32({vocab, d});
  fill(ex, dt32.v(), 0.0f);
  embedding_backward(ex, cv(tokens), cv(out16), dt32.v());
  for (std::int64_t i = 0; i < n; ++i) REQUIRE(float(out16(i, 0)) == float(bf16(float(table(tokens(i), 0)))));
}

TEST_CASE("embedding (host): a token outside (0, V) throws, naming its position and value, shapes are checked") {
  host_tensor<std::int32_t> tokens({4});
  tokens(0) = 0, tokens(1) = 2, tokens(2) = 5, tokens(3) = 1;
  host_tensor<float> table({5, 3}), out({4, 3}), dtable({5, 3});
  fill(ex, table.v(), 1.0f);
  fill(ex, dtable.v(), 0.0f);
  check_throws_with([&] { embedding_forward(ex, cv(tokens), table.v(), out.v()); },
                    {"embedding_forward", "token 5", "position 2", "[0, 5)"});
  tokens(2) = -1;
  check_throws_with([&] { embedding_backward(ex, cv(tokens), cv(out), dtable.v()); },
                    {"embedding_backward", "token -1", "position 2"});
  tokens(2) = 3;
  host_tensor<float> wrong({4, 2});
  check_throws_with([&] { embedding_forward(ex, cv(tokens), table.v(), wrong.v()); },
                    {"embedding_forward", "out", "[4, 2]", "[4, 3]"});
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("rmsnorm (host): forward matches the formula, backward matches finite differences in double") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 6, d = 37;
  const float eps = 1e-5f;
  auto x = testing::random_tensor<double>({n, d}, seed, 0.3f, 1.5f);
  auto w = testing::random_tensor<double>({d}, seed + 1, 1.0f, 0.5f);
  host_tensor<double> y({n, d}), rstd({n});
  rmsnorm_forward(ex, cv(x), cv(w), eps, y.v(), rstd.v());
  for (std::int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (std::int64_t j = 0; j < d; ++j) ss += x(i, j) * x(i, j);
    const double r = 1.0 / std::sqrt(ss / double(d) + double(eps));
    REQUIRE(std::abs(rstd(i) - r) <= 1e-14 * r);
    for (std::int64_t j = 0; j < d; ++j) REQUIRE(std::abs(y(i, j) - x(i, j) * r * w(j)) <= 1e-13);
  }

  auto r = testing::random_tensor<double>({n, d}, seed + 2);
  host_tensor<double> dx({n, d});
  auto dw = testing::random_tensor<double>({d}, seed + 3);  // accumulates onto this
  host_tensor<double> dw0({d});
  copy(ex, cv(dw), dw0.v());
  rmsnorm_backward(ex, cv(x), cv(w), cv(rstd), cv(r), dx.v(), dw.v());
  host_tensor<double> dw_delta({d});
  for (std::int64_t j = 0; j < d; ++j) dw_delta(j) = dw(j) - dw0(j);

  const auto loss = [&] {
    host_tensor<double> yy({n, d}), rs({n});
    rmsnorm_forward(ex, cv(x), cv(w), eps, yy.v(), rs.v());
    return dot(yy, r);
  };
  CHECK(fd_error(x, dx, loss) < 1e-8);
  CHECK(fd_error(w, dw_delta, loss) < 1e-8);

  // beta 1 adds the input gradient to what dx holds (a residual stream's gradient), in the same pass.
  auto stream = testing::random_tensor<double>({n, d}, seed + 4);
  host_tensor<double> added({n, d});
  copy(ex, cv(stream), added.v());
  rmsnorm_backward(ex, cv(x), cv(w), cv(rstd), cv(r), added.v(), dw.v(), 1.0f);
  for (std::int64_t i = 0; i < n * d; ++i)
    REQUIRE(std::abs(added.data()[i] - (stream.data()[i] + dx.data()[i])) <= 1e-14 * (1 + std::abs(added.data()[i])));
}

TEST_CASE("rmsnorm (host): float and bf16 follow the double reference, shapes are checked") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 9, d = 64;
  auto x = testing::random_tensor<double>({n, d}, seed);
  auto w = testing::random_tensor<double>({d}, seed + 1, 1.0f, 0.2f);
  auto dy = testing::random_tensor<double>({n, d}, seed + 2);
  host_tensor<double> y({n, d}), rstd({n}), dx({n, d}), dw({d});
  fill(ex, dw.v(), 0.0);
  rmsnorm_forward(ex, cv(x), cv(w), 1e-5f, y.v(), rstd.v());
  rmsnorm_backward(ex, cv(x), cv(w), cv(rstd), cv(dy), dx.v(), dw.v());

  host_tensor<bf16> xb({n, d}), wb({d}), dyb({n, d}), yb({n, d}), dxb({n, d});
  host_tensor<float> rb({n}), dwb({d});
  cast(ex, cv(x), xb.v());
  cast(ex, cv(w), wb.v());
  cast(ex, cv(dy), dyb.v());
  fill(ex, dwb.v(), 0.0f);
  rmsnorm_forward(ex, cv(xb), cv(wb), 1e-5f, yb.v(), rb.v());
  rmsnorm_backward(ex, cv(xb), cv(wb), cv(rb), cv(dyb), dxb.v(), dwb.v());
  CHECK(testing::rel_error(cv(yb), cv(y)) < 1e-2);
  CHECK(testing::rel_error(cv(dxb), cv(dx)) < 2e-2);
  CHECK(testing::rel_error(cv(dwb), cv(dw)) < 1e-2);

  host_tensor<double> bad({d + 1});
  check_throws_with([&] { rmsnorm_forward(ex, cv(x), cv(bad), 1e-5f, y.v(), rstd.v()); },
                    {"rmsnorm_forward", "weight", "[65]", "[64]"});
  host_tensor<double> bad_rows({n, d - 1});
  check_throws_with([&] { rmsnorm_backward(ex, cv(x), cv(w), cv(rstd), cv(dy), bad_rows.v(), dw.v()); },
                    {"rmsnorm_backward", "dx"});
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("rope_inv_freq: theta^(-2i/hd), Llama 3.1 scaling keeps high, divides low, interpolates the middle") {
  rope_config cfg;
  cfg.theta = 500000.0f;
  const std::int64_t hd = 128;
  const auto plain = rope_inv_freq(cfg, hd);
  REQUIRE(plain.size() == 64);
  for (std::int64_t i = 0; i < 64; ++i)
    CHECK(plain[std::size_t(i)] == doctest::Approx(std::pow(500000.0, -2.0 * double(i) / 128.0)).epsilon(1e-6));

  cfg.llama31_scaling = true;  // factor 8, low 1, high 4, original 8192
  const auto scaled = rope_inv_freq(cfg, hd);
  int kept = 0, divided = 0, smoothed = 0;
  for (std::size_t i = 0; i < 64; ++i) {
    const double wavelen = 2 * std::numbers::pi / double(plain[i]);
    if (wavelen < 8192.0 / 4) {
      CHECK(scaled[i] == plain[i]);
      ++kept;
    } else if (wavelen > 8192.0) {
      CHECK(scaled[i] == doctest::Approx(plain[i] / 8.0).epsilon(1e-6));
      ++divided;
    } else {
      CHECK(scaled[i] < plain[i]);
      CHECK(scaled[i] > plain[i] / 8.0);
      ++smoothed;
    }
  }
  CHECK(kept > 0);
  CHECK(divided > 0);
  CHECK(smoothed > 0);
  check_throws_with([&] { (void)rope_inv_freq(cfg, 7); }, {"rope_inv_freq", "even"});
}

TEST_CASE("rope (host): rotation by (pos0 + s) * inv_freq, inverse undoes it, backward matches finite differences") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t b = 2, s = 5, h = 3, hd = 8;
  rope_config cfg;
  cfg.theta = 10000.0f;
  const auto f = rope_inv_freq(cfg, hd);
  const host_tensor<float> inv = [&] {
    host_tensor<float> t({hd / 2});
    for (std::int64_t i = 0; i < hd / 2; ++i) t(i) = f[std::size_t(i)];
    return t;
  }();
  const std::int64_t pos0 = 11;
  auto x = testing::random_tensor<double>({b, s, h, hd}, seed);
  host_tensor<double> y({b, s, h, hd});
  copy(ex, cv(x), y.v());
  rope_apply(ex, y.v(), cv(inv), pos0, false);
  for (std::int64_t bi = 0; bi < b; ++bi)
    for (std::int64_t si = 0; si < s; ++si)
      for (std::int64_t hi = 0; hi < h; ++hi)
        for (std::int64_t i = 0; i < hd / 2; ++i) {
          const double angle = double(pos0 + si) * double(inv(i));
          const double a = x(bi, si, hi, i), c = x(bi, si, hi, i + hd / 2);
          REQUIRE(std::abs(y(bi, si, hi, i) - (a * std::cos(angle) - c * std::sin(angle))) < 1e-12);
          REQUIRE(std::abs(y(bi, si, hi, i + hd / 2) - (c * std::cos(angle) + a * std::sin(angle))) < 1e-12);
        }

  // The inverse rotation restores x.
  host_tensor<double> back({b, s, h, hd});
  copy(ex, cv(y), back.v());
  rope_apply(ex, back.v(), cv(inv), pos0, true);
  CHECK(testing::rel_error(cv(back), cv(x)) < 1e-14);

  // Backward: the gradient of sum(rope(x) * R) is inverse-rope(R).
  auto r = testing::random_tensor<double>({b, s, h, hd}, seed + 1);
  host_tensor<double> grad({b, s, h, hd});
  copy(ex, cv(r), grad.v());
  rope_apply(ex, grad.v(), cv(inv), pos0, true);
  CHECK(fd_error(x, grad, [&] {
          host_tensor<double> t({b, s, h, hd});
          copy(ex, cv(x), t.v());
          rope_apply(ex, t.v(), cv(inv), pos0, false);
          return dot(t, r);
        }) < 1e-9);

  // A chunk at pos0 equals the same positions of a longer sequence started at 0 (context-parallel chunks).
  auto longer = testing::random_tensor<double>({1, pos0 + s, h, hd}, seed + 2);
  host_tensor<double> tail({1, s, h, hd});
  for (std::int64_t si = 0; si < s; ++si)
    for (std::int64_t hi = 0; hi < h; ++hi)
      for (std::int64_t i = 0; i < hd; ++i) tail(0, si, hi, i) = longer(0, pos0 + si, hi, i);
  rope_apply(ex, longer.v(), cv(inv), 0, false);
  rope_apply(ex, tail.v(), cv(inv), pos0, false);
  for (std::int64_t si = 0; si < s; ++si)
    for (std::int64_t hi = 0; hi < h; ++hi)
      for (std::int64_t i = 0; i < hd; ++i) REQUIRE(tail(0, si, hi, i) == longer(0, pos0 + si, hi, i));

  host_tensor<float> bad_inv({hd});
  check_throws_with([&] { rope_apply(ex, y.v(), cv(bad_inv), 0, false); }, {"rope_apply", "inv_freq", "[8]", "[4]"});
}

// ---------------------------------------------------------------------------------------------------------------
TEST_CASE("swiglu (host): forward is silu(gate) * up, backward matches finite differences, in place works") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 7, f = 19;
  auto gate = testing::random_tensor<double>({n, f}, seed, 0.0f, 3.0f);  // reaches the flat parts of sigmoid
  auto up = testing::random_tensor<double>({n, f}, seed + 1);
  host_tensor<double> h({n, f});
  swiglu_forward(ex, cv(gate), cv(up), h.v());
  for (std::int64_t i = 0; i < h.numel(); ++i) {
    const double g = gate.data()[i];
    REQUIRE(std::abs(h.data()[i] - g / (1 + std::exp(-g)) * up.data()[i]) < 1e-14 * (1 + std::abs(h.data()[i])));
  }
  auto r = testing::random_tensor<double>({n, f}, seed + 2);
  host_tensor<double> dg({n, f}), du({n, f});
  swiglu_backward(ex, cv(gate), cv(up), cv(r), dg.v(), du.v());
  const auto loss = [&] {
    host_tensor<double> hh({n, f});
    swiglu_forward(ex, cv(gate), cv(up), hh.v());
    return dot(hh, r);
  };
  CHECK(fd_error(gate, dg, loss) < 1e-8);
  CHECK(fd_error(up, du, loss) < 1e-8);

  // In place: dgate over gate and dup over up give the same values.
  host_tensor<double> g2({n, f}), u2({n, f});
  copy(ex, cv(gate), g2.v());
  copy(ex, cv(up), u2.v());
  swiglu_backward(ex, cv(g2), cv(u2), cv(r), g2.v(), u2.v());
  CHECK(testing::rel_error(cv(g2), cv(dg)) == 0.0);
  CHECK(testing::rel_error(cv(u2), cv(du)) == 0.0);

  // bf16 in, fp32 math: within bf16 rounding of the double reference.
  host_tensor<bf16> gb({n, f}), ub({n, f}), hb({n, f});
  cast(ex, cv(gate), gb.v());
  cast(ex, cv(up), ub.v());
  swiglu_forward(ex, cv(gb), cv(ub), hb.v());
  CHECK(testing::rel_error(cv(hb), cv(h)) < 1e-2);

  // The backward recomputes h when asked, bit for bit the forward's, written over dh; in float and bf16 too.
  host_tensor<double> dh_then_h({n, f}), dg3({n, f}), du3({n, f});
  copy(ex, cv(r), dh_then_h.v());
  swiglu_backward(ex, cv(gate), cv(up), cv(dh_then_h), dg3.v(), du3.v(), dh_then_h.v());
  CHECK(testing::rel_error(cv(dh_then_h), cv(h)) == 0.0);
  CHECK(testing::rel_error(cv(dg3), cv(dg)) == 0.0);
  CHECK(testing::rel_error(cv(du3), cv(du)) == 0.0);
  host_tensor<bf16> hb2({n, f}), dgb({n, f}), dub({n, f}), rb({n, f});
  cast(ex, cv(r), rb.v());
  swiglu_backward(ex, cv(gb), cv(ub), cv(rb), dgb.v(), dub.v(), hb2.v());
  CHECK(std::memcmp(hb2.data(), hb.data(), std::size_t(hb.numel()) * sizeof(bf16)) == 0);
  host_tensor<float> gf({n, f}), uf({n, f}), hf({n, f}), hf2({n, f}), rf({n, f}), dgf({n, f}), duf({n, f});
  cast(ex, cv(gate), gf.v());
  cast(ex, cv(up), uf.v());
  cast(ex, cv(r), rf.v());
  swiglu_forward(ex, cv(gf), cv(uf), hf.v());
  swiglu_backward(ex, cv(gf), cv(uf), cv(rf), dgf.v(), duf.v(), hf2.v());
  CHECK(std::memcmp(hf2.data(), hf.data(), std::size_t(hf.numel()) * sizeof(float)) == 0);

  // Past one block of the host backward's staging (256 elements, a short last one): in place (dgate over gate,
  // dup over up, h over dh) equals out of place, h equals the forward's bit for bit, both near the double values.
  {
    const std::int64_t rows = 3, cols = 301;
    const auto gl = testing::random_tensor<float>({rows, cols}, seed + 3, 0.0f, 3.0f);
    const auto ul = testing::random_tensor<float>({rows, cols}, seed + 4);
    const auto rl = testing::random_tensor<float>({rows, cols}, seed + 5);
    host_tensor<float> hl({rows, cols}), dgl({rows, cols}), dul({rows, cols}), hl2({rows, cols});
    swiglu_forward(ex, cv(gl), cv(ul), hl.v());
    swiglu_backward(ex, cv(gl), cv(ul), cv(rl), dgl.v(), dul.v(), hl2.v());
    CHECK(std::memcmp(hl2.data(), hl.data(), std::size_t(hl.numel()) * sizeof(float)) == 0);
    host_tensor<float> g4({rows, cols}), u4({rows, cols}), r4({rows, cols});
    copy(ex, cv(gl), g4.v());
    copy(ex, cv(ul), u4.v());
    copy(ex, cv(rl), r4.v());
    swiglu_backward(ex, cv(g4), cv(u4), cv(r4), g4.v(), u4.v(), r4.v());
    CHECK(std::memcmp(g4.data(), dgl.data(), std::size_t(dgl.numel()) * sizeof(float)) == 0);
    CHECK(std::memcmp(u4.data(), dul.data(), std::size_t(dul.numel()) * sizeof(float)) == 0);
    CHECK(std::memcmp(r4.data(), hl.data(), std::size_t(hl.numel()) * sizeof(float)) == 0);
    host_tensor<double> gd({rows, cols}), ud({rows, cols}), rd({rows, cols}), dgd({rows, cols}), dud({rows, cols});
    cast(ex, cv(gl), gd.v());
    cast(ex, cv(ul), ud.v());
    cast(ex, cv(rl), rd.v());
    swiglu_backward(ex, cv(gd), cv(ud), cv(rd), dgd.v(), dud.v());
    CHECK(testing::rel_error(cv(dgl), cv(dgd)) < 1e-6);
    CHECK(testing::rel_error(cv(dul), cv(dud)) < 1e-6);
  }

  host_tensor<double> bad({n, f + 1});
  check_throws_with([&] { swiglu_forward(ex, cv(gate), cv(bad), h.v()); }, {"swiglu_forward", "up", "[7, 20]"});
  check_throws_with([&] { swiglu_backward(ex, cv(gate), cv(up), cv(r), dg.v(), du.v(), bad.v()); },
                    {"swiglu_backward", "h", "[7, 20]"});
}
