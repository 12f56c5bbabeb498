#pragma once
// What every fuzz target shares. A target is one function, LLVMFuzzerTestOneInput(data, size), which hands the
// bytes to one reader of the library. The library's own error (subspace::error: a named, explained refusal) is
// the expected outcome of hostile input and is swallowed; anything else — a crash, a sanitizer report, another
// exception type, a hang, a broken round trip — escapes and is a finding.
//
// Built with libFuzzer (clang -fsanitize=fuzzer) or with the portable driver (driver.cpp) on any compiler.

#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>

#include <subspace/core/error.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace subspace::fuzz {

/// Set when the reader accepted the last input whole. The portable driver keeps such inputs for further mutation
/// (they got past the checks, so their mutants reach deeper); libFuzzer's coverage makes it unnecessary there.
inline bool accepted = false;

/// Runs `read` and says whether it accepted the input; a subspace::error is the expected refusal of bad input,
/// anything else propagates.
template <class Read>
bool accepts(Read&& read) {
  accepted = false;
  try {
    read();
    accepted = true;
  } catch (const subspace::error&) {
  }
  return accepted;
}

/// A property the library promises for every input it accepts (e.g. a round trip): a violation aborts, so that
/// the driver or libFuzzer keeps the input. Checked outside accepts(): there, an exception is a finding too.
inline void promise(bool holds, const char* what) {
  if (!holds) {
    std::fprintf(stderr, "fuzz: broken promise: %s\n", what);
    std::abort();
  }
}

/// A directory of this process's own in the temporary directory, removed at exit: readers that take a path get the
/// bytes through files in it, rewritten for each input.
inline const std::filesystem::path& scratch_directory() {
  struct owned {
    std::filesystem::path path;
    owned() {
      path = std::filesystem::temp_directory_path() / ("subspace-fuzz-" + std::to_string(::getpid()));
      std::filesystem::create_directories(path);
    }
    ~owned() {
      std::error_code ignored;
      std::filesystem::remove_all(path, ignored);
    }
  };
  static const owned dir;
  return dir.path;
}

/// Replaces file `name` in the scratch directory with `bytes` and returns its path. A failure here is the
/// harness's, not the reader's: it aborts with the reason.
inline std::filesystem::path write_scratch_file(std::string_view name, const void* bytes, std::size_t size) {
  const std::filesystem::path path = scratch_directory() / name;
  // Overwritten, then cut to length: ext4 flushes a file truncated to zero and rewritten when it is closed, which
  // would make each run wait for the disk.
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::perror(path.c_str());
    std::abort();
  }
  const auto* p = static_cast<const char*>(bytes);
  for (std::size_t done = 0; done < size;) {
    const ::ssize_t n = ::write(fd, p + done, size - done);
    if (n <= 0) {
      std::perror(path.c_str());
      std::abort();
    }
    done += std::size_t(n);
  }
  if (::ftruncate(fd, ::off_t(size)) != 0) {
    std::perror(path.c_str());
    std::abort();
  }
  ::close(fd);
  return path;
}

}  // namespace subspace::fuzz
