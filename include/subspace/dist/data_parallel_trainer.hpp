#pragma once
// dist::data_parallel_trainer<Model, Stack>: all-reduce data parallelism — PyTorch DDP's algorithm — with any
// Optimizer policy (optim::adamw, optim::galore, optim::golore, ...), on the plan engine.
//
//   dist::data_parallel_trainer t(nn::llama<exec::host, float>(cfg),
//                                 subspace::stack{.communicator = world[r],
//                                                 .scheduler = schedule::gradient_accumulation{2, n},
//                                                 .optimizer = optim::adamw{}},
//                                 options);
//   t.init(seed);                        // identical weights on every rank (rank 0's are broadcast)
//   auto r = t.step(loader);             // this rank's loader holds this rank's shard
//   double val = t.evaluate(val_loader, 20);
//
// The stack's policies: the communicator is this rank's view of the world; the scheduler's plan (M micro-batches,
// then the step, the same on every rank) runs on the plan engine; the compressor sits at the boundaries of a
// model given as several local stages, its trainable tensors declared in the store after the stages' (their
// gradients are all-reduced in the buckets with the model's); the optimizer steps every tensor of the store.
//
// One step on every rank: zero the gradients; the plan's micro-batches forward and backward (loss scale 1/M); in
// the last backward the bucket cursor (dist/bucket.hpp) hands out each bucket once its tensors are final, and its
// all-reduce is launched at once (asynchronous, in place on the flat gradients, reduce_op::avg), so communication
// overlaps the rest of the backward. Then wait for every bucket, clip by the global gradient norm (every rank holds
// the same mean gradient, so every rank computes the same norm without more communication), and take one
// optimizer step per tensor as train::trainer does. Every rank ends the step with the same weights.
//
// With n ranks and a batch of B rows per rank, a step equals train::trainer's step on the n·B rows of every rank
// concatenated (the per-rank losses are means over equally many tokens); the tests check this.
//
// On the wire per step and rank: every bucket's gradients once through a ring all-reduce — 2(n-1)/n · 4p bytes
// for p fp32 gradients — plus one double (the step's loss, so step_result::loss is the mean over the ranks).
//
// Device memory: the communicator's operations must be ordered on the model executor's stream
// (comm::local: local_options::streams[r]; comm::nccl: nccl_options::stream).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/concepts.hpp"
#include "../core/error.hpp"
#include "../data/loader.hpp"
#include "../nn/concepts.hpp"
#include "../optim/schedule.hpp"
#include "../policies.hpp"
#include "../schedule/gradient_accumulation.hpp"
#include "../train/engine.hpp"
#include "../train/replica.hpp"
#include "../train/trainer.hpp"
#include "bucket.hpp"

namespace subspace::dist {

template <class Model, class Stack>
class data_parallel_trainer {
  static_assert(check_stack<Stack>());
  static_assert(nn::check_model<Model>());
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(Stack::scheduler)>, schedule::gradient_accumulation>,
                "dist::data_parallel_trainer: the scheduler is schedule::gradient_accumulation{M, world size} (every "
                "rank runs M micro-batches, then the all-reduced step)");

 public:
  using model_type = Model;
  using stack_type = Stack;
  using communicator_type = std::remove_cvref_t<decltype(Stack::communicator)>;
  using optimizer_type = std::remove_cvref_t<decltype(Stack::optimizer)>;
  using compressor_type = std::remove_cvref_t<decltype(Stack::compressor)>;
  using replica_type = train::replica<Model, optimizer_type>;
  using executor_type = typename replica_type::executor_type;
  using space = typename replica_type::space;
  using grad_type = typename replica_type::grad_type;
  using state_type = typename replica_type::state_type;
  using request_type = detail::all_reduce_request_t<communicator_type, grad_type, space>;

  /// Collective over the stack's communicator: checks that every rank cut the same bucket plan (an error names the
  /// first differing tensor).
  data_parallel_trainer(Model model, Stack stack, trainer_options o)
      : data_parallel_trainer(train::as_stages(std::move(model)), std::move(stack), std::move(o)) {}
  /// A model given as the stages of one rank, in order, sharing one parameter store.
  data_parallel_trainer(std::vector<Model> stages, Stack stack, trainer_options o)
      : stack_(std::move(stack)),
        replica_(std::move(stages), stack_.optimizer, stack_.compressor),
        o_(std::move(o)),
        engine_(replica_.stages(), stack_.compressor, replica_.compressor_parameters()) {
    o_.validate();
    communicator_type& comm = stack_.communicator;
    require(comm.size() >= 1, [&] { return std::string(who) + ": the communicator has no ranks"; });
    require(stack_.scheduler.world_size() == comm.size(), [&] {
      return std::string(who) + ": the scheduler is written for " + std::to_string(stack_.scheduler.world_size()) +
             " ranks, the communicator has " + std::to_string(comm.size());
    });
    plan_ = bucket_plan::of(replica_.store(), o_.bucket_bytes);
    check_same_plan(comm, plan_, who);
  }
  data_parallel_trainer(data_parallel_trainer&& other) noexcept
      : stack_(std::move(other.stack_)),
        replica_(std::move(other.replica_)),
        o_(std::move(other.o_)),
        engine_(std::move(other.engine_)),
        plan_(std::move(other.plan_)),
        pending_(std::move(other.pending_)),
        step_(other.step_),
        tokens_(other.tokens_) {
    engine_.bind(replica_.stages(), stack_.compressor);  // the engine points at this trainer's members
  }
  data_parallel_trainer& operator=(data_parallel_trainer&&) = delete;
  /// Waits for all-reduces a failed step left in flight (their buffers are this trainer's): a peer still writes
  /// into them otherwise.
  ~data_parallel_trainer() {
    for (request_type& req : pending_) try {
        req.wait();
      } catch (...) {
      }
  }

  Model& model() { return replica_.model(); }
  std::vector<Model>& stages() { return replica_.stages(); }
  communicator_type& communicator() { return stack_.communicator; }
  const optimizer_type& optimizer() const { return replica_.optimizer(); }
  const trainer_options& options() const { return o_; }
  /// Micro-batches per step (the scheduler's).
  std::int64_t accumulation() const { return stack_.scheduler.microbatches(); }
  /// The bucket plan, in gradient-ready order.
  const bucket_plan& buckets() const { return plan_; }
  std::int64_t steps_done() const { return step_; }
  /// Tokens of every rank so far.
  std::int64_t tokens_done() const { return tokens_; }
  /// Bytes of this rank's optimizer states (masters not included).
  std::size_t optimizer_state_bytes() const { return replica_.optimizer_state_bytes(); }
  std::vector<state_type>& states() { return replica_.states(); }
  /// The fp32 master weights, flat (laid out like the store).
  view<float, space> master_values() { return replica_.masters(); }

  /// Initialises the weights from `seed` and makes every rank hold rank 0's (collective).
  void init(std::uint64_t seed) {
    replica_.init(seed);
    replica_.broadcast_from_rank0(stack_.communicator);
  }

  /// One optimizer step on the plan's batches of `loader` on every rank (see the top of this file).
  /// step_result: loss is the mean over the ranks, tokens counts every rank's, grad_norm is the global norm of
  /// the mean gradient before clipping.
  train::step_result step(data::batch_loader& loader) {
    static_assert(replica_type::has_masters,
                  "dist::data_parallel_trainer::step: the model's weights must be fp32 or bf16 (an fp64 model can "
                  "only compute_gradients)");
    train::step_result r;
    r.step = step_ + 1;
    r.lr = o_.schedule.at(r.step);
    r.loss = run(loader, [&] {
      r.grad_norm = optim::grad_norm(replica_.executor(), replica_.grads(0, replica_.parameters()));
      r.skipped = !std::isfinite(r.grad_norm);
      if (r.skipped) return;
      replica_.step_all(optim::step_context{r.lr, r.step, optim::clip_factor(r.grad_norm, o_.clip)});
    });
    r.tokens = replica_type::batch_tokens(loader) * accumulation() * stack_.communicator.size();
    step_ = r.step;
    tokens_ += r.tokens;
    return r;
  }

  /// The forward and backward passes of a step with the overlapped bucket all-reduces, without the update:
  /// leaves the mean gradient over the ranks in the gradients and returns the step's loss (mean over the ranks).
  /// Tests call it alone (also on fp64 models).
  double compute_gradients(data::batch_loader& loader) {
    return run(loader, [] {});
  }

  /// The mean loss over `batches` batches of `loader` on every rank (each rank its own loader), averaged over the
  /// ranks; like train::trainer::evaluate, each loader is read from its start and left there. Collective.
  double evaluate(data::batch_loader& loader, std::int64_t batches) {
    const double local = replica_.evaluate_local(
        loader, batches, who, [&](auto tokens, auto targets) { return engine_.evaluate(tokens, targets); });
    return detail::mean_over_ranks(stack_.communicator, local);
  }

 private:
  static constexpr const char* who = "dist::data_parallel_trainer";

  /// Zeroes the gradients, runs the step's plan with the bucket all-reduces, and calls update() once every bucket
  /// holds the mean gradient. Returns the step's loss, averaged over the ranks.
  template <class Update>
  double run(data::batch_loader& loader, Update&& update) {
    replica_.store().zero_grad(replica_.executor());
    bucket_cursor cursor(plan_);
    const double loss = engine_.run(
        stack_.scheduler.plan(step_, stack_.communicator.rank()), train::loader_source{loader},
        [&](std::size_t first, std::size_t last) { cursor.ready(first, last, [&](std::size_t k) { launch(k); }); },
        [&] {
          require(cursor.done(), [&] {
            return std::string(who) + ": backward completed only " + std::to_string(cursor.launched()) + " of " +
                   std::to_string(plan_.size()) + " buckets (every tensor must be reported ready)";
          });
          wait_all();
          update();
        });
    wait_all();  // a plan without optimizer_step (compute_gradients' callers use the default plan, which has one)
    return detail::mean_over_ranks(stack_.communicator, loss);
  }

  /// Starts the mean over the ranks of bucket k's gradients, in place.
  void launch(std::size_t k) {
    const bucket& b = plan_[k];
    pending_.push_back(
        stack_.communicator.all_reduce(replica_.store().flat_grads().slice(b.begin, b.end), comm::reduce_op::avg));
  }
  void wait_all() {
    for (request_type& req : pending_) req.wait();
    pending_.clear();
  }

  Stack stack_;
  replica_type replica_;
  trainer_options o_;
  train::plan_engine<Model, compressor_type> engine_;
  bucket_plan plan_;
  std::vector<request_type> pending_;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace subspace::dist
