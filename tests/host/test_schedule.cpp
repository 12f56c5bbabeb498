// optim/schedule.hpp: the warmup + decay learning-rate schedule and global gradient-norm clipping.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include <subspace/optim/schedule.hpp>

#include "support/numeric.hpp"

using namespace subspace;

TEST_CASE("lr_schedule: linear warmup, then cosine or linear decay to min_lr") {
  optim::lr_schedule s;
  s.peak_lr = 1e-3f;
  s.min_lr = 1e-4f;
  s.warmup_steps = 10;
  s.total_steps = 110;
  s.decay = optim::decay_kind::cosine;
  CHECK(s.at(1) == doctest::Approx(1e-4));  // peak / warmup
  CHECK(s.at(5) == doctest::Approx(5e-4));
  CHECK(s.at(10) == 1e-3f);                    // the peak at the end of warmup
  CHECK(s.at(60) == doctest::Approx(5.5e-4));  // halfway: (peak + min) / 2
  CHECK(s.at(35) == doctest::Approx(1e-4 + 0.9e-3 * 0.5 * (1 + std::cos(M_PI * 0.25))));
  CHECK(s.at(110) == 1e-4f);                                              // min at the last step
  CHECK(s.at(500) == 1e-4f);                                              // and after it
  for (std::int64_t t = 11; t < 110; ++t) CHECK(s.at(t + 1) <= s.at(t));  // monotone decay

  s.decay = optim::decay_kind::linear;
  CHECK(s.at(10) == 1e-3f);
  CHECK(s.at(60) == doctest::Approx(5.5e-4));
  CHECK(s.at(85) == doctest::Approx(1e-3 - 0.9e-3 * 0.75));
  CHECK(s.at(110) == 1e-4f);

  s.decay = optim::decay_kind::constant;
  CHECK(s.at(3) == doctest::Approx(3e-4));
  CHECK(s.at(60) == 1e-3f);
  CHECK(s.at(1000) == 1e-3f);

  optim::lr_schedule no_warmup{2e-3f, 0.0f, 0, 4, optim::decay_kind::cosine};
  CHECK(no_warmup.at(1) == doctest::Approx(2e-3 * 0.5 * (1 + std::cos(M_PI * 0.25))));
  CHECK(no_warmup.at(4) == 0.0f);
  optim::lr_schedule all_warmup{2e-3f, 0.0f, 4, 4, optim::decay_kind::linear};
  CHECK(all_warmup.at(4) == 2e-3f);

  CHECK(optim::parse_decay("cosine") == optim::decay_kind::cosine);
  CHECK(optim::parse_decay("linear") == optim::decay_kind::linear);
  CHECK(std::string(optim::name_of(optim::parse_decay("constant"))) == "constant");
}

TEST_CASE("lr_schedule: bad configurations name the field and the expected range") {
  const auto fails = [](optim::lr_schedule s, const char* text) {
    CAPTURE(text);
    CHECK_THROWS_WITH_AS(s.validate(), doctest::Contains(text), invalid_argument);
  };
  fails({0.0f, 0.0f, 0, 10}, "peak_lr must be a positive number");
  fails({NAN, 0.0f, 0, 10}, "peak_lr must be a positive number");
  fails({1e-3f, 2e-3f, 0, 10}, "min_lr must lie in [0, peak_lr = 0.001], got 0.002");
  fails({1e-3f, -1e-3f, 0, 10}, "min_lr must lie in [0, peak_lr");
  fails({1e-3f, 0.0f, 0, 0}, "total_steps must be >= 1, got 0");
  fails({1e-3f, 0.0f, 20, 10}, "warmup_steps must lie in [0, total_steps = 10], got 20");
  fails({1e-3f, 0.0f, -1, 10}, "warmup_steps must lie in [0, total_steps = 10], got -1");
  const optim::lr_schedule ok{1e-3f, 0.0f, 0, 10};
  CHECK_THROWS_WITH_AS(ok.at(0), doctest::Contains("steps are 1-based, got 0"), invalid_argument);
  CHECK_THROWS_WITH_AS(optim::parse_decay("step"),
                       doctest::Contains("unknown decay 'step' (expected cosine, linear or constant)"),
                       invalid_argument);
}

TEST_CASE("clip_factor: 1 unless clipping is on and the norm exceeds max_norm, then max_norm / (norm + 1e-6)") {
  CHECK(optim::clip_factor(0.5, 1.0) == 1.0f);
  CHECK(optim::clip_factor(1.0, 1.0) == 1.0f);
  CHECK(optim::clip_factor(4.0, 0.0) == 1.0f);   // clipping disabled
  CHECK(optim::clip_factor(4.0, -1.0) == 1.0f);  // clipping disabled
  CHECK(optim::clip_factor(INFINITY, 1.0) == 1.0f);
  CHECK(optim::clip_factor(NAN, 1.0) == 1.0f);
  CHECK(optim::clip_factor(4.0, 1.0) == float(1.0 / (4.0 + 1e-6)));
  CHECK(optim::clip_factor(3e5, 2.5) == float(2.5 / (3e5 + 1e-6)));
  CHECK_THROWS_AS(optim::clip_factor(4.0, std::nan("")), invalid_argument);
}

TEST_CASE("clip_grad_norm: the global norm matches a direct computation, clipping scales to max_norm") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  std::vector<host_tensor<float>> grads;
  grads.push_back(testing::random_tensor<float>({17, 9}, seed, 0.0f, 2.0f));
  grads.push_back(testing::random_tensor<float>({33}, seed + 1, 0.5f, 1.0f));
  grads.push_back(testing::random_tensor<float>({4, 5, 6}, seed + 2));
  const auto direct = [&] {
    double s = 0;
    for (const auto& g : grads)
      for (std::int64_t i = 0; i < g.numel(); ++i) s += double(g.data()[i]) * double(g.data()[i]);
    return std::sqrt(s);
  };
  std::vector<view<float, host_space>> views;
  for (auto& g : grads) views.push_back(g.v());
  const double before = direct();
  CHECK(optim::grad_norm(exec::host{}, views) == doctest::Approx(before).epsilon(1e-6));  // fp32 sums per view
  CHECK(optim::grad_squares(exec::host{}, views) == doctest::Approx(before * before).epsilon(2e-6));

  // No clipping: max_norm above the norm, or 0 (disabled); the gradients are untouched.
  CHECK(optim::clip_grad_norm(exec::host{}, views, before * 2) == doctest::Approx(before).epsilon(1e-6));
  CHECK(optim::clip_grad_norm(exec::host{}, views, 0.0) == doctest::Approx(before).epsilon(1e-6));
  CHECK(direct() == before);

  // Clipping: returns the norm before, leaves max_norm (up to the 1e-6 guard and float rounding).
  const double max_norm = before / 3;
  CHECK(optim::clip_grad_norm(exec::host{}, views, max_norm) == doctest::Approx(before).epsilon(1e-6));
  CHECK(direct() == doctest::Approx(max_norm).epsilon(1e-5));
  CHECK(optim::clip_grad_norm(exec::host{}, views, max_norm) == doctest::Approx(max_norm).epsilon(1e-5));

  // bf16 gradients, through the same helpers.
  auto b = testing::random_tensor<bf16>({64}, seed + 3);
  double sb = 0;
  for (std::int64_t i = 0; i < b.numel(); ++i) sb += double(float(b.data()[i])) * double(float(b.data()[i]));
  std::vector<view<bf16, host_space>> bviews{b.v()};
  CHECK(optim::clip_grad_norm(exec::host{}, bviews, 1.0) == doctest::Approx(std::sqrt(sb)).epsilon(1e-6));
  double after = 0;
  for (std::int64_t i = 0; i < b.numel(); ++i) after += double(float(b.data()[i])) * double(float(b.data()[i]));
  CHECK(std::sqrt(after) == doctest::Approx(1.0).epsilon(1e-2));  // bf16 rounding

  // A non-finite norm is returned and leaves the gradients as they are.
  grads[1](3) = INFINITY;
  const float kept = grads[0](0, 0);
  CHECK(std::isinf(optim::clip_grad_norm(exec::host{}, views, 1.0)));
  CHECK(grads[0](0, 0) == kept);
  CHECK_THROWS_AS(optim::clip_grad_norm(exec::host{}, views, std::nan("")), invalid_argument);
}
