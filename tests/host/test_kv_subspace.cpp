// compress::kv_subspace_mixture (Mixture of Subspaces) on the host: the Taylor form of the rotation and its
// near-orthogonality, skew-symmetric generators, the identity start, PCA of a planted subspace, finite-difference
// gradients of the compressed model (k/v projections, ψ, upstream tensors; m = 1 and 3), the compressed
// context-parallel model equal to the same compressed model on one rank (D = 2, 4; zigzag and contiguous with the
// same chunks), the bytes on the wire per layer, and the last layer dense.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>
#include <subspace/compress/kv_subspace_mixture.hpp>
#include <subspace/context/attention.hpp>
#include <subspace/context/layout.hpp>
#include <subspace/kernels/linalg.hpp>
#include <subspace/nn/llama.hpp>

#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/token_batch.hpp"

namespace {

using namespace subspace;

/// micro (d 16, 4 / 2 heads of 4: d_kv 8) with 3 layers: two compressed, the last dense.
nn::llama_config model_config() {
  nn::llama_config c = nn::presets::micro();
  c.n_layers = 3;
  c.max_seq = 64;
  return c;
}

compress::kv_subspace_options mos_options(const nn::llama_config& cfg, std::int64_t m) {
  compress::kv_subspace_options o;
  o.layers = cfg.n_layers;
  o.kv_dim = cfg.kv_dim();
  o.rank_k = 2;
  o.rank_v = 3;
  o.generators = m;
  o.generator_seed = 17;
  o.warmup_steps = 1;
  o.pca_steps = 1;
  return o;
}

/// A random orthonormal [d, r] basis (double).
host_tensor<double> random_basis(std::int64_t d, std::int64_t r, std::uint64_t seed) {
  const host_tensor<double> g = testing::random_tensor<double>(shape{d, r}, seed);
  host_tensor<double> q(shape{d, r});
  orthonormalize(exec::host{1}, view<const double, host_space>(g.v()), q.v());
  return q;
}

double norm_of(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v * v;
  return std::sqrt(s);
}

using codec_t = compress::kv_subspace_codec<double, double>;

/// The compressed model's tables and ψ: every compressed layer gets tables from random bases (the same on every
/// rank: seeded by layer) and switches to compression; ψ gets small random values (the same on every rank; std 0.1:
/// larger θ makes the loss so curved that the finite differences' truncation, not the gradient, fails the check).
template <class Model>
void compress_model(Model& model, const compress::kv_subspace_options& o, std::uint64_t seed) {
  for (std::int64_t l = 0; l < model.config().n_layers; ++l) {
    codec_t& codec = model.block(l).attention.codec();
    if (!codec.is_final()) {
      auto tk = compress::kv_tables::from_basis(random_basis(o.kv_dim, o.k_rank(), seed + 10 * std::uint64_t(l)).v(),
                                                o.generators, o.generator_seed, l, compress::kv_part::key);
      auto tv =
          compress::kv_tables::from_basis(random_basis(o.kv_dim, o.v_rank(), seed + 10 * std::uint64_t(l) + 1).v(),
                                          o.generators, o.generator_seed, l, compress::kv_part::value);
      codec.set_tables(std::move(tk), std::move(tv));
      for (const auto part : {compress::kv_part::key, compress::kv_part::value})
        for (const bool bias : {false, true}) {
          auto x = model.parameters().value(codec.psi_index(part, bias));
          const host_tensor<double> r =
              testing::random_tensor<double>(x.shape(), seed + 100 + std::uint64_t(l), 0, 0.1f);
          copy(exec::host{}, view<const double, host_space>(r.v()), x);
        }
    }
    codec.begin_step(o.warmup_steps + 1);
  }
}

comm::local_options quick_timeout() {
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  return lo;
}

/// The loss and the mean gradients over the ranks of `world` of the compressed model on (tokens, targets) placed by
/// `lay` (each rank its rows).
template <class Comm>
double compressed_run(std::vector<Comm>& world, const nn::llama_config& cfg, const compress::kv_subspace_options& o,
                      std::uint64_t seed, const context::layout& lay, context::exchange how,
                      const testing::token_batch& batch, testing::named_tensors& out) {
  using blocks_t = context::blocks<Comm, compress::kv_subspace_mixture>;
  std::mutex mu;
  double loss = 0;
  std::vector<testing::named_tensors> per_rank(world.size());
  comm::local::run_ranks(world, [&](Comm& c) {
    const int r = c.rank();
    blocks_t blocks(how, compress::kv_subspace_mixture(o));
    nn::llama<exec::host, double, blocks_t> model(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks);
    blocks.connect(c, lay);
    model.set_positions(lay.positions(r));
    model.init(seed);
    compress_model(model, o, seed);
    model.zero_grad();
    host_tensor<std::int32_t> tok(shape{batch.tokens.shape()[0], lay.rows_per_rank()}), tgt(tok.shape());
    lay.take<std::int32_t>(r, batch.tok(), tok.v());
    lay.take<std::int32_t>(r, view<const std::int32_t, host_space>(batch.targets.v()), tgt.v());
    const double l = model.forward(tok.v(), tgt.v());
    model.backward();
    std::lock_guard lock(mu);
    loss += l / double(world.size());
    per_rank[std::size_t(r)].add(model.parameters());
  });
  out = per_rank[0];
  for (auto& [name, g] : out.grads) {
    for (double& x : g) x = 0;
    for (const auto& p : per_rank)
      for (std::size_t i = 0; i < g.size(); ++i) g[i] += p.grads.at(name)[i] / double(world.size());
  }
  return loss;
}

}  // namespace

TEST_CASE("kv_subspace: the Taylor form, its near-orthogonality, skew-symmetric generators, the identity start") {
  const std::int64_t d = 12, r = 4;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const host_tensor<double> u0 = random_basis(d, r, seed);
  for (const std::int64_t m : {1, 3}) {
    CAPTURE(m);
    const compress::kv_tables t = compress::kv_tables::from_basis(u0.v(), m, seed, 2, compress::kv_part::value);
    std::vector<host_tensor<double>> a;
    for (std::int64_t j = 0; j < m; ++j) {
      a.push_back(compress::kv_generator(seed, 2, compress::kv_part::value, j, m, d));
      for (std::int64_t x = 0; x < d; ++x)
        for (std::int64_t y = 0; y < d; ++y) CHECK(a.back()(x, y) == -a.back()(y, x));  // bitwise
    }
    std::vector<double> theta(static_cast<std::size_t>(m));
    for (std::int64_t j = 0; j < m; ++j) theta[std::size_t(j)] = 0.3 * double(j + 1) - 0.5;
    // Dense: S = Σ θ_j A_j, (I + S + ½ S²) U_0 with U_0 as the tables hold it (fp32).
    std::vector<double> s(std::size_t(d * d), 0.0), u(std::size_t(d * r)), dense(std::size_t(d * r));
    for (std::int64_t j = 0; j < m; ++j)
      for (std::int64_t i = 0; i < d * d; ++i) s[std::size_t(i)] += theta[std::size_t(j)] * a[std::size_t(j)].data()[i];
    for (std::int64_t x = 0; x < d; ++x)
      for (std::int64_t c = 0; c < r; ++c) {
        double su = 0, ssu = 0;
        for (std::int64_t y = 0; y < d; ++y) {
          su += s[std::size_t(x * d + y)] * t.u0()[y * r + c];
          double sy = 0;
          for (std::int64_t z = 0; z < d; ++z) sy += s[std::size_t(y * d + z)] * t.u0()[z * r + c];
          ssu += s[std::size_t(x * d + y)] * sy;
        }
        dense[std::size_t(x * r + c)] = t.u0()[x * r + c] + su + 0.5 * ssu;
      }
    compress::rotated_basis(t, theta.data(), u.data());
    CHECK(testing::rel_diff(u, dense) <= 1e-6);  // P and Q are held in fp32

    // ‖U(θ)ᵀU(θ) − I‖ = ¼‖U_0ᵀ S⁴ U_0‖ shrinks 16x when θ halves.
    const auto defect = [&](double scale) {
      std::vector<double> th(theta), uu(std::size_t(d * r)), e(std::size_t(r * r));
      for (double& x : th) x *= scale;
      compress::rotated_basis(t, th.data(), uu.data());
      for (std::int64_t i = 0; i < r; ++i)
        for (std::int64_t j = 0; j < r; ++j) {
          double sum = 0;
          for (std::int64_t x = 0; x < d; ++x) sum += uu[std::size_t(x * r + i)] * uu[std::size_t(x * r + j)];
          e[std::size_t(i * r + j)] = sum - (i == j ? 1.0 : 0.0);
        }
      return norm_of(e);
    };
    const double ratio = defect(1.0) / defect(0.5);
    CAPTURE(ratio);
    CHECK(ratio > 15.0);
    CHECK(ratio < 17.0);

    // θ = 0: U = U_0, and Z in span(U_0) comes back (up to U_0's fp32 rounding).
    std::vector<double> zero(std::size_t(m), 0.0), u_zero(std::size_t(d * r));
    compress::rotated_basis(t, zero.data(), u_zero.data());
    for (std::int64_t i = 0; i < d * r; ++i) CHECK(u_zero[std::size_t(i)] == double(t.u0()[i]));
  }
}

TEST_CASE("kv_subspace: PCA of the second moment recovers a planted subspace") {
  const std::int64_t d = 16, r = 3, n = 400;
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const host_tensor<double> basis = random_basis(d, r, seed);
  const host_tensor<double> coef = testing::random_tensor<double>(shape{n, r}, seed + 1);
  const host_tensor<double> noise = testing::random_tensor<double>(shape{n, d}, seed + 2, 0.0f, 1e-3f);
  host_tensor<double> z(shape{n, d}), sigma(shape{d, d});
  for (std::int64_t i = 0; i < n; ++i)
    for (std::int64_t x = 0; x < d; ++x) {
      double s = noise(i, x);
      for (std::int64_t c = 0; c < r; ++c) s += coef(i, c) * basis(x, c);
      z(i, x) = s;
    }
  gemm(exec::host{1}, op::transpose, op::none, 1.0f, view<const double, host_space>(z.v()),
       view<const double, host_space>(z.v()), 0.0f, sigma.v());
  const host_tensor<double> u0 = compress::top_eigenbasis(sigma.v(), r);
  // The cosines of the principal angles are the singular values of basisᵀ U_0; the largest angle's is the smallest.
  host_tensor<double> overlap(shape{r, r}), sv(shape{r});
  gemm(exec::host{1}, op::transpose, op::none, 1.0f, view<const double, host_space>(basis.v()),
       view<const double, host_space>(u0.v()), 0.0f, overlap.v());
  svd(exec::host{1}, view<const double, host_space>(overlap.v()), sv.v(), view<double, host_space>{},
      view<double, host_space>{});
  const double largest_angle = std::acos(std::min(1.0, sv(r - 1)));
  CAPTURE(largest_angle);
  CHECK(largest_angle < 1e-2);
}

TEST_CASE(
    "kv_subspace: the compressed model over D = 2 and 4 ranks (zigzag and contiguous, ring and all-gather) equals "
    "the same compressed model on one rank (fp64 loss and every gradient), and moves the bytes it should") {
  const nn::llama_config cfg = model_config();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32;
  const testing::token_batch data(batch, seq, cfg.vocab, seed + 1, false);
  for (const std::int64_t m : {1, 3}) {
    CAPTURE(m);
    const compress::kv_subspace_options o = mos_options(cfg, m);
    // One rank holding every chunk of 4 rows (the chunks of 4 ranks zigzag, of 8 contiguous).
    for (const std::int64_t chunk : {std::int64_t(4), std::int64_t(8)}) {
      CAPTURE(chunk);
      std::vector<comm::local> one = comm::local::world(1, quick_timeout());
      testing::named_tensors reference;
      const double ref_loss =
          compressed_run(one, cfg, o, seed, context::layout(seq, 1, context::placement::contiguous, chunk),
                         context::exchange::ring, data, reference);
      REQUIRE(std::isfinite(ref_loss));
      for (const int d : {2, 4}) {
        const auto kind = chunk == seq / (2 * d) ? context::placement::zigzag : context::placement::contiguous;
        if (kind == context::placement::contiguous && seq % (d * chunk) != 0) continue;
        for (const auto how : {context::exchange::ring, context::exchange::all_gather}) {
          CAPTURE(d);
          CAPTURE(context::to_string(kind));
          CAPTURE(context::to_string(how));
          std::vector<comm::local> base = comm::local::world(d, quick_timeout());
          std::vector<comm::throttled<comm::local>> world;
          for (auto& c : base) world.emplace_back(c, comm::network{});
          testing::named_tensors cp;
          const double loss = compressed_run(world, cfg, o, seed, context::layout(seq, d, kind, chunk), how, data, cp);
          CHECK(std::abs(loss - ref_loss) <= 1e-12 * std::abs(ref_loss));
          for (const auto& [name, g] : reference.grads) {
            CAPTURE(name);
            CHECK(testing::rel_diff(cp.grads.at(name), g) <= 1e-12);
          }
          // Per compressed layer and direction: (D − 1) payloads of B · chunks · (n (r_K + r_V) values + 2m θ);
          // the last layer: (D − 1) dense blocks of 2 · B · S/D · d_kv.
          const std::int64_t chunks = seq / d / chunk;
          const std::uint64_t compressed =
              std::uint64_t(batch * chunks * (chunk * (o.k_rank() + o.v_rank()) + 2 * m)) * sizeof(double);
          const std::uint64_t dense = std::uint64_t(2 * batch * (seq / d) * cfg.kv_dim()) * sizeof(double);
          const std::uint64_t want = 2 * std::uint64_t(d - 1) * (std::uint64_t(cfg.n_layers - 1) * compressed + dense);
          for (auto& c : world) CHECK(c.metrics().bytes_sent() == want);
        }
      }
    }
  }
}

TEST_CASE(
    "kv_subspace: finite differences of the compressed model (k and v projections, psi, upstream tensors; "
    "theta bounded and not)") {
  const nn::llama_config cfg = model_config();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 16;
  const testing::token_batch data(batch, seq, cfg.vocab, seed + 1, false);
  for (const std::int64_t m : {1, 3}) {
    CAPTURE(m);
    // θ bounded hard (|u| ~ 0.1 against θ_max 0.12: tanh's slope well below 1) with m = 1, unbounded with m = 3.
    compress::kv_subspace_options o = mos_options(cfg, m);
    o.theta_max = m == 1 ? 0.12 : 0.0;
    CAPTURE(o.theta_max);
    using blocks_t = context::blocks<comm::local, compress::kv_subspace_mixture>;
    std::vector<comm::local> one = comm::local::world(1, quick_timeout());
    const context::layout lay(seq, 1, context::placement::contiguous, 4);
    blocks_t blocks(context::exchange::ring, compress::kv_subspace_mixture(o));
    nn::llama<exec::host, double, blocks_t> model(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks);
    blocks.connect(one[0], lay);
    model.set_positions(lay.positions(0));
    model.init(seed);
    // Sharp attention and larger values, so that K, V and their compression move the loss well above the rounding of
    // the finite differences: q, k and v projections 12 times the initial 0.02.
    for (std::int64_t l = 0; l < cfg.n_layers; ++l)
      for (auto* p : {&model.block(l).q_proj, &model.block(l).k_proj, &model.block(l).v_proj})
        scale(exec::host{}, 12.0f, p->value);
    compress_model(model, o, seed);
    model.zero_grad();
    model.forward(data.tok(), data.tgt());
    model.backward();
    auto& store = model.parameters();
    const codec_t& codec = model.block(0).attention.codec();
    const std::vector<std::pair<std::size_t, std::string>> tensors = {
        {codec.psi_index(compress::kv_part::key, false), "psi K weight"},
        {codec.psi_index(compress::kv_part::key, true), "psi K bias"},
        {codec.psi_index(compress::kv_part::value, false), "psi V weight"},
        {codec.psi_index(compress::kv_part::value, true), "psi V bias"},
        {model.block(0).first_parameter() + 1, "layer 0 k_proj"},
        {model.block(0).first_parameter() + 2, "layer 0 v_proj"},
        {model.block(1).first_parameter() + 1, "layer 1 k_proj"},
        {0, "embedding"}};
    for (const auto& [index, what] : tensors) {
      CAPTURE(what);
      const auto value = store.value(index);
      const auto grad = store.grad(index);
      std::vector<double> fd, analytic;
      int near_kink = 0;
      // Twelve elements (all of a smaller tensor), drawing up to 48 candidates past the ones near a kink.
      const std::int64_t want = std::min<std::int64_t>(value.numel(), 12);
      for (std::int64_t e = 0; e < std::min<std::int64_t>(value.numel(), 48) && std::int64_t(fd.size()) < want; ++e) {
        const std::int64_t i = (e * 7919) % value.numel();
        const double x0 = value.data()[i];
        const auto at = [&](double x) {
          value.data()[i] = x;
          return model.evaluate(data.tok(), data.tgt());
        };
        // The five-point stencil: truncation O(h⁴), so h can be large enough for rounding not to matter.
        const auto stencil = [&](double h) {
          return (8 * (at(x0 + h) - at(x0 - h)) - (at(x0 + 2 * h) - at(x0 - 2 * h))) / (12 * h);
        };
        const double wide = stencil(5e-5), narrow = stencil(5e-6);
        value.data()[i] = x0;
        // ψ reads a chunk's mean over its ℓ1 norm, which has a kink wherever a component of the mean is zero.
        // Upstream tensors move many means, so a stencil 1e-4 wide crosses one now and then (about one run in
        // four; the embedding, which moves every mean, five of twelve elements in one run in two hundred); the two
        // widths then disagree, and the element is replaced by the next candidate (a wrong gradient shows either
        // way).
        if (std::abs(wide - narrow) > 1e-6 * std::max(std::abs(wide), 1e-3)) {
          ++near_kink;
          continue;
        }
        fd.push_back(wide);
        analytic.push_back(grad.data()[i]);
      }
      CAPTURE(near_kink);
      if (fd.empty()) {  // only a tensor of a few elements, each near a kink in this draw (about one run in 500)
        MESSAGE(what << ": every element is near a kink in this draw; not compared");
        continue;
      }
      REQUIRE(norm_of(analytic) > 0);
      // Relative to the gradient's norm, or to 1e-3 when a draw makes it smaller: the differences' rounding floor
      // (~1e-11) would otherwise dominate a gradient that happens to nearly cancel. The bound is the kink filter's:
      // a kink that moves the wide stencil by less than 1e-6 of it passes the filter (seen: up to 5.5e-7, above
      // 1e-7 in one run of forty); a wrong gradient is off by orders of magnitude more.
      std::vector<double> diff(analytic.size());
      for (std::size_t i = 0; i < diff.size(); ++i) diff[i] = analytic[i] - fd[i];
      const double err = norm_of(diff) / std::max(norm_of(fd), 1e-3);
      MESSAGE(what << ": " << fd.size() << " elements (" << near_kink << " near a kink), |g| " << norm_of(analytic)
                   << ", error " << err);
      CHECK(err <= 1e-6);
    }
  }
}

TEST_CASE("kv_subspace: the last layer and the warm-up send K and V dense; bad options are named") {
  const nn::llama_config cfg = model_config();
  compress::kv_subspace_options o = mos_options(cfg, 1);
  o.warmup_steps = 10;
  o.pca_steps = 3;
  o.unplug_at_step = 20;
  const compress::kv_rows rows{2, 2, 4, 2, 4};
  codec_t last(o, 2, 0), first(o, 0, 0);
  CHECK(last.is_final());
  first.begin_step(5);
  CHECK(first.payload_size(rows) == compress::kv_payload_size{2 * rows.elements(), 0});
  first.set_tables(compress::kv_tables::from_basis(random_basis(8, 2, 1).v(), 1, 1, 0, compress::kv_part::key),
                   compress::kv_tables::from_basis(random_basis(8, 3, 2).v(), 1, 1, 0, compress::kv_part::value));
  first.begin_step(11);
  CHECK(first.compressing());
  CHECK(first.payload_size(rows) == compress::kv_payload_size{2 * 2 * 4 * (2 + 3), 2 * 2 * 2 * 1});
  first.begin_step(20);  // unplugged
  CHECK(!first.compressing());
  last.begin_step(11);
  CHECK(!last.compressing());
  CHECK(last.payload_size(rows) == compress::kv_payload_size{2 * rows.elements(), 0});

  compress::kv_subspace_options bad = o;
  bad.rank_v = 8;
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("must be below kv_dim 8"), invalid_argument);
  bad = o;
  bad.pca_steps = 11;
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("pca_steps must lie in [1, warmup_steps = 10]"),
                       invalid_argument);
  bad = o;
  bad.unplug_at_step = 5;
  CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("unplug_at_step must be 0 (never) or after"),
                       invalid_argument);
  for (const double theta_max : {-0.1, double(NAN), double(INFINITY)}) {
    bad = o;
    bad.theta_max = theta_max;
    CHECK_THROWS_WITH_AS(bad.validate(), doctest::Contains("theta_max must be a finite number >= 0"), invalid_argument);
  }
}
