// Control: the default stack and a stack overriding one policy pass the check (so the failures below come from
// the stacks, not from the build).
#include <subspace/policies.hpp>

struct my_stack : subspace::default_policies {
  using scheduler = subspace::schedule::gradient_accumulation;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<subspace::default_policies>;
template struct trainer<my_stack>;

int main() {}
