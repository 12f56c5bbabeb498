#pragma once
// Whole files for tests that write or damage them, and a doctest matcher for one part of an error message.

#include <doctest/doctest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace subspace::testing {

inline std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

inline void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), std::streamsize(bytes.size()));
}

/// Matches an exception message containing `part` (doctest::Contains keeps a pointer: the string must outlive the
/// check, which a temporary built in the CHECK's arguments does).
inline doctest::Contains has(const std::string& part) { return doctest::Contains(part.c_str()); }

}  // namespace subspace::testing
