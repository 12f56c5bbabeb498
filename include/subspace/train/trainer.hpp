#pragma once
// train::trainer<Model, Stack>: single-device training — gradient accumulation, global gradient-norm clipping,
// the learning-rate schedule, fp32 master weights, one optimizer state per parameter, evaluation, and
// checkpoints that resume exactly.
//
//   train::trainer t(nn::llama<exec::host, float>(cfg, exec::host{}),
//                    subspace::stack{.scheduler = schedule::gradient_accumulation{4}, .optimizer = optim::adamw{}},
//                    options);
//   t.init(seed);                                  // or t.load_weights(hf_dir) / t.resume(checkpoint_dir, loader)
//   auto r = t.step(train_loader);                 // the scheduler's micro-batches, clip, one optimizer step
//   double val = t.evaluate(val_loader, 20);
//   t.save(dir, loader.position(), seed);
//
// The stack's policies: the scheduler's plan (schedule::gradient_accumulation{M}: M micro-batches, then the
// step) runs on the plan engine (train/engine.hpp), which scales each micro-batch's loss by 1/M so the gradients
// are those of the mean loss; the optimizer updates every parameter; the compressor sits at the boundaries of a
// model given as several local stages (compress::identity for a plain model) and declares its trainable tensors
// in the stages' store at construction, so they are initialised, stepped, clipped and checkpointed with the
// model's; the communicator is comm::self (one rank). The step: zero the gradients, run the plan, take the global
// L2 norm of every gradient, then the optimizer at the schedule's learning rate with the gradients clipped to
// `clip` when the norm exceeds it (AdamW scales each gradient as it reads it; for other optimizers the replica
// scales them in memory first), then the model's after_step hooks. A non-finite gradient norm skips the update
// (the weights stay as they were) and the result says so.
//
// Master weights (train::replica, replica.hpp): a model whose weights are fp32 (the host reference) is its own
// master copy. A model with bf16 weights (CUDA) gets fp32 masters beside it; the optimizer updates the masters and
// writes the bf16 working copy into the model in the same pass. Checkpoints hold the masters (io::with_values),
// so a bf16 run resumes from fp32 weights, and load_weights reads any checkpoint or Hugging Face file into the
// masters.
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

#include "../comm/self.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"
#include "../data/loader.hpp"
#include "../io/checkpoint.hpp"
#include "../kernels/elementwise.hpp"
#include "../nn/concepts.hpp"
#include "../optim/concepts.hpp"
#include "../optim/schedule.hpp"
#include "../policies.hpp"
#include "../schedule/gradient_accumulation.hpp"
#include "engine.hpp"
#include "replica.hpp"

namespace subspace::train {

struct trainer_options {
  double clip = 1.0;              // global gradient-norm clip; <= 0 disables it
  optim::lr_schedule schedule{};  // the learning rate of every step

  /// Throws invalid_argument naming the field and the expected value.
  void validate() const {
    require(!std::isnan(clip), "trainer: clip is NaN (expected a number; <= 0 disables clipping)");
    schedule.validate();
  }
};

/// What one optimizer step did.
struct step_result {
  std::int64_t step = 0;    // 1-based: the step just taken
  double loss = 0;          // mean training loss over the step's micro-batches
  double grad_norm = 0;     // global L2 norm before clipping
  float lr = 0;             // the learning rate used
  std::int64_t tokens = 0;  // tokens in this step (batch · seq · accumulation)
  bool skipped = false;     // the gradient norm was not finite: no update
};

template <class Model, class Stack>
class trainer {
  static_assert(check_stack<Stack>());
  static_assert(nn::check_model<Model>());
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(Stack::communicator)>, comm::self>,
                "train::trainer: the communicator of a single-device stack is comm::self (distributed trainers "
                "take the others)");
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(Stack::scheduler)>, schedule::gradient_accumulation>,
                "train::trainer: the scheduler of a single-device stack is schedule::gradient_accumulation{M}");

 public:
  using model_type = Model;
  using stack_type = Stack;
  using optimizer_type = std::remove_cvref_t<decltype(Stack::optimizer)>;
  using compressor_type = std::remove_cvref_t<decltype(Stack::compressor)>;
  using replica_type = replica<Model, optimizer_type>;
  using executor_type = typename Model::executor_type;
  using space = space_of_t<executor_type>;
  using value_type = typename Model::value_type;
  using state_type = optim::state_t<optimizer_type, executor_type>;
  /// Whether the model's weights are fp32 and serve as the master copy (else fp32 masters live beside them).
  static constexpr bool model_is_master = !replica_type::separate_masters;

  trainer(Model model, Stack stack, trainer_options options)
      : trainer(as_stages(std::move(model)), std::move(stack), std::move(options)) {}
  /// A model given as the stages of one rank, in order, sharing one parameter store; the stack's compressor
  /// runs at each boundary between them (its tensors are declared in the store before the replica allocates it).
  trainer(std::vector<Model> stages, Stack stack, trainer_options options)
      : stack_(std::move(stack)),
        r_(std::move(stages), stack_.optimizer, stack_.compressor),
        o_(std::move(options)),
        engine_(r_.stages(), stack_.compressor, r_.compressor_parameters()) {
    o_.validate();
    require(stack_.scheduler.world_size() == 1, [&] {
      return "train::trainer: the scheduler is written for " + std::to_string(stack_.scheduler.world_size()) +
             " ranks; a single-device trainer has one";
    });
    static_assert(replica_type::has_masters,
                  "train::trainer: the model's weights must be fp32 (their own masters) or bf16 (with fp32 masters)");
  }

  trainer(trainer&& other) noexcept
      : stack_(std::move(other.stack_)),
        r_(std::move(other.r_)),
        o_(std::move(other.o_)),
        engine_(std::move(other.engine_)),
        step_(other.step_),
        tokens_(other.tokens_) {
    engine_.bind(r_.stages(), stack_.compressor);  // the engine points at this trainer's members
  }
  trainer& operator=(trainer&&) = delete;

  Model& model() { return r_.model(); }
  std::vector<Model>& stages() { return r_.stages(); }
  const optimizer_type& optimizer() const { return r_.optimizer(); }
  const Stack& stack() const { return stack_; }
  const trainer_options& options() const { return o_; }
  /// Micro-batches per optimizer step (the scheduler's).
  std::int64_t accumulation() const { return stack_.scheduler.microbatches(); }
  std::int64_t steps_done() const { return step_; }
  std::int64_t tokens_done() const { return tokens_; }
  /// The optimizer states, one per parameter in store order.
  std::vector<state_type>& states() { return r_.states(); }
  const std::vector<state_type>& states() const { return r_.states(); }

  /// Bytes of every optimizer state (masters not included).
  std::size_t optimizer_state_bytes() const { return r_.optimizer_state_bytes(); }
  /// Bytes of the fp32 master weights kept beside a 16-bit model (0 when the model is its own master).
  std::size_t master_bytes() {
    if constexpr (model_is_master) return 0;
    else return std::size_t(r_.masters().numel()) * sizeof(float);
  }

  /// Initialises the weights from the Philox streams of `seed`; the masters get the same values before their
  /// rounding to the model's type.
  void init(std::uint64_t seed) { r_.init(seed); }

  /// Loads initial weights (a checkpoint's or Hugging Face's model.safetensors, or its directory) into the
  /// masters and the model; see io::load_weights.
  void load_weights(const std::filesystem::path& path, const io::load_options& lo = {}) {
    r_.with_checkpoint_parameters([&](auto& params) { io::load_weights(r_.executor(), path, params, lo); });
    r_.sync_model();
  }

  /// One optimizer step on the scheduler's micro-batches from `loader` (see the top of this file).
  step_result step(data::batch_loader& loader) {
    step_result r;
    r.step = step_ + 1;
    r.lr = o_.schedule.at(r.step);
    r.tokens = replica_type::batch_tokens(loader) * accumulation();
    r_.store().zero_grad(r_.executor());
    r.loss = engine_.run(
        stack_.scheduler.plan(step_, 0), loader_source{loader}, [](std::size_t, std::size_t) {},
        [&] {
          r.grad_norm = optim::grad_norm(r_.executor(), r_.grads(0, r_.parameters()));
          r.skipped = !std::isfinite(r.grad_norm);
          if (r.skipped) return;
          r_.step_all(optim::step_context{r.lr, r.step, optim::clip_factor(r.grad_norm, o_.clip)});
        });
    step_ = r.step;
    tokens_ += r.tokens;
    return r;
  }

  /// The mean loss over `batches` batches of `loader` from its start (at most the batches one epoch holds): the
  /// same batches every call, so evaluations are comparable. The loader is left at its start.
  double evaluate(data::batch_loader& loader, std::int64_t batches) {
    return r_.evaluate_local(loader, batches, "trainer",
                             [&](auto tokens, auto targets) { return engine_.evaluate(tokens, targets); });
  }

  /// Writes a checkpoint of everything exact resume needs (io/checkpoint.hpp) as the directory `dir`, published
  /// whole (a previous checkpoint `dir` is replaced once the new one is complete); `extra` is kept in
  /// trainer_state.json for the caller (e.g. wall time).
  void save(const std::filesystem::path& dir, const data::loader_position& train_position, std::uint64_t seed,
            io::json extra = io::json::object(), const io::hf_config_options& config = {}) {
    io::trainer_state ts;
    ts.step = step_;
    ts.tokens = tokens_;
    ts.seed = seed;
    ts.train_data = train_position;
    ts.extra = std::move(extra);
    r_.with_checkpoint_parameters([&](auto& params) {
      io::save_checkpoint(r_.executor(), dir, r_.model().config(), params, r_.states(), ts, config);
    });
  }

  /// Restores a checkpoint written by save() for the same model and optimizer, positions `loader` where the saved
  /// run stopped, and returns the saved trainer state (its extra values, seed, ...).
  io::trainer_state resume(const std::filesystem::path& dir, data::batch_loader& loader) {
    io::trainer_state ts;
    r_.with_checkpoint_parameters(
        [&](auto& params) { ts = io::load_checkpoint(r_.executor(), dir, r_.model().config(), params, r_.states()); });
    r_.sync_model();
    loader.seek(ts.train_data);
    step_ = ts.step;
    tokens_ = ts.tokens;
    return ts;
  }

 private:
  Stack stack_;
  replica_type r_;
  trainer_options o_;
  plan_engine<Model, compressor_type> engine_;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace subspace::train
