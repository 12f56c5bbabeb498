// Must not compile: golore<Inner> with an Inner that is a complete Optimizer but has no optim::subspace_rule, which
// the projected Adam step reads its hyper-parameters from. The outermost template says so in one message.
// Expected: "optim::galore<Inner> / optim::golore<Inner>: no optim::subspace_rule<Inner>"
#include <subspace/optim/golore.hpp>

struct my_sgd {
  struct state {
    template <class F>
    void for_each_tensor(F&&) {}
  };
  state init(const subspace::exec::host&, const subspace::optim::param_info&) const { return {}; }
  template <class G>
  void step(const subspace::exec::host&, subspace::view<float, subspace::host_space>,
            subspace::view<const G, subspace::host_space>, state&, const subspace::optim::param_info&,
            const subspace::optim::step_context&, subspace::view<subspace::bf16, subspace::host_space> = {}) const {}
  std::size_t state_bytes(const state&) const { return 0; }
};
static_assert(subspace::Optimizer<my_sgd>);

template struct subspace::optim::golore<my_sgd>;

int main() {}
