#pragma once
// train::replica<Model, Optimizer>: one copy of the training state — the model, its fp32 master weights, the
// optimizer and one optimizer state per parameter — and the per-parameter pieces of a training step. The
// single-device trainer (train/trainer.hpp) holds one; the data-parallel and gossip trainers (include/decent/)
// hold one per rank.
//
// The store holds the stages' tensors and, after them, those of the compressor between the stages: the replica
// has the compressor declare them (compress::declare) before it allocates the store and makes one optimizer
// state per tensor, and init(seed) initialises them with the stages'.
//
// Masters. A bf16 model (CUDA) gets fp32 masters beside it in one flat allocation laid out like the model's flat
// storage (padding zero), so a range of parameters is one contiguous range of masters, like the range of
// gradients a distributed trainer communicates; the optimizer writes the bf16 working copy into the model in the
// same pass. An fp32 model (the host reference) is its own master. An fp64 model (gradient checks) has no
// masters and cannot step.

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../compress/concepts.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/memory.hpp"
#include "../core/tensor.hpp"
#include "../data/loader.hpp"
#include "../io/checkpoint.hpp"
#include "../kernels/elementwise.hpp"
#include "../nn/parameters.hpp"
#include "../optim/concepts.hpp"

namespace subspace::train {

/// A whole model as the one stage of a rank (the trainers take a model or its stages).
template <class Model>
std::vector<Model> as_stages(Model model) {
  std::vector<Model> stages;
  stages.push_back(std::move(model));
  return stages;
}

template <class Model, class Optimizer>
class replica {
 public:
  using executor_type = typename Model::executor_type;
  using space = space_of_t<executor_type>;
  using value_type = typename Model::value_type;
  using grad_type = typename Model::grad_type;
  using state_type = optim::state_t<Optimizer, executor_type>;
  /// bf16 weights get fp32 masters beside them; fp32 weights are their own masters; fp64 weights have none.
  static constexpr bool separate_masters = std::is_same_v<value_type, bf16>;
  static constexpr bool has_masters = separate_masters || std::is_same_v<value_type, float>;

  replica(Model model, Optimizer optimizer) : replica(as_stages(std::move(model)), std::move(optimizer)) {}

  /// The stages one rank holds, in order, sharing one parameter store (a whole model is one stage).
  replica(std::vector<Model> stages, Optimizer optimizer)
      : replica(std::move(stages), std::move(optimizer), no_compressor{}) {}

  /// The same, with `compressor` (a Compressor between the stages, kept by the caller) declaring its trainable
  /// tensors in the store first; compressor_parameters() are their indices.
  template <class Compressor>
  replica(std::vector<Model> stages, Optimizer optimizer, Compressor&& compressor)
      : stages_(std::move(stages)), optimizer_(std::move(optimizer)) {
    require(!stages_.empty(), "train::replica: no model stages");
    for (const Model& m : stages_)
      require(&m.parameters() == &stages_[0].parameters(),
              "train::replica: the stages must share one parameter store (build them on one shared_ptr)");
    const executor_type& ex = executor();
    auto& store = stages_[0].parameters();
    compressor_parameters_ = compress::declare(compressor, store);
    if constexpr (requires { optimizer_.check_parameters(store); }) optimizer_.check_parameters(store);
    require_memory(store);
    store.allocate(ex);
    for (std::size_t i = 0; i < store.size(); ++i) states_.push_back(optimizer_.init(ex, store.info(i)));
    if constexpr (separate_masters) {
      own_ = tensor<float, space>(shape{store.total()});
      fill(ex, own_.v(), 0.0f);  // the padding stays zero, like the model's
    }
  }

  /// The first (for a whole model, the only) stage.
  Model& model() { return stages_.front(); }
  const Model& model() const { return stages_.front(); }
  std::vector<Model>& stages() { return stages_; }
  /// The store every stage's tensors live in.
  auto& store() { return stages_.front().parameters(); }
  const auto& store() const { return stages_.front().parameters(); }
  const Optimizer& optimizer() const { return optimizer_; }
  std::vector<state_type>& states() { return states_; }
  const std::vector<state_type>& states() const { return states_; }
  const executor_type& executor() const { return stages_.front().executor(); }
  std::size_t parameters() const { return states_.size(); }
  /// The store indices of the compressor's tensors (empty without a compressor, or for one without parameters).
  compress::parameter_range compressor_parameters() const { return compressor_parameters_; }
  const optim::param_info& info(std::size_t i) const { return store().info(i); }
  std::int64_t offset(std::size_t i) const { return store().offset(i); }

  std::size_t optimizer_state_bytes() const {
    std::size_t total = 0;
    for (const auto& s : states_) total += optimizer_.state_bytes(s);
    return total;
  }

  /// The fp32 masters as one flat view laid out like the model's flat storage.
  view<float, space> masters() {
    static_assert(has_masters, "train::replica: the model's weights must be fp32 or bf16 to have master weights");
    if constexpr (separate_masters) return own_.v();
    else return store().flat_values();
  }
  view<float, space> master(std::size_t i) { return at(masters(), i); }
  view<grad_type, space> grad(std::size_t i) { return at(store().flat_grads(), i); }
  /// Where the optimizer writes the bf16 working copy of parameter i (none when the model is its own master).
  view<bf16, space> working(std::size_t i) {
    if constexpr (separate_masters) return at(store().flat_values(), i);
    else return {};
  }
  /// The gradients of parameters [first, last) as one range of the flat storage, for clipping: the padding
  /// between tensors is zero, so its norm and scaling are the tensors', in one reduction (one synchronisation on
  /// CUDA) instead of one per tensor.
  std::array<view<grad_type, space>, 1> grads(std::size_t first, std::size_t last) {
    return {store().flat_grads().slice(offset(first), offset(last))};
  }

  /// nn::llama::init(seed) of every stage and the compressor's tensors' initial values (parameter_info::init);
  /// the masters get the same draws before their rounding to the model's type.
  void init(std::uint64_t seed) {
    for (Model& m : stages_) m.init(seed);
    store().init(executor(), seed, compressor_parameters_.first, compressor_parameters_.last);
    if constexpr (separate_masters) {
      for (std::size_t i = 0; i < parameters(); ++i) nn::fill_initial(executor(), master(i), info(i), seed);
    }
  }

  /// Every rank takes rank 0's weights (masters, or the values of a model without masters): the common start of
  /// the data-parallel and gossip trainers (docs/decent.md, "Trainers").
  template <class C>
  void broadcast_from_rank0(C& comm) {
    if constexpr (has_masters) comm.broadcast(masters(), 0).wait();
    else comm.broadcast(store().flat_values(), 0).wait();
    sync_model();
  }

  /// Calls f(params) with the parameters as checkpoints see them: the fp32 masters in place of bf16 model values
  /// (io::with_values), so a checkpoint holds, and a resume restores, the masters.
  template <class F>
  void with_checkpoint_parameters(F&& f) {
    if constexpr (!separate_masters) {
      f(store());
    } else {
      std::vector<view<float, space>> values;
      for (std::size_t i = 0; i < parameters(); ++i) values.push_back(master(i));
      auto params = io::with_values(store(), values);
      f(params);
    }
  }

  /// The model's working copy from the masters (after the masters changed outside the optimizer).
  void sync_model() {
    if constexpr (separate_masters) cast(executor(), view<const float, space>(own_.v()), store().flat_values());
  }
  /// Elements [begin, end) of the working copy from the masters.
  void sync_model(std::int64_t begin, std::int64_t end) {
    if constexpr (separate_masters)
      cast(executor(), view<const float, space>(own_.v().slice(begin, end)), store().flat_values().slice(begin, end));
  }

  /// One optimizer step of parameter i from its master and gradient (a grad_scale other than 1 needs an optimizer
  /// that applies it; step_all scales the gradients for the others).
  void step(std::size_t i, const optim::step_context& ctx) {
    if constexpr (!optim::applies_grad_scale<Optimizer>)
      require(ctx.grad_scale == 1.0f,
              "train::replica::step: this optimizer does not apply step_context::grad_scale "
              "(step_all scales the gradients in memory for it)");
    optimizer_.step(executor(), master(i), view<const grad_type, space>(grad(i)), states_[i], info(i), ctx, working(i));
  }
  /// One optimizer step of every parameter, then the stages' after_step hooks (policies that constrain weights).
  /// ctx.grad_scale (the clipping factor) goes to an optimizer that applies it as it reads each gradient; for any
  /// other, the gradients are scaled in memory first.
  void step_all(optim::step_context ctx) {
    if constexpr (!optim::applies_grad_scale<Optimizer>) {
      if (ctx.grad_scale != 1.0f)
        for (const auto& g : grads(0, parameters())) scale(executor(), ctx.grad_scale, g);
      ctx.grad_scale = 1.0f;
    }
    for (std::size_t i = 0; i < parameters(); ++i) step(i, ctx);
    for (Model& m : stages_) m.after_step();
  }
  /// The next batch of `loader` into the trainer's buffers (sized on first use or when the loader's shape changes).
  void next_batch(data::batch_loader& loader) {
    size_buffers(loader);
    loader.next(tokens_.v(), targets_.v());
  }
  view<const std::int32_t, host_space> tokens() const { return tokens_.v(); }
  view<const std::int32_t, host_space> targets() const { return targets_.v(); }
  /// Tokens of one batch of `loader`.
  static std::int64_t batch_tokens(const data::batch_loader& loader) {
    return loader.options().batch * loader.options().seq;
  }

  /// The mean loss over the first `batches` batches of `loader`
  /// (at most one epoch): the same batches every call. The loader is left at its start.
  double evaluate_local(data::batch_loader& loader, std::int64_t batches, const std::string& who) {
    return evaluate_local(loader, batches, who,
                          [&](auto tokens, auto targets) { return model().evaluate(tokens, targets); });
  }
  /// The same, with the loss of one batch computed by evaluate(tokens, targets) (a chain of stages).
  template <class Evaluate>
  double evaluate_local(data::batch_loader& loader, std::int64_t batches, const std::string& who, Evaluate&& evaluate) {
    require(batches >= 1, [&] { return who + "::evaluate: batches must be >= 1, got " + std::to_string(batches); });
    const auto per_epoch = std::int64_t(loader.batches_per_epoch());
    const std::int64_t n = std::min(batches, per_epoch);
    loader.reset();
    double total = 0;
    for (std::int64_t b = 0; b < n; ++b) {
      next_batch(loader);
      total += evaluate(tokens(), targets());
    }
    loader.reset();
    return total / double(n);
  }

 private:
  /// Parameter i's elements of a flat view laid out like the model's storage.
  template <class T>
  view<T, space> at(view<T, space> flat, std::size_t i) const {
    return view<T, space>(flat.data() + offset(i), info(i).shape);
  }

  /// Checks, before anything is allocated, that the training state fits the memory of the executor's space:
  /// values and gradients, fp32 masters, and the optimizer's states where it can tell their size up front.
  template <class Store>
  void require_memory(const Store& store) const {
    const auto elements = std::uint64_t(store.total());
    const std::uint64_t weights = elements * (sizeof(value_type) + sizeof(grad_type));
    const std::uint64_t masters = separate_masters ? elements * sizeof(float) : 0;
    std::uint64_t states = 0;
    if constexpr (requires(const Optimizer& o, const optim::param_info& i) { o.state_bytes_for(i); })
      for (const auto& i : store.infos()) states += std::uint64_t(optimizer_.state_bytes_for(i));
    require_capacity<space>(weights + masters + states, [&] {
      return "train::replica: the training state of " + std::to_string(store.numel()) + " parameters (values and " +
             "gradients " + std::to_string(weights) + " bytes, fp32 masters " + std::to_string(masters) +
             ", optimizer states " + std::to_string(states) + ")";
    });
  }

  void size_buffers(const data::batch_loader& loader) {
    const shape s{loader.options().batch, loader.options().seq};
    if (tokens_.shape() == s) return;
    tokens_ = host_tensor<std::int32_t>(s);
    targets_ = host_tensor<std::int32_t>(s);
  }

  /// Declares nothing.
  struct no_compressor {
    template <class Store>
    void declare_parameters(Store&) const {}
  };

  std::vector<Model> stages_;
  Optimizer optimizer_;
  compress::parameter_range compressor_parameters_;
  std::vector<state_type> states_;
  tensor<float, space> own_;  // the fp32 masters of a bf16 model (flat); empty otherwise
  host_tensor<std::int32_t> tokens_, targets_;
};

}  // namespace subspace::train
