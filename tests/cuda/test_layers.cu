// The Llama layer kernels on CUDA (embedding, RMSNorm, RoPE, SwiGLU) against the host reference run in double on
// the same inputs (the inputs are rounded to the device type first, so only the device's arithmetic and its
// rounding of the outputs are measured): bf16 within bf16 tolerance, fp32 within fp32 tolerance. Sizes cover the
// 16-byte pack path, the element-by-element path, grid-stride loops and the shared-memory opt-in of the RMSNorm
// backward.
#include <doctest/doctest.h>

#include <cstdint>
#include <string>
#include <vector>

#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/embedding.hpp>
#include <subspace/kernels/norm.hpp>
#include <subspace/kernels/rope.hpp>
#include <subspace/kernels/swiglu.hpp>

#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;

namespace {

const exec::host hx{};

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

/// x rounded to T and back to double (in place), so the host reference sees exactly the device's inputs.
template <class T>
void round_to(host_tensor<double>& x) {
  for (std::int64_t i = 0; i < x.numel(); ++i) x.data()[i] = double(convert<T>(x.data()[i]));
}

/// A device tensor of T holding x (x must already be representable, see round_to).
template <class T>
device_tensor<T> upload(const exec::cuda& ex, const host_tensor<double>& x) {
  host_tensor<T> h(x.shape());
  cast(hx, cv(x), h.v());
  device_tensor<T> d(x.shape());
  copy(ex, cv(h), d.v());
  ex.synchronize();
  return d;
}

/// A host double copy of a device tensor.
template <class T>
host_tensor<double> download(const exec::cuda& ex, const device_tensor<T>& d) {
  const auto h = to_host(ex, d.v());
  host_tensor<double> out(d.shape());
  cast(hx, cv(h), out.v());
  return out;
}

template <class T>
constexpr double tolerance() {
  return std::is_same_v<T, float> ? 2e-5 : 1e-2;
}

std::int32_t token_at(std::uint64_t seed, std::int64_t i, std::int64_t vocab) {
  return std::int32_t(rng::bits4(seed, 7, std::uint64_t(i)).v[0] % std::uint32_t(vocab));
}

template <class F>
void for_each_type(F&& f) {
  f.template operator()<bf16>();
  f.template operator()<float>();
}

}  // namespace

TEST_CASE("embedding (CUDA): forward is exact, backward accumulates like the host, bad tokens throw") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  for_each_type([&]<class T>() {
    for (const std::int64_t d : {64, 1003}) {  // packed rows and element-by-element rows
      const auto seed = testing::fresh_seed();
      CAPTURE(seed);
      CAPTURE(d);
      const std::int64_t n = 777, vocab = 50;
      host_tensor<std::int32_t> tokens({n});
      for (std::int64_t i = 0; i < n; ++i) tokens(i) = token_at(seed, i, vocab);
      auto table = testing::random_tensor<double>({vocab, d}, seed + 1);
      auto dout = testing::random_tensor<double>({n, d}, seed + 2);
      auto dtable = testing::random_tensor<double>({vocab, d}, seed + 3);
      round_to<T>(table);
      round_to<T>(dout);
      round_to<float>(dtable);

      host_tensor<double> out({n, d});
      embedding_forward(hx, cv(tokens), cv(table), out.v());
      host_tensor<double> dtable_host({vocab, d});
      copy(hx, cv(dtable), dtable_host.v());
      embedding_backward(hx, cv(tokens), cv(dout), dtable_host.v());

      auto tok_d = to_device(ex, cv(tokens));
      auto table_d = upload<T>(ex, table);
      auto dout_d = upload<T>(ex, dout);
      auto dtable_d = upload<float>(ex, dtable);
      device_tensor<T> out_d({n, d});
      embedding_forward(ex, view<const std::int32_t, device_space>(tok_d.v()), table_d.v(), out_d.v());
      embedding_backward(ex, view<const std::int32_t, device_space>(tok_d.v()), dout_d.v(), dtable_d.v());
      CHECK(testing::rel_error(cv(download(ex, out_d)), cv(out)) == 0.0);
      CHECK(testing::rel_error(cv(download(ex, dtable_d)), cv(dtable_host)) < 1e-6);
    }
  });

  host_tensor<std::int32_t> tokens({5});
  for (std::int64_t i = 0; i < 5; ++i) tokens(i) = std::int32_t(i);
  tokens(3) = 9;
  auto tok_d = to_device(ex, cv(tokens));
  device_tensor<bf16> table({8, 16}), out({5, 16});
  device_tensor<float> dtable({8, 16});
  fill(ex, table.v(), bf16(1.0f));
  fill(ex, dtable.v(), 0.0f);
  try {
    embedding_forward(ex, view<const std::int32_t, device_space>(tok_d.v()), table.v(), out.v());
    FAIL("expected invalid_argument");
  } catch (const invalid_argument& e) {
    const std::string what = e.what();
    CAPTURE(what);
    CHECK(what.find("token 9 at position 3") != std::string::npos);
  }
  CHECK_THROWS_AS(embedding_backward(ex, view<const std::int32_t, device_space>(tok_d.v()), out.v(), dtable.v()),
                  invalid_argument);
}

TEST_CASE("rmsnorm (CUDA): forward and backward against the host in double") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  for_each_type([&]<class T>() {
    struct dims {
      std::int64_t n, d;
    };
    // bf16 rows (fp32 in brackets) held in registers: the forward by one warp with 1, 2, 4 and 8 packs a lane
    // (64, 512, 768, 2048 [64-1024]) and by 2-8 warps (4096, 16384 [2048, 4096]), the backward by 1, 2, 4 and 8
    // warps of 1 or 2 packs (64-4096 [64-2048]) and by 4-8 warps of 8 packs (16384 [4096]); 16384 fp32 streamed;
    // odd rows (element path: 4 warps of 8 at 1001, streamed at 4097); many rows (grid-stride); rows streamed past
    // 48 KiB of fp32 dweight (20000).
    for (const dims sz : {dims{37, 64}, dims{300, 512}, dims{129, 768}, dims{65, 2048}, dims{33, 4096}, dims{19, 1001},
                          dims{5, 4097}, dims{4099, 128}, dims{6, 16384}, dims{3, 20000}}) {
      const auto seed = testing::fresh_seed();
      CAPTURE(seed);
      CAPTURE(sz.n);
      CAPTURE(sz.d);
      auto x = testing::random_tensor<double>({sz.n, sz.d}, seed, 0.2f, 2.0f);
      auto w = testing::random_tensor<double>({sz.d}, seed + 1, 1.0f, 0.3f);
      auto dy = testing::random_tensor<double>({sz.n, sz.d}, seed + 2);
      auto dw = testing::random_tensor<double>({sz.d}, seed + 3);
      round_to<T>(x);
      round_to<T>(w);
      round_to<T>(dy);
      round_to<float>(dw);

      host_tensor<double> y({sz.n, sz.d}), rstd({sz.n}), dx({sz.n, sz.d}), dw_host({sz.d});
      copy(hx, cv(dw), dw_host.v());
      rmsnorm_forward(hx, cv(x), cv(w), 1e-5f, y.v(), rstd.v());
      rmsnorm_backward(hx, cv(x), cv(w), cv(rstd), cv(dy), dx.v(), dw_host.v());

      auto x_d = upload<T>(ex, x);
      auto w_d = upload<T>(ex, w);
      auto dy_d = upload<T>(ex, dy);
      auto dw_d = upload<float>(ex, dw);
      device_tensor<T> y_d({sz.n, sz.d}), dx_d({sz.n, sz.d});
      device_tensor<float> rstd_d({sz.n});
      rmsnorm_forward(ex, x_d.v(), w_d.v(), 1e-5f, y_d.v(), rstd_d.v());
      rmsnorm_backward(ex, x_d.v(), w_d.v(), rstd_d.v(), dy_d.v(), dx_d.v(), dw_d.v());
      CHECK(testing::rel_error(cv(download(ex, rstd_d)), cv(rstd)) < 1e-5);  // fp32 sums of up to 16384 squares
      CHECK(testing::rel_error(cv(download(ex, y_d)), cv(y)) < tolerance<T>());
      CHECK(testing::rel_error(cv(download(ex, dx_d)), cv(dx)) < tolerance<T>());
      CHECK(testing::rel_error(cv(download(ex, dw_d)), cv(dw_host)) < 1e-4);  // fp32 sums over up to 4099 rows

      // beta 1: the input gradient added to a residual stream's, rounded once.
      auto stream = testing::random_tensor<double>({sz.n, sz.d}, seed + 4);
      round_to<T>(stream);
      host_tensor<double> added({sz.n, sz.d});
      copy(hx, cv(stream), added.v());
      rmsnorm_backward(hx, cv(x), cv(w), cv(rstd), cv(dy), added.v(), dw_host.v(), 1.0f);
      auto added_d = upload<T>(ex, stream);
      rmsnorm_backward(ex, x_d.v(), w_d.v(), rstd_d.v(), dy_d.v(), added_d.v(), dw_d.v(), 1.0f);
      CHECK(testing::rel_error(cv(download(ex, added_d)), cv(added)) < tolerance<T>());
      CHECK(testing::rel_error(cv(download(ex, dw_d)), cv(dw_host)) < 1e-4);
    }
  });
}

TEST_CASE("rope (CUDA): forward and inverse rotations against the host in double") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  for_each_type([&]<class T>() {
    struct dims {
      std::int64_t b, s, h, hd, pos0;
    };
    // hd/2 = 64 (packed), hd/2 = 3 (element path), a position offset, Llama 3.1 scaling on the last.
    for (const dims sz : {dims{2, 33, 4, 128, 0}, dims{3, 17, 5, 6, 1000}, dims{1, 300, 2, 64, 7000}}) {
      const auto seed = testing::fresh_seed();
      CAPTURE(seed);
      CAPTURE(sz.hd);
      rope_config cfg;
      cfg.llama31_scaling = sz.pos0 == 7000;
      const auto f = rope_inv_freq(cfg, sz.hd);
      host_tensor<float> inv({sz.hd / 2});
      for (std::int64_t i = 0; i < sz.hd / 2; ++i) inv(i) = f[std::size_t(i)];
      auto inv_d = to_device(ex, cv(inv));
      auto x = testing::random_tensor<double>({sz.b, sz.s, sz.h, sz.hd}, seed);
      round_to<T>(x);
      for (const bool inverse : {false, true}) {
        CAPTURE(inverse);
        host_tensor<double> want({sz.b, sz.s, sz.h, sz.hd});
        copy(hx, cv(x), want.v());
        rope_apply(hx, want.v(), cv(inv), sz.pos0, inverse);
        auto x_d = upload<T>(ex, x);
        rope_apply(ex, x_d.v(), view<const float, device_space>(inv_d.v()), sz.pos0, inverse);
        // The device forms the angle in fp32 (as Hugging Face does), the reference in double: at positions of
        // several thousand the fp32 angle carries up to ~4e-4 rad of rounding at the highest frequency.
        CHECK(testing::rel_error(cv(download(ex, x_d)), cv(want)) < (std::is_same_v<T, float> ? 5e-4 : tolerance<T>()));
      }
    }
  });
}

TEST_CASE("swiglu (CUDA): forward and backward against the host in double, in place too") {
  testing::stream_guard sg;
  const exec::cuda ex{sg.stream};
  for_each_type([&]<class T>() {
    for (const std::int64_t n : {std::int64_t(5), std::int64_t(4096 * 3 + 5), std::int64_t(1 << 20)}) {
      const auto seed = testing::fresh_seed();
      CAPTURE(seed);
      CAPTURE(n);
      auto gate = testing::random_tensor<double>({n, 1}, seed, 0.0f, 3.0f);
      auto up = testing::random_tensor<double>({n, 1}, seed + 1);
      auto dh = testing::random_tensor<double>({n, 1}, seed + 2);
      round_to<T>(gate);
      round_to<T>(up);
      round_to<T>(dh);
      host_tensor<double> h({n, 1}), dg({n, 1}), du({n, 1});
      swiglu_forward(hx, cv(gate), cv(up), h.v());
      swiglu_backward(hx, cv(gate), cv(up), cv(dh), dg.v(), du.v());

      auto g_d = upload<T>(ex, gate);
      auto u_d = upload<T>(ex, up);
      auto dh_d = upload<T>(ex, dh);
      device_tensor<T> h_d({n, 1}), dg_d({n, 1}), du_d({n, 1});
      swiglu_forward(ex, g_d.v(), u_d.v(), h_d.v());
      swiglu_backward(ex, g_d.v(), u_d.v(), dh_d.v(), dg_d.v(), du_d.v());
      CHECK(testing::rel_error(cv(download(ex, h_d)), cv(h)) < tolerance<T>());
      CHECK(testing::rel_error(cv(download(ex, dg_d)), cv(dg)) < tolerance<T>());
      CHECK(testing::rel_error(cv(download(ex, du_d)), cv(du)) < tolerance<T>());
      // In place: the gradients overwrite gate and up, and match the out-of-place results bit for bit.
      swiglu_backward(ex, g_d.v(), u_d.v(), dh_d.v(), g_d.v(), u_d.v());
      CHECK(testing::rel_error(cv(download(ex, g_d)), cv(download(ex, dg_d))) == 0.0);
      CHECK(testing::rel_error(cv(download(ex, u_d)), cv(download(ex, du_d))) == 0.0);
      // The backward's recomputed h, written over dh: the forward's bits.
      auto g2_d = upload<T>(ex, gate);
      auto u2_d = upload<T>(ex, up);
      swiglu_backward(ex, g2_d.v(), u2_d.v(), dh_d.v(), dg_d.v(), du_d.v(), dh_d.v());
      CHECK(testing::rel_error(cv(download(ex, dh_d)), cv(download(ex, h_d))) == 0.0);
    }
  });
}
