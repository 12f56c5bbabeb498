// Fuzz target: a whole safetensors file (io/safetensors.hpp) — the length prefix, the header and the data
// buffer. Every tensor of an accepted file is read into each element type it may load as.
#include <cstddef>
#include <cstdint>
#include <vector>

#include <subspace/io/safetensors.hpp>

#include "fuzz_target.hpp"
#include "read_safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = subspace::fuzz::write_scratch_file("fuzz.safetensors", data, size);
  (void)subspace::fuzz::accepts([&] { subspace::fuzz::read_every_tensor(path); });
  return 0;
}
