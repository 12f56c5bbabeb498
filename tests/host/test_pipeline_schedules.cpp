// pipeline/*.hpp: the pipeline schedules' plans, run together in a discrete-event simulator
// (support/pipeline_sim.hpp) with t_F = 1, t_B = 2 (t_B = t_W = 1 when split) and free communication.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <subspace/pipeline/any_schedule.hpp>
#include <subspace/pipeline/gpipe.hpp>
#include <subspace/pipeline/interleaved.hpp>
#include <subspace/pipeline/one_f_one_b.hpp>
#include <subspace/pipeline/plan.hpp>
#include <subspace/pipeline/zero_bubble.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>

#include "conformance.hpp"
#include "support/pipeline_sim.hpp"

using namespace subspace;
using schedule::action;
using schedule::action_kind;
using plans_t = std::vector<std::vector<action>>;

namespace {

const std::vector<int> stage_counts{1, 2, 3, 4, 8};
constexpr int max_microbatches = 16;

template <class S>
plans_t plans_of(const S& s, std::int64_t step = 0) {
  plans_t plans;
  for (int r = 0; r < s.world_size(); ++r) plans.push_back(s.plan(step, r));
  return plans;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string s;
  for (const auto& l : lines) s += l + '\n';
  return s;
}

std::string printed(const std::vector<action>& plan) {
  std::string s;
  for (const action& a : plan) s += (s.empty() ? "" : ", ") + schedule::to_string(a);
  return s;
}

/// What every schedule owes: the simulator finds no problem, plans do not depend on the step, and each chunk's
/// parameter gradients accumulate in micro-batch order (plan.hpp). Returns the run for the schedule's own checks.
template <class S>
testing::pipeline_run run_checked(const S& s) {
  const plans_t plans = plans_of(s);
  CHECK(plans == plans_of(s, 7));
  for (const auto& plan : plans) {
    std::vector<int> last(std::size_t(s.chunks()), -1);
    for (const action& a : plan)
      if (a.kind == action_kind::backward || a.kind == action_kind::backward_weight) {
        CHECK(a.microbatch == last[std::size_t(a.chunk)] + 1);
        last[std::size_t(a.chunk)] = a.microbatch;
      }
  }
  testing::pipeline_run run = testing::simulate_pipeline(plans, s.microbatches(), s.chunks());
  CHECK_MESSAGE(run.problems.empty(), joined(run.problems));
  return run;
}

struct gpipe_fixture {
  using scheduler = pipeline::gpipe;
  static std::vector<scheduler> make() { return {{1, 1}, {4, 1}, {3, 2}, {8, 4}, {2, 8}}; }
};
struct one_f_one_b_fixture {
  using scheduler = pipeline::one_f_one_b;
  static std::vector<scheduler> make() { return {{1, 1}, {4, 1}, {3, 2}, {8, 4}, {2, 8}}; }
};
struct interleaved_fixture {
  using scheduler = pipeline::interleaved_1f1b;
  static std::vector<scheduler> make() { return {{1, 1, 1}, {3, 1, 2}, {4, 2, 2}, {8, 4, 3}, {8, 8, 2}}; }
};
struct any_schedule_fixture {
  using scheduler = pipeline::any_schedule;
  static std::vector<scheduler> make() {
    return {{"gpipe", 3, 2}, {"1f1b", 8, 4}, {"interleaved", 4, 2, 2}, {"zb", 8, 4}};
  }
};
struct zero_bubble_fixture {
  using scheduler = pipeline::zero_bubble_h1;
  static std::vector<scheduler> make() { return {{1, 1}, {4, 1}, {3, 2}, {8, 4}, {2, 8}}; }
};

}  // namespace

TYPE_TO_STRING(gpipe_fixture);
TYPE_TO_STRING(one_f_one_b_fixture);
TYPE_TO_STRING(interleaved_fixture);
TYPE_TO_STRING(zero_bubble_fixture);
TYPE_TO_STRING(any_schedule_fixture);
TEST_CASE_TEMPLATE_APPLY(
    scheduler_conformance,
    std::tuple<gpipe_fixture, one_f_one_b_fixture, interleaved_fixture, zero_bubble_fixture, any_schedule_fixture>);

TEST_CASE("pipeline::any_schedule: the plans of the schedule it names, and clear errors") {
  for (std::int64_t step : {0, 3})
    for (int r = 0; r < 4; ++r) {
      CHECK(pipeline::any_schedule("gpipe", 8, 4).plan(step, r) == pipeline::gpipe{8, 4}.plan(step, r));
      CHECK(pipeline::any_schedule("1f1b", 8, 4).plan(step, r) == pipeline::one_f_one_b{8, 4}.plan(step, r));
      CHECK(pipeline::any_schedule("interleaved", 8, 4, 2).plan(step, r) ==
            pipeline::interleaved_1f1b{8, 4, 2}.plan(step, r));
      CHECK(pipeline::any_schedule("zb", 8, 4).plan(step, r) == pipeline::zero_bubble_h1{8, 4}.plan(step, r));
    }
  CHECK(pipeline::any_schedule("zb", 8, 4).bubble() == doctest::Approx(3.0 / 24));
  CHECK(pipeline::any_schedule("interleaved", 8, 4, 2).bubble() == doctest::Approx(3.0 / 16));
  CHECK_THROWS_WITH_AS(pipeline::any_schedule("zigzag", 8, 4), doctest::Contains("no schedule 'zigzag'"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(pipeline::any_schedule("1f1b", 8, 4, 2), doctest::Contains("need the interleaved schedule"),
                       invalid_argument);
}

// Bubble fractions are compared with the closed forms to 1e-12: every simulated time is a small integer.

TEST_CASE("pipeline::gpipe: all forwards, then all backwards, bubble (p - 1)/m, all m micro-batches held") {
  for (const int p : stage_counts)
    for (int m = 1; m <= max_microbatches; ++m) {
      CAPTURE(p);
      CAPTURE(m);
      const auto run = run_checked(pipeline::gpipe{m, p});
      for (int r = 0; r < p; ++r) {
        CAPTURE(r);
        CHECK(run.bubble(r) == doctest::Approx(double(p - 1) / m).epsilon(1e-12));
        CHECK(run.ranks[std::size_t(r)].peak_in_flight == m);
      }
    }
}

TEST_CASE("pipeline::one_f_one_b: bubble (p - 1)/m as GPipe's, min(p - r, m) micro-batches in flight on rank r") {
  for (const int p : stage_counts)
    for (int m = 1; m <= max_microbatches; ++m) {
      CAPTURE(p);
      CAPTURE(m);
      const auto run = run_checked(pipeline::one_f_one_b{m, p});
      for (int r = 0; r < p; ++r) {
        CAPTURE(r);
        CHECK(run.bubble(r) == doctest::Approx(double(p - 1) / m).epsilon(1e-12));
        CHECK(run.ranks[std::size_t(r)].peak_in_flight == std::min(p - r, m));
        CHECK(run.ranks[std::size_t(r)].peak_held == std::min(p - r, m));
      }
    }
}

TEST_CASE("pipeline::interleaved_1f1b: bubble (p - 1)/(v m), chunks in flight per Megatron's warm-up") {
  for (const int p : stage_counts)
    for (int v = 1; v <= 3; ++v)
      for (int m = p; m <= max_microbatches; m += p) {
        CAPTURE(p);
        CAPTURE(v);
        CAPTURE(m);
        const auto run = run_checked(pipeline::interleaved_1f1b{m, p, v});
        for (int r = 0; r < p; ++r) {
          CAPTURE(r);
          CHECK(run.bubble(r) == doctest::Approx(double(p - 1) / (v * m)).epsilon(1e-12));
          const int warmup = 2 * (p - r - 1) + (v - 1) * p;  // in (micro-batch, chunk) passes
          CHECK(run.ranks[std::size_t(r)].peak_in_flight == std::min(warmup + 1, m * v));
        }
      }
}

TEST_CASE("pipeline::interleaved_1f1b: a send latency up to t_F costs only the fill and drain, 2(v p - 1) of it") {
  for (const double latency : {0.5, 1.0})
    for (const int p : {2, 4, 8})
      for (const int v : {2, 3})
        for (const int m : {p, 2 * p}) {
          CAPTURE(latency);
          CAPTURE(p);
          CAPTURE(v);
          CAPTURE(m);
          const pipeline::interleaved_1f1b s{m, p, v};
          const auto free = testing::simulate_pipeline(plans_of(s), m, v);
          const auto slow = testing::simulate_pipeline(plans_of(s), m, v, {.latency = latency});
          REQUIRE(slow.problems.empty());
          CHECK(slow.makespan == doctest::Approx(free.makespan + 2 * (v * p - 1) * latency).epsilon(1e-12));
        }
  // 1F1B's shorter warm-up exposes the latency in the steady state too: with 8 micro-batches on 4 stages the step
  // pays 16 latencies, of which the fill and drain account for 6.
  const pipeline::one_f_one_b s{8, 4};
  const auto free = testing::simulate_pipeline(plans_of(s), 8, 1);
  const auto slow = testing::simulate_pipeline(plans_of(s), 8, 1, {.latency = 0.5});
  CHECK(slow.makespan == doctest::Approx(free.makespan + 16 * 0.5).epsilon(1e-12));
}

TEST_CASE("pipeline::zero_bubble_h1: bubble a third of 1F1B's for m >= p, 1F1B's activations for B") {
  for (const int p : stage_counts)
    for (int m = 1; m <= max_microbatches; ++m) {
      CAPTURE(p);
      CAPTURE(m);
      const auto run = run_checked(pipeline::zero_bubble_h1{m, p});
      for (int r = 0; r < p; ++r) {
        CAPTURE(r);
        // The last stage starts at p - 1 at the earliest and has 3m of work, so (p - 1)/(3m) is a lower bound;
        // ZB-H1 reaches it once m >= p, when there are enough deferred Ws to fill the cool-down.
        const double bound = double(p - 1) / (3 * m);
        if (m >= p) CHECK(run.bubble(r) == doctest::Approx(bound).epsilon(1e-12));
        CHECK(run.bubble(r) >= bound - 1e-12);
        if (p > 1) CHECK(run.bubble(r) < double(p - 1) / m);  // 1F1B's
        CHECK(run.ranks[std::size_t(r)].peak_in_flight == std::min(p - r, m));
        CHECK(run.ranks[std::size_t(r)].peak_held == std::min(p, m));
      }
    }
}

TEST_CASE("pipeline schedules: small plans, as they print") {
  CHECK(printed(pipeline::one_f_one_b{3, 2}.plan(0, 0)) ==
        "forward(0), send_activation(0 -> 1), forward(1), send_activation(1 -> 1), recv_gradient(0 <- 1), "
        "backward(0), forward(2), send_activation(2 -> 1), recv_gradient(1 <- 1), backward(1), "
        "recv_gradient(2 <- 1), backward(2), optimizer_step");
  CHECK(printed(pipeline::one_f_one_b{3, 2}.plan(0, 1)) ==
        "recv_activation(0 <- 0), forward(0), backward(0), send_gradient(0 -> 0), recv_activation(1 <- 0), "
        "forward(1), backward(1), send_gradient(1 -> 0), recv_activation(2 <- 0), forward(2), backward(2), "
        "send_gradient(2 -> 0), optimizer_step");
  CHECK(printed(pipeline::gpipe{2, 2}.plan(0, 1)) ==
        "recv_activation(0 <- 0), forward(0), recv_activation(1 <- 0), forward(1), backward(0), "
        "send_gradient(0 -> 0), backward(1), send_gradient(1 -> 0), optimizer_step");
  // Virtual stages 0, 2 on rank 0 and 1, 3 on rank 1: chunk 1 of rank 0 receives from rank 1 (stage 1).
  CHECK(printed(pipeline::interleaved_1f1b{2, 2, 2}.plan(0, 0)) ==
        "forward(0), send_activation(0 -> 1), forward(1), send_activation(1 -> 1), "
        "recv_activation(0 <- 1, chunk 1), forward(0, chunk 1), send_activation(0 -> 1, chunk 1), "
        "recv_activation(1 <- 1, chunk 1), forward(1, chunk 1), send_activation(1 -> 1, chunk 1), "
        "recv_gradient(0 <- 1, chunk 1), backward(0, chunk 1), send_gradient(0 -> 1, chunk 1), "
        "recv_gradient(1 <- 1, chunk 1), backward(1, chunk 1), send_gradient(1 -> 1, chunk 1), "
        "recv_gradient(0 <- 1), backward(0), recv_gradient(1 <- 1), backward(1), optimizer_step");
  // Rank 1 of 2 holds back one W.
  CHECK(printed(pipeline::zero_bubble_h1{3, 2}.plan(0, 1)) ==
        "recv_activation(0 <- 0), forward(0), backward_input(0), send_gradient(0 -> 0), "
        "recv_activation(1 <- 0), forward(1), backward_input(1), send_gradient(1 -> 0), backward_weight(0), "
        "recv_activation(2 <- 0), forward(2), backward_input(2), send_gradient(2 -> 0), backward_weight(1), "
        "backward_weight(2), optimizer_step");

  CHECK(schedule::to_string(action{action_kind::forward, 3, -1, 1}) == "forward(3, chunk 1)");
  CHECK(schedule::to_string(action{action_kind::send_activation, 3, 1, 2}) == "send_activation(3 -> 1, chunk 2)");
  CHECK(schedule::to_string(action{action_kind::recv_gradient, 0, 2, 1}) == "recv_gradient(0 <- 2, chunk 1)");
  CHECK(schedule::to_string(action{action_kind::backward_input, 4, -1}) == "backward_input(4)");
  CHECK(schedule::to_string(action{action_kind::backward_weight, 4, -1, 2}) == "backward_weight(4, chunk 2)");
}

TEST_CASE("pipeline schedules: equal schedules give equal plans, different ones differ") {
  CHECK(pipeline::one_f_one_b{8, 4} == pipeline::one_f_one_b{8, 4});
  CHECK(pipeline::one_f_one_b{8, 4} != pipeline::one_f_one_b{8, 2});
  CHECK(plans_of(pipeline::one_f_one_b{8, 4}) == plans_of(pipeline::one_f_one_b{8, 4}));
  CHECK(pipeline::interleaved_1f1b{8, 4, 2} != pipeline::interleaved_1f1b{8, 4, 3});
  CHECK(pipeline::zero_bubble_h1{8, 4}.plan(3, 2) == pipeline::zero_bubble_h1{8, 4}.plan(0, 2));
  // Same work, other orders.
  CHECK(plans_of(pipeline::gpipe{8, 4}) != plans_of(pipeline::one_f_one_b{8, 4}));
  CHECK(plans_of(pipeline::interleaved_1f1b{8, 4, 1}) != plans_of(pipeline::one_f_one_b{8, 4}));
  // With one stage there is nothing to wait for: 1F1B is gradient accumulation.
  CHECK(pipeline::one_f_one_b{3, 1}.plan(0, 0) == schedule::gradient_accumulation{3}.plan(0, 0));
}

TEST_CASE("pipeline schedules: bad arguments raise invalid_argument naming the value") {
  const auto fails = [](auto make, const char* text) {
    CAPTURE(text);
    CHECK_THROWS_WITH_AS(make(), doctest::Contains(text), invalid_argument);
  };
  fails([] { return pipeline::gpipe{0, 2}; }, "pipeline::gpipe: the micro-batch count must be >= 1, got 0");
  fails([] { return pipeline::one_f_one_b{4, 0}; }, "pipeline::one_f_one_b: the stage count must be >= 1, got 0");
  fails([] { return pipeline::zero_bubble_h1{-3, 2}; }, "the micro-batch count must be >= 1, got -3");
  fails([] { return pipeline::interleaved_1f1b{4, 2, 0}; },
        "pipeline::interleaved_1f1b: the chunk count per rank must be >= 1, got 0");
  fails([] { return pipeline::interleaved_1f1b{6, 4, 2}; },
        "the micro-batch count m = 6 must be a multiple of the stage count p = 4");
  fails([] { return pipeline::interleaved_1f1b{2, 4, 1}; }, "m = 2 must be a multiple of the stage count p = 4");
  fails([] { return pipeline::one_f_one_b{4, 2}.plan(-1, 0); },
        "pipeline::one_f_one_b::plan: step must be >= 0, got -1");
  fails([] { return pipeline::gpipe{4, 2}.plan(0, 2); }, "pipeline::gpipe::plan: rank 2 outside [0, 2)");
  fails([] { return pipeline::interleaved_1f1b{4, 2, 2}.plan(0, -1); }, "rank -1 outside [0, 2)");
  fails([] { return pipeline::zero_bubble_h1{4, 3}.plan(0, 3); },
        "pipeline::zero_bubble_h1::plan: rank 3 outside [0, 3)");
}

TEST_CASE("simulate_pipeline: plans that break the format are reported, not run") {
  const auto problems_of = [](const plans_t& plans, int m, int v = 1) {
    return joined(testing::simulate_pipeline(plans, m, v).problems);
  };
  const auto finished = [](pipeline::plan_builder&& b) { return std::move(b).finish(); };

  // Rank 0 waits for micro-batch 0's gradient before forwarding 1, which rank 1 waits for first.
  pipeline::plan_builder eager(2, 1, 0), gpipe_like(2, 1, 1);
  for (int mb = 0; mb < 2; ++mb) {
    eager.forward(mb);
    eager.backward(mb);
    gpipe_like.forward(mb);
  }
  for (int mb = 0; mb < 2; ++mb) gpipe_like.backward(mb);
  const plans_t deadlocked{finished(std::move(eager)), finished(std::move(gpipe_like))};
  const std::string deadlock = problems_of(deadlocked, 2);
  CHECK(deadlock.find("rank 0, action 2 'recv_gradient(0 <- 1)': deadlock") != std::string::npos);
  CHECK(deadlock.find("rank 1, action 2 'recv_activation(1 <- 0)': deadlock") != std::string::npos);

  // Rank 1 forwards micro-batch 1 first: it meets micro-batch 0's activations.
  plans_t swapped = plans_of(pipeline::gpipe{2, 2});
  std::swap_ranges(swapped[1].begin(), swapped[1].begin() + 2, swapped[1].begin() + 2);
  CHECK(problems_of(swapped, 2)
            .find("rank 1, action 0 'recv_activation(1 <- 0)': meets the activation of "
                  "micro-batch 0 from virtual stage 0") != std::string::npos);

  plans_t missing_send = plans_of(pipeline::one_f_one_b{2, 2});
  missing_send[0].erase(missing_send[0].begin() + 1);
  CHECK(problems_of(missing_send, 2)
            .find("rank 0, action 0 'forward(0)': needs 'send_activation(0 -> 1)' "
                  "directly after it") != std::string::npos);

  plans_t wrong_chunk = plans_of(pipeline::interleaved_1f1b{2, 2, 2});
  wrong_chunk[1][0].chunk = 1;  // the receive of stage 1 labelled as stage 3's
  CHECK(problems_of(wrong_chunk, 2, 2).find("is not directly before or after the computation") != std::string::npos);

  plans_t twice = plans_of(pipeline::one_f_one_b{2, 1});
  twice[0].insert(twice[0].begin(), action{action_kind::forward, 1, -1});
  CHECK(problems_of(twice, 2).find("micro-batch 1 at virtual stage 0 (rank 0): 2 forward(s)") != std::string::npos);

  plans_t early_step = plans_of(pipeline::one_f_one_b{2, 1});
  std::rotate(early_step[0].rbegin(), early_step[0].rbegin() + 1, early_step[0].rend());
  CHECK(problems_of(early_step, 2).find("optimizer_step must be the last action") != std::string::npos);

  plans_t weight_first = plans_of(pipeline::zero_bubble_h1{2, 1});
  std::swap(weight_first[0][1], weight_first[0][2]);  // forward(0), backward_weight(0), backward_input(0)
  CHECK(problems_of(weight_first, 2).find("'backward_weight(0)': runs before its backward_input") != std::string::npos);
}
