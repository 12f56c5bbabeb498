#pragma once
// What the safetensors targets do with a file: open it (the header's checks) and load every tensor into every
// element type its dtype may load as (the conversions, the range checks of integers, rank above 4).
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <vector>

#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/io/safetensors.hpp>

namespace subspace::fuzz {

/// The sum of everything loaded: kept, so that the loads cannot be optimised away.
inline volatile double checksum = 0;

inline void read_every_tensor(const std::filesystem::path& path) {
  const io::safetensors_file file(path);
  for (const auto& t : file.tensors()) {
    std::vector<std::byte> raw(std::size_t(t.bytes()));
    file.read_bytes(t, raw.data());
    // Each load may refuse (a dtype that does not convert, a value out of range, rank > 4): that is the reader
    // speaking, and the next load is still tried.
    const auto each = [&](auto element) {
      using T = decltype(element);
      try {
        const auto loaded = file.read<T>(t.name);
        // Every element is looked at, so that a value the type cannot hold (a bool that is neither 0 nor 1)
        // meets the sanitizer.
        double sum = 0;
        for (std::int64_t i = 0; i < loaded.numel(); ++i) sum += double(convert<double>(loaded.data()[i]));
        checksum = checksum + sum;
      } catch (const subspace::error&) {
      }
    };
    if (io::is_floating(t.dtype)) {
      each(float{});
      each(double{});
      each(bf16{});
      each(fp16{});
    } else {
      each(std::int64_t{});
      each(std::uint8_t{});
      each(std::int32_t{});
      each(bool{});
    }
  }
}

}  // namespace subspace::fuzz
