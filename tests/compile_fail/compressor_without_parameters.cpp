// Must not compile: the compressor does not say whether it owns trainable parameters.
// Expected: "`compressor` does not satisfy subspace::Compressor: missing `visit_parameters(f)`"
#include <subspace/policies.hpp>

struct copy_compressor {
  subspace::shape payload_shape(const subspace::shape& s) const { return s; }
  std::size_t wire_bytes(const subspace::shape& s, std::size_t e) const { return std::size_t(s.numel()) * e; }
  template <class Exec, class In, class T, class S>
  void encode(const Exec&, subspace::view<In, S>, subspace::view<T, S>) const {}
  template <class Exec, class In, class T, class S>
  void decode(const Exec&, subspace::view<In, S>, subspace::view<T, S>) const {}
  template <class Exec, class Fwd, class In, class T, class S>
  void decode_backward(const Exec&, subspace::view<Fwd, S>, subspace::view<In, S>, subspace::view<T, S>) const {}
  template <class Exec, class Fwd, class In, class T, class S>
  void encode_backward(const Exec&, subspace::view<Fwd, S>, subspace::view<In, S>, subspace::view<T, S>) const {}
};

struct my_stack : subspace::default_policies {
  using compressor = copy_compressor;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<my_stack>;

int main() {}
