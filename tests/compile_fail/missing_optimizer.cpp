// Must not compile: the stack names no optimizer.
// Expected: "training stack: missing `using optimizer = ...;`"
#include <subspace/policies.hpp>

struct no_optimizer_stack {
  using communicator = subspace::comm::self;
  using compressor = subspace::compress::identity;
  using scheduler = subspace::schedule::gradient_accumulation;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<no_optimizer_stack>;

int main() {}
