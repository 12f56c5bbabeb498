#pragma once
// decent::data_parallel_trainer<Model, Stack>: the all-reduce baseline of the spec (shared/specs/decent-dp.md
// §2 "All-reduce Adam baseline", §8.4) — PyTorch DDP's algorithm with any Optimizer policy (optim::adamw,
// optim::galore, optim::golore, ...).
//
//   decent::data_parallel_trainer<nn::llama<exec::host, float>, my_stack> t(std::move(model), comm, optim::adamw{}, o);
//   t.init(seed);                        // identical weights on every rank (rank 0's are broadcast)
//   auto r = t.step(loader);             // this rank's loader holds this rank's shard
//   double val = t.evaluate(val_loader, 20);
//
// One step on every rank: zero the gradients; `accumulation` micro-batches of forward (loss scale
// 1/accumulation) and backward, the last backward with the ready hook: as soon as a bucket's gradients are
// complete (decent/bucket.hpp), its all-reduce is launched (asynchronous, in place on the model's flat gradients,
// reduce_op::avg: the sum over the ranks divided by n inside the reduction), so the communication overlaps the
// rest of the backward. Then wait for every bucket, clip by the global gradient norm (every rank holds the same
// mean gradient, so every rank computes the same norm: no extra communication), and take one optimizer step per
// parameter exactly as train::trainer does (fp32 masters beside a bf16 model, the working copy written in the
// same pass). Every rank ends the step with the same weights.
//
// With n ranks and a batch of B rows per rank, a step equals train::trainer's step on the n·B rows of every rank
// concatenated (the per-rank losses are means over equally many tokens, so the mean of the ranks' gradients is
// the gradient of the global mean loss); the tests check this in fp32 and, for the gradient alone, in fp64.
//
// What crosses the wire per step (spec §5): every bucket's gradients once through a ring all-reduce —
// 2(n-1)/n · 4p bytes per rank for p fp32 gradients — plus the all-reduce of the step's loss (one double), which
// makes step_result::loss the mean over the ranks. Stack::scheduler is not used (accumulation comes from the
// options); Stack::compressor must be compress::identity.
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

#include <subspace/comm/concepts.hpp>
#include <subspace/compress/identity.hpp>
#include <subspace/core/error.hpp>
#include <subspace/data/loader.hpp>
#include <subspace/optim/schedule.hpp>
#include <subspace/policies.hpp>
#include <subspace/train/trainer.hpp>

#include "bucket.hpp"
#include "detail/replica.hpp"

namespace decent {

template <class Model, class Stack>
class data_parallel_trainer {
  static_assert(subspace::check_stack<Stack>());
  static_assert(BucketedModel<Model>,
                "decent::data_parallel_trainer<Model, Stack>: Model needs the llama interface with flat storage — "
                "forward, evaluate, backward(ready), zero_grad, init, for_each_parameter, flat_values(), "
                "flat_grads(), parameter_offset(i), parameter_specs() (see nn/llama.hpp)");
  static_assert(std::is_same_v<typename Stack::compressor, subspace::compress::identity>,
                "decent::data_parallel_trainer: Stack::compressor must be compress::identity (the baseline "
                "all-reduces uncompressed gradients)");

 public:
  using model_type = Model;
  using communicator_type = typename Stack::communicator;
  using optimizer_type = typename Stack::optimizer;
  using replica_type = subspace::train::replica<Model, optimizer_type>;
  using executor_type = typename replica_type::executor_type;
  using space = typename replica_type::space;
  using grad_type = typename replica_type::grad_type;
  using state_type = typename replica_type::state_type;
  using request_type = detail::all_reduce_request_t<communicator_type, grad_type, space>;

  /// Collective over `comm`: checks that every rank cut the same bucket plan (an error names the first
  /// differing tensor).
  data_parallel_trainer(Model model, communicator_type comm, optimizer_type opt, trainer_options o)
      : replica_(std::move(model), std::move(opt)), comm_(std::move(comm)), o_(std::move(o)) {
    o_.validate();
    subspace::require(comm_.size() >= 1, std::string(who) + ": the communicator has no ranks");
    plan_ = bucket_plan::of(replica_.model(), o_.bucket_bytes);
    check_same_plan(comm_, plan_, who);
  }
  data_parallel_trainer(data_parallel_trainer&&) = default;
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
  communicator_type& communicator() { return comm_; }
  const optimizer_type& optimizer() const { return replica_.optimizer(); }
  const trainer_options& options() const { return o_; }
  /// The bucket plan, in gradient-ready order.
  const bucket_plan& buckets() const { return plan_; }
  std::int64_t steps_done() const { return step_; }
  /// Tokens of every rank so far.
  std::int64_t tokens_done() const { return tokens_; }
  /// Bytes of this rank's optimizer states (masters not included).
  std::size_t optimizer_state_bytes() const { return replica_.optimizer_state_bytes(); }
  std::vector<state_type>& states() { return replica_.states(); }
  /// The fp32 master weights, flat (laid out like the model's storage).
  subspace::view<float, space> master_values() { return replica_.masters(); }

  /// Initialises the weights from `seed` (nn::llama::init) and makes every rank hold rank 0's (collective).
  void init(std::uint64_t seed) {
    replica_.init(seed);
    replica_.broadcast_from_rank0(comm_);
  }

  /// One optimizer step on `accumulation` batches of `loader` on every rank (see the top of this file).
  /// step_result: loss is the mean over the ranks, tokens counts every rank's, grad_norm is the global norm of
  /// the mean gradient before clipping.
  subspace::train::step_result step(subspace::data::batch_loader& loader) {
    static_assert(replica_type::has_masters,
                  "decent::data_parallel_trainer::step: the model's weights must be fp32 or bf16 (an fp64 model "
                  "can only compute_gradients)");
    subspace::train::step_result r;
    r.step = step_ + 1;
    r.loss = compute_gradients(loader);
    r.tokens = replica_type::batch_tokens(loader) * o_.accumulation * comm_.size();
    r.lr = o_.schedule.at(r.step);
    r.grad_norm = subspace::optim::clip_grad_norm(replica_.executor(), replica_.grads(0, replica_.parameters()),
                                                  o_.clip);
    r.skipped = !std::isfinite(r.grad_norm);
    if (!r.skipped) {
      const subspace::optim::step_context ctx{r.lr, r.step};
      for (std::size_t i = 0; i < replica_.parameters(); ++i) replica_.step(i, ctx);
    }
    step_ = r.step;
    tokens_ += r.tokens;
    return r;
  }

  /// The forward and backward passes of a step with the overlapped bucket all-reduces, without the update:
  /// leaves the mean gradient over the ranks in the model's gradients and returns the step's loss (mean over the
  /// ranks). step() is this, then clipping and the optimizer; tests call it alone (also on fp64 models).
  double compute_gradients(subspace::data::batch_loader& loader) {
    Model& m = replica_.model();
    m.zero_grad();
    const float scale = float(1.0 / double(o_.accumulation));
    double loss = 0;
    for (std::int64_t micro = 0; micro < o_.accumulation; ++micro) {
      replica_.next_batch(loader);
      loss += m.forward(replica_.tokens(), replica_.targets(), scale);
      if (micro + 1 < o_.accumulation) {
        m.backward();  // accumulation micro-steps: no communication
        continue;
      }
      std::size_t next = 0;  // the first bucket not launched yet
      m.backward([&](std::size_t first, std::size_t) {
        for (; next < plan_.size() && plan_[next].first >= first; ++next) launch(plan_[next]);
      });
      subspace::require(next == plan_.size(), std::string(who) + ": backward completed only " +
                                                  std::to_string(next) + " of " + std::to_string(plan_.size()) +
                                                  " buckets (the model's ready hook must reach parameter 0)");
    }
    for (request_type& req : pending_) req.wait();
    pending_.clear();
    return detail::mean_over_ranks(comm_, loss / double(o_.accumulation));
  }

  /// The mean loss over `batches` batches of `loader` on every rank (each rank its own loader), averaged over the
  /// ranks; like train::trainer::evaluate, each loader is read from its start and left there. Collective.
  double evaluate(subspace::data::batch_loader& loader, std::int64_t batches) {
    return detail::mean_over_ranks(comm_, replica_.evaluate_local(loader, batches, who));
  }

 private:
  static constexpr const char* who = "decent::data_parallel_trainer";

  /// Starts the mean over the ranks of one bucket's gradients, in place.
  void launch(const bucket& b) {
    pending_.push_back(comm_.all_reduce(replica_.store().flat_grads().slice(b.begin, b.end),
                                        subspace::comm::reduce_op::avg));
  }

  replica_type replica_;
  communicator_type comm_;
  trainer_options o_;
  bucket_plan plan_;
  std::vector<request_type> pending_;
  std::int64_t step_ = 0, tokens_ = 0;
};

}  // namespace decent
