// Fuzz target: a checkpoint's trainer_state.json (io/checkpoint.hpp), the sidecar that says which step the
// weights and optimizer state belong to and where the training data continues.
#include <cstddef>
#include <cstdint>

#include <subspace/io/checkpoint.hpp>

#include "fuzz_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = subspace::io;
  const auto path = subspace::fuzz::write_scratch_file(io::state_json_file_name, data, size);
  (void)subspace::fuzz::accepts([&] { (void)io::read_trainer_state(path.parent_path()); });
  return 0;
}
