// attention on CUDA against the float64 host reference on the same bf16 inputs: every head dim (16, 32, 64, 128),
// causal and not, GQA ratios 1/2/4, odd lengths (1, 37, 130, 1024), Skv != S, global-position offsets with rows that
// see no key, forward (out, lse) and backward (dq, dk, dv), head dims 64 and 128 through both kernel pairs
// (attention_kernel::fastest and portable); outputs are poisoned first so every element must be written. Then the
// context-parallel use: two KV blocks given as strided views, merged by lse, and their backward passes given the
// merged out/lse; head-major operands; and the argument errors. Failures print the first mismatching elements.
#include <doctest/doctest.h>

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <string_view>

#include <subspace/kernels/attention.hpp>

#include "support/attention_reference.hpp"
#include "support/cuda.hpp"
#include "support/numeric.hpp"

using namespace subspace;
using testing::attention_case;

namespace {

template <class T>
view<const T, host_space> cv(const host_tensor<T>& t) {
  return t.v();
}

/// Fills a device buffer with all-ones bytes: NaN in bf16 and fp32, so an element left unwritten shows.
template <class T>
void poison(const exec::cuda& ex, device_tensor<T>& t) {
  if (t.numel() > 0) cuda_check(cudaMemsetAsync(t.data(), 0xff, t.bytes(), ex.stream));
}

/// Positions [s0, s1) of dimension 1 of a [B, S, H, hd] device view.
template <class T>
view<T, device_space> seq_slice(view<T, device_space> x, std::int64_t s0, std::int64_t s1) {
  shape s = x.shape();
  s.dims[1] = s1 - s0;
  return view<T, device_space>(x.data() + s0 * x.stride(1), s, x.strides());
}

/// Tolerances: bf16 outputs and gradients (P and dS are rounded to bf16 before their products, as in FlashAttention)
/// against float64; lse (fp32 statistics) in absolute terms.
constexpr double out_tol = 1e-2, grad_tol = 1e-2, lse_tol = 2e-3;

/// Runs one case forward and backward on the device and on the host (double, same bf16 inputs) and checks everything.
void check_case(const exec::cuda& ex, const attention_case& c, std::uint64_t seed,
                attention_kernel kernel = attention_kernel::fastest) {
  const std::string_view kernel_name = kernel == attention_kernel::fastest ? "fastest" : "portable";
  CAPTURE(seed);
  CAPTURE(c.text());
  CAPTURE(kernel_name);
  attention_params p = c.params();
  p.kernel = kernel;
  const auto q = testing::random_tensor<bf16>(c.q_shape(), seed);
  const auto k = testing::random_tensor<bf16>(c.kv_shape(), seed + 1);
  const auto v = testing::random_tensor<bf16>(c.kv_shape(), seed + 2);
  const auto dout = testing::random_tensor<bf16>(c.q_shape(), seed + 3);

  // Host, in double on the same values.
  const auto qd = testing::to_double(q), kd = testing::to_double(k), vd = testing::to_double(v);
  const auto doutd = testing::to_double(dout);
  host_tensor<double> out_h(c.q_shape()), lse_h(c.lse_shape()), dq_h(c.q_shape()), dk_h(c.kv_shape()),
      dv_h(c.kv_shape());
  attention_forward(exec::host{}, cv(qd), cv(kd), cv(vd), out_h.v(), lse_h.v(), p);
  attention_backward(exec::host{}, cv(qd), cv(kd), cv(vd), cv(out_h), cv(lse_h), cv(doutd), dq_h.v(), dk_h.v(),
                     dv_h.v(), p);

  // Device.
  const auto dq_in = to_device(ex, cv(q)), dk_in = to_device(ex, cv(k)), dv_in = to_device(ex, cv(v));
  const auto ddout = to_device(ex, cv(dout));
  device_tensor<bf16> dout_buf(c.q_shape()), ddq(c.q_shape()), ddk(c.kv_shape()), ddv(c.kv_shape());
  device_tensor<float> dlse(c.lse_shape());
  poison(ex, dout_buf);
  poison(ex, dlse);
  poison(ex, ddq);
  poison(ex, ddk);
  poison(ex, ddv);
  attention_forward(ex, dq_in.v(), dk_in.v(), dv_in.v(), dout_buf.v(), dlse.v(), p);
  attention_backward(ex, dq_in.v(), dk_in.v(), dv_in.v(), view<const bf16, device_space>(dout_buf.v()),
                     view<const float, device_space>(dlse.v()), ddout.v(), ddq.v(), ddk.v(), ddv.v(), p);
  cuda_check(cudaStreamSynchronize(ex.stream));
  cuda_check(cudaGetLastError());
  const auto out = to_host(ex, dout_buf.v()), dq = to_host(ex, ddq.v()), dk = to_host(ex, ddk.v()),
             dv = to_host(ex, ddv.v());
  const auto lse = to_host(ex, dlse.v());

  const double e_out = testing::compare("out", out, out_h, out_tol);
  const double e_lse = testing::lse_error("lse", lse, lse_h, lse_tol);
  const double e_dq = testing::compare("dq", dq, dq_h, grad_tol);
  const double e_dk = testing::compare("dk", dk, dk_h, grad_tol);
  const double e_dv = testing::compare("dv", dv, dv_h, grad_tol);
  std::printf("  %-70s %-8s out %.1e  lse %.1e  dq %.1e  dk %.1e  dv %.1e\n", c.text().c_str(), kernel_name.data(),
              e_out, e_lse, e_dq, e_dk, e_dv);
  CHECK(e_out < out_tol);
  CHECK(e_lse <= lse_tol);
  CHECK(e_dq < grad_tol);
  CHECK(e_dk < grad_tol);
  CHECK(e_dv < grad_tol);
}

}  // namespace

TEST_CASE("attention (CUDA): forward and backward match the host for every head dim, mask, GQA ratio and length") {
  testing::stream_guard s;
  const exec::cuda ex{s.stream};
  for (const std::int64_t hd : {16, 32, 64, 128}) {
    const attention_case cases[] = {
        {2, 37, 37, 4, 4, hd, true},           // ratio 1, causal, odd length
        {1, 130, 130, 4, 2, hd, false},        // ratio 2, no mask, past one 128-row block
        {2, 1, 9, 4, 1, hd, true, 8, 0},       // ratio 4, one row (decoding) against 9 keys
        {1, 130, 77, 8, 2, hd, true, 0, 20},   // Skv != S; rows 0-19 see no key
        {1, 45, 200, 2, 1, hd, true, 150, 0},  // a later query block against every key (context parallel)
        {1, 37, 300, 2, 2, hd, false, 0, 0},   // many more keys than queries
        {1, 1024, 1024, 4, 2, hd, true},       // a training length
    };
    for (const attention_case& c : cases) {
      check_case(ex, c, testing::fresh_seed());
      // Head dims 64 and 128 have two kernel pairs on an H100 (attention_kernel): the other one too.
      if (hd >= 64) check_case(ex, c, testing::fresh_seed(), attention_kernel::portable);
    }
  }
  for (const attention_kernel kernel : {attention_kernel::fastest, attention_kernel::portable}) {
    check_case(ex, {1, 1024, 1024, 2, 2, 64, false}, testing::fresh_seed(), kernel);
    check_case(ex, {1, 16, 16, 2, 1, 64, true, 0, 100}, testing::fresh_seed(), kernel);    // nothing visible anywhere
    check_case(ex, {3, 300, 260, 4, 1, 128, true, 40, 0}, testing::fresh_seed(), kernel);  // partial tiles, GQA 4
  }
}

TEST_CASE("attention (CUDA): two KV blocks as strided views merge to the full attention, backward included") {
  testing::stream_guard s;
  const exec::cuda ex{s.stream};
  for (const std::int64_t hd : {32, 128}) {
    const attention_case c{2, 150, 150, 4, 2, hd, true};
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(c.text());
    const attention_params p = c.params();
    const auto q = testing::random_tensor<bf16>(c.q_shape(), seed);
    const auto k = testing::random_tensor<bf16>(c.kv_shape(), seed + 1);
    const auto v = testing::random_tensor<bf16>(c.kv_shape(), seed + 2);
    const auto dout = testing::random_tensor<bf16>(c.q_shape(), seed + 3);
    const auto qd = testing::to_double(q), kd = testing::to_double(k), vd = testing::to_double(v),
               doutd = testing::to_double(dout);
    host_tensor<double> out_h(c.q_shape()), lse_h(c.lse_shape()), dq_h(c.q_shape()), dk_h(c.kv_shape()),
        dv_h(c.kv_shape());
    attention_forward(exec::host{}, cv(qd), cv(kd), cv(vd), out_h.v(), lse_h.v(), p);
    attention_backward(exec::host{}, cv(qd), cv(kd), cv(vd), cv(out_h), cv(lse_h), cv(doutd), dq_h.v(), dk_h.v(),
                       dv_h.v(), p);

    const auto dq_in = to_device(ex, cv(q)), dk_in = to_device(ex, cv(k)), dv_in = to_device(ex, cv(v)),
               ddout = to_device(ex, cv(dout));
    const std::int64_t split = 72;  // a multiple of 8 rows keeps the second block's rows 16-byte aligned
    testing::attention_result part[2];
    for (int blk = 0; blk < 2; ++blk) {
      const std::int64_t s0 = blk == 0 ? 0 : split, s1 = blk == 0 ? split : c.seq_kv;
      attention_params pb = p;
      pb.kv_pos0 = s0;
      device_tensor<bf16> o(c.q_shape());
      device_tensor<float> l(c.lse_shape());
      attention_forward(ex, dq_in.v(), seq_slice(dk_in.v(), s0, s1), seq_slice(dv_in.v(), s0, s1), o.v(), l.v(), pb);
      const auto oh = to_host(ex, o.v());
      const auto lh = to_host(ex, l.v());
      part[blk] = {testing::to_double(oh), testing::to_double(lh)};
    }
    const auto merged = testing::merge(part[0], part[1]);
    CHECK(testing::compare("merged out", merged.out, out_h, out_tol) < out_tol);
    CHECK(testing::lse_error("merged lse", merged.lse, lse_h, lse_tol) <= lse_tol);

    // Backward per block, given the merged (here: the host's full) out and lse.
    host_tensor<bf16> out_b(c.q_shape());
    host_tensor<float> lse_f(c.lse_shape());
    for (std::int64_t i = 0; i < out_b.numel(); ++i) out_b.data()[i] = convert<bf16>(out_h.data()[i]);
    for (std::int64_t i = 0; i < lse_f.numel(); ++i) lse_f.data()[i] = float(lse_h.data()[i]);
    const auto d_out = to_device(ex, cv(out_b));
    const auto d_lse = to_device(ex, cv(lse_f));
    device_tensor<bf16> dq_part(c.q_shape()), dk_cat(c.kv_shape()), dv_cat(c.kv_shape());
    poison(ex, dk_cat);
    poison(ex, dv_cat);
    host_tensor<double> dq_sum(c.q_shape());
    for (std::int64_t i = 0; i < dq_sum.numel(); ++i) dq_sum.data()[i] = 0;
    for (int blk = 0; blk < 2; ++blk) {
      const std::int64_t s0 = blk == 0 ? 0 : split, s1 = blk == 0 ? split : c.seq_kv;
      attention_params pb = p;
      pb.kv_pos0 = s0;
      attention_backward(ex, dq_in.v(), seq_slice(dk_in.v(), s0, s1), seq_slice(dv_in.v(), s0, s1), d_out.v(),
                         d_lse.v(), ddout.v(), dq_part.v(), seq_slice(dk_cat.v(), s0, s1),
                         seq_slice(dv_cat.v(), s0, s1), pb);
      const auto dqh = to_host(ex, dq_part.v());
      for (std::int64_t i = 0; i < dq_sum.numel(); ++i) dq_sum.data()[i] += double(dqh.data()[i]);
    }
    CHECK(testing::compare("dq (sum of the blocks)", dq_sum, dq_h, grad_tol) < grad_tol);
    CHECK(testing::compare("dk (blocks side by side)", to_host(ex, dk_cat.v()), dk_h, grad_tol) < grad_tol);
    CHECK(testing::compare("dv (blocks side by side)", to_host(ex, dv_cat.v()), dv_h, grad_tol) < grad_tol);
  }
}

TEST_CASE("attention (CUDA): head-major operands ([B, H, S, hd] memory seen as [B, S, H, hd]) match the host") {
  // Strides that are not a packed [B, S, H, hd]: the Hopper kernel's TMA maps take them or the mma.sync kernel
  // runs; either way the result is the host's.
  testing::stream_guard s;
  const exec::cuda ex{s.stream};
  for (const std::int64_t hd : {64, 128}) {
    const attention_case c{2, 200, 200, 4, 2, hd, true};
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    CAPTURE(c.text());
    const auto q = testing::random_tensor<bf16>(c.q_shape(), seed);
    const auto k = testing::random_tensor<bf16>(c.kv_shape(), seed + 1);
    const auto v = testing::random_tensor<bf16>(c.kv_shape(), seed + 2);
    host_tensor<double> out_h(c.q_shape()), lse_h(c.lse_shape());
    attention_forward(exec::host{}, cv(testing::to_double(q)), cv(testing::to_double(k)), cv(testing::to_double(v)),
                      out_h.v(), lse_h.v(), c.params());
    // Head-major copies on the device, viewed with the [B, S, H, hd] extents.
    const auto head_major = [&](const host_tensor<bf16>& x) {
      const std::int64_t B = x.shape().dims[0], S = x.shape().dims[1], H = x.shape().dims[2];
      host_tensor<bf16> hm(shape{B, H, S, hd});
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t i = 0; i < S; ++i)
          for (std::int64_t h = 0; h < H; ++h)
            for (std::int64_t e = 0; e < hd; ++e)
              hm.data()[((b * H + h) * S + i) * hd + e] = x.data()[((b * S + i) * H + h) * hd + e];
      return to_device(ex, cv(hm));
    };
    const auto dq = head_major(q), dk = head_major(k), dv = head_major(v);
    const auto as_bsh = [&](const device_tensor<bf16>& t) {
      const shape hm = t.shape();
      return view<const bf16, device_space>(t.data(), shape{hm.dims[0], hm.dims[2], hm.dims[1], hd},
                                            {hm.dims[1] * hm.dims[2] * hd, hd, hm.dims[2] * hd, 1});
    };
    device_tensor<bf16> out(c.q_shape());
    device_tensor<float> lse(c.lse_shape());
    poison(ex, out);
    poison(ex, lse);
    attention_forward(ex, as_bsh(dq), as_bsh(dk), as_bsh(dv), out.v(), lse.v(), c.params());
    CHECK(testing::compare("out", to_host(ex, out.v()), out_h, out_tol) < out_tol);
    CHECK(testing::lse_error("lse", to_host(ex, lse.v()), lse_h, lse_tol) <= lse_tol);
  }
}

TEST_CASE("attention (CUDA): unsupported head dims and misaligned rows are refused with a clear message") {
  testing::stream_guard s;
  const exec::cuda ex{s.stream};
  device_tensor<bf16> q({1, 4, 2, 48}), k({1, 4, 2, 48}), out({1, 4, 2, 48});
  device_tensor<float> lse({1, 2, 4});
  CHECK_THROWS_WITH_AS(attention_forward(ex, q.v(), k.v(), k.v(), out.v(), lse.v(), attention_params{0.1f}),
                       doctest::Contains("head dim 48 is not supported (16, 32, 64 or 128)"), invalid_argument);
  device_tensor<bf16> big({1, 4, 2, 68}), q2({1, 4, 2, 64}), out2({1, 4, 2, 64});
  const view<const bf16, device_space> k_odd(big.data() + 1, {1, 4, 2, 64}, {4 * 2 * 68, 2 * 68, 68, 1});
  CHECK_THROWS_WITH_AS(attention_forward(ex, q2.v(), k_odd, k_odd, out2.v(), lse.v(), attention_params{0.1f}),
                       doctest::Contains("k of shape [1, 4, 2, 64] with strides [544, 136, 68, 1] needs unit stride"),
                       invalid_argument);
  device_tensor<float> lse_bad({1, 4, 2});
  CHECK_THROWS_WITH_AS(attention_forward(ex, q2.v(), q2.v(), q2.v(), out2.v(), lse_bad.v(), attention_params{0.1f}),
                       doctest::Contains("attention_forward: lse [B, Hq, S] has shape [1, 4, 2], expected [1, 2, 4]"),
                       invalid_argument);
}
