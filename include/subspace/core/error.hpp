#pragma once
// Errors: every failure throws a subspace::error whose message names where it happened and why.

#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace subspace {

/// Base class of every exception the library throws.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A caller passed something the operation cannot accept (wrong shape, bad configuration, ...).
class invalid_argument : public error {
 public:
  using error::error;
};

namespace detail {
inline std::string where(const std::source_location& loc) {
  std::ostringstream s;
  s << loc.file_name() << ':' << loc.line();
  return s.str();
}
}  // namespace detail

/// Throws invalid_argument("<file>:<line>: <message>") unless `condition` holds. A literal or an existing string
/// costs nothing when the check passes; a message that has to be assembled is passed as a callable returning it
/// (`require(n > 0, [&] { return "n must be positive, got " + std::to_string(n); })`), so it is built only when
/// the check fails.
inline void require(bool condition, std::string_view message,
                    const std::source_location& loc = std::source_location::current()) {
  if (!condition) [[unlikely]]
    throw invalid_argument(detail::where(loc) + ": " + std::string(message));
}
template <class MakeMessage>
  requires std::is_invocable_r_v<std::string, MakeMessage&>
inline void require(bool condition, MakeMessage&& make_message,
                    const std::source_location& loc = std::source_location::current()) {
  if (!condition) [[unlikely]]
    throw invalid_argument(detail::where(loc) + ": " + std::string(make_message()));
}

}  // namespace subspace
