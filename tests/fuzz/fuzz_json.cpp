// Fuzz target: the JSON parser (util/json.hpp). Whatever it accepts must print and parse back to an equal value,
// compactly and pretty-printed.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <subspace/util/json.hpp>

#include "fuzz_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  using subspace::io::json;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  json value;
  if (!subspace::fuzz::accepts([&] { value = json::parse(text, "fuzz input"); })) return 0;
  const std::string compact = value.dump();
  const json again = json::parse(compact, "compact dump");
  subspace::fuzz::promise(again == value, "json: a compact dump parses back to an equal value");
  subspace::fuzz::promise(again.dump() == compact, "json: a compact dump is stable");
  subspace::fuzz::promise(json::parse(value.dump(2), "pretty dump") == value,
                          "json: a pretty dump parses back to an equal value");
  return 0;
}
