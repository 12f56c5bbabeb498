// What galore/golore project by default, and the optimizer extension points a user meets first: the default rank
// fits the model (a quarter of each matrix's short side), summary() says what is projected, a model where nothing
// is projected is an error at the trainer unless allowed, a custom inner optimizer is wrapped through a
// subspace_rule specialisation, and a state names its tensors for checkpoints through for_each_tensor or
// optim::state_tensors.
#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <subspace/io/checkpoint.hpp>
#include <subspace/nn/llama.hpp>
#include <subspace/optim/galore.hpp>
#include <subspace/optim/golore.hpp>
#include <subspace/train/trainer.hpp>

namespace {

using namespace subspace;
using host_llama = nn::llama<exec::host, float>;

/// A parameter store's infos without a model: size() and info(i).
struct infos {
  std::vector<optim::param_info> list;
  std::size_t size() const { return list.size(); }
  const optim::param_info& info(std::size_t i) const { return list[i]; }
};

infos llama_infos(const nn::llama_config& cfg) {
  const host_llama model(cfg, exec::host{1});
  infos out;
  for (std::size_t i = 0; i < model.parameters().size(); ++i) out.list.push_back(model.parameters().info(i));
  return out;
}

}  // namespace

TEST_CASE("galore/golore: the default rank projects every target of the tiny preset, and summary() says so") {
  const infos tiny = llama_infos(nn::presets::tiny());  // d 128, K/V width 64, FFN 344, 4 layers
  const optim::galore<> galore{};
  const optim::golore<> golore{.random_percent = 100};
  CHECK(galore.rank == optim::auto_rank);
  for (const auto& info : tiny.list) {
    CAPTURE(info.name);
    CHECK(galore.projects(info) == optim::attention_or_mlp_matrix(info));
    CHECK(golore.projects(info) == galore.projects(info));
    if (galore.projects(info)) CHECK(galore.rank_for(info) == std::min(info.shape[0], info.shape[1]) / 4);
  }
  const optim::projection_summary s = galore.summary(tiny);
  CHECK(s.matrices == 4 * 7 + 2);  // the layers' projections, the embedding and the LM head
  CHECK(s.targets == 4 * 7);
  CHECK(s.projected == 4 * 7);
  CHECK(s.min_rank == 16);  // k_proj and v_proj: 64 x 128
  CHECK(s.max_rank == 32);  // q, o, gate, up, down: short side 128
  CHECK(s.text() == "projected 28 of 30 matrices at rank 16-32");
  CHECK(golore.summary(tiny).text() == s.text());
  CHECK_NOTHROW(galore.check_parameters(tiny));

  // The default is GaLore's own recipe on the 60M model: r = 128 on every 512-wide matrix.
  const optim::param_info q{"model.layers.0.self_attn.q_proj.weight", {512, 512}, true, {}};
  const optim::param_info down{"model.layers.0.mlp.down_proj.weight", {512, 1376}, true, {}};
  CHECK(galore.rank_for(q) == 128);
  CHECK(galore.rank_for(down) == 128);
  CHECK(optim::galore<>{.rank = 128}.state_bytes_for(down) == galore.state_bytes_for(down));
  // The smallest matrices: a 2 x 2 target gets r = 1; a 1 x n one cannot be projected and uses the inner AdamW.
  CHECK(galore.rank_for(optim::param_info{"mlp.w", {2, 2}, true, {}}) == 1);
  CHECK(galore.projects(optim::param_info{"mlp.w", {2, 2}, true, {}}));
  CHECK_FALSE(galore.projects(optim::param_info{"mlp.w", {1, 9}, true, {}}));
  const optim::param_info small{"mlp.w", {6, 10}, true, {}};
  const auto st = galore.init(exec::host{}, small);
  CHECK(st.projected());
  CHECK(st.geometry.rank == 1);
}

TEST_CASE("galore/golore: a model where nothing is projected is an error at the trainer unless allowed") {
  const infos tiny = llama_infos(nn::presets::tiny());
  const optim::galore<> too_wide{.rank = 128};  // no short side of the tiny model exceeds 128
  const optim::projection_summary s = too_wide.summary(tiny);
  CHECK(s.projected == 0);
  CHECK(s.targets == 28);
  CHECK(s.min_short_side == 64);
  CHECK(s.max_short_side == 128);
  CHECK(s.text() == "projected 0 of 30 matrices");
  CHECK_THROWS_WITH_AS(too_wide.check_parameters(tiny),
                       doctest::Contains("optim::galore: no parameter is projected, so every one would be stepped by "
                                         "the inner optimizer alone: rank r = 128 is not below the short side of any "
                                         "of the 28 target matrices (min(m, n) from 64 to 128)"),
                       invalid_argument);
  CHECK_NOTHROW((optim::galore<>{.rank = 128, .allow_no_projection = true}.check_parameters(tiny)));

  // Names the target rule does not know: nothing is a target.
  const infos unnamed{{{"encoder.w1", {64, 64}, true, {}}, {"encoder.w2", {64, 64}, true, {}}}};
  CHECK_THROWS_WITH_AS(optim::golore<>{.random_percent = 100}.check_parameters(unnamed),
                       doctest::Contains("none of the 2 matrices is a target of the target rule"), invalid_argument);
  CHECK_NOTHROW((optim::golore<>{.random_percent = 100, .target = &optim::any_matrix}.check_parameters(unnamed)));

  // The trainers call it: a run that would be AdamW under GaLore's name does not start.
  const auto stack = [](auto opt) { return subspace::stack{.optimizer = opt}; };
  CHECK_THROWS_WITH_AS(train::trainer(host_llama(nn::presets::tiny(), exec::host{1}), stack(too_wide), {}),
                       doctest::Contains("optim::galore: no parameter is projected"), invalid_argument);
  CHECK_THROWS_WITH_AS(train::trainer(host_llama(nn::presets::tiny(), exec::host{1}),
                                      stack(optim::golore<>{.rank = 200, .random_percent = 100}), {}),
                       doctest::Contains("optim::golore: no parameter is projected"), invalid_argument);
  train::trainer allowed(host_llama(nn::presets::tiny(), exec::host{1}),
                         stack(optim::galore<>{.rank = 128, .allow_no_projection = true}), {});
  train::trainer fitted(host_llama(nn::presets::tiny(), exec::host{1}), stack(optim::galore<>{}), {});
  CHECK(fitted.optimizer_state_bytes() < allowed.optimizer_state_bytes());
  train::trainer golore(host_llama(nn::presets::tiny(), exec::host{1}), stack(optim::golore<>{.total_steps = 1000}),
                        {});
  CHECK(golore.optimizer_state_bytes() == fitted.optimizer_state_bytes());
}

// --- a user's own inner optimizer and state ------------------------------------------------------------------------

namespace {

/// Plain SGD with a learning-rate multiplier: a complete Optimizer.
struct scaled_sgd {
  float multiplier = 1.0f;
  struct state {
    std::int64_t steps = 0;  // a counter a checkpoint keeps
    template <class F>
    void for_each_tensor(F&& f) {
      f("steps", view<std::int64_t, host_space>(&steps, shape{1}));
    }
  };
  state init(const exec::host&, const optim::param_info&) const { return {}; }
  template <class G>
  void step(const exec::host&, view<float, host_space> master, view<const G, host_space> grad, state& st,
            const optim::param_info&, const optim::step_context& ctx, view<bf16, host_space> working = {}) const {
    for (std::int64_t i = 0; i < master.numel(); ++i) {
      master.data()[i] -= multiplier * ctx.lr * float(grad.data()[i]);
      if (working.data()) working.data()[i] = bf16(master.data()[i]);
    }
    ++st.steps;
  }
  std::size_t state_bytes(const state&) const { return sizeof(std::int64_t); }
};

/// A state type the user cannot change (no for_each_tensor), named through optim::state_tensors.
struct foreign_state {
  float velocity = 0.0f;
};
struct foreign_momentum {
  foreign_state init(const exec::host&, const optim::param_info&) const { return {}; }
  template <class G>
  void step(const exec::host&, view<float, host_space>, view<const G, host_space>, foreign_state&,
            const optim::param_info&, const optim::step_context&, view<bf16, host_space> = {}) const {}
  std::size_t state_bytes(const foreign_state&) const { return sizeof(float); }
};

}  // namespace

template <>
struct subspace::optim::state_tensors<foreign_state> {
  template <class F>
  static void for_each(foreign_state& s, F&& f) {
    f("velocity", view<float, host_space>(&s.velocity, shape{1}));
  }
};

template <>
struct subspace::optim::subspace_rule<scaled_sgd> {
  static scaled_sgd reference() { return {}; }
  static optim::subspace_adam hyper(const scaled_sgd&) { return {0.9f, 0.999f, 1e-6f, 0.0f}; }
  static std::size_t state_bytes_for(const scaled_sgd&, const optim::param_info&) { return sizeof(std::int64_t); }
};

TEST_CASE("extension points: a state names its tensors itself or through optim::state_tensors") {
  static_assert(Optimizer<scaled_sgd>);
  static_assert(check_optimizer<scaled_sgd>());
  static_assert(Optimizer<foreign_momentum>);
  static_assert(optim::requirement::checkpoint_tensors<foreign_momentum>);
  std::vector<std::string> names;
  const auto record = [&](const std::string& name, auto) { names.push_back(name); };
  foreign_state fs;
  io::for_each_state_tensor(fs, record);
  auto own = scaled_sgd{}.init(exec::host{}, optim::param_info_for("w", {2}));
  io::for_each_state_tensor(own, record);
  CHECK(names == std::vector<std::string>{"velocity", "steps"});
}

TEST_CASE("extension points: golore<MyOptimizer> wraps it — MyOptimizer steps the rest, Adam the projected ones") {
  static_assert(optim::SubspaceInner<scaled_sgd>);
  static_assert(!optim::SubspaceInner<foreign_momentum>);  // an Optimizer, but no subspace_rule
  const optim::golore<scaled_sgd> opt{.inner = {.multiplier = 2.0f}, .rank = 2, .random_percent = 100};
  const optim::param_info matrix{"layers.0.mlp.w", {4, 6}, true, {}}, gain = optim::param_info_for("norm", {3});
  auto projected = opt.init(exec::host{}, matrix);
  auto fallback = opt.init(exec::host{}, gain);
  CHECK(projected.projected());
  CHECK_FALSE(fallback.projected());

  // The vector is stepped by scaled_sgd itself: w - 2 lr g.
  std::vector<float> w(3, 1.0f), g(3, 0.5f);
  opt.step(exec::host{}, view<float, host_space>(w.data(), {3}), view<const float, host_space>(g.data(), {3}), fallback,
           gain, optim::step_context{0.1f, 1});
  CHECK(w[0] == doctest::Approx(0.9f));
  CHECK(fallback.inner->steps == 1);
  // The matrix by Adam in the subspace: its first step moves every projected direction by about lr, whatever g's
  // scale (Adam's normalisation), which SGD would not.
  std::vector<float> m(24, 0.0f), gm(24, 1e-3f);
  opt.step(exec::host{}, view<float, host_space>(m.data(), {4, 6}), view<const float, host_space>(gm.data(), {4, 6}),
           projected, matrix, optim::step_context{0.1f, 1});
  CHECK(projected.steps == 1);
  double moved = 0;
  for (float x : m) moved += double(x) * double(x);
  CHECK(moved > 1e-4);  // SGD would move each weight by 2 * 0.1 * 1e-3: a squared norm of about 1e-6
  std::vector<std::string> names;
  projected.for_each_tensor([&](const std::string& name, auto) { names.push_back(name); });
  CHECK(names.front() == "exp_avg");
  names.clear();
  fallback.for_each_tensor([&](const std::string& name, auto) { names.push_back(name); });
  CHECK(names == std::vector<std::string>{"steps"});
}
