#pragma once
// fnv1a_64: a stable 64-bit fingerprint of data (FNV-1a), for checking at start-up that every rank built the same
// tables. Not a cryptographic hash. Floats are fed as the four little-endian bytes of their IEEE bit pattern, so
// the value does not depend on the host's byte order.

#include <cstdint>
#include <cstring>

namespace subspace {

struct fnv1a_64 {
  std::uint64_t state = 0xcbf29ce484222325ull;  // the FNV-1a 64-bit offset basis

  void add_byte(std::uint8_t b) {
    state ^= b;
    state *= 0x00000100000001b3ull;  // the FNV-1a 64-bit prime
  }
  void add_u32(std::uint32_t v) {
    for (int shift = 0; shift < 32; shift += 8) add_byte(std::uint8_t(v >> shift));
  }
  void add_float(float x) {
    std::uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    add_u32(bits);
  }
  std::uint64_t value() const { return state; }
};

}  // namespace subspace
