// Must not compile: the stack's optimizer accepts fp32 gradients only.
// Expected: "`optimizer` does not satisfy subspace::Optimizer: `step` does not accept bf16 gradients"
#include <subspace/policies.hpp>

struct fp32_only {
  struct state {};
  state init(const subspace::exec::host&, const subspace::optim::param_info&) const { return {}; }
  void step(const subspace::exec::host&, subspace::view<float, subspace::host_space>,
            subspace::view<const float, subspace::host_space>, state&, const subspace::optim::param_info&,
            const subspace::optim::step_context&, subspace::view<subspace::bf16, subspace::host_space> = {}) const {}
  std::size_t state_bytes(const state&) const { return 0; }
};

struct my_stack : subspace::default_policies {
  using optimizer = fp32_only;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<my_stack>;

int main() {}
