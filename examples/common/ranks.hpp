#pragma once
// What the multi-rank examples (gossip_llama, pipeline_llama) share: the --bandwidth presets, a link printed for
// people, library messages without their source location, and running one body per rank on threads.

#include <algorithm>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <subspace/comm/throttled.hpp>
#include <subspace/core/parallel.hpp>

#include "cli.hpp"

namespace examples {

/// A library message without its leading "file:line: ".
inline std::string without_location(std::string m) {
  const auto colon = m.find(": ");
  if (colon != std::string::npos) {
    const std::string head = m.substr(0, colon);
    const auto last = head.rfind(':');
    if (last != std::string::npos && last + 1 < head.size() &&
        head.find_first_not_of("0123456789", last + 1) == std::string::npos && head.find(' ') == std::string::npos)
      return m.substr(colon + 2);
  }
  return m;
}

/// --bandwidth: a preset name, a comm::link::parse form, or none (nullopt).
inline std::optional<subspace::comm::link> parse_bandwidth(const std::string& b) {
  namespace links = subspace::comm::links;
  if (b == "none") return std::nullopt;
  if (b == "mbit80") return links::mbit80;
  if (b == "mbit300") return links::mbit300;
  if (b == "gbit1") return links::gbit1;
  if (b == "gbit25") return links::gbit25;
  if (b == "gbit100") return links::gbit100;
  try {
    return subspace::comm::link::parse(b);
  } catch (const std::exception&) {
    throw cli_error("--bandwidth: got '" + b +
                    "', expected none, mbit80, mbit300, gbit1, gbit25, gbit100 "
                    "or <number><kbit|mbit|gbit>[@<number><s|ms|us>] (e.g. 2.5gbit@50us)");
  }
}

/// "80 Mbit/s, 10000 us latency".
inline std::string link_text(const subspace::comm::link& l) {
  char buf[96];
  const double bps = l.bits_per_second;
  if (bps >= 1e9) std::snprintf(buf, sizeof buf, "%g Gbit/s", bps / 1e9);
  else if (bps >= 1e6) std::snprintf(buf, sizeof buf, "%g Mbit/s", bps / 1e6);
  else std::snprintf(buf, sizeof buf, "%g kbit/s", bps / 1e3);
  std::string s = buf;
  std::snprintf(buf, sizeof buf, ", %g us latency", l.latency_seconds * 1e6);
  return s + buf;
}

/// Runs body(r) on a thread per rank; returns the highest exit status, or rethrows the first failure (lowest rank)
/// with the rank named.
template <class Body>
int on_threads(int n, Body&& body) {
  std::vector<int> status(static_cast<std::size_t>(n), 0);
  std::vector<std::string> errors(static_cast<std::size_t>(n));
  subspace::run_concurrently(n, [&](int r) {
    try {
      status[std::size_t(r)] = body(r);
    } catch (const std::exception& e) {
      errors[std::size_t(r)] = e.what();
      status[std::size_t(r)] = -1;
    }
  });
  for (int r = 0; r < n; ++r)
    if (status[std::size_t(r)] < 0)
      throw std::runtime_error("rank " + std::to_string(r) + ": " + errors[std::size_t(r)]);
  return *std::max_element(status.begin(), status.end());
}

}  // namespace examples
