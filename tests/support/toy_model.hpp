#pragma once
// A small language model that is not a Llama, to show that the trainers and checkpoints need nothing but the
// nn::Model concept: each token predicts the next through one tanh layer,
//
//   x = embed[t],   h = tanh(w1 · x),   logits = w2 · h,   loss = mean over targets ≠ -1 of cross_entropy
//
// on the host, in float or double. Its configuration is described once with Boost.Hana, so checkpoints write and
// compare it through io/struct_config.hpp without code of its own.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include <boost/hana/define_struct.hpp>

#include <subspace/core/error.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/nn/concepts.hpp>
#include <subspace/nn/parameters.hpp>

namespace subspace::testing {

struct toy_config {
  BOOST_HANA_DEFINE_STRUCT(toy_config, (std::int64_t, vocab), (std::int64_t, d_model), (float, init_std));
};

template <class T>
class toy_model {
 public:
  using executor_type = subspace::exec::host;
  using value_type = T;
  using grad_type = T;
  using boundary_type = T;
  using config_type = toy_config;
  using store_type = subspace::nn::parameter_store<T, T, subspace::host_space>;
  using hview = subspace::view<const std::int32_t, subspace::host_space>;
  struct stage_io {
    hview tokens, targets;
    subspace::view<const T, subspace::host_space> in;
    subspace::view<T, subspace::host_space> out;
  };

  explicit toy_model(toy_config cfg) : cfg_(cfg), store_(std::make_shared<store_type>()) {
    const auto add = [&](const char* name, subspace::shape s, bool decay) {
      return store_->add({name, s, decay, {cfg_.init_std, 1.0f, std::uint64_t(store_->size())}});
    };
    add("embed.weight", {cfg_.vocab, cfg_.d_model}, false);
    add("hidden.weight", {cfg_.d_model, cfg_.d_model}, true);
    add("out.weight", {cfg_.vocab, cfg_.d_model}, true);
    store_->allocate(ex_);
  }

  const toy_config& config() const { return cfg_; }
  const executor_type& executor() const { return ex_; }
  /// Always a whole model.
  bool has_embedding() const { return true; }
  bool has_head() const { return true; }
  subspace::shape boundary_shape(std::int64_t rows) const { return {rows, cfg_.d_model}; }
  store_type& parameters() { return *store_; }
  const store_type& parameters() const { return *store_; }
  void init(std::uint64_t seed) { store_->init(ex_, seed, 0, store_->size()); }
  void after_step() {}

  double forward(std::size_t slot, const stage_io& io, float loss_scale) {
    saved& s = slot_at(slot);
    const double loss = run(io, s);
    s.scale = loss_scale;
    s.ready = true;
    return loss;
  }
  double evaluate(std::size_t, const stage_io& io) {
    saved s;
    return run(io, s);
  }
  double evaluate(hview tokens, hview targets) { return evaluate(0, stage_io{tokens, targets, {}, {}}); }

  template <class Ready>
  void backward(std::size_t slot, subspace::view<const T, subspace::host_space>,
                subspace::view<T, subspace::host_space>, Ready&& ready) {
    saved& s = slot_at(slot);
    subspace::require(s.ready, "toy_model::backward: call forward on this slot first");
    s.ready = false;
    const std::int64_t V = cfg_.vocab, d = cfg_.d_model;
    T* de = store_->grad(0).data();
    T* dw1 = store_->grad(1).data();
    T* dw2 = store_->grad(2).data();
    const T* w1 = store_->value(1).data();
    const T* w2 = store_->value(2).data();
    const double g = s.counted > 0 ? double(s.scale) / double(s.counted) : 0.0;
    std::vector<double> p(static_cast<std::size_t>(V)), dh(static_cast<std::size_t>(d)),
        dz(static_cast<std::size_t>(d));
    for (std::size_t i = 0; i < s.tokens.size(); ++i) {
      if (s.targets[i] < 0) continue;
      const T* h = &s.h[i * std::size_t(d)];
      probabilities(h, w2, p);
      p[std::size_t(s.targets[i])] -= 1.0;
      std::fill(dh.begin(), dh.end(), 0.0);
      for (std::int64_t v = 0; v < V; ++v)
        for (std::int64_t k = 0; k < d; ++k) {
          dw2[v * d + k] += T(g * p[std::size_t(v)] * double(h[k]));
          dh[std::size_t(k)] += g * p[std::size_t(v)] * double(w2[v * d + k]);
        }
      const T* x = store_->value(0).data() + std::int64_t(s.tokens[i]) * d;
      for (std::int64_t k = 0; k < d; ++k)
        dz[std::size_t(k)] = dh[std::size_t(k)] * (1.0 - double(h[k]) * double(h[k]));
      for (std::int64_t a = 0; a < d; ++a)
        for (std::int64_t b = 0; b < d; ++b) {
          dw1[a * d + b] += T(dz[std::size_t(a)] * double(x[b]));
          de[std::int64_t(s.tokens[i]) * d + b] += T(dz[std::size_t(a)] * double(w1[a * d + b]));
        }
    }
    ready(std::size_t(0), store_->size());
  }

 private:
  struct saved {
    std::vector<std::int32_t> tokens, targets;
    std::vector<T> h;  // [N, d]
    std::int64_t counted = 0;
    float scale = 1.0f;
    bool ready = false;
  };

  saved& slot_at(std::size_t slot) {
    if (slot >= slots_.size()) slots_.resize(slot + 1);
    return slots_[slot];
  }

  /// p = softmax(w2 · h) in double.
  void probabilities(const T* h, const T* w2, std::vector<double>& p) const {
    const std::int64_t V = cfg_.vocab, d = cfg_.d_model;
    double m = -1e300;
    for (std::int64_t v = 0; v < V; ++v) {
      double z = 0;
      for (std::int64_t k = 0; k < d; ++k) z += double(w2[v * d + k]) * double(h[k]);
      p[std::size_t(v)] = z;
      m = std::max(m, z);
    }
    double total = 0;
    for (auto& z : p) total += (z = std::exp(z - m));
    for (auto& z : p) z /= total;
  }

  double run(const stage_io& io, saved& s) {
    const std::int64_t n = io.tokens.numel(), V = cfg_.vocab, d = cfg_.d_model;
    subspace::require(io.targets.numel() == n, "toy_model: tokens and targets differ in size");
    s.tokens.assign(io.tokens.data(), io.tokens.data() + n);
    s.targets.assign(io.targets.data(), io.targets.data() + n);
    s.h.assign(std::size_t(n * d), T(0));
    const T* e = store_->value(0).data();
    const T* w1 = store_->value(1).data();
    const T* w2 = store_->value(2).data();
    std::vector<double> p(static_cast<std::size_t>(V));
    double loss = 0;
    s.counted = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int32_t t = s.tokens[std::size_t(i)], y = s.targets[std::size_t(i)];
      subspace::require(t >= 0 && t < V && y >= -1 && y < V, "toy_model: a token or target is outside the vocabulary");
      T* h = &s.h[std::size_t(i * d)];
      for (std::int64_t a = 0; a < d; ++a) {
        double z = 0;
        for (std::int64_t b = 0; b < d; ++b) z += double(w1[a * d + b]) * double(e[std::int64_t(t) * d + b]);
        h[a] = T(std::tanh(z));
      }
      if (y < 0) continue;
      probabilities(h, w2, p);
      loss -= std::log(p[std::size_t(y)]);
      ++s.counted;
    }
    return s.counted > 0 ? loss / double(s.counted) : 0.0;
  }

  toy_config cfg_;
  executor_type ex_{};
  std::shared_ptr<store_type> store_;
  std::vector<saved> slots_;
};

static_assert(subspace::nn::Model<toy_model<float>>);

}  // namespace subspace::testing
