#pragma once
// Files: atomic writes (temporary file + fsync + rename), and a read-only file with exact positioned reads (no
// memory map: a file truncated by someone else while mapped would kill the process with SIGBUS). POSIX (Linux);
// every failure is an invalid_argument naming the file, the operation and the system's reason.
//
// atomic_write(path, fill) creates path's directory when needed, writes into "<path>.tmp.<pid>.<n>" in the same
// directory, fsyncs it, renames it over `path` and fsyncs the directory. If `fill` throws (or any write fails)
// the temporary file is removed and the exception propagates: `path` keeps its previous content, or stays
// absent — a reader never sees a partial file.
//
// util/ sits under data/ and io/, which both read and write files; the names are subspace::io's (io::read_file).

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>

#include "../core/error.hpp"

namespace subspace::io {

namespace detail {
inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }
inline std::string sys_reason(int err) { return std::generic_category().message(err); }
}  // namespace detail

/// Creates `dir` and its parents when missing; invalid_argument naming the directory otherwise.
inline void ensure_directory(const std::filesystem::path& dir) {
  if (dir.empty()) return;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  require(!ec && std::filesystem::is_directory(dir), [&] {
    return "cannot create directory " + detail::quoted(dir) + ": " + (ec ? ec.message() : "not a directory");
  });
}

/// The writable end of an atomic_write: raw bytes, appended in order.
class file_sink {
 public:
  file_sink(int fd, std::filesystem::path target) : fd_(fd), target_(std::move(target)) {}
  file_sink(const file_sink&) = delete;
  file_sink& operator=(const file_sink&) = delete;

  void write(const void* data, std::size_t bytes) {
    const auto* p = static_cast<const char*>(data);
    while (bytes > 0) {
      const ::ssize_t n = ::write(fd_, p, bytes);
      if (n < 0 && errno == EINTR) continue;
      require(n > 0, [&, err = n < 0 ? errno : EIO] {
        return "writing " + detail::quoted(target_) + " failed after " + std::to_string(written_) +
               " bytes: " + detail::sys_reason(err);
      });
      p += n;
      bytes -= std::size_t(n);
      written_ += std::uint64_t(n);
    }
  }
  void write(std::string_view s) { write(s.data(), s.size()); }
  /// Bytes written so far.
  std::uint64_t written() const { return written_; }
  /// The file being written (its final name).
  const std::filesystem::path& target() const { return target_; }

 private:
  int fd_;
  std::filesystem::path target_;
  std::uint64_t written_ = 0;
};

/// Writes `path` atomically: fill(file_sink&) produces the content; see the top of this file.
template <class Fill>
void atomic_write(const std::filesystem::path& path, Fill&& fill) {
  namespace fs = std::filesystem;
  require(!path.filename().empty(), [&] { return "atomic_write: " + detail::quoted(path) + " names no file"; });
  const fs::path dir = path.parent_path();
  ensure_directory(dir);
  static std::atomic<std::uint64_t> counter{0};
  const fs::path tmp =
      fs::path(path.string() + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1)));
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  require(fd >= 0, [&, err = errno] {
    return "cannot create " + detail::quoted(tmp) + " (to write " + detail::quoted(path) +
           "): " + detail::sys_reason(err);
  });
  bool closed = false;
  try {
    file_sink sink(fd, path);
    fill(sink);
    require(::fsync(fd) == 0,
            [&, err = errno] { return "fsync of " + detail::quoted(tmp) + " failed: " + detail::sys_reason(err); });
    closed = true;
    require(::close(fd) == 0,
            [&, err = errno] { return "closing " + detail::quoted(tmp) + " failed: " + detail::sys_reason(err); });
    std::error_code ec;
    fs::rename(tmp, path, ec);
    require(!ec, [&] {
      return "cannot rename " + detail::quoted(tmp) + " to " + detail::quoted(path) + ": " + ec.message();
    });
  } catch (...) {
    if (!closed) ::close(fd);
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  // Make the rename itself durable (best effort: some filesystems refuse fsync on directories).
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

/// atomic_write of a string.
inline void atomic_write_text(const std::filesystem::path& path, std::string_view text) {
  atomic_write(path, [&](file_sink& out) { out.write(text); });
}

/// A read-only file: its size when opened, and exact positioned reads.
class read_file {
 public:
  read_file() = default;
  /// Opens `path`; invalid_argument "cannot open '<path>' (<what>): <reason>" when it is missing or unreadable.
  explicit read_file(std::filesystem::path path, std::string_view what = "file") : path_(std::move(path)) {
    struct ::stat st {};
    fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    require(fd_ >= 0, [&, err = errno] {
      return "cannot open " + detail::quoted(path_) + " (" + std::string(what) + "): " + detail::sys_reason(err);
    });
    if (::fstat(fd_, &st) != 0 || !S_ISREG(st.st_mode)) {
      const int err = errno;
      ::close(fd_);
      fd_ = -1;
      require(false, [&] {
        return "cannot read " + detail::quoted(path_) + " (" + std::string(what) +
               "): " + (S_ISDIR(st.st_mode) ? std::string("it is a directory") : detail::sys_reason(err));
      });
    }
    size_ = std::uint64_t(st.st_size);
  }
  read_file(read_file&& o) noexcept { swap(o); }
  read_file& operator=(read_file&& o) noexcept {
    read_file tmp(std::move(o));
    swap(tmp);
    return *this;
  }
  read_file(const read_file&) = delete;
  read_file& operator=(const read_file&) = delete;
  ~read_file() {
    if (fd_ >= 0) ::close(fd_);
  }

  const std::filesystem::path& path() const { return path_; }
  std::uint64_t size() const { return size_; }

  /// Reads exactly `bytes` bytes at `offset`; invalid_argument naming the file when it is shorter.
  void read(std::uint64_t offset, void* dst, std::size_t bytes) const {
    auto* p = static_cast<char*>(dst);
    std::uint64_t at = offset;
    while (bytes > 0) {
      const ::ssize_t n = ::pread(fd_, p, bytes, ::off_t(at));
      if (n < 0 && errno == EINTR) continue;
      require(n >= 0, [&, err = errno] {
        return "reading " + detail::quoted(path_) + " at byte " + std::to_string(at) +
               " failed: " + detail::sys_reason(err);
      });
      require(n > 0, [&] {
        return "reading " + detail::quoted(path_) + ": unexpected end of file at byte " + std::to_string(at) +
               " (the file had " + std::to_string(size_) + " bytes when opened: truncated since?)";
      });
      p += n;
      at += std::uint64_t(n);
      bytes -= std::size_t(n);
    }
  }
  /// The whole file as a string.
  std::string read_all() const {
    std::string s(std::size_t(size_), '\0');
    read(0, s.data(), s.size());
    return s;
  }

 private:
  void swap(read_file& o) noexcept {
    std::swap(path_, o.path_);
    std::swap(fd_, o.fd_);
    std::swap(size_, o.size_);
  }
  std::filesystem::path path_;
  int fd_ = -1;
  std::uint64_t size_ = 0;
};

/// The content of a text file; invalid_argument naming the file (and `what` it is) when it cannot be read.
inline std::string read_text(const std::filesystem::path& path, std::string_view what = "file") {
  return read_file(path, what).read_all();
}

}  // namespace subspace::io
