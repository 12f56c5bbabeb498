#pragma once
// nn::parameter_store: every trainable tensor of a model — its own, its block policies' and its compressors' — in
// one flat allocation of values and one of gradients, described by subspace::parameter_info.
//
// Modules declare tensors with add(info), which returns the tensor's index; the index is its place in the flat
// storage order, in the checkpoint and in the optimizer's list of states. Each tensor starts on a multiple of
// `alignment` elements (256 bytes of bf16) and the padding between tensors stays zero, so any run of consecutive
// tensors is one contiguous range of the flat views — what clipping, bucketed all-reduces and gossip work on.
//
// Storage is allocated by allocate(ex). A tensor declared after that (a compressor that a trainer adds to a model
// already built) grows the store: allocate() again keeps the values of the tensors already there, and
// generation() changes, so modules that cached views re-read them. Gradients start at zero.
//
// Several models may share one store (the stages a rank holds, and the compressors between them): they hold it
// by std::shared_ptr and declare their tensors in the order they are built.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/random.hpp"

namespace subspace::nn {

/// A parameter tensor: its value and its gradient (views into a store's two allocations).
template <class T, class G, class Space>
struct parameter {
  view<T, Space> value;
  view<G, Space> grad;
};

/// Fills x with the initial values of `info` for `seed`, in x's element type and the executor's space (the same
/// draws on the host and the device, before any rounding to a model's element type).
template <class Exec, class U>
void fill_initial(const Exec& ex, view<U, space_of_t<Exec>> x, const parameter_info& info, std::uint64_t seed) {
  require(x.shape() == info.shape, [&] {
    return "fill_initial: " + info.name + " has shape " + to_string(info.shape) + ", the view has shape " +
           to_string(x.shape());
  });
  if (info.init.std > 0.0f) fill_normal(ex, x, seed, info.init.stream, 0.0f, info.init.std);
  else fill(ex, x, U(info.init.constant));
}

template <class T, class G, class Space>
class parameter_store {
 public:
  using value_type = T;
  using grad_type = G;
  using space = Space;
  using param = parameter<T, G, Space>;
  /// Every tensor starts on a multiple of this many elements.
  static constexpr std::int64_t alignment = 128;

  /// Declares a tensor; returns its index. Names are unique.
  std::size_t add(parameter_info info) {
    require(info.shape.numel() > 0, [&] {
      return "parameter_store::add: '" + info.name + "' has no elements (shape " + to_string(info.shape) + ")";
    });
    require(!index_.count(info.name), [&] { return "parameter_store::add: '" + info.name + "' declared twice"; });
    const std::size_t i = infos_.size();
    index_.emplace(info.name, i);
    total_ += (info.shape.numel() + alignment - 1) / alignment * alignment;
    offsets_.push_back(total_);
    infos_.push_back(std::move(info));
    return i;
  }

  std::size_t size() const { return infos_.size(); }
  const parameter_info& info(std::size_t i) const { return infos_.at(i); }
  const std::vector<parameter_info>& infos() const { return infos_; }
  /// Where tensor i starts in the flat views; offset(size()) == total().
  std::int64_t offset(std::size_t i) const { return offsets_.at(i); }
  /// Elements of the flat views, padding included.
  std::int64_t total() const { return total_; }
  /// Elements of every tensor, padding excluded.
  std::int64_t numel() const {
    std::int64_t n = 0;
    for (const auto& info : infos_) n += info.shape.numel();
    return n;
  }
  /// The index of the tensor called `name`, if any.
  std::optional<std::size_t> find(const std::string& name) const {
    const auto it = index_.find(name);
    if (it == index_.end()) return std::nullopt;
    return it->second;
  }

  /// (Re)allocates the flat storage for every declared tensor, keeping the values already there; new values
  /// and the padding are zero, every gradient is zero. Nothing happens when the storage is current.
  template <class Exec>
  void allocate(const Exec& ex) {
    if (allocated()) return;
    tensor<T, Space> values(shape{total_});
    tensor<G, Space> grads(shape{total_});
    fill(ex, values.v(), T(0.0f));
    fill(ex, grads.v(), G(0.0f));
    if (stored_ > 0) copy(ex, view<const T, Space>(values_.v()), values.v().slice(0, stored_));
    ex.synchronize();  // the old storage is freed below
    values_ = std::move(values);
    grads_ = std::move(grads);
    stored_ = total_;
    ++generation_;
  }
  /// Whether the storage holds every declared tensor.
  bool allocated() const { return total_ > 0 && stored_ == total_; }
  /// Changes each time allocate() moves the storage: views taken before are stale.
  std::uint64_t generation() const { return generation_; }

  view<T, Space> value(std::size_t i) { return view<T, Space>(values_.data() + offset(i), infos_.at(i).shape); }
  view<G, Space> grad(std::size_t i) { return view<G, Space>(grads_.data() + offset(i), infos_.at(i).shape); }
  param operator[](std::size_t i) { return param{value(i), grad(i)}; }
  /// Every value / gradient as one flat view (storage order, each tensor padded; the padding is zero).
  view<T, Space> flat_values() { return values_.v(); }
  view<G, Space> flat_grads() { return grads_.v(); }

  /// Calls f(name, value, grad, info) for every tensor, in storage order.
  template <class F>
  void for_each(F&& f) {
    for (std::size_t i = 0; i < size(); ++i) f(infos_[i].name, value(i), grad(i), infos_[i]);
  }

  template <class Exec>
  void zero_grad(const Exec& ex) {
    fill(ex, grads_.v(), G(0.0f));
  }
  /// Sets tensors [first, last) to their initial values for `seed` (parameter_info::init).
  template <class Exec>
  void init(const Exec& ex, std::uint64_t seed, std::size_t first, std::size_t last) {
    for (std::size_t i = first; i < last; ++i) fill_initial(ex, value(i), infos_[i], seed);
  }

 private:
  std::vector<parameter_info> infos_;
  std::unordered_map<std::string, std::size_t> index_;
  std::vector<std::int64_t> offsets_{0};
  std::int64_t total_ = 0;
  std::int64_t stored_ = 0;  // elements the storage holds
  tensor<T, Space> values_;
  tensor<G, Space> grads_;
  std::uint64_t generation_ = 0;
};

}  // namespace subspace::nn
