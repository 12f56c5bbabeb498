#pragma once
// fnv1a_64: a stable 64-bit fingerprint of data (FNV-1a), for checking at start-up that every rank built the same
// tables, and of a checkpoint's files. Not a cryptographic hash. Floats are fed as the four little-endian bytes of
// their IEEE bit pattern, so the value does not depend on the host's byte order.

#include <bit>
#include <cstddef>
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
  /// Feeds a block of bytes (a file's content): each whole 8-byte little-endian word in one step (xor, multiply by
  /// the prime, then the high half folded into the low one, so that every bit of the word reaches every bit of the
  /// state), then the remaining bytes one by one. Several times faster than add_byte over the bytes, and another
  /// value: a stream fed in pieces gives the same value only when every piece but the last is a multiple of 8.
  void add_bytes(const void* data, std::size_t bytes) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (; bytes >= 8; p += 8, bytes -= 8) {
      std::uint64_t word = 0;
      if constexpr (std::endian::native == std::endian::little) std::memcpy(&word, p, 8);
      else
        for (int i = 7; i >= 0; --i) word = (word << 8) | p[i];
      state ^= word;
      state *= 0x00000100000001b3ull;
      state ^= state >> 32;
    }
    for (; bytes > 0; ++p, --bytes) add_byte(*p);
  }
  std::uint64_t value() const { return state; }
};

}  // namespace subspace
