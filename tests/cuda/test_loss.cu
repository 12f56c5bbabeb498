// lm_head_cross_entropy on CUDA against the float64 host reference on the same bf16 (and fp32) inputs: losses,
// dh and the added part of dweight, with the logits in bf16 (the default for bf16 inputs) and in fp32, ignored
// targets, chunk sizes (one row, odd counts, a byte budget), a vocabulary
// that is not a multiple of 4, a long vocabulary (the in-place gradient spans many stretches of a row), optional
// gradients, and an out-of-range target (NaN loss, no gradient). Failures print the first mismatching elements.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#include <subspace/core/rng.hpp>
#include <subspace/kernels/loss.hpp>

#include "support/attention_reference.hpp"
#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

host_tensor<std::int32_t> random_targets(std::int64_t n, std::int64_t vocab, std::uint64_t seed) {
  host_tensor<std::int32_t> t({n});
  for (std::int64_t i = 0; i < n; ++i) {
    t.data()[i] = std::int32_t(rng::bits4(seed, 11, std::uint64_t(i)).v[0] % std::uint32_t(vocab));
    if (i % 7 == 3) t.data()[i] = -1;  // ignored
  }
  return t;
}

struct loss_case {
  std::int64_t n, d, vocab;
  lm_head_options options;
};

/// One call on the device and the float64 host reference on the same values; checks losses, dh and dweight's
/// increment.
template <class T>
void check_case(const exec::cuda& ex, const loss_case& c, std::uint64_t seed) {
  CAPTURE(seed);
  CAPTURE(c.n);
  CAPTURE(c.d);
  CAPTURE(c.vocab);
  CAPTURE(c.options.chunk_rows);
  CAPTURE(c.options.chunk_bytes);
  const bool bf16_logits = std::is_same_v<T, bf16> && c.options.logits == lm_head_logits::input;
  CAPTURE(bf16_logits);
  const float grad_scale = 1.0f / float(c.n);
  const auto h = testing::random_tensor<T>({c.n, c.d}, seed);
  const auto w = testing::random_tensor<T>({c.vocab, c.d}, seed + 1, 0.0f, 2.0f / std::sqrt(float(c.d)));
  const auto targets = random_targets(c.n, c.vocab, seed);
  const auto dw0 = testing::random_tensor<float>({c.vocab, c.d}, seed + 2, 0.0f, 0.01f);

  const auto hd = testing::to_double(h), wd = testing::to_double(w);
  host_tensor<double> loss_h({c.n}), dh_h({c.n, c.d}), dw_h({c.vocab, c.d});
  for (std::int64_t i = 0; i < dw_h.numel(); ++i) dw_h.data()[i] = 0;
  lm_head_cross_entropy(exec::host{}, cv(hd), cv(wd), cv(targets), loss_h.v(), dh_h.v(), dw_h.v(), grad_scale);

  const auto d_h = to_device(ex, cv(h)), d_w = to_device(ex, cv(w));
  const auto d_t = to_device(ex, cv(targets));
  auto d_dw = to_device(ex, cv(dw0));
  device_tensor<float> d_loss({c.n});
  device_tensor<T> d_dh({c.n, c.d});
  lm_head_cross_entropy(ex, d_h.v(), d_w.v(), d_t.v(), d_loss.v(), d_dh.v(), d_dw.v(), grad_scale, c.options);
  cuda_check(cudaStreamSynchronize(ex.stream));
  const auto loss = to_host(ex, d_loss.v());
  const auto dh = to_host(ex, d_dh.v());
  const auto dw = to_host(ex, d_dw.v());
  host_tensor<double> dw_added({c.vocab, c.d});
  for (std::int64_t i = 0; i < dw.numel(); ++i) dw_added.data()[i] = double(dw.data()[i]) - double(dw0.data()[i]);

  // bf16 logits round each logit to 8 significant bits before the fp32 statistics: a bf16-level loss tolerance.
  const double loss_tol = bf16_logits ? 1e-2 : 1e-4, grad_tol = std::is_same_v<T, float> ? 1e-4 : 1e-2;
  const double e_loss = testing::compare("losses", loss, loss_h, loss_tol);
  const double e_dh = testing::compare("dh", dh, dh_h, grad_tol);
  const double e_dw = testing::compare("dweight (added)", dw_added, dw_h, grad_tol);
  std::printf("  %s (%s logits) N=%lld d=%lld V=%lld chunk_rows=%lld: losses %.1e  dh %.1e  dweight %.1e\n",
              dtype_name<T>(), bf16_logits ? "bf16" : "fp32", (long long)c.n, (long long)c.d, (long long)c.vocab,
              (long long)c.options.chunk_rows, e_loss, e_dh, e_dw);
  CHECK(e_loss < loss_tol);
  CHECK(e_dh < grad_tol);
  CHECK(e_dw < grad_tol);
  for (std::int64_t i = 0; i < c.n; ++i)
    if (targets(i) < 0) REQUIRE(loss(i) == 0.0f);
}

}  // namespace

TEST_CASE("lm_head_cross_entropy (CUDA): losses and gradients match the host, for chunk sizes and vocabularies") {
  testing::stream_guard s;
  const exec::cuda ex{s.stream};
  const loss_case cases[] = {
      {300, 64, 1000, {}},              // one chunk
      {300, 64, 1000, {37}},            // odd chunks, a short last one
      {300, 64, 1001, {1}},             // one row per chunk; V not a multiple of 4 (scalar path)
      {257, 128, 4096, {0, 64 << 10}},  // a byte budget: 4 rows per chunk (8 of bf16 logits)
      {128, 64, 50304, {}},             // the GPT-2 vocabulary: the in-place gradient spans 25 stretches
      {96, 64, 50305, {40}},            // the same, scalar path
  };
  for (const lm_head_logits logits : {lm_head_logits::input, lm_head_logits::fp32})
    for (loss_case c : cases) {
      c.options.logits = logits;
      check_case<bf16>(ex, c, testing::fresh_seed());
    }
  check_case<float>(ex, {100, 32, 500, {33}}, testing::fresh_seed());
  check_case<float>(ex, {64, 32, 3001, {}}, testing::fresh_seed());
}

TEST_CASE("lm_head_cross_entropy (CUDA): losses only, an out-of-range target gives a NaN loss and no gradient") {
  testing::stream_guard s;
  const exec::cuda ex{s.stream};
  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  const std::int64_t n = 40, d = 32, vocab = 300;
  const auto h = testing::random_tensor<bf16>({n, d}, seed);
  const auto w = testing::random_tensor<bf16>({vocab, d}, seed + 1, 0.0f, 0.3f);
  auto targets = random_targets(n, vocab, seed);
  const auto hd = testing::to_double(h), wd = testing::to_double(w);
  host_tensor<double> loss_h({n});
  lm_head_cross_entropy(exec::host{}, cv(hd), cv(wd), cv(targets), loss_h.v(), {}, {}, 1.0f);
  const auto d_h = to_device(ex, cv(h)), d_w = to_device(ex, cv(w));

  for (const lm_head_logits logits : {lm_head_logits::input, lm_head_logits::fp32}) {  // no gradients wanted
    const auto d_t = to_device(ex, cv(targets));
    device_tensor<float> d_loss({n});
    lm_head_cross_entropy(ex, d_h.v(), d_w.v(), d_t.v(), d_loss.v(), {}, {}, 1.0f, {.chunk_rows = 7, .logits = logits});
    const auto loss = to_host(ex, d_loss.v());
    const double tol = logits == lm_head_logits::input ? 1e-2 : 1e-4;  // bf16 logits: see check_case
    CHECK(testing::compare("losses (no gradients)", loss, loss_h, tol) < tol);
  }
  {  // row 5 out of range (loss NaN, dh row 0), row 6 = V - 1 fine
    targets(5) = std::int32_t(vocab);
    targets(6) = std::int32_t(vocab - 1);
    const auto d_t = to_device(ex, cv(targets));
    device_tensor<float> d_loss({n});
    device_tensor<bf16> d_dh({n, d});
    lm_head_cross_entropy(ex, d_h.v(), d_w.v(), d_t.v(), d_loss.v(), d_dh.v(), {}, 1.0f);
    const auto loss = to_host(ex, d_loss.v());
    const auto dh = to_host(ex, d_dh.v());
    CHECK(std::isnan(loss(5)));
    CHECK(std::isfinite(loss(6)));
    for (std::int64_t e = 0; e < d; ++e) REQUIRE(float(dh(5, e)) == 0.0f);
  }
}
