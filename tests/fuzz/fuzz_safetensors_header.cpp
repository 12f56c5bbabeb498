// Fuzz target: the JSON header of a safetensors file (io/safetensors.hpp). The input is the header text; the
// target frames it (the 8-byte length, then a data buffer as long as the largest end offset it names, up to
// 1 MiB) so that mutations reach the header's checks instead of failing at the length prefix.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <subspace/io/safetensors.hpp>
#include <subspace/util/json.hpp>

#include "fuzz_target.hpp"
#include "read_safetensors.hpp"

namespace {

/// The largest data_offsets end the header names, when it parses (0 otherwise), capped at 1 MiB.
std::uint64_t buffer_bytes(std::string_view header) {
  using subspace::io::json;
  std::uint64_t end = 0;
  try {
    const json h = json::parse(header);
    if (!h.is_object()) return 0;
    for (const auto& [name, entry] : h.as_object()) {
      const json* offsets = entry.find("data_offsets");
      if (offsets && offsets->is_array() && offsets->size() == 2 && offsets->at(1).is_int() &&
          offsets->at(1).as_int() > 0)
        end = std::max(end, std::uint64_t(offsets->at(1).as_int()));
    }
  } catch (const subspace::error&) {
  }
  return std::min<std::uint64_t>(end, std::uint64_t(1) << 20);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view header(reinterpret_cast<const char*>(data), size);
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[std::size_t(i)] = char(std::uint64_t(size) >> (8 * i));
  file += header;
  const std::uint64_t buffer = buffer_bytes(header);
  for (std::uint64_t i = 0; i < buffer; ++i) file += char(i * 131 + 7);  // finite floats and small integers alike
  const auto path = subspace::fuzz::write_scratch_file("header.safetensors", file.data(), file.size());
  (void)subspace::fuzz::accepts([&] { subspace::fuzz::read_every_tensor(path); });
  return 0;
}
