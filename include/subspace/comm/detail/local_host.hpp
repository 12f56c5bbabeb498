#pragma once
// comm::local's data movement in host memory: a matched send's copy into its recv, and the collectives, run on the
// thread of the last rank to post (detail/local_world.hpp matches them). Internal.

#include <algorithm>
#include <cstddef>
#include <memory>
#include <string>
#include <vector>

#include "../../core/error.hpp"
#include "../../core/tensor.hpp"
#include "local_world.hpp"

namespace subspace::comm::detail {

/// Copies src into dst element by element in row-major order (same element count, any shapes and strides).
template <class T>
void copy_elements(view<const T, host_space> src, view<T, host_space> dst) {
  if (src.is_contiguous() && dst.is_contiguous()) {
    std::copy(src.data(), src.data() + src.numel(), dst.data());
    return;
  }
  std::vector<T> tmp;
  tmp.reserve(std::size_t(src.numel()));
  for_each_element(src, [&](const T& x) { tmp.push_back(x); });
  std::size_t i = 0;
  for_each_element(dst, [&](T& x) { x = tmp[i++]; });
}

template <class T>
std::shared_ptr<void> host_move(local_world&, const local_p2p_entry& send, const local_p2p_entry& recv) {
  copy_elements(as_view<const T, host_space>(send.buf), as_view<T, host_space>(recv.buf));
  return nullptr;
}

/// Runs one collective over host buffers, on the calling thread (the last rank to call it). Results go through
/// scratch memory first, so buffers that alias (in place, or an input inside an output) are safe.
template <class T>
std::shared_ptr<void> host_collective(local_world& w, const std::vector<local_coll_entry>& es) {
  const int n = w.n;
  const local_op& op = *es[0].op;
  std::vector<T> inputs;  // the ranks' inputs, rank-major
  const auto gather_inputs = [&](bool from_out) {
    for (const auto& e : es)
      for_each_element(as_view<const T, host_space>(from_out ? e.out : e.in), [&](const T& x) { inputs.push_back(x); });
  };
  if (op.kind == local_kind::broadcast) {
    const auto& root = es[std::size_t(op.peer)];
    const auto src = as_view<const T, host_space>(root.out);
    std::vector<T> data;
    for_each_element(src, [&](const T& x) { data.push_back(x); });
    for (int r = 0; r < n; ++r) {
      if (r == op.peer) continue;
      std::size_t i = 0;
      for_each_element(as_view<T, host_space>(es[std::size_t(r)].out), [&](T& x) { x = data[i++]; });
    }
    return nullptr;
  }
  if (op.kind == local_kind::all_gather) {
    gather_inputs(false);
    for (const auto& e : es) {
      std::size_t i = 0;
      for_each_element(as_view<T, host_space>(e.out), [&](T& x) { x = inputs[i++]; });
    }
    return nullptr;
  }
  if constexpr (local_reducible_v<T>) {
    using A = local_accum_t<T>;
    const bool all_reduce = op.kind == local_kind::all_reduce;
    gather_inputs(all_reduce);
    const std::size_t total = inputs.size() / std::size_t(n);  // elements per rank's input
    std::vector<A> acc(total);
    for (std::size_t i = 0; i < total; ++i) acc[i] = A(inputs[i]);
    for (int r = 1; r < n; ++r)
      for (std::size_t i = 0; i < total; ++i)
        acc[i] = local_combine(acc[i], A(inputs[std::size_t(r) * total + i]), op.rop);
    if (op.rop == reduce_op::avg)
      for (auto& a : acc) a = a / A(n);
    if (all_reduce) {
      for (const auto& e : es) {
        std::size_t i = 0;
        for_each_element(as_view<T, host_space>(e.out), [&](T& x) { x = T(acc[i++]); });
      }
    } else {  // reduce_scatter: rank r receives block r
      const std::size_t block = total / std::size_t(n);
      for (int r = 0; r < n; ++r) {
        std::size_t i = std::size_t(r) * block;
        for_each_element(as_view<T, host_space>(es[std::size_t(r)].out), [&](T& x) { x = T(acc[i++]); });
      }
    }
    return nullptr;
  } else {
    throw invalid_argument(std::string("comm::local: ") + to_string(op.kind) + " cannot reduce " + op.element +
                           " elements");
  }
}

}  // namespace subspace::comm::detail
