#pragma once
// What the pipeline tests share: every tensor of a parameter store by name (a pipeline's stages hold the whole
// model's tensors between them, so comparisons go by name), the relative norm difference of two of them, and the
// Genesis shards as train / validation loaders.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <subspace/data/loader.hpp>

#include "genesis.hpp"
#include "scratch_dir.hpp"

namespace subspace::testing {

/// Values and gradients of store tensors by name, copied out as double (host stores).
struct named_tensors {
  std::map<std::string, std::vector<double>> values, grads;

  template <class Store>
  void add(Store& store) {
    for (std::size_t i = 0; i < store.size(); ++i) {
      const auto v = store.value(i);
      const auto g = store.grad(i);
      values[store.info(i).name].assign(v.data(), v.data() + v.numel());
      grads[store.info(i).name].assign(g.data(), g.data() + g.numel());
    }
  }
};

/// ‖a − b‖ / ‖b‖ (NaN stays NaN, so it never passes a bound).
inline double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-300);
}

/// The Genesis shards in a scratch directory, read as shuffled training batches or in-order validation batches.
struct genesis_data {
  scratch_dir dir;
  genesis_data() { genesis_shards(dir.path); }
  data::batch_loader train(std::int64_t batch, std::int64_t seq) const {
    return loader_for(dir.path, "train", batch, seq, true);
  }
  data::batch_loader val(std::int64_t batch, std::int64_t seq) const {
    return loader_for(dir.path, "val", batch, seq, false);
  }
};

}  // namespace subspace::testing
