// Context-parallel attention (context::attention through context::blocks) on in-process ranks: a Llama whose
// sequences are spread over D = 1, 2, 4 and 8 ranks (contiguous and zigzag, ring and all-gather) computes exactly
// the single-device model's loss and every gradient (fp64), the K/V blocks cross the wire as counted, and the
// layout places chunks as documented.
#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>
#include <subspace/context/attention.hpp>
#include <subspace/context/layout.hpp>
#include <subspace/nn/llama.hpp>

#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/token_batch.hpp"

namespace {

using namespace subspace;

/// The micro preset (GQA 4 / 2 heads) with a context long enough for 8 ranks of zigzag chunks.
nn::llama_config long_micro() {
  nn::llama_config c = nn::presets::micro();
  c.max_seq = 64;
  return c;
}

/// Fresh random tokens [B, S] below `vocab`.
host_tensor<std::int32_t> random_tokens(std::int64_t b, std::int64_t s, std::int64_t vocab, std::uint64_t seed) {
  return testing::token_batch(b, s, vocab, seed, false).tokens;
}

/// The loss and gradients of `cfg` on (tokens, targets) on one device.
double single_device(const nn::llama_config& cfg, std::uint64_t seed, const host_tensor<std::int32_t>& tokens,
                     const host_tensor<std::int32_t>& targets, testing::named_tensors& out) {
  nn::llama<exec::host, double> model(cfg, exec::host{1});
  model.init(seed);
  model.zero_grad();
  const double loss = model.forward(tokens.v(), targets.v());
  model.backward();
  out.add(model.parameters());
  return loss;
}

/// The same over the ranks of `world` holding the layout's chunks: the mean of the ranks' losses and gradients
/// (equal token counts per rank, so the mean of the means is the mean over the sequence).
template <class Comm>
double context_parallel(std::vector<Comm>& world, const nn::llama_config& cfg, std::uint64_t seed,
                        const context::layout& lay, context::exchange how, const host_tensor<std::int32_t>& tokens,
                        const host_tensor<std::int32_t>& targets, testing::named_tensors& out) {
  std::mutex mu;
  double loss = 0;
  std::vector<testing::named_tensors> per_rank(world.size());
  comm::local::run_ranks(world, [&](Comm& c) {
    const int r = c.rank();
    context::blocks<Comm> blocks(how);
    nn::llama<exec::host, double, context::blocks<Comm>> model(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks);
    blocks.connect(c, lay);
    model.set_positions(lay.positions(r));
    model.init(seed);
    model.zero_grad();
    host_tensor<std::int32_t> tok(shape{tokens.shape()[0], lay.rows_per_rank()}), tgt(tok.shape());
    lay.take<std::int32_t>(r, tokens.v(), tok.v());
    lay.take<std::int32_t>(r, targets.v(), tgt.v());
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

comm::local_options quick_timeout() {
  comm::local_options o;
  o.timeout = std::chrono::seconds(60);
  return o;
}

}  // namespace

TEST_CASE("context::layout: contiguous and zigzag chunks, owners, positions and the rows each rank takes") {
  const context::layout zz(16, 4, context::placement::zigzag);
  CHECK(zz.chunk_rows() == 2);
  CHECK(zz.chunks_of(0) == std::vector<std::int64_t>{0, 7});
  CHECK(zz.chunks_of(3) == std::vector<std::int64_t>{3, 4});
  for (std::int64_t c = 0; c < zz.chunks(); ++c) {
    const std::vector<std::int64_t> held = zz.chunks_of(zz.owner(c));
    CHECK(std::find(held.begin(), held.end(), c) != held.end());
  }
  CHECK(zz.positions(1) == std::vector<nn::position_chunk>{{2, 2}, {2, 12}});

  const context::layout ct(16, 4, context::placement::contiguous, 2);  // two chunks per rank, consecutive
  CHECK(ct.chunks_of(1) == std::vector<std::int64_t>{2, 3});
  CHECK(ct.owner(5) == 2);
  CHECK(context::layout(16, 4, context::placement::contiguous).positions(2) == std::vector<nn::position_chunk>{{4, 8}});

  host_tensor<std::int32_t> full(shape{2, 16}), local(shape{2, 4});
  for (std::int64_t i = 0; i < full.numel(); ++i) full.data()[i] = std::int32_t(i);
  zz.take<std::int32_t>(1, full.v(), local.v());
  CHECK(std::vector<std::int32_t>(local.data(), local.data() + 8) ==
        std::vector<std::int32_t>{2, 3, 12, 13, 18, 19, 28, 29});

  CHECK_THROWS_WITH_AS(context::layout(18, 4, context::placement::zigzag), doctest::Contains("multiple of 8"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(context::layout(16, 4, context::placement::zigzag, 1), doctest::Contains("exactly two"),
                       invalid_argument);
  CHECK_THROWS_AS(zz.chunks_of(4), invalid_argument);
}

TEST_CASE("context::layout: the visible blocks cover every (query, key) pair the causal mask keeps, once") {
  // Row by row: each pair of global positions (q >= k) of rank me's queries and rank owner's keys lies in exactly
  // one block; no block holds a pair the mask drops, except inside a masked block (the kernel masks it there).
  const auto check = [](const context::layout& lay) {
    for (int me = 0; me < lay.ranks(); ++me)
      for (int owner = 0; owner < lay.ranks(); ++owner) {
        CAPTURE(me);
        CAPTURE(owner);
        const auto qs = lay.positions(me), ks = lay.positions(owner);
        const auto global = [](const std::vector<nn::position_chunk>& chunks, std::int64_t row) {
          for (const nn::position_chunk& c : chunks) {
            if (row < c.rows) return c.pos0 + row;
            row -= c.rows;
          }
          return std::int64_t(-1);
        };
        const std::int64_t rows = lay.rows_per_rank();
        std::vector<int> covered(std::size_t(rows * rows), 0);
        for (const context::visible_block& b : lay.visible_blocks(me, owner)) {
          CHECK(b.q_rows > 0);
          CHECK(b.k_rows > 0);
          if (b.masked) {  // one chunk each, positions contiguous from the block's first ones
            CHECK(b.q_rows == lay.chunk_rows());
            CHECK(b.k_rows == lay.chunk_rows());
            CHECK(global(qs, b.q0) == b.q_pos0);
            CHECK(global(ks, b.k0) == b.k_pos0);
          }
          for (std::int64_t i = b.q0; i < b.q0 + b.q_rows; ++i)
            for (std::int64_t j = b.k0; j < b.k0 + b.k_rows; ++j) {
              ++covered[std::size_t(i * rows + j)];
              if (!b.masked) CHECK(global(ks, j) <= global(qs, i));
            }
        }
        for (std::int64_t i = 0; i < rows; ++i)
          for (std::int64_t j = 0; j < rows; ++j) {
            const bool visible = global(ks, j) <= global(qs, i);
            const int times = covered[std::size_t(i * rows + j)];
            // a masked block also spans the masked-out corner of its diagonal chunk pair
            if (visible) CHECK(times == 1);
            else CHECK(times <= 1);
          }
      }
  };
  for (const int d : {1, 2, 4, 8}) {
    check(context::layout(48, d, context::placement::contiguous, 48 / (3 * d)));  // three chunks per rank
    check(context::layout(16 * d, d, context::placement::zigzag));
  }

  // Zigzag: one block for every other owner (twice the chunk rows on one side), three for the rank's own keys.
  const context::layout zz(64, 4, context::placement::zigzag);
  const std::int64_t c = zz.chunk_rows();
  for (int me = 0; me < 4; ++me)
    for (int owner = 0; owner < 4; ++owner) {
      const auto blocks = zz.visible_blocks(me, owner);
      if (owner == me) {
        CHECK(blocks.size() == 3);
        continue;
      }
      REQUIRE(blocks.size() == 1);
      CHECK_FALSE(blocks[0].masked);
      CHECK(blocks[0].q_rows * blocks[0].k_rows == 2 * c * c);
    }
}

TEST_CASE(
    "context::attention: D = 1, 2, 4, 8 ranks, contiguous and zigzag, ring and all-gather equal one device (fp64 "
    "loss and every gradient)") {
  const nn::llama_config cfg = long_micro();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 32;
  const host_tensor<std::int32_t> tokens = random_tokens(batch, seq, cfg.vocab, seed + 1);
  const host_tensor<std::int32_t> targets = random_tokens(batch, seq, cfg.vocab, seed + 2);
  testing::named_tensors whole;
  const double whole_loss = single_device(cfg, seed, tokens, targets, whole);
  REQUIRE(std::isfinite(whole_loss));

  for (const int d : {1, 2, 4, 8})
    for (const auto kind : {context::placement::contiguous, context::placement::zigzag})
      for (const auto how : {context::exchange::ring, context::exchange::all_gather}) {
        CAPTURE(d);
        CAPTURE(context::to_string(kind));
        CAPTURE(context::to_string(how));
        std::vector<comm::local> world = comm::local::world(d, quick_timeout());
        testing::named_tensors cp;
        const double loss = context_parallel(world, cfg, seed, context::layout(seq, d, kind), how, tokens, targets, cp);
        CHECK(std::abs(loss - whole_loss) <= 1e-12 * std::abs(whole_loss));
        REQUIRE(cp.grads.size() == whole.grads.size());
        for (const auto& [name, g] : whole.grads) {
          CAPTURE(name);
          CHECK(testing::rel_diff(cp.grads.at(name), g) <= 1e-12);
        }
      }
}

TEST_CASE("context::attention: each rank sends (D - 1) K/V blocks forward and (D - 1) dK/dV blocks backward") {
  const nn::llama_config cfg = long_micro();
  const std::int64_t batch = 2, seq = 32;
  const int d = 4;
  const host_tensor<std::int32_t> tokens = random_tokens(batch, seq, cfg.vocab, 11);
  for (const auto how : {context::exchange::ring, context::exchange::all_gather}) {
    CAPTURE(context::to_string(how));
    std::vector<comm::local> base = comm::local::world(d, quick_timeout());
    std::vector<comm::throttled<comm::local>> world;
    for (auto& c : base) world.emplace_back(c, comm::network{});
    testing::named_tensors cp;
    context_parallel(world, cfg, 5, context::layout(seq, d, context::placement::zigzag), how, tokens, tokens, cp);
    // Per layer: a block is 2 · B · (S / D) · d_kv doubles; forward and backward each move D − 1 of them.
    const std::uint64_t block = std::uint64_t(2 * batch * (seq / d) * cfg.kv_dim()) * sizeof(double);
    const std::uint64_t want = std::uint64_t(cfg.n_layers) * 2 * (d - 1) * block;
    for (auto& c : world) {
      CAPTURE(c.rank());
      CHECK(c.metrics().bytes_sent() == want);
    }
  }
}

TEST_CASE("context::attention: clear errors for a model that is not placed by the layout") {
  const nn::llama_config cfg = long_micro();
  std::vector<comm::local> world = comm::local::world(1, quick_timeout());
  context::blocks<comm::local> blocks;
  nn::llama<exec::host, double, context::blocks<comm::local>> model(cfg, exec::host{1}, nn::llama_stage{}, nullptr,
                                                                    blocks);
  model.init(1);
  const host_tensor<std::int32_t> tokens = random_tokens(1, 8, cfg.vocab, 3);
  CHECK_THROWS_WITH_AS(model.forward(tokens.v(), tokens.v()), doctest::Contains("context::blocks::connect"),
                       invalid_argument);
  blocks.connect(world[0], context::layout(16, 1, context::placement::contiguous));
  CHECK_THROWS_WITH_AS(model.forward(tokens.v(), tokens.v()), doctest::Contains("16 rows each"), invalid_argument);
  CHECK_THROWS_WITH_AS(blocks.connect(world[0], context::layout(16, 2, context::placement::zigzag)),
                       doctest::Contains("the layout has 2 ranks"), invalid_argument);
}
