#pragma once
// Overflow-checked sizes: element counts computed from untrusted extents (configuration files, flags, file
// headers) before anything multiplies them unchecked or allocates; and unsigned numbers read from untrusted text.
//
// max_elements bounds every tensor and every model's parameter count: 2^48 elements, beyond any memory, so that
// a count times an element size (8 bytes at most), or a sum of a few such counts, still fits in int64.

#include <charconv>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <system_error>
#include <type_traits>

namespace subspace {

inline constexpr std::int64_t max_elements = std::int64_t(1) << 48;

/// a · b for non-negative a and b when the product is at most `limit`; nullopt otherwise (a negative factor
/// included).
constexpr std::optional<std::int64_t> checked_mul(std::int64_t a, std::int64_t b, std::int64_t limit = max_elements) {
  if (a < 0 || b < 0) return std::nullopt;
  if (a == 0 || b == 0) return 0;
  if (a > limit / b) return std::nullopt;
  return a * b;
}

/// a + b for non-negative a and b when the sum is at most `limit`; nullopt otherwise.
constexpr std::optional<std::int64_t> checked_add(std::int64_t a, std::int64_t b, std::int64_t limit = max_elements) {
  if (a < 0 || b < 0 || a > limit - b) return std::nullopt;
  return a + b;
}

/// The product of `extents` when it is at most `limit`; nullopt for a negative extent or a larger product. A zero
/// extent makes the product 0 whatever the others ([2^40, 2^40, 0] is empty, not an overflow).
constexpr std::optional<std::int64_t> checked_product(std::span<const std::int64_t> extents,
                                                      std::int64_t limit = max_elements) {
  bool empty = false;
  for (const std::int64_t e : extents) {
    if (e < 0) return std::nullopt;
    empty = empty || e == 0;
  }
  if (empty) return 0;
  std::int64_t n = 1;
  for (const std::int64_t e : extents) {
    const std::optional<std::int64_t> next = checked_mul(n, e, limit);
    if (!next) return std::nullopt;
    n = *next;
  }
  return n;
}

/// The product of the arguments (each non-negative) when it is at most max_elements; nullopt otherwise.
template <class... I>
constexpr std::optional<std::int64_t> checked_product(std::int64_t first, I... rest) {
  const std::int64_t extents[] = {first, std::int64_t(rest)...};
  return checked_product(std::span<const std::int64_t>(extents));
}

/// The unsigned integer that `text` spells in decimal digits, when it fits in T; nullopt for anything else: empty
/// text, a blank, a sign, a prefix, a trailing character or a larger value (std::stoull reads " -1" as 2^64 - 1).
template <class T = std::uint64_t>
  requires(std::is_unsigned_v<T> && !std::is_same_v<T, bool>)
std::optional<T> parse_unsigned(std::string_view text) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (text.empty() || ec != std::errc{} || end != text.data() + text.size()) return std::nullopt;
  return value;
}

}  // namespace subspace
