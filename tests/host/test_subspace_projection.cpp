// The subspace-network boundary on the host: the fixed basis U (orthonormal, the Q of its documented draws, the
// same bits on 4 threads and in every build), the regenerated E_fix (equal to its materialised table bit for bit,
// nearly orthogonal rows, unit moments), the rebuild / project kernels against a float64 reference, and
// compress::subspace_projection: round trips, adjoints and finite differences (the Compressor conformance suite),
// wire accounting, the bf16 wire, token checks and the default k.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <subspace/compress/subspace_projection.hpp>
#include <subspace/core/parallel.hpp>
#include <subspace/kernels/fixed_embedding.hpp>
#include <subspace/kernels/subspace_projection.hpp>

#include "conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

namespace conformance = testing::conformance;

const exec::host host{};

/// The parameter store argument: subspace_projection never reads it.
struct no_parameters {};

using conformance::filled;
using conformance::random_tokens;

/// ‖UᵀU − I‖_max in double.
double orthonormality_error(view<const float, host_space> u) {
  const std::int64_t d = u.dim(0), k = u.dim(1);
  double worst = 0;
  for (std::int64_t a = 0; a < k; ++a)
    for (std::int64_t b = 0; b < k; ++b) {
      double s = 0;
      for (std::int64_t i = 0; i < d; ++i) s += double(u(i, a)) * double(u(i, b));
      const double e = std::abs(s - (a == b ? 1.0 : 0.0));
      worst = std::isfinite(e) ? std::max(worst, e) : INFINITY;
    }
  return worst;
}

/// E_fix[tokens] + c·Uᵀ, in float64 from the definitions (the reference for rebuild).
template <class B>
host_tensor<double> rebuilt_reference(std::uint64_t seed, const host_tensor<std::int32_t>& tokens,
                                      const host_tensor<double>& c, view<const B, host_space> u) {
  const std::int64_t n = c.dim(0), k = c.dim(1), d = u.dim(0);
  host_tensor<double> x({n, d});
  for (std::int64_t r = 0; r < n; ++r)
    for (std::int64_t j = 0; j < d; ++j) {
      double s = double(fixed_embedding_at(seed, tokens(r), j));
      for (std::int64_t p = 0; p < k; ++p) s += c(r, p) * double(u(j, p));
      x(r, j) = s;
    }
  return x;
}

compress::subspace_projection make_compressor(std::int64_t d, std::int64_t vocab, std::int64_t k, std::uint64_t seed,
                                              compress::wire_dtype wire, bool materialise = false) {
  compress::subspace_projection_options o;
  o.d_model = d;
  o.vocab = vocab;
  o.k = k;
  o.basis_seed = seed;
  o.fixed_embedding_seed = seed + 1;
  o.wire = wire;
  o.materialise_fixed_embedding = materialise;
  return compress::subspace_projection(o);
}

/// encode / decode / the backward maps on host views of T [n, d] / [n, k], one call each.
template <class T>
struct boundary_calls {
  const compress::subspace_projection& c;
  const host_tensor<std::int32_t>& tokens;
  no_parameters params{};

  host_tensor<T> encode(const host_tensor<T>& x) {
    host_tensor<T> p = filled<T>(c.payload_shape(x.shape()), T(NAN));
    host_tensor<std::int32_t> sent = filled<std::int32_t>(tokens.shape(), -1);
    c.encode(host, compress::boundary<const T, host_space>{x.v(), tokens.v()},
             compress::payload<T, host_space>{p.v(), sent.v()}, params);
    CHECK(testing::rel_error(sent, tokens) == 0.0);
    return p;
  }
  host_tensor<T> decode(const host_tensor<T>& p, const shape& xs) {
    host_tensor<T> x = filled<T>(xs, T(NAN));
    c.decode(host, compress::payload<const T, host_space>{p.v(), tokens.v()}, x.v(), params);
    return x;
  }
  host_tensor<T> decode_backward(const host_tensor<T>& p, const host_tensor<T>& grad_x) {
    host_tensor<T> g = filled<T>(p.shape(), T(NAN));
    c.decode_backward(host, compress::payload<const T, host_space>{p.v(), tokens.v()}, grad_x.v(), g.v(), params);
    return g;
  }
  host_tensor<T> encode_backward(const host_tensor<T>& x, const host_tensor<T>& g) {
    host_tensor<T> grad_x = filled<T>(x.shape(), T(NAN));
    c.encode_backward(host, compress::boundary<const T, host_space>{x.v(), tokens.v()}, g.v(), grad_x.v(), params);
    return grad_x;
  }
};

/// E_fix rows of `tokens` in T.
template <class T>
host_tensor<T> fixed_rows(const compress::subspace_projection& c, const host_tensor<std::int32_t>& tokens) {
  host_tensor<T> e({tokens.dim(0), c.d_model()});
  fixed_embedding_rows(host, c.fixed_embedding_on(host), tokens.v(), e.v());
  return e;
}

double dot(const host_tensor<double>& a, const host_tensor<double>& b) {
  return conformance::dot<double, double>(a.v(), b.v());
}

/// The message of the invalid_argument that f throws ("" when it throws none).
template <class F>
std::string thrown_message(F&& f) {
  try {
    f();
  } catch (const invalid_argument& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("subspace basis: orthonormal, the Q of its documented draws, the same bits on 4 threads") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t d = 192, k = 12;
  const host_tensor<float> u = make_subspace_basis(d, k, seed);
  CHECK(orthonormality_error(u.v()) <= 1e-6);

  // U = the Q of G = U R: R = UᵀG is upper triangular with a positive diagonal (the sign fix), and G's elements
  // are the documented draws.
  host_tensor<double> r({k, k});
  for (std::int64_t a = 0; a < k; ++a)
    for (std::int64_t b = 0; b < k; ++b) {
      double s = 0;
      for (std::int64_t i = 0; i < d; ++i)
        s += double(u(i, a)) * double(rng::normal_at(seed, subspace_basis_offset, std::uint64_t(i * k + b)));
      r(a, b) = s;
    }
  for (std::int64_t a = 0; a < k; ++a) {
    CAPTURE(a);
    CHECK(r(a, a) > 0.5);
    for (std::int64_t b = 0; b < a; ++b) CHECK(std::abs(r(a, b)) <= 1e-4);
  }
  CHECK(subspace_basis_offset == (std::uint64_t(0x53534e55u) << 32));

  // The same U as kernels/linalg.hpp's orthonormalize of the same draws, to fp32 rounding.
  host_tensor<float> draws({d, k}), q({d, k});
  fill_normal(host, draws.v(), seed, subspace_basis_offset);
  orthonormalize(host, draws.v(), q.v());
  CHECK(testing::rel_error(u, q) <= 1e-6);

  // Built on 4 threads at once: the same bits and hashes.
  std::vector<host_tensor<float>> built(4);
  std::vector<std::uint64_t> hashes(4);
  run_concurrently(4, [&](int i) {
    built[std::size_t(i)] = make_subspace_basis(d, k, seed);
    hashes[std::size_t(i)] = subspace_basis_hash(built[std::size_t(i)].v());
  });
  for (int i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(conformance::same_bits<float>(built[std::size_t(i)].v(), u.v()));
    CHECK(hashes[std::size_t(i)] == subspace_basis_hash(u.v()));
  }

  // Another seed gives another basis and another hash.
  const host_tensor<float> other = make_subspace_basis(d, k, seed + 1);
  CHECK_FALSE(conformance::same_bits<float>(other.v(), u.v()));
  CHECK(subspace_basis_hash(other.v()) != subspace_basis_hash(u.v()));

  // The fp64 basis of float64 activations spans the same subspace, orthonormal to fp64 precision.
  const host_tensor<double> q64 = subspace_basis_fp64(u.v());
  CHECK(testing::rel_error(q64, u) <= 1e-6);
  double worst_gram = 0, worst_residual = 0;
  for (std::int64_t a = 0; a < k; ++a) {
    for (std::int64_t b = 0; b < k; ++b) {
      double s = 0;
      for (std::int64_t i = 0; i < d; ++i) s += q64(i, a) * q64(i, b);
      worst_gram = std::max(worst_gram, std::abs(s - (a == b ? 1.0 : 0.0)));
    }
    // U's column a minus its projection onto span(Q): zero up to fp64 rounding.
    std::vector<double> coeff(std::size_t(k), 0.0);
    for (std::int64_t b = 0; b < k; ++b)
      for (std::int64_t i = 0; i < d; ++i) coeff[std::size_t(b)] += q64(i, b) * double(u(i, a));
    for (std::int64_t i = 0; i < d; ++i) {
      double s = double(u(i, a));
      for (std::int64_t b = 0; b < k; ++b) s -= coeff[std::size_t(b)] * q64(i, b);
      worst_residual = std::max(worst_residual, std::abs(s));
    }
  }
  CHECK(worst_gram <= 1e-14);
  CHECK(worst_residual <= 1e-14);

  CHECK_THROWS_AS(make_subspace_basis(8, 9, seed), invalid_argument);
  CHECK_THROWS_AS(make_subspace_basis(8, 0, seed), invalid_argument);
}

TEST_CASE("subspace basis: pinned hashes, so every build (host compilers, nvcc's host pass) agrees bit for bit") {
  // Computed once with the definitions of kernels/subspace_projection.hpp and fixed_embedding.hpp; the CUDA suite
  // pins the same values. A change here means ranks built with different versions would not agree.
  const host_tensor<float> u = make_subspace_basis(64, 8, 1);
  CHECK(subspace_basis_hash(u.v()) == 0xd54a264ed004897full);
  CHECK(fixed_embedding_hash(2, 50265, 64) == 0xb574c160f2b7ad3eull);
}

TEST_CASE("E_fix: the documented stream, regenerated equals materialised bit for bit, unit moments") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t vocab = 301, d = 67;  // d not a multiple of 4: the last quad is partial
  host_tensor<float> table({vocab, d});
  fill_fixed_embedding(host, seed, table.v());

  // Element (t, j) is draw j of the stream (seed, ("EFIX" << 32) | t): row t is an ordinary normal fill.
  CHECK(fixed_embedding_offset(7) == ((std::uint64_t(0x45464958u) << 32) | 7u));
  host_tensor<float> row({d});
  fill_normal(host, row.v(), seed, fixed_embedding_offset(std::int32_t(vocab - 1)));
  CHECK(conformance::same_bits<float>(row.v(), table.v()[vocab - 1]));

  std::vector<std::pair<std::int32_t, std::int64_t>> probes = {
      {0, 0}, {std::int32_t(vocab - 1), d - 1}, {std::int32_t(vocab - 1), 0}, {0, d - 1}};
  for (int i = 0; i < 200; ++i)
    probes.emplace_back(std::int32_t(rng::uniform_at(seed, 9, std::uint64_t(2 * i)) * float(vocab)),
                        std::int64_t(rng::uniform_at(seed, 9, std::uint64_t(2 * i + 1)) * float(d)));
  bool all_equal = true;
  for (const auto& [t, j] : probes)
    all_equal = all_equal && testing::same_bits(fixed_embedding_at(seed, t, j), table(t, j));
  CHECK(all_equal);

  // fixed_embedding_rows from the regenerated rows and from the table: the same bits.
  const auto tokens = random_tokens({40, d}, std::int32_t(vocab), seed + 3);
  host_tensor<float> generated({40, d}), materialised({40, d});
  fixed_embedding_rows(host, fixed_embedding<host_space>{seed, vocab, d, {}}, tokens.v(), generated.v());
  fixed_embedding_rows(host, fixed_embedding<host_space>{seed, vocab, d, table.v()}, tokens.v(), materialised.v());
  CHECK(conformance::same_bits<float>(generated.v(), materialised.v()));
  CHECK(conformance::same_bits<float>(generated.v()[5], table.v()[tokens(5)]));

  // The probe hash covers the rows of 16 tokens, the first and the last among them.
  const auto probe_tokens = fixed_embedding_probe_tokens(vocab);
  CHECK(probe_tokens.front() == 0);
  CHECK(probe_tokens.back() == vocab - 1);
  fnv1a_64 h;
  for (const std::int32_t t : probe_tokens)
    for (std::int64_t j = 0; j < d; ++j) h.add_float(table(t, j));
  CHECK(fixed_embedding_hash(seed, vocab, d) == h.value());
  CHECK(fixed_embedding_hash(seed + 1, vocab, d) != h.value());

  // Moments over 256 rows of width 1024: mean 0 and variance 1 (each within ~10 standard errors).
  const std::int64_t rows = 256, wide = 1024;
  host_tensor<float> sample({rows, wide});
  host_tensor<std::int32_t> ids({rows});
  for (std::int64_t i = 0; i < rows; ++i) ids(i) = std::int32_t(i * 37);
  fixed_embedding_rows(host, fixed_embedding<host_space>{seed, 1 << 20, wide, {}}, ids.v(), sample.v());
  double sum = 0, sum2 = 0;
  for (std::int64_t i = 0; i < sample.numel(); ++i) {
    sum += sample.data()[i];
    sum2 += double(sample.data()[i]) * sample.data()[i];
  }
  const double mean = sum / double(sample.numel()), var = sum2 / double(sample.numel()) - mean * mean;
  CAPTURE(mean);
  CAPTURE(var);
  CHECK(std::abs(mean) < 0.02);
  CHECK(std::abs(var - 1.0) < 0.03);

  // Rows of distinct tokens are nearly orthogonal: |cos| <= 5 / sqrt(d).
  double worst = 0;
  for (std::int64_t a = 0; a + 1 < rows; a += 5) {
    const std::int64_t b = a + 1;
    double ab = 0, aa = 0, bb = 0;
    for (std::int64_t j = 0; j < wide; ++j) {
      ab += double(sample(a, j)) * sample(b, j);
      aa += double(sample(a, j)) * sample(a, j);
      bb += double(sample(b, j)) * sample(b, j);
    }
    worst = std::max(worst, std::abs(ab) / std::sqrt(aa * bb));
  }
  CAPTURE(worst);
  CHECK(worst <= 5.0 / std::sqrt(double(wide)));
}

TEST_CASE_TEMPLATE("subspace_rebuild and subspace_project against the float64 definitions", T, float, double) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 37, d = 130, k = 9, vocab = 1000;
  const double tol = std::is_same_v<T, double> ? 1e-13 : 1e-6;
  const host_tensor<float> u32 = make_subspace_basis(d, k, seed);
  const host_tensor<double> u64 = subspace_basis_fp64(u32.v());
  const auto u = [&] {  // the basis of T's precision
    if constexpr (std::is_same_v<T, double>) return u64.v();
    else return u32.v();
  }();
  const fixed_embedding<host_space> fixed{seed + 1, vocab, d, {}};
  const auto tokens = random_tokens({n, d}, std::int32_t(vocab), seed + 2);
  const auto c64 = testing::random_tensor<double>({n, k}, seed + 3);
  host_tensor<T> c({n, k});
  host_tensor<double> c_as_t({n, k});
  for (std::int64_t i = 0; i < c.numel(); ++i) {
    c.data()[i] = T(c64.data()[i]);
    c_as_t.data()[i] = double(c.data()[i]);
  }
  const host_tensor<double> want = rebuilt_reference(fixed.seed, tokens, c_as_t, u);

  host_tensor<T> x = filled<T>({n, d}, T(NAN));
  subspace_rebuild(host, fixed, tokens.v(), c.v(), u, x.v());
  CHECK(testing::rel_error(x, want) <= tol);

  // project(rebuild(c)) = c, relative to |x - E_fix| (float: the subtraction of two numbers of size ~1).
  host_tensor<T> back = filled<T>({n, k}, T(NAN));
  subspace_project(host, fixed, tokens.v(), x.v(), u, back.v());
  CHECK(testing::rel_error(back, c_as_t) <= (std::is_same_v<T, double> ? 1e-12 : 1e-5));

  // The gradient maps are the products with U and Uᵀ.
  const auto dx = testing::random_tensor<T>({n, d}, seed + 4);
  host_tensor<T> g = filled<T>({n, k}, T(NAN)), dx_back = filled<T>({n, d}, T(NAN));
  subspace_coefficients(host, dx.v(), u, g.v());
  subspace_expand(host, g.v(), u, dx_back.v());
  host_tensor<double> g_want({n, k}), dx_back_want({n, d});
  for (std::int64_t r = 0; r < n; ++r) {
    for (std::int64_t p = 0; p < k; ++p) {
      double s = 0;
      for (std::int64_t j = 0; j < d; ++j) s += double(dx(r, j)) * u(j, p);
      g_want(r, p) = s;
    }
    for (std::int64_t j = 0; j < d; ++j) {
      double s = 0;
      for (std::int64_t p = 0; p < k; ++p) s += double(g(r, p)) * u(j, p);
      dx_back_want(r, j) = s;
    }
  }
  CHECK(testing::rel_error(g, g_want) <= tol);
  CHECK(testing::rel_error(dx_back, dx_back_want) <= tol);
  // Strided operands (transposed views) give the same products.
  host_tensor<T> dx_t({d, n}), g_t({k, n}), dx_back_t({d, n});
  copy(host, dx.v().transposed(), dx_t.v());
  subspace_coefficients(host, dx_t.v().transposed(), u, g_t.v().transposed());
  subspace_expand(host, g_t.v().transposed(), u, dx_back_t.v().transposed());
  CHECK(testing::rel_error<T, double>(g_t.v().transposed(), g_want.v()) <= tol);
  CHECK(testing::rel_error<T, double>(dx_back_t.v().transposed(), dx_back_want.v()) <= tol);

  // With the materialised table: the same bits.
  host_tensor<float> table({vocab, d});
  fill_fixed_embedding(host, fixed.seed, table.v());
  const fixed_embedding<host_space> stored{fixed.seed, vocab, d, table.v()};
  host_tensor<T> x2 = filled<T>({n, d}, T(NAN)), back2 = filled<T>({n, k}, T(NAN));
  subspace_rebuild(host, stored, tokens.v(), c.v(), u, x2.v());
  subspace_project(host, stored, tokens.v(), x.v(), u, back2.v());
  CHECK(conformance::same_bits<T>(x2.v(), x.v()));
  CHECK(conformance::same_bits<T>(back2.v(), back.v()));
}

TEST_CASE("subspace_projection: round trips in float64 (span form exact, any x projected onto E_fix + span(U))") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t d = 96, k = 7, vocab = 500;
  const auto c = make_compressor(d, vocab, k, seed, compress::wire_dtype::compute);
  const shape xs{3, 5, d};
  CHECK(c.basis_on<double>(host).data() == c.basis_fp64().data());  // float64 activations: the fp64 basis
  const auto tokens = random_tokens(xs, std::int32_t(vocab), seed + 2);
  boundary_calls<double> calls{c, tokens};

  // x = E_fix + c·Uᵀ comes back to 1e-12.
  const auto coeffs = testing::random_tensor<double>(c.payload_shape(xs), seed + 3);
  const host_tensor<double> x = calls.decode(coeffs, xs);
  const host_tensor<double> p = calls.encode(x);
  CHECK(testing::rel_error(p, coeffs) <= 1e-12);
  CHECK(testing::rel_error(calls.decode(p, xs), x) <= 1e-12);

  // Any x: decode(encode(x)) = E_fix + (x - E_fix)·U·Uᵀ.
  const auto y = testing::random_tensor<double>(xs, seed + 4);
  const host_tensor<double> e = fixed_rows<double>(c, tokens);
  host_tensor<double> want(xs);
  const auto u = c.basis_fp64();
  const std::int64_t n = compress::rows(xs);
  for (std::int64_t r = 0; r < n; ++r) {
    std::vector<double> proj(std::size_t(k), 0.0);
    for (std::int64_t p2 = 0; p2 < k; ++p2)
      for (std::int64_t j = 0; j < d; ++j) proj[std::size_t(p2)] += (y.data()[r * d + j] - e(r, j)) * u(j, p2);
    for (std::int64_t j = 0; j < d; ++j) {
      double s = e(r, j);
      for (std::int64_t p2 = 0; p2 < k; ++p2) s += proj[std::size_t(p2)] * u(j, p2);
      want.data()[r * d + j] = s;
    }
  }
  CHECK(testing::rel_error(calls.decode(calls.encode(y), xs), want) <= 1e-12);

  // The materialised fixed embedding gives the same bits.
  const auto stored = make_compressor(d, vocab, k, seed, compress::wire_dtype::compute, true);
  boundary_calls<double> stored_calls{stored, tokens};
  CHECK(conformance::same_bits<double>(stored_calls.encode(y).v(), calls.encode(y).v()));
  CHECK(conformance::same_bits<double>(stored_calls.decode(p, xs).v(), calls.decode(p, xs).v()));
}

TEST_CASE("subspace_projection: the backward maps are the adjoints of the linear parts (float64)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t d = 80, k = 11, vocab = 300;
  const auto c = make_compressor(d, vocab, k, seed, compress::wire_dtype::compute);
  const shape xs{9, d}, ps = c.payload_shape(xs);
  const auto tokens = random_tokens(xs, std::int32_t(vocab), seed + 2);
  boundary_calls<double> calls{c, tokens};
  const host_tensor<double> e = fixed_rows<double>(c, tokens);
  const auto x = testing::random_tensor<double>(xs, seed + 3), g = testing::random_tensor<double>(xs, seed + 4);
  const auto p = testing::random_tensor<double>(ps, seed + 5), q = testing::random_tensor<double>(ps, seed + 6);

  // <decode(p) - E_fix, g> = <p, decode_backward(g)>
  host_tensor<double> lifted = calls.decode(p, xs);
  for (std::int64_t i = 0; i < lifted.numel(); ++i) lifted.data()[i] -= e.data()[i];
  const double lhs1 = dot(lifted, g), rhs1 = dot(p, calls.decode_backward(p, g));
  CHECK(std::abs(lhs1 - rhs1) <= 1e-12 * conformance::norm<double>(p.v()) * conformance::norm<double>(g.v()));
  // <encode(x), q> = <x - E_fix, encode_backward(q)>
  host_tensor<double> centred(xs);
  for (std::int64_t i = 0; i < x.numel(); ++i) centred.data()[i] = x.data()[i] - e.data()[i];
  const double lhs2 = dot(calls.encode(x), q), rhs2 = dot(centred, calls.encode_backward(x, q));
  CHECK(std::abs(lhs2 - rhs2) <= 1e-12 * conformance::norm<double>(centred.v()) * conformance::norm<double>(q.v()));
}

namespace {

/// The conformance fixture: a small boundary in the `compute` wire (so float64 finite differences see no rounding).
struct subspace_projection_fixture {
  using compressor = compress::subspace_projection;
  static compressor make(std::uint64_t seed) {
    return make_compressor(24, 100, 5, seed, compress::wire_dtype::compute);
  }
  static std::vector<shape> shapes() { return {{6, 24}, {2, 3, 24}}; }
  static constexpr bool lossless = false;
  static constexpr std::int32_t vocab = 100;
};

}  // namespace

TYPE_TO_STRING(subspace_projection_fixture);
TEST_CASE_TEMPLATE_APPLY(compressor_conformance, std::tuple<subspace_projection_fixture>);

TEST_CASE("subspace_projection: wire accounting, the bf16 and fp32 wires, token ids checked") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t d = 64, k = 6;
  const shape xs{4, 8, d};
  const std::size_t n = 32;

  // fp32 coefficients; the ids as uint16 up to V = 65535, as uint32 from 65536 on.
  const auto narrow_ids = make_compressor(d, 65535, k, seed, compress::wire_dtype::fp32);
  const auto wide_ids = make_compressor(d, 65536, k, seed, compress::wire_dtype::fp32);
  CHECK(narrow_ids.token_id_bytes() == 2);
  CHECK(wide_ids.token_id_bytes() == 4);
  CHECK(narrow_ids.wire_bytes(xs, narrow_ids.wire_element_bytes(2)) == n * (4 * k + 2));
  CHECK(wide_ids.wire_bytes(xs, wide_ids.wire_element_bytes(2)) == n * (4 * k + 4));
  CHECK(narrow_ids.payload_shape(xs) == shape{4, 8, k});
  const auto bf16_wire = make_compressor(d, 50265, k, seed, compress::wire_dtype::bf16);
  const auto compute_wire = make_compressor(d, 50265, k, seed, compress::wire_dtype::compute);
  CHECK(bf16_wire.wire_element_bytes(4) == 2);
  CHECK(compute_wire.wire_element_bytes(8) == 8);
  CHECK(compute_wire.wire_element_bytes(2) == 2);
  CHECK(bf16_wire.wire_bytes(xs, 2) == n * (2 * k + 2));

  // The bf16 wire rounds the coefficients and the boundary gradient: relative error <= 2^-8, values on bf16's grid.
  const auto tokens = random_tokens(xs, 50265, seed + 2);
  boundary_calls<float> exact{compute_wire, tokens}, rounded{bf16_wire, tokens};
  const auto x = testing::random_tensor<float>(xs, seed + 3), gx = testing::random_tensor<float>(xs, seed + 4);
  const host_tensor<float> c_exact = exact.encode(x), c_bf16 = rounded.encode(x);
  CHECK(testing::rel_error(c_bf16, c_exact) <= 0x1p-8);
  CHECK(testing::rel_error(c_bf16, c_exact) > 0.0);
  const host_tensor<float> g_exact = exact.decode_backward(c_exact, gx), g_bf16 = rounded.decode_backward(c_bf16, gx);
  CHECK(testing::rel_error(g_bf16, g_exact) <= 0x1p-8);
  bool on_grid = true;
  for (std::int64_t i = 0; i < c_bf16.numel(); ++i)
    on_grid = on_grid && float(bf16(c_bf16.data()[i])) == c_bf16.data()[i] &&
              float(bf16(g_bf16.data()[i])) == g_bf16.data()[i];
  CHECK(on_grid);

  // The fp32 wire under float64 activations: the coefficients are fp32 values.
  const auto fp32_wire = make_compressor(d, 50265, k, seed, compress::wire_dtype::fp32);
  boundary_calls<double> wire64{fp32_wire, tokens};
  const host_tensor<double> c64 = wire64.encode(testing::random_tensor<double>(xs, seed + 5));
  bool fp32_values = true;
  for (std::int64_t i = 0; i < c64.numel(); ++i)
    fp32_values = fp32_values && double(float(c64.data()[i])) == c64.data()[i];
  CHECK(fp32_values);

  // An id outside [0, V) raises, naming its row.
  host_tensor<std::int32_t> bad = random_tokens(xs, 50265, seed + 6);
  bad(13) = 50265;
  boundary_calls<float> bad_calls{compute_wire, bad};
  const std::string on_encode = thrown_message([&] { (void)bad_calls.encode(x); });
  CAPTURE(on_encode);
  CHECK(on_encode.find("position 13") != std::string::npos);
  CHECK(on_encode.find("50265") != std::string::npos);
  bad(13) = 0;
  bad(30) = -1;
  const std::string on_decode = thrown_message([&] { (void)bad_calls.decode(c_exact, xs); });
  CAPTURE(on_decode);
  CHECK(on_decode.find("position 30") != std::string::npos);
  host_tensor<float> rows({32, d});
  const std::string on_rows =
      thrown_message([&] { fixed_embedding_rows(host, compute_wire.fixed_embedding_on(host), bad.v(), rows.v()); });
  CHECK(on_rows.find("position 30") != std::string::npos);

  // No token ids at all: an error that says why they are needed.
  no_parameters params;
  host_tensor<float> p = filled<float>(compute_wire.payload_shape(xs), 0.0f);
  CHECK_THROWS_AS(compute_wire.encode(host, compress::boundary<const float, host_space>{x.v()},
                                      compress::payload<float, host_space>{p.v()}, params),
                  invalid_argument);
}

TEST_CASE("subspace_projection: options, the default k and the accessors") {
  using compress::default_subspace_rank;
  CHECK(default_subspace_rank(4096) == 40);
  CHECK(default_subspace_rank(2048) == 40);
  CHECK(default_subspace_rank(1536) == 30);
  CHECK(default_subspace_rank(5120) == 51);
  CHECK(default_subspace_rank(8192) == 81);
  CHECK(default_subspace_rank(256) == 8);
  CHECK(default_subspace_rank(64) == 8);
  CHECK(default_subspace_rank(5) == 5);  // never above d

  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  compress::subspace_projection_options o;
  o.d_model = 128;
  o.vocab = 1000;
  o.basis_seed = seed;
  o.fixed_embedding_seed = seed + 1;
  const compress::subspace_projection c(o);
  CHECK(c.k() == 8);
  CHECK(c.options().k == 8);
  CHECK(c.wire() == compress::wire_dtype::fp32);
  CHECK(c.basis().shape() == shape{128, 8});
  CHECK(c.basis_seed() == seed);
  CHECK(c.fixed_embedding_seed() == seed + 1);
  CHECK(c.basis_hash() == subspace_basis_hash(make_subspace_basis(128, 8, seed).v()));
  CHECK(c.fixed_embedding_hash() == fixed_embedding_hash(seed + 1, 1000, 128));
  const compress::subspace_projection copy_of_c = c;  // copies share the tables
  CHECK(copy_of_c.basis().data() == c.basis().data());

  nn::parameter_store<float, float, host_space> store;
  CHECK(compress::declare(c, store).empty());
  CHECK(compress::sends_tokens_v<compress::subspace_projection>);
  CHECK_FALSE(compress::is_linear_v<compress::subspace_projection>);

  auto with = [&](auto change) {
    compress::subspace_projection_options bad = o;
    change(bad);
    return thrown_message([&] { compress::subspace_projection{bad}; });
  };
  CHECK(with([](auto& b) { b.k = 129; }).find("k must be in [1, d_model = 128]") != std::string::npos);
  CHECK(with([](auto& b) { b.k = -1; }) != "");
  CHECK(with([](auto& b) { b.vocab = 0; }).find("vocab") != std::string::npos);
  CHECK(with([](auto& b) { b.d_model = 0; }).find("d_model") != std::string::npos);
  CHECK_THROWS_AS((void)c.payload_shape({4, 127}), invalid_argument);
}
