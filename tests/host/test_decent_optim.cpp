// decent::decent_adam(w) and decent::accum_adam(w) on the host: the Optimizer conformance suite; the update
// rules against a float64 reference written here from the formulas of docs/decent.md ("Optimizers");
// AccumAdam with K = 1 is DAdam bit for bit; AccumAdam's persistent moments see window-mean gradients and its
// bias correction counts windows; weight decay only on matrices; the fused mix-and-step; misuse.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <decent/accum_adam.hpp>
#include <decent/decent_adam.hpp>

#include "conformance.hpp"
#include "support/numeric.hpp"

using namespace subspace;

static_assert(Optimizer<decent::decent_adam>, "decent_adam must satisfy subspace::Optimizer");
static_assert(Optimizer<decent::decent_adamw>, "decent_adamw must satisfy subspace::Optimizer");
static_assert(Optimizer<decent::accum_adam>, "accum_adam must satisfy subspace::Optimizer");
static_assert(Optimizer<decent::accum_adamw>, "accum_adamw must satisfy subspace::Optimizer");

namespace {

/// The update rules of docs/decent.md in float64, one tensor. K = 0: DAdam; K >= 1: AccumAdam with accum_iter K. The
/// parameters are not kept: each step starts from the mixed point the test hands in.
struct reference {
  double beta1, beta2, eps, wd;
  bool decoupled;
  int K;
  std::vector<double> m, v, acc;  // DAdam: m, v; AccumAdam: persistent M, V and Acc

  std::vector<double> step(const std::vector<double>& mixed, const std::vector<double>& grad, double lr, std::int64_t s,
                           bool decay) {
    const std::int64_t k = K == 0 ? s : (s + K - 1) / K;  // bias correction: steps, or windows ⌈s/K⌉
    const double bias1 = 1.0 - std::pow(beta1, double(k));
    const double bias2 = 1.0 - std::pow(beta2, double(k));
    std::vector<double> x(mixed.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      double xt = mixed[i], g = grad[i];
      if (decay && !decoupled) g += wd * xt;
      if (decay && decoupled) xt *= 1.0 - lr * wd;
      double mi, vi;
      if (K == 0) {
        m[i] = beta1 * m[i] + (1 - beta1) * g;
        v[i] = beta2 * v[i] + (1 - beta2) * g * g;
        mi = m[i];
        vi = v[i];
      } else {
        acc[i] += g / K;
        mi = beta1 * m[i] + (1 - beta1) * g;
        vi = beta2 * v[i] + (1 - beta2) * g * g;
      }
      x[i] = xt - lr / bias1 * mi / (std::sqrt(vi) / std::sqrt(bias2) + eps);
      if (K != 0 && s % K == 0) {
        m[i] = beta1 * m[i] + (1 - beta1) * acc[i];
        v[i] = beta2 * v[i] + (1 - beta2) * acc[i] * acc[i];
        acc[i] = 0;
      }
    }
    return x;
  }
};

template <class T>
std::vector<double> to_vector(const host_tensor<T>& t) {
  std::vector<double> out(std::size_t(t.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i) out[std::size_t(i)] = double(t.data()[i]);
  return out;
}
host_tensor<double> as_tensor(const std::vector<double>& x, const shape& s) {
  host_tensor<double> t(s);
  std::copy(x.begin(), x.end(), t.data());
  return t;
}
host_tensor<float> copy_of(const host_tensor<float>& a) {
  host_tensor<float> b(a.shape());
  copy(exec::host{}, a.v(), b.v());
  return b;
}
template <class T>
bool same_bits(const host_tensor<T>& a, const host_tensor<T>& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), a.bytes()) == 0;
}

template <class O>
constexpr int accum_of(const O& o) {
  if constexpr (requires { o.accum_iter; }) return o.accum_iter;
  else return 0;
}

/// Runs `opt` for 10 steps against the float64 reference: gradients of growing scale, varying lr, and a mixed
/// point that is master itself on odd steps (step) and a fresh neighbour average on even ones (step_from_mixed).
template <class G, class O>
void check_against_reference(const O& opt, std::uint64_t seed) {
  for (const bool decay : {true, false}) {
    CAPTURE(decay);
    const optim::param_info info{"layers.0.mlp.w1", {19, 23}, decay};
    auto master = testing::random_tensor<float>(info.shape, seed);
    auto st = opt.init(exec::host{}, info);
    const std::size_t n = std::size_t(info.shape.numel());
    reference ref{opt.beta1,
                  opt.beta2,
                  opt.eps,
                  opt.weight_decay,
                  O::rule == decent::weight_decay_rule::decoupled,
                  accum_of(opt),
                  std::vector<double>(n, 0.0),
                  std::vector<double>(n, 0.0),
                  std::vector<double>(n, 0.0)};
    host_tensor<bf16> working(info.shape);
    for (int s = 1; s <= 10; ++s) {
      CAPTURE(s);
      const auto grad = testing::random_tensor<G>(info.shape, seed + 100 + std::uint64_t(s), 0.0f, 0.05f * float(s));
      const float lr = 1e-2f / float(1 + s % 3);
      const optim::step_context ctx{lr, s};
      std::vector<double> expected;
      if (s % 2 == 1) {
        expected = ref.step(to_vector(master), to_vector(grad), double(lr), s, decay);
        opt.step(exec::host{}, master.v(), grad.v(), st, info, ctx, working.v());
      } else {
        // A neighbour's replica, averaged in as a pair exchange would: x̃ = (x + y) / 2 in fp32.
        const auto y = testing::random_tensor<float>(info.shape, seed + 500 + std::uint64_t(s));
        host_tensor<float> mixed(info.shape);
        for (std::int64_t i = 0; i < mixed.numel(); ++i) mixed.data()[i] = 0.5f * (master.data()[i] + y.data()[i]);
        expected = ref.step(to_vector(mixed), to_vector(grad), double(lr), s, decay);
        opt.step_from_mixed(exec::host{}, mixed.v(), master.v(), grad.v(), st, info, ctx, working.v());
      }
      CHECK(testing::rel_error(master, as_tensor(expected, info.shape)) <= 1e-6);
      CHECK(testing::rel_error(st.m, as_tensor(ref.m, info.shape)) <= 1e-6);
      CHECK(testing::rel_error(st.v, as_tensor(ref.v, info.shape)) <= 1e-6);
      if constexpr (requires { st.acc; }) {
        if (s % ref.K == 0) {
          bool zero = true;
          for (std::int64_t i = 0; i < st.acc.numel(); ++i) zero = zero && st.acc.data()[i] == 0.0f;
          CHECK(zero);
        } else {
          CHECK(testing::rel_error(st.acc, as_tensor(ref.acc, info.shape)) <= 1e-6);
        }
      }
      bool working_is_bf16_of_master = true;
      for (std::int64_t i = 0; i < master.numel(); ++i)
        working_is_bf16_of_master = working_is_bf16_of_master && working.data()[i].bits == bf16(master.data()[i]).bits;
      CHECK(working_is_bf16_of_master);
    }
  }
}

struct decent_adam_fixture {
  using optimizer = decent::decent_adam;
  static optimizer make() { return {.weight_decay = 0.01f}; }
  static std::vector<optim::param_info> params() {
    return {optim::param_info_for("w", {6, 5}), optim::param_info_for("gain", {7})};
  }
};
struct decent_adamw_fixture {
  using optimizer = decent::decent_adamw;
  static optimizer make() { return {}; }
  static std::vector<optim::param_info> params() { return decent_adam_fixture::params(); }
};
struct accum_adam_fixture {
  using optimizer = decent::accum_adam;
  static optimizer make() { return {.accum_iter = 2, .weight_decay = 0.01f}; }
  static std::vector<optim::param_info> params() { return decent_adam_fixture::params(); }
};
struct accum_adamw_fixture {
  using optimizer = decent::accum_adamw;
  static optimizer make() { return {.accum_iter = 3}; }
  static std::vector<optim::param_info> params() { return decent_adam_fixture::params(); }
};

}  // namespace

TYPE_TO_STRING(decent_adam_fixture);
TYPE_TO_STRING(decent_adamw_fixture);
TYPE_TO_STRING(accum_adam_fixture);
TYPE_TO_STRING(accum_adamw_fixture);
TEST_CASE_TEMPLATE_APPLY(
    optimizer_conformance,
    std::tuple<decent_adam_fixture, decent_adamw_fixture, accum_adam_fixture, accum_adamw_fixture>);

TEST_CASE_TEMPLATE("decent_adam and decent_adamw (host) follow the float64 reference", G, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  check_against_reference<G>(decent::decent_adam{.weight_decay = 0.05f}, seed);
  check_against_reference<G>(decent::decent_adamw{.beta1 = 0.8f, .beta2 = 0.99f}, seed);
}

TEST_CASE_TEMPLATE("accum_adam and accum_adamw (host) follow the float64 reference", G, float, bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  for (const int K : {1, 3, 4}) {
    CAPTURE(K);
    check_against_reference<G>(decent::accum_adam{.accum_iter = K, .weight_decay = 0.05f}, seed);
    check_against_reference<G>(decent::accum_adamw{.accum_iter = K, .beta2 = 0.95f}, seed);
  }
}

TEST_CASE_TEMPLATE("accum_adam with accumulation 1 is decent_adam bit for bit (accum_adamw: decent_adamw)", G, float,
                   bf16) {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  CAPTURE(dtype_name<G>());
  const auto compare = [&](const auto& dadam, const auto& accum) {
    for (const bool decay : {true, false}) {
      CAPTURE(decay);
      const optim::param_info info{"w", {31, 9}, decay};
      auto a = testing::random_tensor<float>(info.shape, seed);
      auto b = copy_of(a);
      auto sa = dadam.init(exec::host{}, info);
      auto sb = accum.init(exec::host{}, info);
      for (int s = 1; s <= 7; ++s) {
        CAPTURE(s);
        const auto g = testing::random_tensor<G>(info.shape, seed + std::uint64_t(s), 0.0f, 0.1f);
        const optim::step_context ctx{3e-2f / float(s), s};
        dadam.step(exec::host{}, a.v(), g.v(), sa, info, ctx);
        accum.step(exec::host{}, b.v(), g.v(), sb, info, ctx);
        CHECK(same_bits(a, b));
        CHECK(same_bits(sa.m, sb.m));
        CHECK(same_bits(sa.v, sb.v));
      }
    }
  };
  const float b1 = 0.85f, b2 = 0.97f, eps = 1e-7f, wd = 0.05f;
  compare(decent::decent_adam{b1, b2, eps, wd}, decent::accum_adam{1, b1, b2, eps, wd});
  compare(decent::decent_adamw{b1, b2, eps, wd}, decent::accum_adamw{1, b1, b2, eps, wd});
}

TEST_CASE("accum_adam K = 4: M and V are Adam moments of window-mean gradients, bias correction counts windows") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const decent::accum_adam opt{.accum_iter = 4, .beta1 = 0.9f, .beta2 = 0.98f, .eps = 1e-8f, .weight_decay = 0.0f};
  CHECK(opt.window(1) == 1);
  CHECK(opt.window(4) == 1);
  CHECK(opt.window(5) == 2);
  CHECK(opt.closes_window(8));
  CHECK(!opt.closes_window(9));
  // Enough elements that the norm-wise error of the fp32 window sums (cancellation in Acc, squared in V) is its
  // typical size, not one unlucky element's.
  const optim::param_info info{"w", {4096}, false};
  auto x = testing::random_tensor<float>(info.shape, seed);
  auto st = opt.init(exec::host{}, info);
  const std::size_t n = 4096;
  std::vector<double> M(n, 0.0), V(n, 0.0), window_sum(n, 0.0);
  const float lr = 1e-2f;
  for (int s = 1; s <= 12; ++s) {
    CAPTURE(s);
    const auto g = testing::random_tensor<float>(info.shape, seed + std::uint64_t(s));
    const auto before = to_vector(x);
    opt.step(exec::host{}, x.v(), g.v(), st, info, optim::step_context{lr, s});
    if (s <= 4) {
      // First window: M = V = 0 and k = 1, so every step moves by lr g / (|g| + eps), about lr sign(g); a
      // bias correction by s would give lr (1 - β1) / (1 - β1^s) g / (|g| sqrt(1 - β2) / sqrt(1 - β2^s) + eps).
      host_tensor<double> expected(info.shape);
      for (std::size_t i = 0; i < n; ++i) {
        const double gi = double(g.data()[i]);
        expected.data()[i] = before[i] - double(lr) * gi / (std::abs(gi) + 1e-8);
      }
      CHECK(testing::rel_error(x, expected) <= 1e-6);
    }
    for (std::size_t i = 0; i < n; ++i) window_sum[i] += double(g.data()[i]);
    if (s % 4 == 0)
      for (std::size_t i = 0; i < n; ++i) {
        const double mean = window_sum[i] / 4;        // the window's mean gradient, not the mean of squares
        const double b1 = opt.beta1, b2 = opt.beta2;  // the float hyper-parameters, exactly
        M[i] = b1 * M[i] + (1 - b1) * mean;
        V[i] = b2 * V[i] + (1 - b2) * mean * mean;
        window_sum[i] = 0;
      }
    CHECK(testing::rel_error(st.m, as_tensor(M, info.shape)) <= 1e-6);
    CHECK(testing::rel_error(st.v, as_tensor(V, info.shape)) <= 1e-6);
  }
}

TEST_CASE("decent optimizers: weight decay on matrices, never on norm gains or biases (Decent-DP inverts this)") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  // With a zero gradient, decoupled decay alone scales x by 1 - lr wd; L2 decay turns into the gradient wd x,
  // whose first Adam step is lr wd x / (|wd x| + eps). Parameters without decay do not move at all.
  const float lr = 0.1f, wd = 0.1f;
  const auto run = [&](const auto& opt, bool decoupled) {
    for (const auto& info :
         {optim::param_info_for("layers.0.attn.wq", {8, 8}), optim::param_info_for("tok_embeddings", {16, 4}),
          optim::param_info_for("layers.0.attention_norm.weight", {8}),
          optim::param_info_for("layers.0.mlp.bias", {8})}) {
      CAPTURE(info.name);
      const auto x0 = testing::random_tensor<float>(info.shape, seed);
      auto x = copy_of(x0);
      host_tensor<float> zero(info.shape);
      std::fill(zero.data(), zero.data() + zero.numel(), 0.0f);
      auto st = opt.init(exec::host{}, info);
      opt.step(exec::host{}, x.v(), zero.v(), st, info, optim::step_context{lr, 1});
      host_tensor<double> expected(info.shape);
      for (std::int64_t i = 0; i < x.numel(); ++i) {
        const double xi = x0.data()[i], gi = double(wd) * xi;
        const double decayed = decoupled ? xi * (1.0 - double(lr) * wd) : xi - double(lr) * gi / (std::abs(gi) + 1e-8);
        expected.data()[i] = info.shape.rank >= 2 ? decayed : xi;
      }
      CHECK(info.decay == (info.shape.rank >= 2));
      CHECK(testing::rel_error(x, expected) <= 1e-6);
      if (!info.decay) CHECK(same_bits(x, x0));
    }
  };
  run(decent::decent_adam{.weight_decay = wd}, false);
  run(decent::decent_adamw{.weight_decay = wd}, true);
  run(decent::accum_adam{.accum_iter = 4, .weight_decay = wd}, false);
  run(decent::accum_adamw{.accum_iter = 4, .weight_decay = wd}, true);
}

TEST_CASE("decent optimizers: step_from_mixed equals copying the mixed point into master, then step") {
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const auto compare = [&](const auto& opt) {
    const auto info = optim::param_info_for("w", {12, 11});
    auto fused = testing::random_tensor<float>(info.shape, seed);  // x^t: overwritten by the update
    const auto mixed = testing::random_tensor<float>(info.shape, seed + 1);
    const auto mixed_before = copy_of(mixed);
    auto plain = copy_of(mixed);
    auto s1 = opt.init(exec::host{}, info);
    auto s2 = opt.init(exec::host{}, info);
    for (int s = 1; s <= 3; ++s) {
      const auto g = testing::random_tensor<bf16>(info.shape, seed + 10 + std::uint64_t(s));
      const optim::step_context ctx{1e-2f, s};
      opt.step_from_mixed(exec::host{}, view<const float, host_space>(s == 1 ? mixed.v() : fused.v()), fused.v(), g.v(),
                          s1, info, ctx);
      opt.step(exec::host{}, plain.v(), g.v(), s2, info, ctx);
      CHECK(same_bits(fused, plain));
    }
    CHECK(same_bits(mixed, mixed_before));  // the mixed point is only read
  };
  compare(decent::decent_adam{.weight_decay = 0.1f});
  compare(decent::decent_adamw{});
  compare(decent::accum_adam{.accum_iter = 2, .weight_decay = 0.1f});
  compare(decent::accum_adamw{.accum_iter = 2});
}

TEST_CASE("decent optimizers: state is zeroed fp32 moments (and AccumAdam's accumulator), sized exactly") {
  for (const shape& s : {shape{7}, shape{3, 5}, shape{2, 3, 4}}) {
    CAPTURE(to_string(s));
    const auto info = optim::param_info_for("p", s);
    const std::size_t bytes = std::size_t(s.numel()) * sizeof(float);
    const auto d = decent::decent_adam{}.init(exec::host{}, info);
    CHECK(decent::decent_adam{}.state_bytes(d) == 2 * bytes);
    const auto a = decent::accum_adamw{}.init(exec::host{}, info);
    CHECK(decent::accum_adamw{}.state_bytes(a) == 3 * bytes);
    bool zero = true;
    for (std::int64_t i = 0; i < s.numel(); ++i)
      zero = zero && d.m.data()[i] == 0.0f && d.v.data()[i] == 0.0f && a.m.data()[i] == 0.0f && a.v.data()[i] == 0.0f &&
             a.acc.data()[i] == 0.0f;
    CHECK(zero);
  }
  // What a per-rank checkpoint saves: every state tensor, named (io/checkpoint.hpp's for_each_tensor hook).
  const auto info = optim::param_info_for("p", {3, 5});
  auto ds = decent::decent_adamw{}.init(exec::host{}, info);
  auto as = decent::accum_adam{}.init(exec::host{}, info);
  std::vector<std::pair<std::string, const float*>> seen;
  const auto record = [&](const std::string& name, view<float, host_space> t) { seen.emplace_back(name, t.data()); };
  ds.for_each_tensor(record);
  as.for_each_tensor(record);
  using entry = std::pair<std::string, const float*>;
  CHECK(seen == std::vector<entry>{{"exp_avg", ds.m.data()},
                                   {"exp_avg_sq", ds.v.data()},
                                   {"exp_avg", as.m.data()},
                                   {"exp_avg_sq", as.v.data()},
                                   {"accum_grad", as.acc.data()}});
  // The library's defaults (docs/decent.md, "Optimizers").
  const decent::accum_adamw w{};
  CHECK((w.accum_iter == 8 && w.beta1 == 0.9f && w.beta2 == 0.98f && w.eps == 1e-8f && w.weight_decay == 0.1f));
  const decent::decent_adam d{};
  CHECK((d.beta1 == 0.9f && d.beta2 == 0.999f));
}

TEST_CASE("decent optimizers: misuse is reported with the optimizer and the parameter's name") {
  const auto info = optim::param_info_for("layers.0.wq", {4, 4});
  host_tensor<float> w({4, 4}), g({4, 4}), g_wrong({4, 5}), big({8, 4});
  std::fill(w.data(), w.data() + 16, 1.0f);
  std::fill(g.data(), g.data() + 16, 1.0f);
  std::fill(big.data(), big.data() + 32, 1.0f);
  const decent::accum_adamw opt{.accum_iter = 2};
  auto st = opt.init(exec::host{}, info);
  const optim::step_context ctx{1e-3f, 1};
  CHECK_THROWS_WITH_AS(opt.step(exec::host{}, w.v(), g.v(), st, info, optim::step_context{1e-3f, 0}),
                       doctest::Contains("decent::accum_adamw::step(layers.0.wq): step_context::step is 1-based"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(opt.step(exec::host{}, w.v(), g_wrong.v(), st, info, ctx),
                       doctest::Contains("grad has shape [4, 5]"), invalid_argument);
  const decent::accum_adam no_window{.accum_iter = 0};
  auto st0 = no_window.init(exec::host{}, info);
  CHECK_THROWS_WITH_AS(no_window.step(exec::host{}, w.v(), g.v(), st0, info, ctx),
                       doctest::Contains("accum_iter (K) must be >= 1, got 0"), invalid_argument);
  auto other = decent::decent_adam{}.init(exec::host{}, optim::param_info_for("b", {4}));
  CHECK_THROWS_WITH_AS(decent::decent_adam{}.step(exec::host{}, w.v(), g.v(), other, info, ctx),
                       doctest::Contains("decent::decent_adam::step(layers.0.wq): state has shape [4]"),
                       invalid_argument);
  auto sd = decent::decent_adamw{}.init(exec::host{}, info);
  CHECK_THROWS_WITH_AS(decent::decent_adamw{.beta2 = 1.0f}.step(exec::host{}, w.v(), g.v(), sd, info, ctx),
                       doctest::Contains("beta1 and beta2 must lie in [0, 1)"), invalid_argument);
  // A mixed point that overlaps master without being master would be read after it is written.
  const view<float, host_space> shifted(big.data() + 2, info.shape);
  const view<float, host_space> base(big.data(), info.shape);
  CHECK_THROWS_WITH_AS(opt.step_from_mixed(exec::host{}, shifted, base, g.v(), st, info, ctx),
                       doctest::Contains("mixed must be master itself or not overlap it"), invalid_argument);
  CHECK_THROWS_AS(opt.step(exec::host{}, w.v().transposed(), g.v(), st, info, ctx), invalid_argument);
}
