// The policy vocabulary: every wave-1 policy through its concept's conformance suite, the policies' own
// behaviour, and the trainer-side stack check.
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include <subspace/comm/self.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/nn/parameters.hpp>
#include <subspace/optim/adamw.hpp>
#include <subspace/policies.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>

#include "conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using testing::conformance::filled;
using testing::conformance::same_bits;

// --- fixtures -------------------------------------------------------------------------------------------------

namespace {

struct self_world {
  using communicator = comm::self;
  static std::vector<int> world_sizes() { return {1}; }
  static std::vector<comm::self> make(int n) {
    REQUIRE(n == 1);
    return std::vector<comm::self>(1);
  }
};

struct identity_fixture {
  using compressor = compress::identity;
  static constexpr bool lossless = true;
  static constexpr std::int32_t vocab = 256;
  static compress::identity make(std::uint64_t) { return {}; }
  static std::vector<shape> shapes() { return {{17}, {3, 5}, {2, 3, 4}}; }
};

struct gradient_accumulation_fixture {
  using scheduler = schedule::gradient_accumulation;
  static std::vector<scheduler> make() { return {scheduler{}, scheduler{4}, scheduler{3, 4}, scheduler{1, 8}}; }
};

struct adamw_fixture {
  using optimizer = optim::adamw;
  static optim::adamw make() { return {}; }
  static std::vector<optim::param_info> params() {
    return {optim::param_info_for("w", {7, 5}), optim::param_info_for("gain", {11}),
            optim::param_info{"no_decay_matrix", {3, 4}, false, {}}};
  }
};

}  // namespace

TYPE_TO_STRING(self_world);
TYPE_TO_STRING(identity_fixture);
TYPE_TO_STRING(gradient_accumulation_fixture);
TYPE_TO_STRING(adamw_fixture);

TEST_CASE_TEMPLATE_APPLY(communicator_conformance, std::tuple<self_world>);
TEST_CASE_TEMPLATE_APPLY(compressor_conformance, std::tuple<identity_fixture>);
TEST_CASE_TEMPLATE_APPLY(scheduler_conformance, std::tuple<gradient_accumulation_fixture>);
TEST_CASE_TEMPLATE_APPLY(optimizer_conformance, std::tuple<adamw_fixture>);

// --- comm::self -------------------------------------------------------------------------------------------------

TEST_CASE("comm::self: sends to itself match recvs in order, whichever is issued first") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  comm::self world;
  auto a = testing::random_tensor<float>({5}, seed), b = testing::random_tensor<float>({2, 3}, seed + 1);
  host_tensor<float> ra = filled<float>({5}, NAN), rb = filled<float>({6}, NAN);  // same count, other shape

  auto sa = world.send(a.v(), 0);
  auto sb = world.send(b.v(), 0);
  CHECK(!sa.test());
  CHECK(world.pending() == 2);
  auto qa = world.recv(ra.v(), 0);
  CHECK((sa.test() && qa.test()));
  CHECK(!sb.test());
  auto qb = world.recv(rb.v(), 0);
  CHECK((sb.test() && qb.test()));
  CHECK(world.pending() == 0);
  CHECK(same_bits<float>(ra.v(), a.v()));
  CHECK(same_bits<float>(rb.v().reshape({2, 3}), b.v()));

  // recv first
  host_tensor<float> rc = filled<float>({5}, NAN);
  auto qc = world.recv(rc.v(), 0);
  CHECK(!qc.test());
  world.send(a.v(), 0).wait();
  qc.wait();
  CHECK(same_bits<float>(rc.v(), a.v()));
}

TEST_CASE("comm::self: an unmatched wait, mismatched messages and bad arguments are errors") {
  comm::self world;
  host_tensor<float> x = filled<float>({4}, 1.0f), y = filled<float>({3}, 0.0f);
  host_tensor<double> z = filled<double>({4}, 0.0);
  auto s = world.send(x.v(), 0);
  CHECK_THROWS_WITH_AS(s.wait(), doctest::Contains("wait forever"), error);
  CHECK_THROWS_WITH_AS(world.recv(y.v(), 0), doctest::Contains("different element counts"), invalid_argument);
  auto s2 = world.send(x.v(), 0);
  CHECK_THROWS_WITH_AS(world.recv(z.v(), 0), doctest::Contains("different element types"), invalid_argument);
  CHECK_THROWS_AS(world.split(-1, 0), invalid_argument);
  CHECK_THROWS_AS(world.group_end(), invalid_argument);
  world.group_start();
  world.group_start();
  world.group_end();
  world.group_end();
}

TEST_CASE("comm::self: collectives over one rank copy or leave the data, and split gives a fresh world") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  comm::self world;
  auto x = testing::random_tensor<float>({3, 4}, seed);
  auto keep = testing::random_tensor<float>({3, 4}, seed);
  for (auto op : {comm::reduce_op::sum, comm::reduce_op::avg, comm::reduce_op::max}) {
    world.all_reduce(x.v(), op).wait();
    CHECK(same_bits<float>(x.v(), keep.v()));
  }
  host_tensor<float> gathered = filled<float>({1, 3, 4}, NAN), scattered = filled<float>({12}, NAN);
  world.all_gather(x.v(), gathered.v()).wait();
  CHECK(same_bits<float>(gathered.v()[0], x.v()));
  world.reduce_scatter(x.v(), scattered.v(), comm::reduce_op::sum).wait();
  CHECK(same_bits<float>(scattered.v().reshape({3, 4}), x.v()));

  auto pending = world.send(x.v(), 0);  // the split world has its own queue
  comm::self sub = world.split(3, 7);
  CHECK(sub.size() == 1);
  CHECK(sub.rank() == 0);
  CHECK(sub.pending() == 0);
  CHECK(world.pending() == 1);
  comm::self handle = world;  // copies share the queue
  host_tensor<float> r = filled<float>({3, 4}, NAN);
  handle.recv(r.v(), 0).wait();
  CHECK(pending.test());
  CHECK(same_bits<float>(r.v(), x.v()));
}

// --- compress::identity ------------------------------------------------------------------------------------------

TEST_CASE("compress::identity: the payload is x, the wire carries every element, every type passes through") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  compress::identity id;
  CHECK(id.payload_shape({4, 6, 8}) == shape{4, 6, 8});
  CHECK(id.wire_bytes({4, 6, 8}, 2) == 4 * 6 * 8 * 2);
  CHECK(id.wire_bytes({4, 6, 8}, 4) == 4 * 6 * 8 * 4);
  CHECK(compress::is_linear_v<compress::identity>);
  CHECK_FALSE(compress::sends_tokens_v<compress::identity>);

  // No trainable parameters: nothing is declared, and the store is never read.
  nn::parameter_store<float, float, host_space> store;
  CHECK(compress::declare(id, store).empty());
  CHECK(store.size() == 0);

  const auto x = testing::random_tensor<bf16>({3, 7}, seed);
  host_tensor<bf16> p = filled<bf16>({3, 7}, bf16(NAN)), back = filled<bf16>({3, 7}, bf16(NAN));
  id.encode(exec::host{}, compress::boundary{x.v()}, compress::payload{p.v()}, store);
  id.decode(exec::host{}, compress::payload{p.v()}, back.v(), store);
  CHECK(same_bits<bf16>(back.v(), x.v()));

  // A strided (transposed) input is copied element by element.
  const auto m = testing::random_tensor<double>({4, 5}, seed + 1);
  host_tensor<double> mt = filled<double>({5, 4}, NAN);
  id.encode(exec::host{}, compress::boundary{m.v().transposed()}, compress::payload{mt.v()}, store);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 5; ++j) REQUIRE(mt(j, i) == m(i, j));

  host_tensor<bf16> wrong({3, 8});
  CHECK_THROWS_WITH_AS(id.encode(exec::host{}, compress::boundary{x.v()}, compress::payload{wrong.v()}, store),
                       doctest::Contains("[3, 7] vs [3, 8]"), invalid_argument);
}

// --- schedule::gradient_accumulation -------------------------------------------------------------------------------

TEST_CASE("schedule::gradient_accumulation: forward/backward per micro-batch, then one optimizer step") {
  using schedule::action;
  using schedule::action_kind;
  const schedule::gradient_accumulation ga{3};
  CHECK(ga.microbatches() == 3);
  CHECK(ga.world_size() == 1);
  const std::vector<action> expected{{action_kind::forward, 0, -1},        {action_kind::backward, 0, -1},
                                     {action_kind::forward, 1, -1},        {action_kind::backward, 1, -1},
                                     {action_kind::forward, 2, -1},        {action_kind::backward, 2, -1},
                                     {action_kind::optimizer_step, -1, -1}};
  CHECK(ga.plan(0, 0) == expected);
  CHECK(ga.plan(12345, 0) == expected);
  CHECK(schedule::to_string(expected[3]) == "backward(1)");
  CHECK(schedule::to_string(expected[6]) == "optimizer_step");
  CHECK(schedule::to_string(action{action_kind::send_activation, 2, 1}) == "send_activation(2 -> 1)");
  CHECK(schedule::to_string(action{action_kind::recv_gradient, 2, 3}) == "recv_gradient(2 <- 3)");

  const schedule::gradient_accumulation dp{2, 4};
  CHECK(dp.plan(5, 3) == dp.plan(5, 0));
  CHECK(dp.plan(5, 3).size() == 5);
  CHECK(dp != ga);
  CHECK(schedule::gradient_accumulation{3} == ga);
}

TEST_CASE("schedule::gradient_accumulation: zero micro-batches or ranks are a clear error") {
  CHECK_THROWS_WITH_AS(schedule::gradient_accumulation{0}, doctest::Contains("at least 1 micro-batch"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(schedule::gradient_accumulation(-2), doctest::Contains("got -2"), invalid_argument);
  CHECK_THROWS_WITH_AS((schedule::gradient_accumulation{2, 0}), doctest::Contains("world_size"), invalid_argument);
  const schedule::gradient_accumulation ga{2, 2};
  CHECK_THROWS_WITH_AS((void)ga.plan(0, 2), doctest::Contains("rank 2 outside [0, 2)"), invalid_argument);
}

// --- training stacks ---------------------------------------------------------------------------------------------

namespace {

struct sgd {  // a minimal conforming optimizer: plain SGD, no state
  struct state {
    template <class F>
    void for_each_tensor(F&&) {}  // nothing to checkpoint
  };
  template <class Exec>
  state init(const Exec&, const parameter_info&) const {
    return {};
  }
  template <class G, class S>
  void step(const exec::host&, view<float, S> master, view<const G, S> grad, state&, const optim::param_info&,
            const optim::step_context& ctx, view<bf16, S> working = {}) const {
    for (std::int64_t i = 0; i < master.numel(); ++i) {
      master.data()[i] -= ctx.lr * float(grad.data()[i]);
      if (working.data()) working.data()[i] = bf16(master.data()[i]);
    }
  }
  std::size_t state_bytes(const state&) const { return 0; }
};

struct no_state_bytes {  // an optimizer missing state_bytes
  struct state {};
  state init(const exec::host&, const parameter_info&) const { return {}; }
  template <class G>
  void step(const exec::host&, view<float, host_space>, view<const G, host_space>, state&, const optim::param_info&,
            const optim::step_context&, view<bf16, host_space> = {}) const {}
};

struct no_checkpoint_names {  // an optimizer whose state cannot name its tensors for checkpoints
  struct state {};
  state init(const exec::host&, const parameter_info&) const { return {}; }
  template <class G>
  void step(const exec::host&, view<float, host_space>, view<const G, host_space>, state&, const optim::param_info&,
            const optim::step_context&, view<bf16, host_space> = {}) const {}
  std::size_t state_bytes(const state&) const { return 0; }
};

struct fp32_only {  // an optimizer that rejects bf16 gradients
  struct state {};
  state init(const exec::host&, const parameter_info&) const { return {}; }
  void step(const exec::host&, view<float, host_space>, view<const float, host_space>, state&, const optim::param_info&,
            const optim::step_context&, view<bf16, host_space> = {}) const {}
  std::size_t state_bytes(const state&) const { return 0; }
};

struct sgd_stack : default_policies {
  using optimizer = sgd;
};
struct missing_optimizer {
  using communicator = comm::self;
  using compressor = compress::identity;
  using scheduler = schedule::gradient_accumulation;
};
struct bad_optimizer_stack : default_policies {
  using optimizer = no_state_bytes;
};
struct plan_is_not_regular {
  struct plan_type {
    int x;  // no ==
  };
  plan_type plan(std::int64_t, int) const { return {}; }
  int world_size() const { return 1; }
};

}  // namespace

TEST_CASE("training stacks: the defaults and user overrides pass the stack check, faulty ones do not") {
  static_assert(check_stack<default_policies>());
  static_assert(check_stack<sgd_stack>());
  static_assert(TrainingStack<sgd_stack>);
  static_assert(Optimizer<sgd>);
  static_assert(!TrainingStack<missing_optimizer>);
  static_assert(!TrainingStack<bad_optimizer_stack>);
  static_assert(!Optimizer<no_state_bytes>);
  static_assert(!optim::requirement::state_bytes<no_state_bytes>);
  static_assert(optim::requirement::step<no_state_bytes, bf16>);
  static_assert(!Optimizer<no_checkpoint_names>);
  static_assert(optim::requirement::state_bytes<no_checkpoint_names>);
  static_assert(!optim::requirement::checkpoint_tensors<no_checkpoint_names>);
  static_assert(!Optimizer<fp32_only>);
  static_assert(optim::requirement::step<fp32_only, float>);
  static_assert(!optim::requirement::step<fp32_only, bf16>);
  static_assert(!Scheduler<plan_is_not_regular>);
  static_assert(!Communicator<int>);
  static_assert(!Compressor<sgd>);
  CHECK(std::is_same_v<default_policies::optimizer, optim::adamw>);

  // The custom optimizer runs through the same stack types.
  sgd_stack::optimizer opt;
  host_tensor<float> w = filled<float>({3}, 1.0f), g = filled<float>({3}, 2.0f);
  host_tensor<bf16> working({3});
  auto st = opt.init(exec::host{}, optim::param_info_for("w", {3}));
  opt.step(exec::host{}, w.v(), view<const float, host_space>(g.v()), st, optim::param_info_for("w", {3}),
           optim::step_context{0.25f, 1}, working.v());
  CHECK(w(0) == 0.5f);
  CHECK(float(working(2)) == 0.5f);
}

TEST_CASE("optim::param_info_for: matrices decay, vectors do not") {
  CHECK(optim::param_info_for("w", {4, 4}).decay);
  CHECK(optim::param_info_for("emb", {100, 8}).decay);
  CHECK_FALSE(optim::param_info_for("gain", {8}).decay);
  CHECK_FALSE(optim::param_info_for("scalar", {}).decay);
  CHECK(optim::param_info_for("w", {4, 4}).name == "w");
}
