#pragma once
// pipeline::pipeline_trainer<Model, Stack>: pipeline parallelism on the plan engine, with the stack's Compressor
// at every stage boundary — compress::identity for a plain pipeline, compress::subspace_projection for Subspace
// Networks (docs/pipeline.md).
//
//   // rank r of a world of P·D ranks: stage s = r % P of replica r / P
//   pipeline::pipeline_trainer t(pipeline::llama_chunks<model>(cfg, ex, P, 1, s),
//                                subspace::stack{.communicator = world[r],
//                                                .compressor = compress::identity{},
//                                                .scheduler = pipeline::one_f_one_b{M, P},
//                                                .optimizer = optim::adamw{}},
//                                options);
//   t.init(seed);
//   auto res = t.step(loader);   // every stage of a replica reads the same batches; replicas read their shards
//
// The world is split into pipelines (consecutive ranks: the P stages of one replica) and replica groups (the
// ranks holding the same stage). The rank's chunks — one per virtual stage it holds, one stage of the model each,
// sharing one parameter store — run the scheduler's plan for its stage rank; payloads move through a
// pipeline::transport over the pipeline group, and with D > 1 replicas each bucket of gradients is averaged over
// the replica group as soon as its last backward is done (dist/bucket.hpp), overlapping the rest of the step.
// Clipping uses the global gradient norm of the whole model (the squared norms of the stages summed over the
// pipeline); the loss is the mean over every micro-batch (the head's stage has it; the pipeline sums, which is
// exact with one non-zero term; the replicas average).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/concepts.hpp"
#include "../core/error.hpp"
#include "../data/loader.hpp"
#include "../dist/bucket.hpp"
#include "../io/checkpoint.hpp"
#include "../kernels/reduce.hpp"
#include "../nn/concepts.hpp"
#include "../optim/schedule.hpp"
#include "../policies.hpp"
#include "../train/engine.hpp"
#include "../train/replica.hpp"
#include "../train/trainer.hpp"
#include "transport.hpp"

namespace subspace::pipeline {

/// The data-parallel trainer's options (clip, learning-rate schedule, bucket size for the replica all-reduce) and
/// how payload values travel: as the compressor asks (wire_format_of: the boundary type for compress::identity),
/// or as bf16 / fp32. A dense bf16 model's stream holds bf16 values, so `values_as::bf16` sends it without loss
/// at half the bytes of its fp32 boundary.
struct trainer_options : dist::trainer_options {
  std::optional<wire_format::values_as> wire_values;
};

template <class Model, class Stack>
class pipeline_trainer {
  static_assert(check_stack<Stack>());
  static_assert(nn::check_model<Model>());

 public:
  using model_type = Model;
  using communicator_type = std::remove_cvref_t<decltype(Stack::communicator)>;
  using optimizer_type = std::remove_cvref_t<decltype(Stack::optimizer)>;
  using compressor_type = std::remove_cvref_t<decltype(Stack::compressor)>;
  using scheduler_type = std::remove_cvref_t<decltype(Stack::scheduler)>;
  using replica_type = train::replica<Model, optimizer_type>;
  using executor_type = typename replica_type::executor_type;
  using space = typename replica_type::space;
  using boundary_type = typename Model::boundary_type;
  using grad_type = typename replica_type::grad_type;
  using transport_type = transport<communicator_type, executor_type, boundary_type>;
  using request_type = dist::detail::all_reduce_request_t<communicator_type, grad_type, space>;
  static_assert(std::is_same_v<typename scheduler_type::plan_type, std::vector<schedule::action>>,
                "pipeline::pipeline_trainer: the scheduler must plan schedule::action sequences (pipeline::gpipe, "
                "pipeline::one_f_one_b, pipeline::interleaved_1f1b)");

  /// Collective over the stack's communicator (it is split into pipelines and replica groups). `chunks` are this
  /// rank's model stages in the order of its virtual stages, sharing one parameter store.
  pipeline_trainer(std::vector<Model> chunks, Stack stack, trainer_options o)
      : stack_(std::move(stack)),
        o_(std::move(o)),
        stages_(stack_.scheduler.world_size()),
        replicas_(replicas_of(stack_.communicator, stages_)),
        stage_(stack_.communicator.rank() % stages_),
        replica_index_(stack_.communicator.rank() / stages_),
        pipe_(stack_.communicator.split(replica_index_, stage_)),
        group_(stack_.communicator.split(stage_, replica_index_)),
        replica_(std::move(chunks), stack_.optimizer, stack_.compressor),
        engine_(replica_.stages(), stack_.compressor, replica_.compressor_parameters()),
        transport_(pipe_, replica_.executor(), wire_of(stack_.compressor, o_)) {
    o_.validate();
    check_same_tables();
    if (replicas_ > 1) {
      plan_ = dist::bucket_plan::of(replica_.store(), o_.bucket_bytes);
      dist::check_same_plan(group_, plan_, who);
    }
  }
  pipeline_trainer(pipeline_trainer&&) = delete;  // the engine and the transport point into this object
  ~pipeline_trainer() {
    for (request_type& req : pending_) try {
        req.wait();
      } catch (...) {
      }
  }

  std::vector<Model>& chunks() { return replica_.stages(); }
  const trainer_options& options() const { return o_; }
  /// Pipeline stages (ranks per pipeline), replicas, and this rank's place in both.
  int stages() const { return stages_; }
  int replicas() const { return replicas_; }
  int stage() const { return stage_; }
  int replica() const { return replica_index_; }
  /// The stack's communicator (the whole world), the pipeline group and the replica group.
  communicator_type& communicator() { return stack_.communicator; }
  communicator_type& pipeline_communicator() { return pipe_; }
  communicator_type& replica_communicator() { return group_; }
  /// Seconds this rank waited for a neighbour's payload so far (transport::waited_seconds).
  double waited_seconds() const { return transport_.waited_seconds(); }
  /// Bytes of this rank's optimizer states.
  std::size_t optimizer_state_bytes() const { return replica_.optimizer_state_bytes(); }
  std::int64_t steps_done() const { return step_; }
  std::int64_t tokens_done() const { return tokens_; }
  std::vector<typename replica_type::state_type>& states() { return replica_.states(); }
  /// The micro-batches of a step (the plan's).
  int microbatches() const { return microbatches_of(stack_.scheduler.plan(0, stage_)); }

  /// Initialises every chunk from `seed` (each tensor from its stream in the whole model's order, so the stages
  /// together hold the whole model's initial weights); replicas take replica 0's. Collective.
  void init(std::uint64_t seed) {
    replica_.init(seed);
    if (replicas_ > 1) replica_.broadcast_from_rank0(group_);
  }

  /// One optimizer step on the plan's micro-batches of `loader` (see the top of this file).
  train::step_result step(data::batch_loader& loader) {
    static_assert(replica_type::has_masters,
                  "pipeline::pipeline_trainer::step: the model's weights must be fp32 or bf16 (an fp64 model can "
                  "only compute_gradients)");
    train::step_result r;
    r.step = step_ + 1;
    r.lr = o_.schedule.at(r.step);
    r.loss = run(loader, [&] {
      r.grad_norm = clip();
      r.skipped = !std::isfinite(r.grad_norm);
      if (r.skipped) return;
      replica_.step_all(optim::step_context{r.lr, r.step});
    });
    r.tokens = replica_type::batch_tokens(loader) * microbatches() * replicas_;
    step_ = r.step;
    tokens_ += r.tokens;
    return r;
  }

  /// The forward and backward passes of a step without the update: leaves this rank's gradients (averaged over
  /// the replicas) in the store and returns the step's loss. Tests call it alone (also on fp64 models).
  double compute_gradients(data::batch_loader& loader) {
    return run(loader, [] {});
  }

  /// The mean loss over `batches` batches of `loader` (every stage of a replica the same loader, read from its
  /// start and left there), averaged over the replicas. Collective.
  double evaluate(data::batch_loader& loader, std::int64_t batches) {
    const int previous = (stage_ + stages_ - 1) % stages_, next = (stage_ + 1) % stages_;
    const double local = replica_.evaluate_local(loader, batches, who, [&](auto tokens, auto targets) {
      return engine_.evaluate(tokens, targets, transport_, previous, next);
    });
    transport_.finish();
    return over_replicas(sum_over_pipeline(local));
  }

  /// Writes the checkpoint `dir`: every stage's directory dir/stage-<s> (replica 0 writes it; the others hold the
  /// same state) is a checkpoint of its tensors with the whole model's names (io/checkpoint.hpp). The stages write
  /// into one staging directory, which rank 0 publishes whole once every stage is on disk (util/directory.hpp), so
  /// `dir` never holds stages of two saves. Collective.
  void save(const std::filesystem::path& dir, const data::loader_position& train_position, std::uint64_t seed,
            io::json extra = io::json::object()) {
    const bool lead = stack_.communicator.rank() == 0;
    io::check_replaceable(dir);  // on every rank, so that all of them fail alike
    if (lead) io::prepare_staging(dir);
    stack_.communicator.barrier().wait();  // the staging directory exists before any stage writes into it
    if (replica_index_ == 0) {
      io::trainer_state ts;
      ts.step = step_;
      ts.tokens = tokens_;
      ts.seed = seed;
      ts.train_data = train_position;
      ts.extra = std::move(extra);
      replica_.with_checkpoint_parameters([&](auto& params) {
        io::write_checkpoint(replica_.executor(), stage_directory(io::staging_directory(dir), stage_),
                             replica_.model().config(), params, replica_.states(), ts);
      });
    }
    stack_.communicator.barrier().wait();  // every stage is on disk before the checkpoint is published
    if (lead) io::publish_staging(dir);
    stack_.communicator.barrier().wait();
  }

  /// Restores this stage from dir/stage-<s> (written by save() with the same layout), positions `loader` where the
  /// saved run stopped and returns the saved state; every stage must be from the same step. Collective.
  io::trainer_state resume(const std::filesystem::path& dir, data::batch_loader& loader) {
    io::trainer_state ts;
    replica_.with_checkpoint_parameters([&](auto& params) {
      ts = io::load_checkpoint(replica_.executor(), stage_directory(dir, stage_), replica_.model().config(), params,
                               replica_.states());
    });
    const std::vector<std::uint64_t> all =
        dist::detail::all_gather_host(stack_.communicator, {std::uint64_t(ts.step), std::uint64_t(ts.tokens)});
    for (int r = 0; r < stack_.communicator.size(); ++r)
      require(
          all[std::size_t(2 * r)] == std::uint64_t(ts.step) && all[std::size_t(2 * r + 1)] == std::uint64_t(ts.tokens),
          [&] {
            return std::string(who) + ": " + dir.string() + ": rank " + std::to_string(r) + " restored step " +
                   std::to_string(all[std::size_t(2 * r)]) + ", stage " + std::to_string(stage_) + " step " +
                   std::to_string(ts.step) + " (the stages' checkpoints are of different saves)";
          });
    replica_.sync_model();
    loader.seek(ts.train_data);
    step_ = ts.step;
    tokens_ = ts.tokens;
    stack_.communicator.barrier().wait();
    return ts;
  }

  static std::filesystem::path stage_directory(const std::filesystem::path& dir, int stage) {
    return dir / ("stage-" + std::to_string(stage));
  }

 private:
  static constexpr const char* who = "pipeline::pipeline_trainer";

  /// A compressor built from seeds (compress::subspace_projection: U and E_fix) must have built the same tables
  /// on every rank: the ranks all-gather its hashes and compare.
  void check_same_tables() {
    if constexpr (requires(const compressor_type& c) {
                    { c.basis_hash() } -> std::convertible_to<std::uint64_t>;
                    { c.fixed_embedding_hash() } -> std::convertible_to<std::uint64_t>;
                  }) {
      const std::vector<std::uint64_t> mine{stack_.compressor.basis_hash(), stack_.compressor.fixed_embedding_hash()};
      const std::vector<std::uint64_t> all = dist::detail::all_gather_host(stack_.communicator, mine);
      for (int r = 0; r < stack_.communicator.size(); ++r)
        require(all[std::size_t(2 * r)] == mine[0] && all[std::size_t(2 * r + 1)] == mine[1], [&] {
          return std::string(who) + ": rank " + std::to_string(r) + " built another basis or fixed embedding (hashes " +
                 std::to_string(all[std::size_t(2 * r)]) + ", " + std::to_string(all[std::size_t(2 * r + 1)]) +
                 ") than rank " + std::to_string(stack_.communicator.rank()) + " (" + std::to_string(mine[0]) + ", " +
                 std::to_string(mine[1]) + "): every rank needs the same d_model, vocab, k and seeds";
        });
    }
  }

  static wire_format wire_of(const compressor_type& c, const trainer_options& o) {
    wire_format w = wire_format_of<boundary_type>(c);
    if (o.wire_values) w.values = *o.wire_values;
    return w;
  }

  static int replicas_of(communicator_type& world, int stages) {
    require(stages >= 1 && world.size() % stages == 0, [&] {
      return std::string(who) + ": the scheduler has " + std::to_string(stages) +
             " stages, which must divide the communicator's " + std::to_string(world.size()) + " ranks";
    });
    return world.size() / stages;
  }

  static int microbatches_of(const std::vector<schedule::action>& plan) {
    int m = 0;
    for (const schedule::action& a : plan) m = std::max(m, a.microbatch + 1);
    return m;
  }

  template <class Update>
  double run(data::batch_loader& loader, Update&& update) {
    replica_.store().zero_grad(replica_.executor());
    dist::bucket_cursor cursor(plan_);
    const auto ready = [&](std::size_t first, std::size_t last) {
      if (replicas_ > 1) cursor.ready(first, last, [&](std::size_t k) { launch(k); });
    };
    const double loss = engine_.run(
        stack_.scheduler.plan(step_, stage_), train::loader_source{loader}, ready,
        [&] {
          wait_all();
          update();
        },
        transport_);
    transport_.finish();
    wait_all();
    return over_replicas(sum_over_pipeline(loss));
  }

  /// The global gradient norm over the pipeline's stages; scales this stage's gradients to o_.clip when it is
  /// exceeded. Every stage computes the same norm.
  double clip() {
    const auto grads = replica_.grads(0, replica_.parameters());
    double squares = 0;
    for (const auto& g : grads) squares += double(squared_norm(replica_.executor(), g));
    const double norm = std::sqrt(sum_over_pipeline(squares));
    if (o_.clip > 0 && std::isfinite(norm) && norm > o_.clip) {
      const float factor = float(o_.clip / (norm + 1e-6));
      for (const auto& g : grads) scale(replica_.executor(), factor, g);
    }
    return norm;
  }

  double sum_over_pipeline(double x) {
    comm_scalar_ = x;
    pipe_.all_reduce(view<double, host_space>(&comm_scalar_, {1}), comm::reduce_op::sum).wait();
    return comm_scalar_;
  }
  double over_replicas(double x) { return replicas_ > 1 ? dist::detail::mean_over_ranks(group_, x) : x; }

  void launch(std::size_t k) {
    const dist::bucket& b = plan_[k];
    pending_.push_back(group_.all_reduce(replica_.store().flat_grads().slice(b.begin, b.end), comm::reduce_op::avg));
  }
  void wait_all() {
    for (request_type& req : pending_) req.wait();
    pending_.clear();
  }

  Stack stack_;
  trainer_options o_;
  int stages_, replicas_, stage_, replica_index_;
  communicator_type pipe_, group_;
  replica_type replica_;
  train::plan_engine<Model, compressor_type> engine_;
  transport_type transport_;
  dist::bucket_plan plan_;
  std::vector<request_type> pending_;
  double comm_scalar_ = 0;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace subspace::pipeline
