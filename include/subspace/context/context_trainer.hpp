#pragma once
// context::context_trainer<Model, Stack>: context parallelism (every sequence spread over the C ranks of a
// context group, docs/context.md), with data parallelism over the groups, on the plan engine.
//
//   // rank r of a world of C·D ranks: place r % C of context group r / C
//   context::trainer_options o;
//   o.context_ranks = C;
//   o.seq = 4096;                                   // the loader's sequence length, spread over the group
//   context::context_trainer<nn::llama<exec::host, float>, decltype(stack)> t(cfg, std::move(stack), o);
//   t.init(seed);
//   auto res = t.step(loader);   // the ranks of a group read the same batches; the groups read their shards
//
// Model is the single-device model type (nn::llama<Exec, T>); the trainer builds it with context::blocks, so its
// attention is context::attention over the group (ring or all-gather exchange, contiguous or zigzag placement),
// and gives it the global positions of its rows. The stack: the communicator is the whole world (split here into
// context groups of consecutive ranks and replica groups); the scheduler is schedule::gradient_accumulation{M,
// world size}; the compressor compresses the attention's K/V — compress::identity (they cross the wire as they
// are) or compress::kv_subspace_mixture (Mixture of Subspaces: dense warm-up steps, then after the last one the
// switch of context/kv_phases.hpp — U_0 from the world's summed second moments, checked equal on every rank — and
// compressed steps; its ψ heads are tensors of the store like the model's); the optimizer steps every tensor.
//
// One step: every rank reads the step's full batches [B, seq] and keeps its rows of each (context::layout::take);
// forward and backward run on them, the attention layers exchanging K/V and dK/dV within the group; each bucket of
// gradients is averaged over the whole world as soon as the backward completes it. A rank's gradient is that of
// the mean loss over its rows, and every rank holds as many rows, so the average over the group is the gradient
// of the mean over the whole sequence, and over the world the mean over the replicas too. Every rank then takes
// the same clipped optimizer step: the weights stay identical on every rank, so one checkpoint (rank 0's, a
// whole model's, with the K/V tables of a compressing model beside it) resumes any layout.
//
// With sync_every = c > 1 the gradients are not averaged: each rank steps on the gradient of its own rows, and
// every c steps the weights (fp32 masters) are averaged over the world; the optimizer moments stay each rank's.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/concepts.hpp"
#include "../compress/identity.hpp"
#include "../compress/kv.hpp"
#include "../core/error.hpp"
#include "../data/loader.hpp"
#include "../dist/bucket.hpp"
#include "../dist/replica_positions.hpp"
#include "../io/checkpoint.hpp"
#include "../nn/concepts.hpp"
#include "../nn/llama.hpp"
#include "../optim/schedule.hpp"
#include "../policies.hpp"
#include "../schedule/gradient_accumulation.hpp"
#include "../train/engine.hpp"
#include "../train/replica.hpp"
#include "../train/trainer.hpp"
#include "attention.hpp"
#include "kv_phases.hpp"
#include "layout.hpp"

namespace subspace::context {

/// The data-parallel trainer's options (clip, learning-rate schedule, bucket size) and the context-parallel
/// layout: ranks per sequence, the sequence length, the placement of chunks and the K/V exchange.
struct trainer_options : dist::trainer_options {
  int context_ranks = 1;  // C: ranks per sequence (the world is C · replicas)
  std::int64_t seq = 0;   // tokens per sequence: the loaders' seq, a multiple of C (zigzag: of 2C)
  placement layout = placement::zigzag;
  exchange kv_exchange = exchange::ring;
  // c: 1 averages the gradients over the world every step (one optimizer step, the same on every rank); c > 1
  // lets each rank step on its own gradient and averages the weights every c steps (optimizer moments stay local).
  std::int64_t sync_every = 1;

  void validate() const {
    dist::trainer_options::validate();
    require(sync_every >= 1,
            [&] { return "context::trainer_options: sync_every must be >= 1, got " + std::to_string(sync_every); });
    require(context_ranks >= 1, [&] {
      return "context::trainer_options: context_ranks must be >= 1, got " + std::to_string(context_ranks);
    });
    require(seq >= 1, [&] { return "context::trainer_options: seq must be >= 1, got " + std::to_string(seq); });
  }
};

/// The model type the trainer builds from the single-device Model: its attention context parallel over Comm.
template <class Model, class Comm, class Compressor>
struct with_context_attention;
template <class Exec, class T, class Blocks, class Comm, class Compressor>
struct with_context_attention<nn::llama<Exec, T, Blocks>, Comm, Compressor> {
  static_assert(std::is_same_v<Blocks, nn::dense_blocks>,
                "context::context_trainer: Model is the plain single-device Llama (nn::llama<Exec, T>); the trainer "
                "puts context::blocks in it");
  using type = nn::llama<Exec, T, blocks<Comm, Compressor>>;
};

template <class Model, class Stack>
class context_trainer {
  using policy_types = typename subspace::detail::policy_types<Stack>::type;
  // The communicator, scheduler and optimizer as any trainer checks them; the compressor compresses K/V.
  static_assert(subspace::detail::check_stack_communicator<policy_types>() &&
                subspace::detail::check_stack_scheduler<policy_types>() &&
                subspace::detail::check_stack_optimizer<policy_types>());
  static_assert(compress::KVCompressor<std::remove_cvref_t<decltype(Stack::compressor)>>,
                "context::context_trainer: the compressor compresses the attention's K/V: compress::identity (dense) "
                "or compress::kv_subspace_mixture (Mixture of Subspaces)");
  static_assert(nn::check_model<Model>());
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(Stack::scheduler)>, schedule::gradient_accumulation>,
                "context::context_trainer: the scheduler is schedule::gradient_accumulation{M, world size} (every "
                "rank runs M micro-batches, then the all-reduced step)");

 public:
  using communicator_type = std::remove_cvref_t<decltype(Stack::communicator)>;
  using compressor_type = std::remove_cvref_t<decltype(Stack::compressor)>;
  using model_type = typename with_context_attention<Model, communicator_type, compressor_type>::type;
  using optimizer_type = std::remove_cvref_t<decltype(Stack::optimizer)>;
  using replica_type = train::replica<model_type, optimizer_type>;
  using executor_type = typename replica_type::executor_type;
  using space = typename replica_type::space;
  using grad_type = typename replica_type::grad_type;
  using request_type = dist::detail::all_reduce_request_t<communicator_type, grad_type, space>;

  /// Collective over the stack's communicator (it is split into context groups and replica groups): builds the
  /// model of `cfg` on `ex` for this rank's place.
  context_trainer(const nn::llama_config& cfg, Stack stack, trainer_options o, executor_type ex = {})
      : stack_(std::move(stack)),
        o_(checked(std::move(o), stack_.communicator)),
        layout_(o_.seq, o_.context_ranks, o_.layout),
        place_(stack_.communicator.rank() % o_.context_ranks),
        replica_index_(stack_.communicator.rank() / o_.context_ranks),
        group_(stack_.communicator.split(replica_index_, place_)),
        replicas_(stack_.communicator.split(place_, replica_index_)),
        blocks_(o_.kv_exchange, stack_.compressor),
        replica_(train::as_stages(build(cfg, ex)), stack_.optimizer),
        engine_(replica_.stages(), boundary_, {}) {
    require(stack_.scheduler.world_size() == stack_.communicator.size(), [&] {
      return std::string(who) + ": the scheduler is written for " + std::to_string(stack_.scheduler.world_size()) +
             " ranks, the communicator has " + std::to_string(stack_.communicator.size());
    });
    plan_ = dist::bucket_plan::of(replica_.store(), o_.bucket_bytes);
    dist::check_same_plan(stack_.communicator, plan_, who);
  }
  context_trainer(context_trainer&&) = delete;  // the model's attention and the engine point into this object
  ~context_trainer() {
    for (request_type& req : pending_) try {
        req.wait();
      } catch (...) {
      }
  }

  model_type& model() { return replica_.model(); }
  const trainer_options& options() const { return o_; }
  const context::layout& layout() const { return layout_; }
  /// This rank's place in its context group, and its group's index among the replicas.
  int place() const { return place_; }
  int replica() const { return replica_index_; }
  int replicas() const { return stack_.communicator.size() / o_.context_ranks; }
  /// The whole world, this rank's context group and its replica group (the ranks at the same place).
  communicator_type& communicator() { return stack_.communicator; }
  communicator_type& context_communicator() { return group_; }
  communicator_type& replica_communicator() { return replicas_; }
  std::int64_t accumulation() const { return stack_.scheduler.microbatches(); }
  std::int64_t steps_done() const { return step_; }
  std::int64_t tokens_done() const { return tokens_; }
  std::size_t optimizer_state_bytes() const { return replica_.optimizer_state_bytes(); }
  std::vector<typename replica_type::state_type>& states() { return replica_.states(); }

  /// Initialises the weights from `seed` and makes every rank hold rank 0's (collective).
  void init(std::uint64_t seed) {
    replica_.init(seed);
    replica_.broadcast_from_rank0(stack_.communicator);
    set_kv_phase(model(), 1);
  }

  /// Whether the attention layers send compressed K/V at the next step (Mixture of Subspaces after its warm-up).
  bool compressing_kv() {
    bool any = false;
    for_each_mos_codec(model(), [&](auto& c) { any = any || c.compressing(); });
    return any;
  }

  /// One optimizer step on the plan's batches of `loader` (see the top of this file). loss: the mean over every
  /// token of the step's sequences on every replica; tokens: every replica's (each sequence counted once).
  train::step_result step(data::batch_loader& loader) {
    static_assert(replica_type::has_masters,
                  "context::context_trainer::step: the model's weights must be fp32 or bf16 (an fp64 model can "
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
    r.tokens = replica_type::batch_tokens(loader) * accumulation() * replicas();
    step_ = r.step;
    tokens_ += r.tokens;
    if (o_.sync_every > 1 && step_ % o_.sync_every == 0) {  // the weights' average over the world
      stack_.communicator.all_reduce(replica_.masters(), comm::reduce_op::avg).wait();
      replica_.sync_model();
    }
    if constexpr (!std::is_same_v<compressor_type, compress::identity>)
      if (step_ == stack_.compressor.options().warmup_steps)
        switch_to_compressed(model(), stack_.communicator, stack_.compressor.options());
    set_kv_phase(model(), step_ + 1);
    return r;
  }

  /// The forward and backward passes of a step without the update: leaves the mean gradient over the world in the
  /// store (this rank's own with sync_every > 1) and returns the step's loss. Tests call it alone (also on fp64
  /// models).
  double compute_gradients(data::batch_loader& loader) {
    return run(loader, [] {});
  }

  /// The mean loss over `batches` batches of `loader` (every rank of a group the same loader, read from its start
  /// and left there), averaged over the world. Collective.
  double evaluate(data::batch_loader& loader, std::int64_t batches) {
    check_loader(loader);
    const double local = replica_.evaluate_local(loader, batches, who, [&](auto tokens, auto targets) {
      source_.take(layout_, place_, tokens, targets);
      return engine_.evaluate(source_.tokens.v(), source_.targets.v());
    });
    return dist::detail::mean_over_ranks(stack_.communicator, local);
  }

  /// Writes the checkpoint `dir` with the K/V codecs' state beside it (every rank its own partial second moments
  /// inside the PCA window). With sync_every = 1 every rank holds the same weights and optimizer state, and rank 0
  /// writes one whole-model checkpoint; with sync_every > 1 they differ between averages, and every rank writes its
  /// own into dir/rank-<r>. The ranks write into one staging directory, which rank 0 publishes whole once every
  /// part is on disk (util/directory.hpp). Collective.
  void save(const std::filesystem::path& dir, const data::loader_position& train_position, std::uint64_t seed,
            io::json extra = io::json::object()) {
    const int rank = stack_.communicator.rank();
    const bool per_rank = o_.sync_every > 1;
    io::check_replaceable(dir);  // on every rank, so that all of them fail alike
    if (rank == 0) io::prepare_staging(dir);
    stack_.communicator.barrier().wait();  // the staging directory exists before any rank writes into it
    const std::filesystem::path staging = io::staging_directory(dir);
    const std::filesystem::path where = per_rank ? rank_directory(staging, rank) : staging;
    save_kv_state(model(), where, rank, per_rank || rank == 0);
    stack_.communicator.barrier().wait();  // every rank's part is on disk before the sidecar fingerprints it
    if (!per_rank)  // one checkpoint for all: it keeps every data replica's position (a per-rank one its own)
      extra =
          dist::with_replica_positions(stack_.communicator, replica(), replicas(), train_position, std::move(extra));
    if (per_rank || rank == 0) {
      io::trainer_state ts;
      ts.step = step_;
      ts.tokens = tokens_;
      ts.seed = seed;
      ts.train_data = train_position;
      ts.extra = std::move(extra);
      replica_.with_checkpoint_parameters([&](auto& params) {
        io::write_checkpoint(replica_.executor(), where, replica_.model().config(), params, replica_.states(), ts);
      });
    }
    stack_.communicator.barrier().wait();  // the checkpoint is complete before it is published
    if (rank == 0) io::publish_staging(dir);
    stack_.communicator.barrier().wait();
  }

  /// Restores a checkpoint written by save(): a whole-model one with any context layout (one saved inside a
  /// Mixture-of-Subspaces PCA window continues each rank's partial second moment, so it needs the same ranks), a
  /// per-rank one (sync_every > 1) with the ranks that wrote it, every rank's from the same step. Positions
  /// `loader` where the saved run stopped and returns the saved state. Collective.
  io::trainer_state resume(const std::filesystem::path& dir, data::batch_loader& loader) {
    const int rank = stack_.communicator.rank();
    const bool per_rank = std::filesystem::exists(rank_directory(dir, 0));
    require(!per_rank || std::filesystem::exists(rank_directory(dir, rank)), [&] {
      return std::string(who) + ": " + dir.string() +
             " holds one checkpoint per rank (sync_every > 1) and none for rank " + std::to_string(rank) +
             "; resume it with the ranks that saved it";
    });
    const std::filesystem::path where = per_rank ? rank_directory(dir, rank) : dir;
    io::trainer_state ts;
    replica_.with_checkpoint_parameters([&](auto& params) {
      ts = io::load_checkpoint(replica_.executor(), where, replica_.model().config(), params, replica_.states());
    });
    const std::vector<std::uint64_t> steps =
        dist::detail::all_gather_host(stack_.communicator, {std::uint64_t(ts.step)});
    for (int r = 0; r < stack_.communicator.size(); ++r)
      require(steps[std::size_t(r)] == std::uint64_t(ts.step), [&] {
        return std::string(who) + ": " + dir.string() + ": rank " + std::to_string(r) + " restored step " +
               std::to_string(steps[std::size_t(r)]) + ", rank " + std::to_string(rank) + " step " +
               std::to_string(ts.step) + " (the ranks' checkpoints are of different saves)";
      });
    replica_.sync_model();
    if constexpr (!std::is_same_v<compressor_type, compress::identity>)
      load_kv_state(model(), where, rank, stack_.communicator.size(), !per_rank, stack_.compressor.options());
    loader.seek(per_rank ? ts.train_data : dist::replica_position(ts, replica(), replicas(), dir));
    step_ = ts.step;
    tokens_ = ts.tokens;
    set_kv_phase(model(), step_ + 1);
    stack_.communicator.barrier().wait();
    return ts;
  }

  static std::filesystem::path rank_directory(const std::filesystem::path& dir, int rank) {
    return dir / ("rank-" + std::to_string(rank));
  }

 private:
  static constexpr const char* who = "context::context_trainer";

  /// A full batch of the loader and this rank's rows of it.
  struct rows_source {
    data::batch_loader* loader = nullptr;
    const context::layout* layout = nullptr;
    int place = 0;
    host_tensor<std::int32_t> full_tokens, full_targets, tokens, targets;

    shape batch_shape() const { return shape{loader->options().batch, layout->rows_per_rank()}; }
    void next(view<std::int32_t, host_space> tok, view<std::int32_t, host_space> tgt) {
      const shape full{loader->options().batch, layout->seq()};
      if (full_tokens.shape() != full) {
        full_tokens = host_tensor<std::int32_t>(full);
        full_targets = host_tensor<std::int32_t>(full);
      }
      loader->next(full_tokens.v(), full_targets.v());
      layout->take<std::int32_t>(place, full_tokens.v(), tok);
      layout->take<std::int32_t>(place, full_targets.v(), tgt);
    }
    /// This rank's rows of one full batch, into `tokens` / `targets`.
    void take(const context::layout& lay, int p, view<const std::int32_t, host_space> tok,
              view<const std::int32_t, host_space> tgt) {
      const shape local{tok.dim(0), lay.rows_per_rank()};
      if (tokens.shape() != local) {
        tokens = host_tensor<std::int32_t>(local);
        targets = host_tensor<std::int32_t>(local);
      }
      lay.take<std::int32_t>(p, tok, tokens.v());
      lay.take<std::int32_t>(p, tgt, targets.v());
    }
  };

  static trainer_options checked(trainer_options o, communicator_type& world) {
    o.validate();
    require(world.size() % o.context_ranks == 0, [&] {
      return std::string(who) + ": context_ranks " + std::to_string(o.context_ranks) +
             " must divide the communicator's " + std::to_string(world.size()) + " ranks";
    });
    return o;
  }

  model_type build(const nn::llama_config& cfg, executor_type ex) {
    require(o_.seq <= cfg.max_seq, [&] {
      return std::string(who) + ": seq " + std::to_string(o_.seq) + " exceeds max_seq " + std::to_string(cfg.max_seq) +
             " of '" + cfg.name + "'";
    });
    blocks_.connect(group_, layout_);
    model_type m(cfg, ex, nn::llama_stage{}, nullptr, blocks_);
    m.set_positions(layout_.positions(place_));
    return m;
  }

  void check_loader(const data::batch_loader& loader) const {
    require(loader.options().seq == o_.seq, [&] {
      return std::string(who) + ": the loader reads sequences of " + std::to_string(loader.options().seq) +
             " tokens; the trainer spreads sequences of seq = " + std::to_string(o_.seq) + " over its ranks";
    });
  }

  template <class Update>
  double run(data::batch_loader& loader, Update&& update) {
    check_loader(loader);
    replica_.store().zero_grad(replica_.executor());
    source_.loader = &loader;
    source_.layout = &layout_;
    source_.place = place_;
    dist::bucket_cursor cursor(plan_);
    begin_kv_step(model(), step_ + 1);
    const double loss = engine_.run(
        stack_.scheduler.plan(step_, stack_.communicator.rank()), source_,
        [&](std::size_t first, std::size_t last) {
          if (o_.sync_every == 1) cursor.ready(first, last, [&](std::size_t k) { launch(k); });
        },
        [&] {
          wait_all();
          update();
        });
    wait_all();
    end_kv_step(model());
    return dist::detail::mean_over_ranks(stack_.communicator, loss);
  }

  void launch(std::size_t k) {
    const dist::bucket& b = plan_[k];
    pending_.push_back(
        stack_.communicator.all_reduce(replica_.store().flat_grads().slice(b.begin, b.end), comm::reduce_op::avg));
  }
  void wait_all() {
    for (request_type& req : pending_) req.wait();
    pending_.clear();
  }

  Stack stack_;
  trainer_options o_;
  context::layout layout_;
  int place_, replica_index_;
  communicator_type group_, replicas_;
  blocks<communicator_type, compressor_type> blocks_;
  replica_type replica_;
  compress::identity boundary_;  // the engine's (one stage: no boundary)
  train::plan_engine<model_type, compress::identity> engine_;
  dist::bucket_plan plan_;
  std::vector<request_type> pending_;
  rows_source source_;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace subspace::context
