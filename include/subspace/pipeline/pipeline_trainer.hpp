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
// ranks holding the same stage). The Sequences policy says how a replica group shares the data: whole_sequences
// (the default) makes every rank of it a data-parallel replica; context::pipeline_context
// (context/pipeline_context.hpp) spreads each sequence over C of its ranks — pipeline × context (× data)
// parallelism, rank r holding stage r % P at place (r / P) % C of the context group of replica r / (P·C). The rank's
// chunks — one per virtual stage it holds, one stage of the model each, sharing one parameter store — run the
// scheduler's plan for its stage rank; payloads move through a pipeline::transport over the pipeline group, and with D
// > 1 replicas each bucket of gradients is averaged over the replica group as soon as its last backward is done
// (dist/bucket.hpp), overlapping the rest of the step. Clipping uses the global gradient norm of the whole model (the
// squared norms of the stages summed over the pipeline); the loss is the mean over every micro-batch (the head's stage
// has it; the pipeline sums, which is exact with one non-zero term; the replicas average).

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
#include "../dist/replica_positions.hpp"
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

/// How the ranks holding a stage share the data: each reads whole sequences (a data-parallel replica). The
/// Sequences policy of pipeline_trainer; context::pipeline_context is the other one. A policy says:
///   ranks()                                  ranks per sequence, C (the replica group of a stage is C · D ranks)
///   connect(group, place, chunks)            once: the C ranks of this rank's stage and replica, its place there
///   rows_shape(full), rows(full, local)      this rank's rows of a full [B, seq] batch of token ids
///   begin_step(chunks, step), end_step(chunks)   around training step `step` (1-based)
///   after_step(chunks, step, stage_group)    after training step `step`, collective over the stage's C · D ranks
///   save(chunks, dir, rank, lead), load(chunks, dir, rank, ranks)  its state beside a stage's checkpoint
struct whole_sequences {
  int ranks() const { return 1; }
  template <class Comm, class Chunks>
  void connect(Comm&, int, Chunks&) {}
  shape rows_shape(const shape& full) const { return full; }
  void rows(view<const std::int32_t, host_space> full, view<std::int32_t, host_space> local) const {
    copy(exec::host{}, full, local);
  }
  template <class Chunks>
  void begin_step(Chunks&, std::int64_t) {}
  template <class Chunks>
  void end_step(Chunks&) {}
  template <class Chunks, class Comm>
  void after_step(Chunks&, std::int64_t, Comm&) {}
  template <class Chunks>
  void save(Chunks&, const std::filesystem::path&, int, bool) {}
  template <class Chunks>
  void load(Chunks&, const std::filesystem::path&, int, int) {}
};

/// S can say how the ranks holding a stage of Model share the data (see whole_sequences).
template <class S, class Model, class Comm>
concept SequencesPolicy = requires(S& s, const S& cs, Comm& comm, std::vector<Model>& chunks, const shape& full,
                                   view<const std::int32_t, host_space> in, view<std::int32_t, host_space> out,
                                   const std::filesystem::path& dir) {
  { cs.ranks() } -> std::convertible_to<int>;
  s.connect(comm, 0, chunks);
  { cs.rows_shape(full) } -> std::convertible_to<shape>;
  cs.rows(in, out);
  s.begin_step(chunks, std::int64_t(1));
  s.end_step(chunks);
  s.after_step(chunks, std::int64_t(1), comm);
  s.save(chunks, dir, 0, true);
  s.load(chunks, dir, 0, 1);
};

template <class Model, class Stack, class Sequences = whole_sequences>
class pipeline_trainer {
  static_assert(check_stack<Stack>());
  static_assert(nn::check_model<Model>());
  static_assert(SequencesPolicy<Sequences, Model, std::remove_cvref_t<decltype(Stack::communicator)>>,
                "pipeline::pipeline_trainer: Sequences says how the ranks holding a stage share the data: "
                "pipeline::whole_sequences, or context::pipeline_context over the model's context::blocks and the "
                "stack's communicator type (see pipeline::whole_sequences for what a policy provides)");

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

  /// Collective over the stack's communicator (it is split into pipelines and replica groups, and with C > 1 ranks
  /// per sequence the replica groups into context groups). `chunks` are this rank's model stages in the order of
  /// its virtual stages, sharing one parameter store.
  pipeline_trainer(std::vector<Model> chunks, Stack stack, trainer_options o, Sequences sequences = {})
      : stack_(std::move(stack)),
        o_(std::move(o)),
        sequences_(std::move(sequences)),
        stages_(stack_.scheduler.world_size()),
        holders_(holders_of(stack_.communicator, stages_, sequences_.ranks())),
        stage_(stack_.communicator.rank() % stages_),
        holder_(stack_.communicator.rank() / stages_),
        pipe_(stack_.communicator.split(holder_, stage_)),
        group_(stack_.communicator.split(stage_, holder_)),
        replica_(std::move(chunks), stack_.optimizer, stack_.compressor),
        engine_(replica_.stages(), stack_.compressor, replica_.compressor_parameters()),
        transport_(pipe_, replica_.executor(), wire_of(stack_.compressor, o_)) {
    o_.validate();
    check_same_tables();
    if constexpr (!std::is_same_v<Sequences, whole_sequences>) {  // the ranks of this stage and replica
      context_.emplace(group_.split(replica(), place()));
      sequences_.connect(*context_, place(), replica_.stages());
    }
    if (holders_ > 1) {
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
  /// Pipeline stages (ranks per pipeline), data replicas, ranks per sequence (C), and this rank's place in each.
  int stages() const { return stages_; }
  int replicas() const { return holders_ / context_ranks(); }
  int context_ranks() const { return sequences_.ranks(); }
  int stage() const { return stage_; }
  int replica() const { return holder_ / context_ranks(); }
  int place() const { return holder_ % context_ranks(); }
  /// The stack's communicator (the whole world), the pipeline group, the replica group (the C · D ranks holding
  /// this stage, over which gradients and losses are averaged) and the context group (its C ranks of this
  /// replica; not with whole_sequences).
  communicator_type& communicator() { return stack_.communicator; }
  communicator_type& pipeline_communicator() { return pipe_; }
  communicator_type& replica_communicator() { return group_; }
  communicator_type& context_communicator() {
    require(context_.has_value(),
            "pipeline::pipeline_trainer::context_communicator: whole sequences, no context group");
    return *context_;
  }
  const Sequences& sequences() const { return sequences_; }
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
    if (holders_ > 1) replica_.broadcast_from_rank0(group_);
    restored_step();
  }

  /// One optimizer step on the plan's micro-batches of `loader` (see the top of this file).
  train::step_result step(data::batch_loader& loader) {
    static_assert(replica_type::has_masters,
                  "pipeline::pipeline_trainer::step: the model's weights must be fp32 or bf16 (an fp64 model can "
                  "only compute_gradients)");
    train::step_result r;
    r.step = step_ + 1;
    r.lr = o_.schedule.at(r.step);
    r.loss = run(loader, [&](double local_loss) {
      double pipeline_loss = 0;
      r.grad_norm = global_grad_norm(local_loss, pipeline_loss);
      r.skipped = !std::isfinite(r.grad_norm);
      if (!r.skipped) replica_.step_all(optim::step_context{r.lr, r.step, optim::clip_factor(r.grad_norm, o_.clip)});
      return std::optional<double>(pipeline_loss);
    });
    r.tokens = replica_type::batch_tokens(loader) * microbatches() * replicas();  // each sequence once
    step_ = r.step;
    tokens_ += r.tokens;
    sequences_.after_step(replica_.stages(), step_, group_);
    return r;
  }

  /// The forward and backward passes of a step without the update: leaves this rank's gradients (averaged over
  /// the replicas) in the store and returns the step's loss. Tests call it alone (also on fp64 models).
  double compute_gradients(data::batch_loader& loader) {
    return run(loader, [](double) { return std::optional<double>(); });
  }

  /// The mean loss over `batches` batches of `loader` (every stage of a replica the same loader, read from its
  /// start and left there), averaged over the replicas. Collective.
  double evaluate(data::batch_loader& loader, std::int64_t batches) {
    const int previous = (stage_ + stages_ - 1) % stages_, next = (stage_ + 1) % stages_;
    const double local = replica_.evaluate_local(loader, batches, who, [&](auto tokens, auto targets) {
      rows_.take(sequences_, tokens, targets);
      return engine_.evaluate(rows_.tokens.v(), rows_.targets.v(), transport_, previous, next);
    });
    transport_.finish();
    return over_replicas(sum_over_pipeline(local));
  }

  /// Writes the checkpoint `dir`: every stage's directory dir/stage-<s> (replica 0 writes it; the others hold the
  /// same state) is a checkpoint of its tensors with the whole model's names (io/checkpoint.hpp), and every data
  /// replica's `train_position` (dist/replica_positions.hpp). The stages write
  /// into one staging directory, which rank 0 publishes whole once every stage is on disk (util/directory.hpp), so
  /// `dir` never holds stages of two saves. Collective.
  void save(const std::filesystem::path& dir, const data::loader_position& train_position, std::uint64_t seed,
            io::json extra = io::json::object()) {
    const bool lead = stack_.communicator.rank() == 0;
    io::check_replaceable(dir);  // on every rank, so that all of them fail alike
    if (lead) io::prepare_staging(dir);
    stack_.communicator.barrier().wait();  // the staging directory exists before any stage writes into it
    sequences_.save(replica_.stages(), stage_directory(io::staging_directory(dir), stage_), group_.rank(),
                    holder_ == 0);
    stack_.communicator.barrier().wait();  // the policy's files are on disk before the sidecar fingerprints them
    extra = dist::with_replica_positions(stack_.communicator, replica(), replicas(), train_position, std::move(extra));
    if (holder_ == 0) {
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
    sequences_.load(replica_.stages(), stage_directory(dir, stage_), group_.rank(), group_.size());
    loader.seek(dist::replica_position(ts, replica(), replicas(), dir));
    step_ = ts.step;
    tokens_ = ts.tokens;
    restored_step();
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

  /// The policy's state for the next step once step_ is set (a step begun and ended without running: no training
  /// forward accumulates anything).
  void restored_step() {
    sequences_.begin_step(replica_.stages(), step_ + 1);
    sequences_.end_step(replica_.stages());
  }

  /// The ranks holding each stage: C · D.
  static int holders_of(communicator_type& world, int stages, int context_ranks) {
    require(stages >= 1 && context_ranks >= 1 && world.size() % (stages * context_ranks) == 0, [&] {
      return std::string(who) + ": the scheduler has " + std::to_string(stages) + " stages and each sequence is on " +
             std::to_string(context_ranks) + " ranks; their product must divide the communicator's " +
             std::to_string(world.size()) + " ranks";
    });
    return world.size() / stages;
  }

  static int microbatches_of(const std::vector<schedule::action>& plan) {
    int m = 0;
    for (const schedule::action& a : plan) m = std::max(m, a.microbatch + 1);
    return m;
  }

  /// This rank's rows of a loader's batches (Sequences::rows), for the engine; the whole batches with one rank per
  /// sequence.
  struct rows_source {
    data::batch_loader* loader = nullptr;
    const Sequences* sequences = nullptr;
    host_tensor<std::int32_t> full_tokens, full_targets, tokens, targets;

    shape batch_shape() const { return sequences->rows_shape(full_shape()); }
    void next(view<std::int32_t, host_space> tok, view<std::int32_t, host_space> tgt) {
      if constexpr (std::is_same_v<Sequences, whole_sequences>) return loader->next(tok, tgt);
      sized(full_tokens, full_targets, full_shape());
      loader->next(full_tokens.v(), full_targets.v());
      sequences->rows(full_tokens.v(), tok);
      sequences->rows(full_targets.v(), tgt);
    }
    /// The rows of one full batch into `tokens` / `targets`.
    void take(const Sequences& s, view<const std::int32_t, host_space> tok, view<const std::int32_t, host_space> tgt) {
      sized(tokens, targets, s.rows_shape(tok.shape()));
      s.rows(tok, tokens.v());
      s.rows(tgt, targets.v());
    }

   private:
    shape full_shape() const { return shape{loader->options().batch, loader->options().seq}; }
    static void sized(host_tensor<std::int32_t>& a, host_tensor<std::int32_t>& b, const shape& s) {
      if (a.shape() == s) return;
      a = host_tensor<std::int32_t>(s);
      b = host_tensor<std::int32_t>(s);
    }
  };

  /// One step's forwards and backwards; update(local loss) runs at the plan's optimizer_step and returns the loss
  /// summed over the pipeline when it summed it (with the norm, in one collective), else nullopt.
  template <class Update>
  double run(data::batch_loader& loader, Update&& update) {
    replica_.store().zero_grad(replica_.executor());
    dist::bucket_cursor cursor(plan_);
    const auto ready = [&](std::size_t first, std::size_t last) {
      if (holders_ > 1) cursor.ready(first, last, [&](std::size_t k) { launch(k); });
    };
    rows_.loader = &loader;
    rows_.sequences = &sequences_;
    sequences_.begin_step(replica_.stages(), step_ + 1);
    std::optional<double> pipeline_loss;
    const double loss = engine_.run(
        stack_.scheduler.plan(step_, stage_), rows_, ready,
        [&](double local_loss) {
          wait_all();
          pipeline_loss = update(local_loss);
        },
        transport_);
    transport_.finish();
    wait_all();
    sequences_.end_step(replica_.stages());
    return over_replicas(pipeline_loss ? *pipeline_loss : sum_over_pipeline(loss));
  }

  /// The global gradient norm over the pipeline's stages (the step clips to o_.clip with it). Every stage
  /// computes the same norm. The stages' losses are summed in the same collective (one latency of a slow link,
  /// not two) into pipeline_loss.
  double global_grad_norm(double local_loss, double& pipeline_loss) {
    const double squares = optim::grad_squares(replica_.executor(), replica_.grads(0, replica_.parameters()));
    comm_pair_[0] = squares;
    comm_pair_[1] = local_loss;
    pipe_.all_reduce(view<double, host_space>(comm_pair_, {2}), comm::reduce_op::sum).wait();
    pipeline_loss = comm_pair_[1];
    return std::sqrt(comm_pair_[0]);
  }

  double sum_over_pipeline(double x) {
    comm_scalar_ = x;
    pipe_.all_reduce(view<double, host_space>(&comm_scalar_, {1}), comm::reduce_op::sum).wait();
    return comm_scalar_;
  }
  /// The mean over the ranks holding this stage: over the replicas, and over a sequence's rows (C ranks, as many
  /// rows each).
  double over_replicas(double x) { return holders_ > 1 ? dist::detail::mean_over_ranks(group_, x) : x; }

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
  Sequences sequences_;
  // holder_: this rank's index among the C · D ranks holding its stage (place + C · replica).
  int stages_, holders_, stage_, holder_;
  communicator_type pipe_, group_;
  std::optional<communicator_type> context_;
  rows_source rows_;
  replica_type replica_;
  train::plan_engine<Model, compressor_type> engine_;
  transport_type transport_;
  dist::bucket_plan plan_;
  std::vector<request_type> pending_;
  double comm_scalar_ = 0;
  double comm_pair_[2] = {0, 0};  // the gradient norm's squares and the loss, summed over the pipeline together
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace subspace::pipeline
