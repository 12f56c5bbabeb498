// primitives_demo: a least-squares fit driven end to end by subspace's primitives — RNG fills, GEMM in every
// transpose the backward pass needs, casts, axpy, reductions and the AdamW optimizer — on the host or on CUDA.
//
// The model is one weight matrix W [in, out] fitted to a random teacher: Y = X W* + noise, loss
// 0.5 |X W - Y|^2 / rows, gradient X^T (X W - Y) / rows. The loss must fall to the noise floor and W approach W*.
// This file compiles as C++ (host only) or, in a CUDA build, as CUDA (host and --device cuda).
#include <subspace/subspace.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <string>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"

namespace {

using namespace subspace;

struct options {
  std::string device = "auto";
  int steps = 300;
  int rows = 4096;
  int in = 256;
  int out = 128;
  float lr = 0.02f;
  float noise = 0.01f;
  std::uint64_t seed = 1;
  int threads = 0;
  int log_every = 25;
};

/// Element type of the activations and the working weights: fp32 on the host, bf16 on CUDA.
template <class Exec>
using act_t = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;

template <class Exec>
int run(const Exec& ex, const options& o, const char* device_name) {
  using S = space_of_t<Exec>;
  using A = act_t<Exec>;
  const std::int64_t rows = o.rows, in = o.in, out = o.out;
  std::printf("primitives_demo: device %s, X [%lld, %lld], W [%lld, %lld], %d AdamW steps\n", device_name,
              (long long)rows, (long long)in, (long long)in, (long long)out, o.steps);

  // Data: X ~ N(0, 1), teacher W* ~ N(0, 1/in), Y = X W* + noise.
  tensor<A, S> x({rows, in}), w_teacher({in, out});
  tensor<float, S> y({rows, out}), noise({rows, out});
  fill_normal(ex, x.v(), o.seed, 0);
  fill_normal(ex, w_teacher.v(), o.seed, 1, 0.0f, 1.0f / std::sqrt(float(in)));
  fill_normal(ex, noise.v(), o.seed, 2, 0.0f, o.noise);
  gemm(ex, op::none, op::none, 1.0f, x.v(), w_teacher.v(), 0.0f, y.v());
  axpy(ex, 1.0f, noise.v(), y.v());

  // Student: fp32 master weights start at zero. On CUDA the GEMMs read a bf16 working copy that the optimizer
  // writes in the same pass as the update; on the host they read the fp32 master weights directly.
  tensor<float, S> w({in, out}), grad({in, out}), residual({rows, out});
  tensor<A, S> w_work({in, out}), residual_act({rows, out});
  fill(ex, w.v(), 0.0f);
  cast(ex, w.v(), w_work.v());
  const auto weights = [&] {
    if constexpr (std::is_same_v<A, float>) return view<const float, S>(w.v());
    else return view<const A, S>(w_work.v());
  };

  optim::adamw opt;
  opt.weight_decay = 0.0f;  // a regression: nothing to decay
  const optim::param_info info{"W", w.shape(), false};
  auto state = opt.init(ex, info);

  const double flops_per_step = 2.0 * 2.0 * double(rows) * double(in) * double(out);
  const auto start = std::chrono::steady_clock::now();
  float loss = 0.0f;
  for (int step = 1; step <= o.steps; ++step) {
    // forward: residual = X W - Y; loss = 0.5 |residual|^2 / rows
    gemm(ex, op::none, op::none, 1.0f, x.v(), weights(), 0.0f, residual.v());
    axpy(ex, -1.0f, y.v(), residual.v());
    // backward: dL/dW = X^T residual / rows
    cast(ex, residual.v(), residual_act.v());
    gemm(ex, op::transpose, op::none, 1.0f / float(rows), x.v(), residual_act.v(), 0.0f, grad.v());
    const optim::step_context ctx{o.lr, step};
    if constexpr (std::is_same_v<A, bf16>) opt.step(ex, w.v(), grad.v(), state, info, ctx, w_work.v());
    else opt.step(ex, w.v(), grad.v(), state, info, ctx);
    if (step % o.log_every == 0 || step == 1 || step == o.steps) {
      loss = 0.5f * squared_norm(ex, residual.v()) / float(rows);  // synchronizes on CUDA
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::printf("step %5d  loss %.6f  grad_norm %.4e  %.2f ms/step  %.1f GFLOP/s\n", step, double(loss),
                  std::sqrt(double(squared_norm(ex, grad.v()))), 1e3 * secs / step, flops_per_step * step / secs / 1e9);
      std::fflush(stdout);
    }
  }

  // How close is the student to the teacher?
  tensor<float, S> diff({in, out});
  cast(ex, w_teacher.v(), diff.v());
  const double teacher_norm = std::sqrt(double(squared_norm(ex, diff.v())));
  axpy(ex, -1.0f, w.v(), diff.v());
  const double rel = std::sqrt(double(squared_norm(ex, diff.v()))) / teacher_norm;
  const double floor = 0.5 * double(o.noise) * o.noise * double(out);
  std::printf("final: loss %.6f (noise floor %.6f), |W - W*| / |W*| = %.4f\n", double(loss), floor, rel);
  if (!(rel < 0.1)) {
    std::fprintf(stderr, "primitives_demo: the fit did not converge (relative error %.4f >= 0.1)\n", rel);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  examples::cli cli("primitives_demo",
                    "Fits a random linear teacher with subspace's GEMM, element-wise kernels, reductions, RNG "
                    "and AdamW,\non the host or on a CUDA device. Exits non-zero if the fit does not converge.");
  cli.flag("device", o.device, "where to run: auto picks cuda when a GPU is present", {"auto", "host", "cuda"})
      .flag("steps", o.steps, "optimizer steps")
      .flag("rows", o.rows, "training examples (rows of X)")
      .flag("in", o.in, "input features (rows of W)")
      .flag("out", o.out, "outputs (columns of W)")
      .flag("lr", o.lr, "AdamW learning rate")
      .flag("noise", o.noise, "standard deviation of the label noise")
      .flag("seed", o.seed, "RNG seed for data and teacher")
      .flag("threads", o.threads, "host worker threads (0: all cores)")
      .flag("log-every", o.log_every, "print a progress line every N steps");
  return examples::guarded_main("primitives_demo", [&] {
    if (!cli.parse(argc, argv)) return 0;
    if (o.steps < 1 || o.rows < 1 || o.in < 1 || o.out < 1 || o.log_every < 1 || !(o.lr > 0) || !std::isfinite(o.lr))
      throw examples::cli_error("--steps, --rows, --in, --out and --log-every must be >= 1 and --lr > 0");
    examples::need_finite_non_negative("noise", o.noise);
    const examples::device_choice d = examples::choose_device(o.device);
#if defined(__CUDACC__)
    if (d.cuda) return run(exec::cuda{}, o, d.name.c_str());
#endif
    return run(exec::host{o.threads}, o, d.name.c_str());
  });
}
