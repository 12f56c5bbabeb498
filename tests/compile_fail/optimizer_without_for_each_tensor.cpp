// Must not compile: the stack's optimizer steps and counts its bytes, but its state cannot name its tensors, so a
// checkpoint could not save it. The stack check says so, instead of an error deep inside save().
// Expected: "`optimizer` does not satisfy subspace::Optimizer: its state has no `for_each_tensor(f)`"
#include <subspace/policies.hpp>

#include <cstddef>
#include <vector>

struct momentum_sgd {
  struct state {
    std::vector<float> velocity;  // a tensor a checkpoint would need, with no for_each_tensor naming it
  };
  state init(const subspace::exec::host&, const subspace::optim::param_info&) const { return {}; }
  template <class G>
  void step(const subspace::exec::host&, subspace::view<float, subspace::host_space>,
            subspace::view<const G, subspace::host_space>, state&, const subspace::optim::param_info&,
            const subspace::optim::step_context&, subspace::view<subspace::bf16, subspace::host_space> = {}) const {}
  std::size_t state_bytes(const state& s) const { return s.velocity.size() * sizeof(float); }
};

struct my_stack : subspace::default_policies {
  using optimizer = momentum_sgd;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<my_stack>;

int main() {}
