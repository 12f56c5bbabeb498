// Must not compile: the compressor does not say whether it has trainable parameters.
// Expected: "`compressor` does not satisfy subspace::Compressor: missing `declare_parameters(store)`"
#include <subspace/policies.hpp>

struct copy_compressor {
  subspace::shape payload_shape(const subspace::shape& s) const { return s; }
  std::size_t wire_bytes(const subspace::shape& s, std::size_t e) const { return std::size_t(s.numel()) * e; }
  template <class Exec, class In, class T, class S, class P>
  void encode(const Exec&, subspace::compress::boundary<In, S>, subspace::compress::payload<T, S>, P&) const {}
  template <class Exec, class In, class T, class S, class P>
  void decode(const Exec&, subspace::compress::payload<In, S>, subspace::view<T, S>, P&) const {}
  template <class Exec, class Fwd, class In, class T, class S, class P>
  void decode_backward(const Exec&, subspace::compress::payload<Fwd, S>, subspace::view<In, S>, subspace::view<T, S>,
                       P&) const {}
  template <class Exec, class Fwd, class In, class T, class S, class P>
  void encode_backward(const Exec&, subspace::compress::boundary<Fwd, S>, subspace::view<In, S>, subspace::view<T, S>,
                       P&) const {}
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
