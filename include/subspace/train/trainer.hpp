#pragma once
// train::trainer<Model, Optimizer>: single-device training of a model with the llama interface — gradient
// accumulation, global gradient-norm clipping, the learning-rate schedule, fp32 master weights, one optimizer
// state per parameter, evaluation, and checkpoints that resume exactly.
//
//   train::trainer t(nn::llama<exec::host, float>(cfg, exec::host{}), optim::adamw{}, options);
//   t.init(seed);                                  // or t.load_weights(hf_dir) / t.resume(checkpoint_dir, loader)
//   auto r = t.step(train_loader);                 // accumulation micro-batches, clip, one optimizer step
//   double val = t.evaluate(val_loader, 20);
//   t.save(dir, loader.position());
//
// One step: zero the gradients; for each of `accumulation` micro-batches, forward with loss_scale 1/accumulation
// and backward (so the gradients are those of the mean loss over the step's tokens); the global L2 norm of every
// gradient, clipped to `clip` when it exceeds it; then the optimizer updates every parameter at the schedule's
// learning rate. A non-finite gradient norm skips the update (the weights stay as they were) and the result says
// so — the caller decides whether to stop.
//
// Master weights: a model whose weights are fp32 (the host reference) is its own master copy. A model with 16-bit
// weights (CUDA's bf16) gets fp32 masters beside it; the optimizer updates the masters and writes the bf16
// working copy into the model in the same pass. Checkpoints hold the masters (io::with_values), so a bf16 run
// resumes from fp32 weights, and load_weights reads any checkpoint or Hugging Face file into the masters.
//
// Exact resume: the step count, tokens, the optimizer states (moments, projectors, counters), the masters and the
// training loader's position are saved; the learning rate follows from the step. On the host the continued run is
// bit-identical to an uninterrupted one (the host kernels are deterministic for a given thread count).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../data/loader.hpp"
#include "../io/checkpoint.hpp"
#include "../kernels/elementwise.hpp"
#include "../nn/llama.hpp"
#include "../optim/concepts.hpp"
#include "../optim/schedule.hpp"

namespace subspace::train {

struct trainer_options {
  std::int64_t accumulation = 1;  // micro-batches per optimizer step
  double clip = 1.0;              // global gradient-norm clip; <= 0 disables it
  optim::lr_schedule schedule{};  // the learning rate of every step

  /// Throws invalid_argument naming the field and the expected value.
  void validate() const {
    require(accumulation >= 1, "trainer: accumulation must be >= 1, got " + std::to_string(accumulation));
    require(!std::isnan(clip), "trainer: clip is NaN (expected a number; <= 0 disables clipping)");
    schedule.validate();
  }
};

/// What one optimizer step did.
struct step_result {
  std::int64_t step = 0;     // 1-based: the step just taken
  double loss = 0;           // mean training loss over the step's micro-batches
  double grad_norm = 0;      // global L2 norm before clipping
  float lr = 0;              // the learning rate used
  std::int64_t tokens = 0;   // tokens in this step (batch · seq · accumulation)
  bool skipped = false;      // the gradient norm was not finite: no update
};

/// What the trainer needs from a model: the llama interface (nn/llama.hpp).
template <class M>
concept TrainableModel = requires(M& m, view<const std::int32_t, host_space> tokens) {
  typename M::executor_type;
  typename M::value_type;
  { m.config() } -> std::convertible_to<const nn::llama_config&>;
  { m.forward(tokens, tokens, 1.0f) } -> std::convertible_to<double>;
  { m.evaluate(tokens, tokens) } -> std::convertible_to<double>;
  m.backward();
  m.zero_grad();
  m.init(std::uint64_t{});
};

template <class Model, class Optimizer>
class trainer {
  static_assert(TrainableModel<Model>,
                "train::trainer<Model, Optimizer>: Model must provide the llama interface — executor_type, "
                "value_type, config(), forward(tokens, targets, loss_scale), evaluate(tokens, targets), backward(), "
                "zero_grad(), init(seed), for_each_parameter(f) (see nn/llama.hpp)");
  static_assert(check_optimizer<Optimizer>());

 public:
  using model_type = Model;
  using executor_type = typename Model::executor_type;
  using space = space_of_t<executor_type>;
  using value_type = typename Model::value_type;
  using state_type = optim::state_t<Optimizer, executor_type>;
  /// Whether the model's weights are fp32 and serve as the master copy (else fp32 masters live beside them).
  static constexpr bool model_is_master = std::is_same_v<value_type, float>;

  trainer(Model model, Optimizer optimizer, trainer_options options)
      : model_(std::move(model)), optimizer_(std::move(optimizer)), o_(std::move(options)) {
    o_.validate();
    static_assert(model_is_master || std::is_same_v<value_type, bf16>,
                  "train::trainer: the model's weights must be fp32 (their own masters) or bf16 (with fp32 masters)");
    const executor_type& ex = model_.executor();
    model_.for_each_parameter([&](const std::string&, auto value, auto, const optim::param_info& info) {
      infos_.push_back(info);
      if constexpr (!model_is_master) masters_.emplace_back(value.shape());
      states_.push_back(optimizer_.init(ex, info));
    });
  }

  Model& model() { return model_; }
  const Optimizer& optimizer() const { return optimizer_; }
  const trainer_options& options() const { return o_; }
  std::int64_t steps_done() const { return step_; }
  std::int64_t tokens_done() const { return tokens_; }
  /// The optimizer states, one per parameter in for_each_parameter order.
  std::vector<state_type>& states() { return states_; }
  const std::vector<state_type>& states() const { return states_; }

  /// Bytes of every optimizer state (masters not included).
  std::size_t optimizer_state_bytes() const {
    std::size_t total = 0;
    for (const auto& s : states_) total += optimizer_.state_bytes(s);
    return total;
  }
  /// Bytes of the fp32 master weights kept beside a 16-bit model (0 when the model is its own master).
  std::size_t master_bytes() const {
    std::size_t total = 0;
    for (const auto& m : masters_) total += m.bytes();
    return total;
  }

  /// Initialises the weights from the Philox streams of `seed` (nn::llama::init); the masters get the same
  /// values before their rounding to the model's type.
  void init(std::uint64_t seed) {
    model_.init(seed);
    if constexpr (!model_is_master) {
      const auto& specs = model_.parameter_specs();
      for (std::size_t i = 0; i < masters_.size(); ++i)
        nn::fill_initial(model_.executor(), masters_[i].v(), specs[i], seed);
    }
  }

  /// Loads initial weights (a checkpoint's or Hugging Face's model.safetensors, or its directory) into the
  /// masters and the model; see io::load_weights.
  void load_weights(const std::filesystem::path& path, const io::load_options& lo = {}) {
    with_parameters([&](auto& params) { io::load_weights(model_.executor(), path, params, lo); });
    sync_model();
  }

  /// One optimizer step on `accumulation` batches from `loader` (see the top of this file).
  step_result step(data::batch_loader& loader) {
    const executor_type& ex = model_.executor();
    batch_buffers(loader);
    model_.zero_grad();
    const float scale = float(1.0 / double(o_.accumulation));
    double loss = 0;
    for (std::int64_t micro = 0; micro < o_.accumulation; ++micro) {
      loader.next(tokens_buf_.v(), targets_buf_.v());
      loss += model_.forward(tokens_buf_.v(), targets_buf_.v(), scale);
      model_.backward();
    }
    step_result r;
    r.step = step_ + 1;
    r.loss = loss / double(o_.accumulation);
    r.tokens = tokens_buf_.numel() * o_.accumulation;
    r.lr = o_.schedule.at(r.step);
    r.grad_norm = optim::clip_grad_norm(ex, gradients(), o_.clip);
    r.skipped = !std::isfinite(r.grad_norm);
    if (!r.skipped) update(optim::step_context{r.lr, r.step});
    step_ = r.step;
    tokens_ += r.tokens;
    return r;
  }

  /// The mean loss over `batches` batches of `loader` from its start (at most the batches one epoch holds): the
  /// same batches every call, so evaluations are comparable. The loader is left at its start.
  double evaluate(data::batch_loader& loader, std::int64_t batches) {
    require(batches >= 1, "trainer::evaluate: batches must be >= 1, got " + std::to_string(batches));
    const auto per_epoch = std::int64_t(loader.position().windows / std::uint64_t(loader.options().batch));
    const std::int64_t n = std::min(batches, per_epoch);
    batch_buffers(loader);
    loader.reset();
    double total = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      loader.next(tokens_buf_.v(), targets_buf_.v());
      total += model_.evaluate(tokens_buf_.v(), targets_buf_.v());
    }
    loader.reset();
    return total / double(n);
  }

  /// Writes a checkpoint of everything exact resume needs (io/checkpoint.hpp) into `dir`; `extra` is kept in
  /// trainer_state.json for the caller (e.g. wall time).
  void save(const std::filesystem::path& dir, const data::loader_position& train_position, std::uint64_t seed,
            io::json extra = io::json::object(), const io::hf_config_options& config = {}) {
    io::trainer_state ts;
    ts.step = step_;
    ts.tokens = tokens_;
    ts.seed = seed;
    ts.train_data = train_position;
    ts.extra = std::move(extra);
    with_parameters([&](auto& params) {
      io::save_checkpoint(model_.executor(), dir, model_.config(), params, states_, ts, config);
    });
  }

  /// Restores a checkpoint written by save() for the same model and optimizer, positions `loader` where the saved
  /// run stopped, and returns the saved trainer state (its extra values, seed, ...).
  io::trainer_state resume(const std::filesystem::path& dir, data::batch_loader& loader) {
    io::trainer_state ts;
    with_parameters(
        [&](auto& params) { ts = io::load_checkpoint(model_.executor(), dir, model_.config(), params, states_); });
    sync_model();
    loader.seek(ts.train_data);
    step_ = ts.step;
    tokens_ = ts.tokens;
    return ts;
  }

 private:
  /// Calls f(params) with the parameters as checkpoints see them: the masters in place of 16-bit model values.
  template <class F>
  void with_parameters(F&& f) {
    if constexpr (model_is_master) {
      f(model_);
    } else {
      auto params = io::with_values(model_, masters_);
      f(params);
    }
  }

  /// The model's working copy from the masters (after a load).
  void sync_model() {
    if constexpr (!model_is_master) {
      std::size_t i = 0;
      model_.for_each_parameter([&](const std::string&, auto value, auto, const optim::param_info&) {
        cast(model_.executor(), view<const float, space>(masters_[i++].v()), value);
      });
    }
  }

  std::vector<view<typename Model::grad_type, space>> gradients() {
    std::vector<view<typename Model::grad_type, space>> out;
    model_.for_each_parameter([&](const std::string&, auto, auto grad, const optim::param_info&) {
      out.push_back(grad);
    });
    return out;
  }

  void update(const optim::step_context& ctx) {
    const executor_type& ex = model_.executor();
    std::size_t i = 0;
    model_.for_each_parameter([&](const std::string&, auto value, auto grad, const optim::param_info& info) {
      const view<const typename Model::grad_type, space> g = grad;
      if constexpr (model_is_master) optimizer_.step(ex, value, g, states_[i], info, ctx);
      else optimizer_.step(ex, masters_[i].v(), g, states_[i], info, ctx, value);
      ++i;
    });
  }

  void batch_buffers(const data::batch_loader& loader) {
    const shape s{loader.options().batch, loader.options().seq};
    if (tokens_buf_.shape() == s) return;
    tokens_buf_ = host_tensor<std::int32_t>(s);
    targets_buf_ = host_tensor<std::int32_t>(s);
  }

  Model model_;
  Optimizer optimizer_;
  trainer_options o_;
  std::vector<optim::param_info> infos_;
  std::vector<tensor<float, space>> masters_;  // empty when the model is its own master
  std::vector<state_type> states_;
  host_tensor<std::int32_t> tokens_buf_, targets_buf_;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace subspace::train
