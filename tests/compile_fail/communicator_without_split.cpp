// Must not compile: the communicator cannot split into groups.
// Expected: "`communicator` does not satisfy subspace::Communicator: missing `split(int color, int key)`"
#include <subspace/policies.hpp>

struct unsplittable : subspace::comm::self {
  void split(int, int) = delete;
};

struct my_stack : subspace::default_policies {
  using communicator = unsplittable;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<my_stack>;

int main() {}
