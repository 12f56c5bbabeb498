// Must not compile: the scheduler's plans cannot be compared with ==.
// Expected: "`scheduler` does not satisfy subspace::Scheduler: `plan_type` is not std::regular"
#include <cstdint>

#include <subspace/policies.hpp>

struct opaque_schedule {
  struct plan_type {
    int microbatches = 1;  // no operator==
  };
  plan_type plan(std::int64_t, int) const { return {}; }
  int world_size() const { return 1; }
};

struct my_stack : subspace::default_policies {
  using scheduler = opaque_schedule;
};

template <class Stack>
struct trainer {
  static_assert(subspace::check_stack<Stack>());
};

template struct trainer<my_stack>;

int main() {}
