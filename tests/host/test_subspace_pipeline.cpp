// Subspace Networks end to end on the host: a Llama with nn::subspace_blocks, run whole on one device and as a
// pipeline whose boundaries carry k coefficients and the token ids (compress::subspace_projection). The key
// identity: the pipelined model computes the unpipelined constrained model's loss and every gradient (fp64,
// GPipe and 1F1B over 2-4 stages); the stream after every constrained stage lies in E_fix + span(U); the boundary
// gradient and every parameter gradient match finite differences; the two parameterisations agree; the last
// stage stays dense; the wire carries exactly B·S·(4k+2) bytes forward and B·S·4k backward per boundary.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include <subspace/comm/local.hpp>
#include <subspace/comm/throttled.hpp>
#include <subspace/compress/subspace_projection.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/nn/subspace_blocks.hpp>
#include <subspace/pipeline/gpipe.hpp>
#include <subspace/pipeline/interleaved.hpp>
#include <subspace/pipeline/layout.hpp>
#include <subspace/pipeline/one_f_one_b.hpp>
#include <subspace/pipeline/pipeline_trainer.hpp>
#include <subspace/pipeline/zero_bubble.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/engine.hpp>

#include "support/genesis.hpp"
#include "support/named_tensors.hpp"
#include "support/numeric.hpp"
#include "support/scratch_dir.hpp"
#include "support/token_batch.hpp"

namespace {

using namespace subspace;

nn::llama_config four_layers() {
  nn::llama_config c = nn::presets::micro();
  c.vocab = 256;
  c.n_layers = 4;
  return c;
}

compress::subspace_projection codec_for(const nn::llama_config& cfg, std::int64_t k, compress::wire_dtype wire,
                                        std::uint64_t seed) {
  return compress::subspace_projection({cfg.d_model, cfg.vocab, k, seed, seed + 1, wire, false});
}

/// The first layer of the last of `stages` even stages: where the constraint ends.
std::int64_t last_stage_start(const nn::llama_config& cfg, int stages) {
  return stages == 1 ? 0 : pipeline::even_cuts(cfg.n_layers, stages).back();
}

template <class T>
using ssn_model = nn::llama<exec::host, T, nn::subspace_blocks>;

/// The constrained model whole on one device: loss and gradients of M micro-batches.
template <class T>
double unpipelined(const nn::llama_config& cfg, const nn::subspace_blocks& blocks, std::uint64_t seed,
                   data::batch_loader& loader, int m, testing::named_tensors& out) {
  std::vector<ssn_model<T>> whole =
      train::as_stages(ssn_model<T>(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks));
  whole[0].init(seed);
  whole[0].zero_grad();
  compress::identity none;
  train::plan_engine<ssn_model<T>, compress::identity> engine(whole, none, {});
  const double loss = engine.run(
      schedule::gradient_accumulation{m}.plan(0, 0), train::loader_source{loader}, [](std::size_t, std::size_t) {},
      [] {});
  out.add(whole[0].parameters());
  return loss;
}

/// The same as a P-rank pipeline with `codec` at the boundaries.
template <class T, class Scheduler>
double pipelined(const nn::llama_config& cfg, const nn::subspace_blocks& blocks,
                 const compress::subspace_projection& codec, Scheduler scheduler, std::uint64_t seed,
                 const testing::genesis_data& text, std::int64_t batch, std::int64_t seq, testing::named_tensors& out) {
  const int p = scheduler.world_size();
  std::mutex mu;
  double loss = 0;
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(60);
  comm::local::run_ranks(
      p,
      [&](comm::local& world) {
        pipeline::pipeline_trainer t(
            pipeline::llama_chunks<ssn_model<T>>(cfg, exec::host{1}, p, scheduler.chunks(), world.rank(), blocks),
            subspace::stack{
                .communicator = world, .compressor = codec, .scheduler = scheduler, .optimizer = optim::adamw{}},
            pipeline::trainer_options{});
        t.init(seed);
        auto data = text.train(batch, seq);
        const double l = t.compute_gradients(data);
        std::lock_guard lock(mu);
        loss = l;
        out.add(t.chunks()[0].parameters());
      },
      lo);
  return loss;
}

}  // namespace

TEST_CASE(
    "subspace pipeline: GPipe, 1F1B and zero-bubble over 2-4 stages equal the unpipelined constrained model "
    "(fp64)") {
  const testing::genesis_data text;
  const nn::llama_config cfg = four_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 16, k = 5;
  const int m = 3;
  for (const int p : {2, 3, 4}) {
    CAPTURE(p);
    const auto codec = codec_for(cfg, k, compress::wire_dtype::compute, seed);
    const nn::subspace_blocks blocks(codec, last_stage_start(cfg, p));
    testing::named_tensors whole;
    auto data = text.train(batch, seq);
    const double whole_loss = unpipelined<double>(cfg, blocks, seed, data, m, whole);
    CHECK(whole.grads.count("model.embed_tokens.subspace_weight") == 1);
    CHECK(whole.grads.count("model.embed_tokens.weight") == 0);
    for (const int schedule : {0, 1, 2}) {  // GPipe, 1F1B, zero bubble (split backward)
      CAPTURE(schedule);
      testing::named_tensors piped;
      const double loss =
          schedule == 0 ? pipelined<double>(cfg, blocks, codec, pipeline::gpipe{m, p}, seed, text, batch, seq, piped)
          : schedule == 1
              ? pipelined<double>(cfg, blocks, codec, pipeline::one_f_one_b{m, p}, seed, text, batch, seq, piped)
              : pipelined<double>(cfg, blocks, codec, pipeline::zero_bubble_h1{m, p}, seed, text, batch, seq, piped);
      CHECK(std::abs(loss - whole_loss) <= 1e-12 * whole_loss);
      REQUIRE(piped.grads.size() == whole.grads.size());
      for (const auto& [name, g] : whole.grads) {
        CAPTURE(name);
        CHECK(testing::rel_diff(piped.grads.at(name), g) <= 1e-12);
      }
    }
    if (p == 2) {  // interleaved: 2 ranks x 2 chunks, the 4 layers one per virtual stage, 3 of them constrained
      const nn::subspace_blocks four(codec, last_stage_start(cfg, 4));
      testing::named_tensors whole4, piped4;
      auto d4 = text.train(batch, seq);
      const double want = unpipelined<double>(cfg, four, seed, d4, 4, whole4);
      const double got =
          pipelined<double>(cfg, four, codec, pipeline::interleaved_1f1b{4, 2, 2}, seed, text, batch, seq, piped4);
      CHECK(std::abs(got - want) <= 1e-12 * want);
      for (const auto& [name, g] : whole4.grads) {
        CAPTURE(name);
        CHECK(testing::rel_diff(piped4.grads.at(name), g) <= 1e-12);
      }
    }
    // The default fp32 wire rounds the coefficients once per boundary and direction.
    testing::named_tensors fp32_wire;
    const double loss32 = pipelined<double>(cfg, blocks, codec_for(cfg, k, compress::wire_dtype::fp32, seed),
                                            pipeline::one_f_one_b{m, p}, seed, text, batch, seq, fp32_wire);
    CHECK(std::abs(loss32 - whole_loss) <= 1e-6 * whole_loss);
    for (const auto& [name, g] : whole.grads) {
      CAPTURE(name);
      CHECK(testing::rel_diff(fp32_wire.grads.at(name), g) <= 1e-6);
    }
  }
}

TEST_CASE("subspace pipeline: after every constrained stage the stream is E_fix + c·Uᵀ") {
  const nn::llama_config cfg = four_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 8, n = batch * seq, k = 5;
  const auto codec = codec_for(cfg, k, compress::wire_dtype::compute, seed);
  const auto check = [&]<class T>(double tolerance) {
    const nn::subspace_blocks blocks(codec, 3);
    auto store = std::make_shared<typename ssn_model<T>::store_type>();
    std::vector<ssn_model<T>> stages;
    for (const auto& s : nn::llama_stage::split(cfg, {1, 2, 3}))
      stages.emplace_back(cfg, exec::host{1}, s, store, blocks);
    for (auto& s : stages) s.init(seed);
    const testing::token_batch batch_data(batch, seq, cfg.vocab, seed + 7);
    const host_tensor<std::int32_t>& tokens = batch_data.tokens;
    host_tensor<T> x({n, cfg.d_model}), next({n, cfg.d_model}), fixed({n, cfg.d_model});
    fixed_embedding_rows(exec::host{}, codec.fixed_embedding_on(exec::host{}), tokens.v().flat(), fixed.v());
    const auto basis = codec.basis_on<T>(exec::host{});
    for (std::size_t s = 0; s + 1 < stages.size(); ++s) {
      typename ssn_model<T>::stage_io io{tokens.v(), tokens.v(), {}, next.v()};
      if (s > 0) io.in = x.v();
      stages[s].evaluate(0, io);
      // r = next − E_fix; off = r − r·U·Uᵀ
      host_tensor<T> r({n, cfg.d_model}), c({n, k}), back({n, cfg.d_model});
      for (std::int64_t i = 0; i < r.numel(); ++i) r.data()[i] = next.data()[i] - fixed.data()[i];
      subspace_coefficients(exec::host{}, view<const T, host_space>(r.v()), basis, c.v());
      subspace_expand(exec::host{}, view<const T, host_space>(c.v()), basis, back.v());
      double off = 0, norm = 0;
      for (std::int64_t i = 0; i < r.numel(); ++i) {
        off += double(r.data()[i] - back.data()[i]) * double(r.data()[i] - back.data()[i]);
        norm += double(r.data()[i]) * double(r.data()[i]);
      }
      CAPTURE(s);
      CHECK(norm > 0);
      CHECK(std::sqrt(off / norm) <= tolerance);
      std::swap(x, next);
    }
  };
  check.operator()<double>(1e-12);
  // fp32 rows: E_fix (entries ~1) dominates, so x − E_fix carries the rounding of x itself (~6e-8 of 1) against a
  // learned part of ~1e-2: about 1e-5 relative. The coefficients themselves are kept exactly (the stream is c).
  check.operator()<float>(3e-5);
}

TEST_CASE(
    "subspace pipeline: the boundary gradient dL/dc = (dL/dX)·U and the gradients of E and Z match "
    "finite differences (d 16, k 3)") {
  const nn::llama_config cfg = four_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t batch = 2, seq = 8, n = batch * seq, k = 3;
  const auto codec = codec_for(cfg, k, compress::wire_dtype::compute, seed);
  const nn::subspace_blocks blocks(codec, 2);
  auto store = std::make_shared<ssn_model<double>::store_type>();
  std::vector<ssn_model<double>> stages;
  for (const auto& s : nn::llama_stage::split(cfg, {2})) stages.emplace_back(cfg, exec::host{1}, s, store, blocks);
  for (auto& s : stages) s.init(seed);
  const testing::token_batch batch_data(batch, seq, cfg.vocab, seed + 1);
  const host_tensor<std::int32_t>& tokens = batch_data.tokens;
  const host_tensor<std::int32_t>& targets = batch_data.targets;
  compress::subspace_projection boundary = codec;
  auto& params = *store;

  // The forward through the boundary: stage 0 -> encode -> c -> decode -> stage 1.
  host_tensor<double> out({n, cfg.d_model}), in({n, cfg.d_model}), c({n, k}), grad_in({n, cfg.d_model}), grad_c({n, k}),
      grad_out({n, cfg.d_model});
  host_tensor<std::int32_t> ids({n});
  const auto loss_from_c = [&] {
    boundary.decode(exec::host{}, compress::payload<const double, host_space>{c.v(), ids.v()}, in.v(), params);
    return stages[1].evaluate(0, {tokens.v(), targets.v(), in.v(), {}});
  };
  const auto whole_loss = [&] {
    stages[0].evaluate(0, {tokens.v(), targets.v(), {}, out.v()});
    boundary.encode(exec::host{}, compress::boundary<const double, host_space>{out.v(), tokens.v().flat()},
                    compress::payload<double, host_space>{c.v(), ids.v()}, params);
    return loss_from_c();
  };
  store->zero_grad(exec::host{});
  stages[0].forward(0, {tokens.v(), targets.v(), {}, out.v()}, 1.0f);
  boundary.encode(exec::host{}, compress::boundary<const double, host_space>{out.v(), tokens.v().flat()},
                  compress::payload<double, host_space>{c.v(), ids.v()}, params);
  boundary.decode(exec::host{}, compress::payload<const double, host_space>{c.v(), ids.v()}, in.v(), params);
  const double loss = stages[1].forward(0, {tokens.v(), targets.v(), in.v(), {}}, 1.0f);
  const auto none = [](std::size_t, std::size_t) {};
  stages[1].backward(0, {}, grad_in.v(), none);
  boundary.decode_backward(exec::host{}, compress::payload<const double, host_space>{c.v(), ids.v()},
                           view<const double, host_space>(grad_in.v()), grad_c.v(), params);
  boundary.encode_backward(exec::host{}, compress::boundary<const double, host_space>{out.v(), tokens.v().flat()},
                           view<const double, host_space>(grad_c.v()), grad_out.v(), params);
  stages[0].backward(0, view<const double, host_space>(grad_out.v()), {}, none);
  CHECK(std::abs(whole_loss() - loss) <= 1e-13 * loss);

  // The five-point central difference: truncation O(h⁴) and rounding ~1e-16·loss/h, both ~1e-12 at h = 1e-3.
  const double h = 1e-3;
  const auto fd = [&](double& x, auto&& f) {
    const double saved = x;
    const auto at = [&](double dx) {
      x = saved + dx;
      return f();
    };
    const double d = (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h);
    x = saved;
    return d;
  };
  for (const std::int64_t i : {std::int64_t(0), n * k / 2 + 1, n * k - 1}) {
    CAPTURE(i);
    const double want = fd(c.data()[i], loss_from_c), got = grad_c.data()[i];
    CHECK(std::abs(got - want) <= 1e-7 * std::abs(want) + 3e-12);  // + the difference's rounding (~1e-12)
  }
  for (const std::string name :
       {"model.embed_tokens.subspace_weight", "model.layers.0.self_attn.o_proj.subspace_weight",
        "model.layers.1.mlp.down_proj.subspace_weight", "model.layers.1.self_attn.q_proj.weight",
        "model.layers.3.mlp.down_proj.weight"}) {
    CAPTURE(name);
    const std::size_t p = *store->find(name);
    const auto v = store->value(p);
    const auto g = store->grad(p);
    // The entries with the largest gradients (the embedding's rows of absent tokens have none).
    std::int64_t best = 0;
    for (std::int64_t i = 1; i < g.numel(); ++i)
      if (std::abs(g.data()[i]) > std::abs(g.data()[best])) best = i;
    const double want = fd(v.data()[best], whole_loss);
    CHECK(std::abs(g.data()[best]) > 1e-8);
    CHECK(std::abs(g.data()[best] - want) <= 1e-7 * std::abs(want) + 3e-12);  // + the difference's rounding
  }
}

TEST_CASE(
    "subspace blocks: the projected variant with W equals the reparameterised one with Z = UᵀW; "
    "re-projection is idempotent; the last stage stays dense") {
  const nn::llama_config cfg = four_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t k = 4;
  const auto codec = codec_for(cfg, k, compress::wire_dtype::compute, seed);
  ssn_model<double> reparam(cfg, exec::host{1}, nn::llama_stage{}, nullptr, nn::subspace_blocks(codec, 3));
  ssn_model<double> projected(cfg, exec::host{1}, nn::llama_stage{}, nullptr,
                              nn::subspace_blocks(codec, 3, nn::subspace_variant::projected));
  reparam.init(seed);
  projected.init(seed + 1);
  auto& rs = reparam.parameters();
  auto& ps = projected.parameters();
  const auto basis = codec.basis_on<double>(exec::host{});
  for (std::size_t i = 0; i < ps.size(); ++i) {
    const std::string& name = ps.info(i).name;
    const auto pv = ps.value(i);
    const std::string factor = name.substr(0, name.size() - std::string("weight").size()) + "subspace_weight";
    if (const auto z = rs.find(factor); z && name.find("_proj.weight") != std::string::npos) {
      // Z = Uᵀ·W: [k, in] = (Wᵀ·U)ᵀ.
      host_tensor<double> wtu({pv.dim(1), k});
      subspace_coefficients(exec::host{}, view<const double, host_space>(pv).transposed(), basis, wtu.v());
      copy(exec::host{}, view<const double, host_space>(wtu.v()).transposed(), rs.value(*z));
    } else {
      copy(exec::host{}, view<const double, host_space>(pv), rs.value(*rs.find(name)));
    }
  }
  CHECK(rs.find("model.layers.3.self_attn.o_proj.weight").has_value());  // the last stage's layer: dense W
  CHECK(!rs.find("model.layers.2.self_attn.o_proj.weight").has_value());
  CHECK(rs.info(*rs.find("model.layers.2.self_attn.o_proj.subspace_weight")).shape == shape{k, cfg.d_model});
  const testing::token_batch batch_data(2, 8, cfg.vocab, seed + 3);
  const double a = reparam.evaluate(batch_data.tok(), batch_data.tgt()),
               b = projected.evaluate(batch_data.tok(), batch_data.tgt());
  CHECK(std::abs(a - b) <= 1e-12 * std::abs(a));

  projected.after_step();
  const auto w = ps.value(*ps.find("model.layers.1.mlp.down_proj.weight"));
  const std::vector<double> once(w.data(), w.data() + w.numel());
  projected.after_step();
  const std::vector<double> twice(w.data(), w.data() + w.numel());
  CHECK(testing::rel_diff(twice, once) <= 1e-14);
  CHECK(std::abs(projected.evaluate(batch_data.tok(), batch_data.tgt()) - b) <= 1e-12 * std::abs(b));  // same function
}

TEST_CASE(
    "subspace pipeline: the wire carries B·S·(4k+2) bytes forward and B·S·4k backward per boundary; "
    "a bf16 wire trains; ranks with other tables are testing::named_tensors") {
  using model = ssn_model<float>;
  const testing::genesis_data text;
  const nn::llama_config cfg = four_layers();
  const std::int64_t batch = 2, seq = 16, k = 6;
  const int m = 3, p = 4;
  const auto run = [&](compress::wire_dtype wire, std::vector<std::uint64_t>& sent, std::vector<double>& losses,
                       int steps) {
    const auto codec = codec_for(cfg, k, wire, 11);
    const nn::subspace_blocks blocks(codec, last_stage_start(cfg, p));
    comm::local_options lo;
    lo.timeout = std::chrono::seconds(60);
    std::vector<comm::local> world = comm::local::world(p, lo);
    std::vector<comm::throttled<comm::local>> links;
    for (comm::local& c : world) links.emplace_back(std::move(c), comm::network{});
    sent.assign(p, 0);
    comm::local::run_ranks(links, [&](comm::throttled<comm::local>& c) {
      pipeline::pipeline_trainer t(pipeline::llama_chunks<model>(cfg, exec::host{1}, p, 1, c.rank(), blocks),
                                   subspace::stack{.communicator = c,
                                                   .compressor = codec,
                                                   .scheduler = pipeline::one_f_one_b{m, p},
                                                   .optimizer = optim::adamw{}},
                                   pipeline::trainer_options{});
      t.init(3);
      auto d = text.train(batch, seq);
      const std::uint64_t before = c.metrics()[comm::op_kind::send].bytes_sent;
      for (int s = 0; s < steps; ++s) {
        const double loss = t.step(d).loss;
        if (c.rank() == 0) losses.push_back(loss);
      }
      sent[std::size_t(c.rank())] = (c.metrics()[comm::op_kind::send].bytes_sent - before) / std::uint64_t(steps);
    });
  };
  std::vector<std::uint64_t> sent;
  std::vector<double> losses;
  run(compress::wire_dtype::fp32, sent, losses, 1);
  const auto tokens = std::uint64_t(batch * seq * m);
  const std::uint64_t forward = tokens * (4 * k + 2), backward = tokens * 4 * k;
  CHECK(sent[0] == forward);
  CHECK(sent[1] == forward + backward);
  CHECK(sent[2] == forward + backward);
  CHECK(sent[3] == backward);
  // The dense boundary of the same model: d fp32 values per token each way.
  CHECK(double(tokens * 4 * std::uint64_t(cfg.d_model)) / double(forward) > 2.0);

  std::vector<double> bf16_losses;
  run(compress::wire_dtype::bf16, sent, bf16_losses, 4);
  CHECK(sent[1] == tokens * (2 * k + 2) + tokens * 2 * k);
  for (const double l : bf16_losses) CHECK(std::isfinite(l));
  CHECK(bf16_losses.back() < bf16_losses.front());

  // Two ranks whose codecs differ (another basis seed) refuse to start.
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(20);
  comm::local::run_ranks(
      2,
      [&](comm::local& c) {
        const auto codec = codec_for(cfg, k, compress::wire_dtype::fp32, c.rank() == 0 ? 11 : 12);
        const auto make = [&] {
          pipeline::pipeline_trainer t(
              pipeline::llama_chunks<model>(cfg, exec::host{1}, 2, 1, c.rank(), nn::subspace_blocks(codec, 2)),
              subspace::stack{.communicator = c,
                              .compressor = codec,
                              .scheduler = pipeline::gpipe{1, 2},
                              .optimizer = optim::adamw{}},
              pipeline::trainer_options{});
        };
        CHECK_THROWS_WITH_AS(make(), doctest::Contains("built another basis or fixed embedding"), invalid_argument);
      },
      lo);
}

TEST_CASE("subspace blocks: export_dense gives the plain Llama of the same function (both variants)") {
  const nn::llama_config cfg = four_layers();
  const std::uint64_t seed = testing::fresh_seed();
  CAPTURE(seed);
  const testing::token_batch batch_data(2, 12, cfg.vocab, seed + 5);
  const auto check = [&]<class T>(nn::subspace_variant variant, double tolerance) {
    const auto codec = codec_for(cfg, 6, compress::wire_dtype::compute, seed);
    const nn::subspace_blocks blocks(codec, 2, variant);
    ssn_model<T> ssn(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks);
    ssn.init(seed);
    if (variant == nn::subspace_variant::projected) ssn.after_step();  // W in span(U), as after any step
    nn::llama<exec::host, T> plain(cfg, exec::host{1});
    plain.parameters().allocate(exec::host{});
    nn::export_dense(exec::host{}, blocks, ssn.parameters(), plain.parameters());
    const double a = ssn.evaluate(batch_data.tok(), batch_data.tgt()),
                 b = plain.evaluate(batch_data.tok(), batch_data.tgt());
    CAPTURE(a);
    CAPTURE(b);
    CHECK(std::abs(a - b) <= tolerance * std::abs(a));
  };
  check.operator()<double>(nn::subspace_variant::reparameterised, 1e-12);
  check.operator()<double>(nn::subspace_variant::projected, 1e-12);
  check.operator()<float>(nn::subspace_variant::reparameterised, 1e-5);
  check.operator()<float>(nn::subspace_variant::projected, 1e-5);
}
