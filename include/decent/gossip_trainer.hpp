#pragma once
// decent::gossip_trainer<Model, Stack>: Decent-DP's bucketed, overlapped gossip loop (docs/decent.md), with a
// decent topology as the stack's scheduler and any Optimizer, on the plan engine (subspace/train/engine.hpp).
//
//   decent::gossip_trainer t(nn::llama<exec::host, float>(cfg),
//                            subspace::stack{.communicator = world[r],
//                                            .scheduler = decent::alternating_exp_ring(n, 8),
//                                            .optimizer = decent::accum_adamw{}},
//                            options);       // decent::gossip_options: accumulation, clip, schedule, bucket size
//   t.init(seed);                          // identical weights on every rank (rank 0's are broadcast)
//   for (...) t.step(loader);              // this rank's loader holds this rank's shard
//   double val = t.evaluate(val_loader, 20);   // the loss of the global average x̄, averaged over the ranks
//   t.finish();                            // every rank ends with x̄
//
// State per rank: fp32 master parameters x (the model itself when its weights are fp32, else a flat fp32 copy
// beside the bf16 model) and a communication buffer of the same layout; both are cut into the buckets of
// subspace/dist/bucket.hpp, so each bucket is one contiguous block of each. One communicator per phase of the topology
// is made at construction (world.split(color = plan(q, rank).group_id, key = rank)); a plan's group_rank is the
// rank in it.
//
// The loop. Step t (0-based) computes the gradient at this rank's un-mixed x_i^t, and when bucket b's gradients
// are complete (the model's ready hook, during the last micro-batch's backward):
//   1. wait for bucket b's all-reduce launched in step t−1 (if any);
//   2. mix: x_b ← comm_b, the average of the group of round t (uniform weights);
//   3. local step on bucket b: clip by the bucket's own gradient norm (a global norm would need a barrier),
//      then one optimizer step per parameter from the mixed point (decent_adam / accum_adam fuse 2 and 3 in
//      step_from_mixed; other optimizers get the mixed point copied into the master first); the bf16 working copy
//      is written in the same pass;
//   4. comm_b ← x_b · 1/|R'| for the group R' of round t+1, and launch all_reduce(comm_b, sum) on R''s
//      communicator, asynchronously.
// So bucket b's gossip overlaps the rest of this backward and the next forward, up to bucket b's ready point in
// step t+1. Every rank ends step t with
//     x_i^{t+1} = Σ_j W^t_ij x_j^t − γ_t · d_i(g_i(x_i^t))        (W^t: plan(t, ·) of the topology)
// which the tests check against a sequential simulator of exactly this formula.
//
// The first step. All ranks start from the same x^0 (init broadcasts rank 0's
// weights), so W^0 x^0 = x^0: step 0 has nothing to mix and steps straight from x^0. Its exchange, launched from
// the hook like every other, already uses the group of round 1 (Decent-DP's "step 2") for both the scaling and the
// mixing in step 1. A bucket whose group in the next round is the rank alone (mix_op::none) sends nothing and is
// not mixed. The exchange is waited asynchronously, at the bucket's next ready point; the authors' code waits
// for the first one synchronously, which gives the same values.
//
// Gradient accumulation: micro-batches before the last accumulate gradients without stepping or communicating.
//
// Not in a step: global_average() waits for the pending exchanges (their results stay for the next step), backs
// up x and replaces it by the mean over all ranks (one all-reduce on the world); revert_global_average() restores
// x; evaluate() does both around the evaluation; consensus_distance() = mean_i ‖x_i − x̄‖ / ‖x̄‖; finish() waits
// and leaves every rank with x̄ (a later step then has nothing to mix, as in step 0).
//
// step_result: loss is this rank's mean training loss (a global mean would need the barrier gossip avoids),
// grad_norm this rank's gradient norm before the per-bucket clipping, tokens every rank's tokens of the step;
// skipped when some bucket's gradient norm was not finite (that bucket is mixed but takes no local step).
//
// What crosses the wire per step and rank: Σ_b plan(t+1, rank).bytes_sent(4 · numel_b) — for pairs,
// the bucket once (4p bytes in all); nothing else. Moments are never sent.
//
// Device memory: the communicator's operations must be ordered on the model executor's stream
// (comm::local: local_options::streams[r]; comm::nccl: nccl_options::stream). Reading a bucket's gradient norm
// synchronises the host with that stream once per bucket.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <subspace/comm/concepts.hpp>
#include <subspace/core/error.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/dist/bucket.hpp>
#include <subspace/kernels/elementwise.hpp>
#include <subspace/kernels/reduce.hpp>
#include <subspace/nn/concepts.hpp>
#include <subspace/optim/schedule.hpp>
#include <subspace/policies.hpp>
#include <subspace/schedule/gradient_accumulation.hpp>
#include <subspace/train/engine.hpp>
#include <subspace/train/trainer.hpp>

#include "detail/replica.hpp"
#include "plan.hpp"

namespace decent {

/// A gossip topology: a Scheduler whose plans are gossip_plan, with a period (topology.hpp, or any
/// group_schedule).
template <class S>
concept GossipTopology =
    subspace::Scheduler<S> && std::is_same_v<typename S::plan_type, gossip_plan> && requires(const S& s) {
      { s.period() } -> std::convertible_to<int>;
    };

/// The gossip trainer's options: the data-parallel ones (clip per bucket, schedule, bucket size) and the
/// micro-batches per local step.
struct gossip_options : subspace::dist::trainer_options {
  std::int64_t accumulation = 1;

  /// Throws invalid_argument naming the field and the expected value.
  void validate() const {
    subspace::dist::trainer_options::validate();
    subspace::require(accumulation >= 1,
                      [&] { return "gossip_options: accumulation must be >= 1, got " + std::to_string(accumulation); });
  }
};

template <class Model, class Stack>
class gossip_trainer {
  static_assert(subspace::check_stack<Stack>());
  static_assert(subspace::nn::check_model<Model>());
  static_assert(GossipTopology<std::remove_cvref_t<decltype(Stack::scheduler)>>,
                "decent::gossip_trainer: the stack's scheduler must be a gossip topology — plan(t, rank) returning "
                "decent::gossip_plan, and period() (decent::complete, ring, one_peer_exp, alternating_exp_ring, "
                "or a decent::group_schedule)");

 public:
  using model_type = Model;
  using stack_type = Stack;
  using communicator_type = std::remove_cvref_t<decltype(Stack::communicator)>;
  using scheduler_type = std::remove_cvref_t<decltype(Stack::scheduler)>;
  using optimizer_type = std::remove_cvref_t<decltype(Stack::optimizer)>;
  using compressor_type = std::remove_cvref_t<decltype(Stack::compressor)>;
  using replica_type = subspace::train::replica<Model, optimizer_type>;
  using executor_type = typename replica_type::executor_type;
  using space = typename replica_type::space;
  using state_type = typename replica_type::state_type;
  using request_type = subspace::dist::detail::all_reduce_request_t<communicator_type, float, space>;

  static_assert(replica_type::has_masters,
                "decent::gossip_trainer: the model's weights must be fp32 (their own masters) or bf16 (with fp32 "
                "masters)");

  /// Collective over the stack's communicator: checks that every rank cut the same bucket plan (an error names
  /// the first differing tensor), then makes one communicator per phase of the topology (one split each).
  gossip_trainer(Model model, Stack stack, gossip_options o)
      : gossip_trainer(subspace::train::as_stages(std::move(model)), std::move(stack), std::move(o)) {}
  /// A model given as the stages of one rank, in order, sharing one parameter store.
  gossip_trainer(std::vector<Model> stages, Stack stack, gossip_options o)
      : stack_(std::move(stack)),
        replica_(std::move(stages), stack_.optimizer, stack_.compressor),
        o_(std::move(o)),
        engine_(replica_.stages(), stack_.compressor, replica_.compressor_parameters()) {
    o_.validate();
    accumulation_ = subspace::schedule::gradient_accumulation{int(o_.accumulation)};
    subspace::require(topology().world_size() == comm().size(), [&] {
      return std::string(who) + ": the topology is written for " + std::to_string(topology().world_size()) +
             " ranks, the communicator has " + std::to_string(comm().size());
    });
    plan_ = subspace::dist::bucket_plan::of(replica_.store(), o_.bucket_bytes);
    subspace::dist::check_same_plan(comm(), plan_, who);
    comm_buf_ = subspace::tensor<float, space>(subspace::shape{plan_.total()});
    subspace::fill(replica_.executor(), comm_buf_.v(), 0.0f);
    for (int q = 0; q < topology().period(); ++q)
      groups_.push_back(comm().split(topology().plan(q, comm().rank()).group_id, comm().rank()));
    in_flight_.resize(plan_.size());
    holds_mix_.assign(plan_.size(), false);
  }
  gossip_trainer(gossip_trainer&& other) noexcept
      : stack_(std::move(other.stack_)),
        replica_(std::move(other.replica_)),
        o_(std::move(other.o_)),
        engine_(std::move(other.engine_)),
        accumulation_(other.accumulation_),
        plan_(std::move(other.plan_)),
        groups_(std::move(other.groups_)),
        comm_buf_(std::move(other.comm_buf_)),
        in_flight_(std::move(other.in_flight_)),
        holds_mix_(std::move(other.holds_mix_)),
        next_(other.next_),
        backup_(std::move(other.backup_)),
        scratch_(std::move(other.scratch_)),
        averaged_(other.averaged_),
        step_(other.step_),
        tokens_(other.tokens_) {
    engine_.bind(replica_.stages(), stack_.compressor);  // the engine points at this trainer's members
  }
  gossip_trainer& operator=(gossip_trainer&&) = delete;
  /// Waits for the exchanges still in flight: peers write into this trainer's buffers until they complete.
  ~gossip_trainer() {
    try {
      wait_pending();
    } catch (...) {
    }
  }

  Model& model() { return replica_.model(); }
  std::vector<Model>& stages() { return replica_.stages(); }
  communicator_type& communicator() { return stack_.communicator; }
  const scheduler_type& topology() const { return stack_.scheduler; }
  const optimizer_type& optimizer() const { return replica_.optimizer(); }
  const gossip_options& options() const { return o_; }
  /// The bucket plan, in gradient-ready order.
  const subspace::dist::bucket_plan& buckets() const { return plan_; }
  /// Local steps taken; the next step mixes with plan(steps_done(), ·).
  std::int64_t steps_done() const { return step_; }
  /// Tokens of every rank so far.
  std::int64_t tokens_done() const { return tokens_; }
  /// Bytes of this rank's optimizer states (masters and communication buffer not included).
  std::size_t optimizer_state_bytes() const { return replica_.optimizer_state_bytes(); }
  std::vector<state_type>& states() { return replica_.states(); }
  /// This rank's fp32 master parameters x_i, flat (laid out like the model's storage).
  subspace::view<float, space> master_values() { return replica_.masters(); }
  /// Whether the weights are the global average of global_average(), until revert_global_average().
  bool averaged() const { return averaged_; }

  /// Initialises the weights from `seed` (nn::llama::init) and makes every rank hold rank 0's (collective).
  void init(std::uint64_t seed) {
    require_local("init");
    wait_pending();
    replica_.init(seed);
    replica_.broadcast_from_rank0(comm());
    std::fill(holds_mix_.begin(), holds_mix_.end(), false);  // identical replicas: nothing to mix
  }

  /// One local step with the overlapped gossip (see the top of this file).
  subspace::train::step_result step(subspace::data::batch_loader& loader) {
    require_local("step");
    subspace::train::step_result r;
    r.step = step_ + 1;
    r.lr = o_.schedule.at(r.step);
    const subspace::optim::step_context ctx{r.lr, r.step};
    next_ = topology().plan(step_ + 1, comm().rank());
    replica_.store().zero_grad(replica_.executor());
    double squared_norm = 0;
    subspace::dist::bucket_cursor cursor(plan_);
    const double loss = engine_.run(
        accumulation_.plan(step_, 0), subspace::train::loader_source{loader},
        [&](std::size_t first, std::size_t last) {
          cursor.ready(first, last, [&](std::size_t k) { step_bucket(k, ctx, squared_norm, r.skipped); });
        },
        [&] {
          subspace::require(cursor.done(), [&] {
            return std::string(who) + ": backward completed only " + std::to_string(cursor.launched()) + " of " +
                   std::to_string(plan_.size()) + " buckets (every tensor must be reported ready)";
          });
          for (Model& m : replica_.stages()) m.after_step();
        });
    r.loss = loss;
    r.grad_norm = std::sqrt(squared_norm);
    r.tokens = replica_type::batch_tokens(loader) * o_.accumulation * comm().size();
    step_ = r.step;
    tokens_ += r.tokens;
    return r;
  }

  /// The loss of the global average x̄ over `batches` batches of `loader` on every rank (each rank its own
  /// loader, read from its start and left there), averaged over the ranks. Collective; x is restored afterwards
  /// (unless it already was the average).
  double evaluate(subspace::data::batch_loader& loader, std::int64_t batches) {
    subspace::require(batches >= 1, [&] {
      return std::string(who) + "::evaluate: batches must be >= 1, got " + std::to_string(batches);
    });
    const bool restore = !averaged_;
    if (restore) global_average();
    const double local = replica_.evaluate_local(
        loader, batches, who, [&](auto tokens, auto targets) { return engine_.evaluate(tokens, targets); });
    if (restore) revert_global_average();
    return subspace::dist::detail::mean_over_ranks(comm(), local);
  }

  /// Replaces x_i by x̄ = mean over the ranks, keeping x_i for revert_global_average(); pending exchanges are
  /// waited for first and their results kept for the next step. Collective.
  void global_average() {
    subspace::require(!averaged_, [&] {
      return std::string(who) +
             "::global_average: the weights already are the average "
             "(call revert_global_average() first)";
    });
    wait_pending();
    const executor_type& ex = replica_.executor();
    if (backup_.numel() != plan_.total()) backup_ = subspace::tensor<float, space>(subspace::shape{plan_.total()});
    subspace::copy(ex, subspace::view<const float, space>(replica_.masters()), backup_.v());
    comm().all_reduce(replica_.masters(), subspace::comm::reduce_op::avg).wait();
    replica_.sync_model();
    averaged_ = true;
  }

  /// Restores the x_i that global_average() replaced.
  void revert_global_average() {
    subspace::require(averaged_,
                      [&] { return std::string(who) + "::revert_global_average: no global_average() to revert"; });
    subspace::copy(replica_.executor(), subspace::view<const float, space>(backup_.v()), replica_.masters());
    replica_.sync_model();
    averaged_ = false;
  }

  /// mean_i ‖x_i − x̄‖ / ‖x̄‖ over the ranks' master parameters (collective; waits for pending exchanges).
  double consensus_distance() {
    wait_pending();
    const executor_type& ex = replica_.executor();
    if (scratch_.numel() != plan_.total()) scratch_ = subspace::tensor<float, space>(subspace::shape{plan_.total()});
    const subspace::view<const float, space> x = replica_.masters();
    const subspace::view<const float, space> s = scratch_.v();
    subspace::copy(ex, x, scratch_.v());
    comm().all_reduce(scratch_.v(), subspace::comm::reduce_op::avg).wait();
    const double mean_norm = std::sqrt(double(subspace::squared_norm(ex, s)));
    subspace::axpy(ex, -1.0f, x, scratch_.v());  // x̄ − x_i
    const double distance = std::sqrt(double(subspace::squared_norm(ex, s)));
    return subspace::dist::detail::mean_over_ranks(comm(), distance) / mean_norm;
  }

  /// Waits for the pending exchanges and leaves every rank with the global average x̄ (kept, not revertible).
  /// Training may continue afterwards: the replicas are identical, so the next step has nothing to mix.
  void finish() {
    wait_pending();
    if (averaged_) {
      averaged_ = false;  // keep the average
    } else {
      comm().all_reduce(replica_.masters(), subspace::comm::reduce_op::avg).wait();
      replica_.sync_model();
    }
    std::fill(holds_mix_.begin(), holds_mix_.end(), false);
  }

 private:
  static constexpr const char* who = "decent::gossip_trainer";

  void require_local(const char* what) const {
    subspace::require(!averaged_, [&] {
      return std::string(who) + "::" + what +
             ": the weights are the global average of global_average(); call "
             "revert_global_average() first (or finish() to keep the average)";
    });
  }

  /// Waits for every exchange in flight; their results stay in the communication buffer for the next step.
  void wait_pending() {
    for (auto& req : in_flight_)
      if (req) {
        req->wait();
        req.reset();
      }
  }

  /// Steps 1-4 of the loop for bucket k, from the model's ready hook.
  void step_bucket(std::size_t k, const subspace::optim::step_context& ctx, double& squared_norm, bool& skipped) {
    const subspace::dist::bucket& b = plan_[k];
    const executor_type& ex = replica_.executor();
    // 1. The mixing launched in the previous step.
    if (in_flight_[k]) {
      in_flight_[k]->wait();
      in_flight_[k].reset();
    }
    const bool mix = holds_mix_[k];
    // 2-3. Mix and step, clipped by this bucket's gradient norm.
    const double norm = subspace::optim::clip_grad_norm(ex, replica_.grads(b.first, b.last), o_.clip);
    squared_norm += norm * norm;
    if (std::isfinite(norm)) {
      for (std::size_t i = b.first; i < b.last; ++i) {
        if (mix) detail::step_from_mixed(replica_, i, mixed(i), ctx);
        else replica_.step(i, ctx);
      }
    } else {
      skipped = true;  // no local step; the bucket is still mixed
      if (mix) {
        subspace::copy(ex, subspace::view<const float, space>(comm_buf_.v().slice(b.begin, b.end)),
                       replica_.masters().slice(b.begin, b.end));
        replica_.sync_model(b.begin, b.end);
      }
    }
    // 4. The mixing for the next step: comm_b = x_b / |R'|, summed over R'.
    holds_mix_[k] = next_.op != mix_op::none;
    if (!holds_mix_[k]) return;
    const subspace::view<float, space> c = comm_buf_.v().slice(b.begin, b.end);
    subspace::copy(ex, subspace::view<const float, space>(replica_.masters().slice(b.begin, b.end)), c);
    subspace::scale(ex, float(next_.weight()), c);
    in_flight_[k] = groups_[std::size_t(next_.phase)].all_reduce(c, subspace::comm::reduce_op::sum);
  }

  /// Parameter i's part of the communication buffer: the group average once its exchange completed.
  subspace::view<const float, space> mixed(std::size_t i) {
    return subspace::view<const float, space>(comm_buf_.data() + replica_.offset(i), replica_.info(i).shape);
  }

  communicator_type& comm() { return stack_.communicator; }

  Stack stack_;
  replica_type replica_;
  gossip_options o_;
  subspace::train::plan_engine<Model, compressor_type> engine_;
  subspace::schedule::gradient_accumulation accumulation_;  // the compute plan of a local step
  subspace::dist::bucket_plan plan_;
  std::vector<communicator_type> groups_;               // by phase: the group communicator of plan(q, rank)
  subspace::tensor<float, space> comm_buf_;             // the buckets' communication blocks (flat)
  std::vector<std::optional<request_type>> in_flight_;  // by bucket: the exchange launched last step
  std::vector<bool> holds_mix_;                         // by bucket: comm_buf_ holds (or will hold) the next mix
  gossip_plan next_;                                    // the plan of the round the current step launches
  subspace::tensor<float, space> backup_, scratch_;     // global_average()'s x_i; consensus_distance()'s x̄
  bool averaged_ = false;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace decent
