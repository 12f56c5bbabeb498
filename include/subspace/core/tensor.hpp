#pragma once
// shape, view<T, Space> (non-owning, strided, rank 0..4) and tensor<T, Space> (owning, contiguous).
// Copies between views are explicit: subspace::copy(executor, src, dst).

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>

#include "checked.hpp"
#include "error.hpp"
#include "memory.hpp"

namespace subspace {

inline constexpr int max_rank = 4;

struct shape;
inline std::string to_string(const shape& s);

/// Extents of a tensor of rank 0..4, row-major.
struct shape {
  int rank = 0;
  std::array<std::int64_t, max_rank> dims{};

  shape() = default;
  shape(std::initializer_list<std::int64_t> d) {
    require(d.size() <= std::size_t(max_rank), "shape: rank above 4");
    rank = int(d.size());
    std::copy(d.begin(), d.end(), dims.begin());
    for (int i = 0; i < rank; ++i) require(dims[std::size_t(i)] >= 0, "shape: negative extent");
    require(checked_numel().has_value(), [&] { return "shape " + to_string(*this) + ": more than 2^48 elements"; });
  }
  /// numel() when it is at most max_elements (core/checked.hpp), else nullopt: for shapes built from untrusted
  /// extents, before anything multiplies them.
  std::optional<std::int64_t> checked_numel() const {
    return checked_product(std::span<const std::int64_t>(dims.data(), std::size_t(rank)));
  }
  SUBSPACE_HD std::int64_t operator[](int i) const { return dims[std::size_t(i)]; }
  /// The element count (unchecked: the host code that makes a shape from untrusted extents uses checked_numel).
  /// A zero extent makes it 0 before anything multiplies: [2^63 − 1, 2, 0] is empty, not an overflow.
  SUBSPACE_HD std::int64_t numel() const {
    for (int i = 0; i < rank; ++i)
      if (dims[std::size_t(i)] == 0) return 0;
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[std::size_t(i)];
    return n;
  }
  friend bool operator==(const shape& a, const shape& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a.dims[std::size_t(i)] != b.dims[std::size_t(i)]) return false;
    return true;
  }
};

/// "[2, 3, 4]", for error messages.
inline std::string to_string(const shape& s) {
  std::ostringstream o;
  o << '[';
  for (int i = 0; i < s.rank; ++i) o << (i ? ", " : "") << s.dims[std::size_t(i)];
  o << ']';
  return o.str();
}

/// A borrowed, strided window on elements of type T living in memory space Space. Cheap to copy.
/// Element access with operator() is valid where the memory is (host code for host_space, device code for
/// device_space).
template <class T, class Space>
class view {
  static_assert(is_memory_space_v<Space>, "view<T, Space>: Space must be host_space or device_space");

 public:
  using value_type = std::remove_const_t<T>;
  using element_type = T;
  using space = Space;

  view() = default;
  /// A contiguous row-major view of `s`.
  view(T* data, const subspace::shape& s) : data_(data), shape_(s) {
    std::int64_t st = 1;
    for (int i = s.rank - 1; i >= 0; --i) {
      strides_[std::size_t(i)] = st;
      st *= s.dims[std::size_t(i)];
    }
  }
  view(T* data, const subspace::shape& s, const std::array<std::int64_t, max_rank>& strides)
      : data_(data), shape_(s), strides_(strides) {}

  /// Every view converts to a view of const elements.
  template <class U>
    requires(std::is_same_v<const U, T> && !std::is_same_v<U, T>)
  view(const view<U, Space>& v) : data_(v.data()), shape_(v.shape()), strides_(v.strides()) {}  // NOLINT

  SUBSPACE_HD T* data() const { return data_; }
  SUBSPACE_HD const subspace::shape& shape() const { return shape_; }
  SUBSPACE_HD const std::array<std::int64_t, max_rank>& strides() const { return strides_; }
  SUBSPACE_HD int rank() const { return shape_.rank; }
  SUBSPACE_HD std::int64_t dim(int i) const { return shape_.dims[std::size_t(i)]; }
  SUBSPACE_HD std::int64_t stride(int i) const { return strides_[std::size_t(i)]; }
  SUBSPACE_HD std::int64_t numel() const { return shape_.numel(); }
  /// True for a default-constructed view (no data) and for views with a zero extent.
  SUBSPACE_HD bool empty() const { return data_ == nullptr || numel() == 0; }
  std::size_t bytes() const { return std::size_t(numel()) * sizeof(T); }

  /// True when the elements are dense and row-major (strides of unit-extent dimensions are ignored).
  SUBSPACE_HD bool is_contiguous() const {
    std::int64_t st = 1;
    for (int i = shape_.rank - 1; i >= 0; --i) {
      if (shape_.dims[std::size_t(i)] != 1 && strides_[std::size_t(i)] != st) return false;
      st *= shape_.dims[std::size_t(i)];
    }
    return true;
  }

  template <class... I>
  SUBSPACE_HD T& operator()(I... i) const {
    static_assert(sizeof...(I) <= max_rank, "view: at most 4 indices");
    const std::int64_t idx[] = {std::int64_t(i)..., 0};
    std::int64_t off = 0;
    for (std::size_t d = 0; d < sizeof...(I); ++d) off += idx[d] * strides_[d];
    return data_[off];
  }

  /// Rows [begin, end) along dimension 0.
  view slice(std::int64_t begin, std::int64_t end) const {
    require(shape_.rank >= 1 && 0 <= begin && begin <= end && end <= dim(0), [&] {
      return "view::slice: range [" + std::to_string(begin) + ", " + std::to_string(end) +
             ") outside dimension 0 of shape " + to_string(shape_);
    });
    subspace::shape s = shape_;
    s.dims[0] = end - begin;
    return view(data_ + begin * strides_[0], s, strides_);
  }
  /// Element i of dimension 0, as a view of rank - 1.
  view operator[](std::int64_t i) const {
    require(shape_.rank >= 1 && 0 <= i && i < dim(0),
            [&] { return "view[]: index " + std::to_string(i) + " outside shape " + to_string(shape_); });
    subspace::shape s;
    s.rank = shape_.rank - 1;
    std::array<std::int64_t, max_rank> st{};
    for (int d = 1; d < shape_.rank; ++d) {
      s.dims[std::size_t(d - 1)] = shape_.dims[std::size_t(d)];
      st[std::size_t(d - 1)] = strides_[std::size_t(d)];
    }
    return view(data_ + i * strides_[0], s, st);
  }
  /// The same elements under another shape with as many elements; the view must be contiguous.
  view reshape(const subspace::shape& s) const {
    require(is_contiguous(),
            [&] { return "view::reshape: view of shape " + to_string(shape_) + " is not contiguous"; });
    require(s.numel() == numel(),
            [&] { return "view::reshape: cannot view " + to_string(shape_) + " as " + to_string(s); });
    return view(data_, s);
  }
  /// The elements as one dimension; the view must be contiguous.
  view flat() const { return reshape(subspace::shape{numel()}); }
  /// The transpose of a rank-2 view (no copy: the strides swap).
  view transposed() const {
    require(shape_.rank == 2, [&] { return "view::transposed: rank-2 view expected, got shape " + to_string(shape_); });
    subspace::shape s{dim(1), dim(0)};
    return view(data_, s, {stride(1), stride(0), 0, 0});
  }

 private:
  T* data_ = nullptr;
  subspace::shape shape_{};
  std::array<std::int64_t, max_rank> strides_{};
};

template <class T, class Space>
using cview = view<const T, Space>;

/// Owns a contiguous, row-major block of elements in memory space Space. Move-only. Contents start
/// uninitialised; fill them with subspace::fill, a copy or an RNG fill.
template <class T, class Space>
class tensor {
  static_assert(std::is_trivially_copyable_v<T>, "tensor<T, Space>: T must be trivially copyable");

 public:
  using value_type = T;
  using space = Space;

  tensor() = default;
  explicit tensor(const subspace::shape& s) : data_(allocate(s)), shape_(s) {}

  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }
  const subspace::shape& shape() const { return shape_; }
  int rank() const { return shape_.rank; }
  std::int64_t dim(int i) const { return shape_.dims[std::size_t(i)]; }
  std::int64_t numel() const { return shape_.numel(); }
  std::size_t bytes() const { return std::size_t(numel()) * sizeof(T); }
  bool empty() const { return numel() == 0; }

  view<T, Space> v() { return view<T, Space>(data(), shape_); }
  view<const T, Space> v() const { return view<const T, Space>(data(), shape_); }
  operator view<T, Space>() { return v(); }              // NOLINT
  operator view<const T, Space>() const { return v(); }  // NOLINT

  /// Host tensors only: element access.
  template <class... I>
  T& operator()(I... i) {
    static_assert(std::is_same_v<Space, host_space>, "tensor::operator(): element access needs host memory");
    return v()(i...);
  }
  template <class... I>
  const T& operator()(I... i) const {
    static_assert(std::is_same_v<Space, host_space>, "tensor::operator(): element access needs host memory");
    return v()(i...);
  }

 private:
  struct release {
    void operator()(T* p) const noexcept { space_memory<Space>::deallocate(p); }
  };
  /// Storage for `s`; its extents may come from anywhere (a file header), so the count is checked first.
  static T* allocate(const subspace::shape& s) {
    const std::optional<std::int64_t> n = s.checked_numel();
    require(n.has_value(), [&] { return "tensor: shape " + to_string(s) + " holds more than 2^48 elements"; });
    return static_cast<T*>(space_memory<Space>::allocate(std::size_t(*n) * sizeof(T)));
  }
  std::unique_ptr<T, release> data_;
  subspace::shape shape_{};
};

template <class T>
using host_tensor = tensor<T, host_space>;
template <class T>
using device_tensor = tensor<T, device_space>;

/// A view of shape `s` over the front of scratch tensor `t`, which is reallocated only when it holds fewer than
/// s.numel() elements: for scratch whose shape changes from call to call (freeing device memory synchronises the
/// whole device, so reallocating on every change of shape would stall every stream on it).
template <class T, class Space>
view<T, Space> scratch_view(tensor<T, Space>& t, const shape& s) {
  if (t.data() == nullptr || t.numel() < s.numel()) t = tensor<T, Space>(shape{s.numel()});
  return view<T, Space>(t.data(), s);
}

namespace detail {
template <class A, class B>
void require_same_shape(const A& a, const B& b, const char* op) {
  require(a.shape() == b.shape(),
          [&] { return std::string(op) + ": shapes differ: " + to_string(a.shape()) + " vs " + to_string(b.shape()); });
}
}  // namespace detail

/// Calls f(offset_a, offset_b) for every index of `s`, in row-major order, with the element offsets of that
/// index under two stride sets. The host's strided traversal, shared by copies and elementwise kernels.
template <class F>
void for_each_offset(const shape& s, const std::array<std::int64_t, max_rank>& stride_a,
                     const std::array<std::int64_t, max_rank>& stride_b, F&& f) {
  std::array<std::int64_t, max_rank> ext{1, 1, 1, 1}, sa{}, sb{};
  for (int d = 0; d < s.rank; ++d) {
    ext[std::size_t(d)] = s[d];
    sa[std::size_t(d)] = stride_a[std::size_t(d)];
    sb[std::size_t(d)] = stride_b[std::size_t(d)];
  }
  for (std::int64_t i = 0; i < ext[0]; ++i)
    for (std::int64_t j = 0; j < ext[1]; ++j)
      for (std::int64_t k = 0; k < ext[2]; ++k)
        for (std::int64_t l = 0; l < ext[3]; ++l)
          f(i * sa[0] + j * sa[1] + k * sa[2] + l * sa[3], i * sb[0] + j * sb[1] + k * sb[2] + l * sb[3]);
}

/// Copies src into dst (same shape, same element type, any strides) on the host.
template <class S, class T>
  requires std::is_same_v<std::remove_const_t<S>, T>
void copy(const exec::host&, view<S, host_space> src, view<T, host_space> dst) {
  detail::require_same_shape(src, dst, "copy");
  if (src.is_contiguous() && dst.is_contiguous()) {
    std::copy(src.data(), src.data() + src.numel(), dst.data());
    return;
  }
  for_each_offset(src.shape(), src.strides(), dst.strides(),
                  [&](std::int64_t a, std::int64_t b) { dst.data()[b] = src.data()[a]; });
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "cuda/copy.cuh"
#endif
