#pragma once
// Activation arenas: many typed views carved out of one allocation (a model's activations per micro-batch slot,
// its backward scratch), and the read-only view of a view.

#include <cstddef>

#include "tensor.hpp"

namespace subspace {

/// Carves typed views out of one byte allocation, each 256-byte aligned. Measure with a null base, allocate
/// bytes(), then carve the same sequence again from the real base.
template <class Space>
class arena {
 public:
  static constexpr std::size_t alignment = 256;
  explicit arena(std::byte* base = nullptr) : base_(base) {}

  template <class U>
  view<U, Space> take(const shape& s) {
    offset_ = (offset_ + alignment - 1) / alignment * alignment;
    U* p = base_ ? reinterpret_cast<U*>(base_ + offset_) : nullptr;
    offset_ += std::size_t(s.numel()) * sizeof(U);
    return view<U, Space>(p, s);
  }
  std::size_t bytes() const { return offset_; }

 private:
  std::byte* base_;
  std::size_t offset_ = 0;
};

/// The read-only view of v (what the policies' inputs are).
template <class U, class Space>
view<const U, Space> ro(view<U, Space> v) {
  return v;
}

}  // namespace subspace
