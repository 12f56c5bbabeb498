// The subspace-network boundary on CUDA against the host: E_fix regenerated on the device is the host's table bit for
// bit (rows and the materialised table, partial quads, the last token); the fused rebuild, the project kernel and
// the gradient maps match the host reference (fp32 to 1e-6, bf16 to bf16 rounding), with or without the table;
// bad token ids raise naming the row; and compress::subspace_projection on exec::cuda uses the host's basis and
// hashes and matches the host compressor.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include <subspace/compress/subspace_projection.hpp>
#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/fixed_embedding.hpp>
#include <subspace/kernels/subspace_projection.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

const exec::host hx{};

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}
template <class T>
view<const T, device_space> cv(const device_tensor<T>& t) {
  return t.v();
}

/// A host tensor of T holding x rounded to T, and x itself overwritten with those values (so a float64 reference
/// sees exactly the device's inputs).
template <class T>
host_tensor<T> rounded(host_tensor<double>& x) {
  host_tensor<T> out(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    out.data()[i] = convert<T>(x.data()[i]);
    x.data()[i] = double(out.data()[i]);
  }
  return out;
}

template <class T>
host_tensor<double> widened(const host_tensor<T>& x) {
  host_tensor<double> out(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) out.data()[i] = double(x.data()[i]);
  return out;
}

host_tensor<std::int32_t> random_tokens(std::int64_t n, std::int64_t vocab, std::uint64_t seed) {
  host_tensor<std::int32_t> t({n});
  for (std::int64_t i = 0; i < n; ++i) t(i) = std::int32_t(rng::bits4(seed, 7, std::uint64_t(i)).v[0] % vocab);
  t(n - 1) = std::int32_t(vocab - 1);  // the last token is always among them
  return t;
}

/// Relative tolerance of a T result against the float64 reference, for sums of `terms` products: fp32 sums carry
/// a rounding error growing like sqrt(terms) (about 1.1e-6 for 4096 terms, 3e-7 for 256, summed in order), so
/// fp32 gets 1e-6 up to 256 terms and sqrt(terms / 256)·1e-6 beyond; bf16 is bound by its output rounding.
template <class T>
double tolerance(std::int64_t terms = 1) {
  if constexpr (std::is_same_v<T, float>) return 1e-6 * std::max(1.0, std::sqrt(double(terms) / 256.0));
  else return 1e-2;
}

/// U [d, k] on the device as the compressor keeps it: the transposed view of a contiguous [k, d] copy.
struct device_basis {
  device_tensor<float> transposed;
  device_basis(const exec::cuda& ex, const host_tensor<float>& u) : transposed({u.dim(1), u.dim(0)}) {
    host_tensor<float> t({u.dim(1), u.dim(0)});
    for (std::int64_t i = 0; i < u.dim(0); ++i)
      for (std::int64_t j = 0; j < u.dim(1); ++j) t(j, i) = u(i, j);
    copy(ex, cv(t), transposed.v());
    ex.synchronize();
  }
  view<const float, device_space> v() const { return cv(transposed).transposed(); }
};

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

TEST_CASE_TEMPLATE("fixed embedding (CUDA): rows and the table are the host's bit for bit", T, float, bf16) {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const std::int64_t d : {64, 67, 1}) {  // whole quads, a partial last quad, a single column
    CAPTURE(d);
    const std::int64_t vocab = 257, n = 1031;
    host_tensor<float> table({vocab, d});
    fill_fixed_embedding(hx, seed, table.v());
    device_tensor<float> table_d({vocab, d});
    fill_fixed_embedding(ex, seed, table_d.v());
    CHECK(testing::first_difference(to_host(ex, cv(table_d)), table) == -1);

    const auto tokens = random_tokens(n, vocab, seed + 1);
    const auto tokens_d = to_device(ex, cv(tokens));
    host_tensor<T> rows({n, d});
    fixed_embedding_rows(hx, fixed_embedding<host_space>{seed, vocab, d, {}}, cv(tokens), rows.v());
    device_tensor<T> generated({n, d}), materialised({n, d});
    fixed_embedding_rows(ex, fixed_embedding<device_space>{seed, vocab, d, {}}, cv(tokens_d), generated.v());
    fixed_embedding_rows(ex, fixed_embedding<device_space>{seed, vocab, d, cv(table_d)}, cv(tokens_d),
                         materialised.v());
    CHECK(testing::first_difference(to_host(ex, cv(generated)), rows) == -1);
    CHECK(testing::first_difference(to_host(ex, cv(materialised)), rows) == -1);
  }
}

TEST_CASE_TEMPLATE("subspace maps (CUDA): rebuild, project and the gradient maps against the host", T, float, bf16) {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  for (const auto& [n, d, k] :
       {std::tuple<std::int64_t, std::int64_t, std::int64_t>{333, 256, 8}, {5, 130, 9}, {64, 4096, 40}}) {
    CAPTURE(n);
    CAPTURE(d);
    CAPTURE(k);
    const std::int64_t vocab = 50265;
    const host_tensor<float> u = make_subspace_basis(d, k, seed);
    const device_basis u_d(ex, u);
    const fixed_embedding<host_space> fixed{seed + 1, vocab, d, {}};
    const fixed_embedding<device_space> fixed_d{seed + 1, vocab, d, {}};
    const auto tokens = random_tokens(n, vocab, seed + 2);
    const auto tokens_d = to_device(ex, cv(tokens));

    // Inputs rounded to T; the host reference runs in double on the same values (with fp32 U).
    auto c64 = testing::random_tensor<double>({n, k}, seed + 3);
    auto x64 = testing::random_tensor<double>({n, d}, seed + 4);
    const host_tensor<T> c = rounded<T>(c64);
    host_tensor<double> e64({n, d});
    fixed_embedding_rows(hx, fixed, cv(tokens), e64.v());
    for (std::int64_t i = 0; i < x64.numel(); ++i) x64.data()[i] += e64.data()[i];  // x near E_fix, as in use
    const host_tensor<T> x = rounded<T>(x64);
    const auto c_d = to_device(ex, cv(c));
    const auto x_d = to_device(ex, cv(x));

    // rebuild: x = E_fix + c·Uᵀ
    host_tensor<double> rebuilt({n, d});
    subspace_rebuild(hx, fixed, cv(tokens), cv(c64), cv(u), rebuilt.v());
    device_tensor<T> rebuilt_d({n, d});
    subspace_rebuild(ex, fixed_d, cv(tokens_d), cv(c_d), u_d.v(), rebuilt_d.v());
    CHECK(testing::rel_error(cv(widened(to_host(ex, cv(rebuilt_d)))), cv(rebuilt)) <= tolerance<T>());

    // project: c = (x - E_fix)·U
    host_tensor<double> projected({n, k});
    subspace_project(hx, fixed, cv(tokens), cv(x64), cv(u), projected.v());
    device_tensor<T> projected_d({n, k});
    subspace_project(ex, fixed_d, cv(tokens_d), cv(x_d), u_d.v(), projected_d.v());
    CHECK(testing::rel_error(cv(widened(to_host(ex, cv(projected_d)))), cv(projected)) <= tolerance<T>(d));

    // The gradient maps: g = dx·U, dx = g·Uᵀ
    host_tensor<double> g({n, k}), dx({n, d});
    subspace_coefficients(hx, cv(x64), cv(u), g.v());
    subspace_expand(hx, cv(c64), cv(u), dx.v());
    device_tensor<T> g_d({n, k}), dx_d({n, d});
    subspace_coefficients(ex, cv(x_d), u_d.v(), g_d.v());
    subspace_expand(ex, cv(c_d), u_d.v(), dx_d.v());
    CHECK(testing::rel_error(cv(widened(to_host(ex, cv(g_d)))), cv(g)) <= tolerance<T>(d));
    CHECK(testing::rel_error(cv(widened(to_host(ex, cv(dx_d)))), cv(dx)) <= tolerance<T>());
    if constexpr (std::is_same_v<T, float>) {  // fp32 operands may be strided (a transposed view)
      device_tensor<float> g_t({k, n}), dx_t({d, n});
      subspace_coefficients(ex, cv(x_d), u_d.v(), g_t.v().transposed());
      subspace_expand(ex, cv(c_d), u_d.v(), dx_t.v().transposed());
      const host_tensor<float> g_back = to_host(ex, cv(g_t)), dx_back = to_host(ex, cv(dx_t));
      CHECK(testing::rel_error<float, double>(g_back.v().transposed(), g.v()) <= tolerance<T>(d));
      CHECK(testing::rel_error<float, double>(dx_back.v().transposed(), dx.v()) <= tolerance<T>());
    }

    // The materialised table gives the same bits.
    device_tensor<float> table_d({vocab, d});
    fill_fixed_embedding(ex, fixed_d.seed, table_d.v());
    const fixed_embedding<device_space> stored{fixed_d.seed, vocab, d, cv(table_d)};
    device_tensor<T> rebuilt2_d({n, d}), projected2_d({n, k});
    subspace_rebuild(ex, stored, cv(tokens_d), cv(c_d), u_d.v(), rebuilt2_d.v());
    subspace_project(ex, stored, cv(tokens_d), cv(x_d), u_d.v(), projected2_d.v());
    CHECK(testing::first_difference(to_host(ex, cv(rebuilt2_d)), to_host(ex, cv(rebuilt_d))) == -1);
    CHECK(testing::first_difference(to_host(ex, cv(projected2_d)), to_host(ex, cv(projected_d))) == -1);
  }
}

TEST_CASE("subspace maps (CUDA): a token id outside 0 .. V-1 raises naming its row, token_check::trust skips it") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const std::int64_t n = 40, d = 32, k = 4, vocab = 100;
  const host_tensor<float> u = make_subspace_basis(d, k, 3);
  const device_basis u_d(ex, u);
  host_tensor<std::int32_t> tokens = random_tokens(n, vocab, 5);
  tokens(17) = std::int32_t(vocab);
  tokens(29) = -4;
  const auto tokens_d = to_device(ex, cv(tokens));
  const fixed_embedding<device_space> fixed{1, vocab, d, {}};
  device_tensor<float> c({n, k}), x({n, d});
  fill(ex, c.v(), 0.5f);
  fill(ex, x.v(), 1.0f);
  const std::string on_rebuild =
      thrown_message([&] { subspace_rebuild(ex, fixed, cv(tokens_d), cv(c), u_d.v(), x.v()); });
  CAPTURE(on_rebuild);
  CHECK(on_rebuild.find("position 17") != std::string::npos);
  const std::string on_project =
      thrown_message([&] { subspace_project(ex, fixed, cv(tokens_d), cv(x), u_d.v(), c.v()); });
  CAPTURE(on_project);
  CHECK(on_project.find("position 17") != std::string::npos);
  CHECK(thrown_message([&] {
          subspace_rebuild(ex, fixed, cv(tokens_d), cv(c), u_d.v(), x.v(), token_check::trust);
          ex.synchronize();
        }) == "");
  const host_tensor<float> back = to_host(ex, cv(x));
  CHECK(std::isnan(back(17, 0)));
  CHECK(std::isnan(back(29, d - 1)));
  CHECK(std::isfinite(back(16, 0)));
}

TEST_CASE_TEMPLATE("compress::subspace_projection (CUDA): the host's basis and hashes, the host's results", T, float,
                   bf16) {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  // Pinned like the host suite's: nvcc's host pass builds the same basis and E_fix as the host compilers.
  CHECK(subspace_basis_hash(make_subspace_basis(64, 8, 1).v()) == 0xd54a264ed004897full);
  CHECK(fixed_embedding_hash(2, 50265, 64) == 0xb574c160f2b7ad3eull);

  for (const bool materialise : {false, true}) {
    for (const auto wire : {compress::wire_dtype::fp32, compress::wire_dtype::bf16}) {
      CAPTURE(materialise);
      CAPTURE(compress::to_string(wire));
      compress::subspace_projection_options o;
      o.d_model = 192;
      o.vocab = 70000;  // uint32 ids
      o.basis_seed = seed;
      o.fixed_embedding_seed = seed + 1;
      o.wire = wire;
      o.materialise_fixed_embedding = materialise;
      const compress::subspace_projection c(o);
      CHECK(c.k() == 8);
      CHECK(c.token_id_bytes() == 4);
      // The device basis is U, bit for bit (kept as Uᵀ, contiguous [k, d]).
      host_tensor<float> host_transposed({c.k(), c.d_model()});
      copy(hx, c.basis().transposed(), host_transposed.v());
      CHECK(testing::first_difference(to_host(ex, c.basis_on<T>(ex).transposed()), host_transposed) == -1);

      const shape xs{3, 7, 192}, ps = c.payload_shape(xs);
      const std::int64_t n = 21;
      const auto tokens = random_tokens(n, o.vocab, seed + 2);
      const auto tokens_d = to_device(ex, cv(tokens));
      auto x64 = testing::random_tensor<double>(xs, seed + 3);
      auto g64 = testing::random_tensor<double>(xs, seed + 4);
      auto q64 = testing::random_tensor<double>(ps, seed + 5);
      const host_tensor<T> x = rounded<T>(x64), g = rounded<T>(g64), q = rounded<T>(q64);
      const host_tensor<float> xf = rounded<float>(x64), gf = rounded<float>(g64), qf = rounded<float>(q64);
      const auto x_d = to_device(ex, cv(x)), g_d = to_device(ex, cv(g)), q_d = to_device(ex, cv(q));
      int params = 0;

      // The host compressor on the same values, in float.
      host_tensor<float> p_h(ps), xhat_h(xs), gp_h(ps), gx_h(xs);
      host_tensor<std::int32_t> sent_h({n});
      c.encode(hx, compress::boundary<const float, host_space>{cv(xf), cv(tokens)},
               compress::payload<float, host_space>{p_h.v(), sent_h.v()}, params);
      c.decode(hx, compress::payload<const float, host_space>{cv(qf), cv(tokens)}, xhat_h.v(), params);
      c.decode_backward(hx, compress::payload<const float, host_space>{cv(qf), cv(tokens)}, cv(gf), gp_h.v(), params);
      c.encode_backward(hx, compress::boundary<const float, host_space>{cv(xf), cv(tokens)}, cv(qf), gx_h.v(), params);

      device_tensor<T> p_d(ps), xhat_d(xs), gp_d(ps), gx_d(xs);
      device_tensor<std::int32_t> sent_d({n});
      c.encode(ex, compress::boundary<const T, device_space>{cv(x_d), cv(tokens_d)},
               compress::payload<T, device_space>{p_d.v(), sent_d.v()}, params);
      c.decode(ex, compress::payload<const T, device_space>{cv(q_d), cv(tokens_d)}, xhat_d.v(), params);
      c.decode_backward(ex, compress::payload<const T, device_space>{cv(q_d), cv(tokens_d)}, cv(g_d), gp_d.v(), params);
      c.encode_backward(ex, compress::boundary<const T, device_space>{cv(x_d), cv(tokens_d)}, cv(q_d), gx_d.v(),
                        params);

      // bf16 wire: the host rounds too, so the two differ by the rounding of a few different last bits at most.
      const double tol = std::is_same_v<T, float> && wire == compress::wire_dtype::fp32 ? 1e-6 : 1e-2;
      CHECK(testing::first_difference(to_host(ex, cv(sent_d)), tokens) == -1);
      CHECK(testing::rel_error(cv(widened(to_host(ex, cv(p_d)))), cv(widened(p_h))) <= tol);
      CHECK(testing::rel_error(cv(widened(to_host(ex, cv(xhat_d)))), cv(widened(xhat_h))) <= tolerance<T>());
      CHECK(testing::rel_error(cv(widened(to_host(ex, cv(gp_d)))), cv(widened(gp_h))) <= tol);
      CHECK(testing::rel_error(cv(widened(to_host(ex, cv(gx_d)))), cv(widened(gx_h))) <= tolerance<T>());
    }
  }
}
