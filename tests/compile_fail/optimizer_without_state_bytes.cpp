// Must not compile: the stack's optimizer has init and step but no state_bytes.
// Expected: "`optimizer` does not satisfy subspace::Optimizer: missing `state_bytes(const state&) -> std::size_t`"
#include <subspace/policies.hpp>

struct sgd_without_state_bytes {
  struct state {};
  state init(const subspace::exec::host&, const subspace::optim::param_info&) const { return {}; }
  template <class G>
  void step(const subspace::exec::host&, subspace::view<float, subspace::host_space>,
            subspace::view<const G, subspace::host_space>, state&, const subspace::optim::param_info&,
            const subspace::optim::step_context&, subspace::view<subspace::bf16, subspace::host_space> = {}) const {}
};

struct my_stack : subspace::default_policies {
  using optimizer = sgd_without_state_bytes;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<my_stack>;

int main() {}
