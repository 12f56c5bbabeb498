#pragma once
// Errors: every failure throws a subspace::error whose message names where it happened and why.

#include <source_location>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

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

/// Throws invalid_argument("<file>:<line>: <message>") unless `condition` holds.
inline void require(bool condition, std::string_view message,
                    const std::source_location& loc = std::source_location::current()) {
  if (!condition) throw invalid_argument(detail::where(loc) + ": " + std::string(message));
}

}  // namespace subspace
