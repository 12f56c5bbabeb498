#pragma once
// The TCP rendezvous through which comm::nccl hands every rank the same bytes (NCCL's unique id): an
// implementation detail of comm/nccl.cuh, included by it alone (and by the host test of the rendezvous). Host-only
// (POSIX sockets).
//
// Rank 0 listens at launch_info::master_addr:rendezvous_port (comm/bootstrap.hpp) — on MASTER_ADDR itself when
// that is a loopback address, so tests stay on the loopback interface; on every interface otherwise, so a host name
// that resolves to 127.0.1.1 locally still works — waits for the other ranks, checks that each reports the same
// world size and a distinct rank, and then answers every one with its payload. Other ranks connect, retrying until
// rank 0 listens. Both sides give up after a timeout with a message naming the missing ranks or the unreachable
// address; a mismatch (another WORLD_SIZE, a rank claimed twice) fails every connected rank with a message naming
// it.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../../core/error.hpp"
#include "../bootstrap.hpp"
#include "../error.hpp"

namespace subspace::comm::detail {

inline constexpr std::uint32_t rendezvous_magic = 0x53535256u;  // "SSRV"
inline constexpr std::uint32_t rendezvous_version = 1;

/// Owns a socket descriptor.
class socket_fd {
 public:
  socket_fd() = default;
  explicit socket_fd(int fd) : fd_(fd) {}
  socket_fd(socket_fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  socket_fd& operator=(socket_fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  socket_fd(const socket_fd&) = delete;
  socket_fd& operator=(const socket_fd&) = delete;
  ~socket_fd() { reset(); }
  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

inline std::string errno_text(int e) { return std::string(std::strerror(e)); }

inline std::string endpoint(const std::string& address, int port) {
  return (address.find(':') != std::string::npos ? "[" + address + "]" : address) + ":" + std::to_string(port);
}

/// True for "localhost", 127.x.y.z and ::1.
inline bool is_loopback(const std::string& address) {
  if (address == "localhost" || address == "::1") return true;
  in_addr a{};
  return ::inet_pton(AF_INET, address.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

inline double seconds_left(std::chrono::steady_clock::time_point deadline) {
  return std::chrono::duration<double>(deadline - std::chrono::steady_clock::now()).count();
}
inline int poll_ms(std::chrono::steady_clock::time_point deadline) {
  const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  return int(std::clamp<std::int64_t>(left.count(), 0, 1000));
}

/// Writes everything or raises error.
inline void send_all(int fd, const void* data, std::size_t n, const std::string& what) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) throw error("comm::rendezvous: " + what + ": " + errno_text(errno));
    p += k;
    n -= std::size_t(k);
  }
}

/// Reads exactly n bytes before the deadline; false when the peer closed first or the deadline passed
/// (`timed_out` says which).
inline bool recv_all(int fd, void* data, std::size_t n, std::chrono::steady_clock::time_point deadline,
                     bool& timed_out) {
  char* p = static_cast<char*>(data);
  timed_out = false;
  while (n > 0) {
    if (seconds_left(deadline) <= 0) {
      timed_out = true;
      return false;
    }
    pollfd pf{fd, POLLIN, 0};
    const int ready = ::poll(&pf, 1, poll_ms(deadline));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) continue;
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (k <= 0) return false;
    p += k;
    n -= std::size_t(k);
  }
  return true;
}

inline void put_u32(std::vector<unsigned char>& out, std::uint32_t x) {
  const std::uint32_t be = htonl(x);
  unsigned char b[4];
  std::memcpy(b, &be, 4);
  out.insert(out.end(), b, b + 4);
}
inline std::uint32_t get_u32(const unsigned char* p) {
  std::uint32_t be = 0;
  std::memcpy(&be, p, 4);
  return ntohl(be);
}

/// What rank 0 answers: the payload, or why the world failed.
enum class rendezvous_status : unsigned char { ok = 0, mismatch = 1, timeout = 2 };

/// The answer rank 0 sends: a status byte, a length, then the payload or the error message.
inline std::vector<unsigned char> rendezvous_answer(rendezvous_status status, const void* data, std::size_t n) {
  std::vector<unsigned char> out;
  out.push_back(static_cast<unsigned char>(status));
  put_u32(out, std::uint32_t(n));
  const auto* p = static_cast<const unsigned char*>(data);
  out.insert(out.end(), p, p + n);
  return out;
}

/// Rank 0's side of the rendezvous. Listens from construction, so other ranks may connect before serve().
class rendezvous_server {
 public:
  /// Listens at address:port (port 0: a free port, see port()). Raises error when it cannot.
  rendezvous_server(const std::string& address, int port) : address_(address) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    const int rc = ::getaddrinfo(address.empty() ? nullptr : address.c_str(), service.c_str(), &hints, &res);
    if (rc != 0) throw error("comm::rendezvous: cannot resolve " + endpoint(address, port) + ": " + ::gai_strerror(rc));
    int last = 0;
    for (addrinfo* ai = res; ai != nullptr && !fd_; ai = ai->ai_next) {
      socket_fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol));
      if (!fd) {
        last = errno;
        continue;
      }
      const int one = 1;
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
      if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0 || ::listen(fd.get(), 512) != 0) {
        last = errno;
        continue;
      }
      fd_ = std::move(fd);
    }
    ::freeaddrinfo(res);
    if (!fd_)
      throw error("comm::rendezvous: rank 0 cannot listen at " + endpoint(address, port) + ": " + errno_text(last) +
                  (last == EADDRINUSE ? " (another program holds the port; under torchrun its agent's store may: set "
                                        "SUBSPACE_RENDEZVOUS_PORT to a free port, the same on every rank)"
                                      : ""));
    sockaddr_storage bound{};
    socklen_t len = sizeof bound;
    ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&bound), &len);
    port_ = bound.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                                        : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  }

  /// The port it listens on.
  int port() const { return port_; }

  /// Waits for ranks 1 .. world_size - 1 (each reports its rank and world size), then sends each the payload.
  /// Raises timeout_error naming the ranks that never came, mismatch_error when one reports another world size
  /// or a rank already taken (every connected rank then fails with the same message).
  void serve(int world_size, const std::vector<std::byte>& payload, std::chrono::milliseconds timeout) {
    require(world_size >= 1, "comm::rendezvous_server::serve: world size below 1");
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    struct client {
      socket_fd fd;
      unsigned char hello[16]{};
      std::size_t got = 0;
      int rank = -1;
    };
    std::vector<client> clients;
    std::map<int, std::size_t> by_rank;  // rank -> index in clients
    const auto fail_all = [&](const std::string& message, bool mismatch) {
      const auto answer = rendezvous_answer(mismatch ? rendezvous_status::mismatch : rendezvous_status::timeout,
                                            message.data(), message.size());
      for (auto& c : clients)
        if (c.fd) {
          try {
            send_all(c.fd.get(), answer.data(), answer.size(), "answering");
          } catch (const error&) {
          }
        }
      if (mismatch) throw mismatch_error(message);
      throw timeout_error(message);
    };
    while (int(by_rank.size()) < world_size - 1) {
      if (seconds_left(deadline) <= 0) {
        std::vector<int> missing;
        for (int r = 1; r < world_size; ++r)
          if (!by_rank.count(r)) missing.push_back(r);
        std::string list;
        for (std::size_t i = 0; i < missing.size(); ++i) list += (i ? ", " : "") + std::to_string(missing[i]);
        std::ostringstream s;
        s.precision(3);
        s << std::fixed << "comm::rendezvous: rank 0 waited " << double(timeout.count()) / 1000.0 << " s at "
          << endpoint(address_, port_) << " for the other " << world_size - 1 << " rank(s) of a world of " << world_size
          << "; rank(s) " << list << " never reported (are they running, with the same MASTER_ADDR and MASTER_PORT?)";
        fail_all(s.str(), false);
      }
      std::vector<pollfd> fds{{fd_.get(), POLLIN, 0}};
      for (auto& c : clients) fds.push_back({c.fd.get(), POLLIN, 0});
      const int ready = ::poll(fds.data(), nfds_t(fds.size()), poll_ms(deadline));
      if (ready <= 0) continue;
      if (fds[0].revents & POLLIN) {
        socket_fd c(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (c) clients.push_back(client{std::move(c), {}, 0, -1});
      }
      for (std::size_t i = 1; i < fds.size(); ++i) {
        client& c = clients[i - 1];
        if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR)) || c.rank >= 0) continue;
        const ssize_t k = ::recv(c.fd.get(), c.hello + c.got, sizeof c.hello - c.got, 0);
        if (k <= 0) {  // closed before saying who it is: forget it
          c.fd.reset();
          continue;
        }
        c.got += std::size_t(k);
        if (c.got < sizeof c.hello) continue;
        if (get_u32(c.hello) != rendezvous_magic || get_u32(c.hello + 4) != rendezvous_version) {
          c.fd.reset();  // not one of ours
          continue;
        }
        const int rank = int(get_u32(c.hello + 8)), size = int(get_u32(c.hello + 12));
        const std::string at = " (rendezvous at " + endpoint(address_, port_) + ")";
        if (size != world_size)
          fail_all("comm::rendezvous: rank " + std::to_string(rank) + " was launched with a world of " +
                       std::to_string(size) + " ranks, but rank 0 with " + std::to_string(world_size) + at,
                   true);
        if (rank <= 0 || rank >= world_size)
          fail_all("comm::rendezvous: a process reports rank " + std::to_string(rank) + ", outside [1, " +
                       std::to_string(world_size) + ")" + at,
                   true);
        if (by_rank.count(rank))
          fail_all("comm::rendezvous: two processes claim rank " + std::to_string(rank) + at, true);
        c.rank = rank;
        by_rank[rank] = i - 1;
      }
      std::erase_if(clients, [&](const client& c) { return !c.fd && c.rank < 0; });
      by_rank.clear();
      for (std::size_t i = 0; i < clients.size(); ++i)
        if (clients[i].rank >= 0) by_rank[clients[i].rank] = i;
    }
    const auto answer = rendezvous_answer(rendezvous_status::ok, payload.data(), payload.size());
    for (auto& [rank, i] : by_rank)
      send_all(clients[i].fd.get(), answer.data(), answer.size(),
               "sending rank " + std::to_string(rank) + " its answer");
  }

 private:
  std::string address_;
  socket_fd fd_;
  int port_ = 0;
};

/// Rank `rank`'s side: connects to rank 0 at address:port (retrying until it listens), says who it is and
/// returns rank 0's payload. Raises timeout_error when rank 0 cannot be reached or does not answer in time,
/// mismatch_error (or error) with rank 0's message when rank 0 refused the world.
inline std::vector<std::byte> rendezvous_fetch(const std::string& address, int port, int rank, int world_size,
                                               std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  const std::string where = endpoint(address, port);
  const std::string who = "comm::rendezvous: rank " + std::to_string(rank) + " of " + std::to_string(world_size);
  const auto secs = [&] {
    std::ostringstream s;
    s.precision(3);
    s << std::fixed << double(timeout.count()) / 1000.0 << " s";
    return s.str();
  };
  std::string last = "no attempt";
  socket_fd fd;
  while (!fd) {
    if (seconds_left(deadline) <= 0)
      throw timeout_error(who + " could not reach rank 0 at " + where + " within " + secs() + " (last error: " + last +
                          "); is rank 0 running, with the same MASTER_ADDR and MASTER_PORT?");
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    if (const int rc = ::getaddrinfo(address.c_str(), service.c_str(), &hints, &res); rc != 0) {
      last = std::string("cannot resolve the address: ") + ::gai_strerror(rc);
    } else {
      for (addrinfo* ai = res; ai != nullptr && !fd; ai = ai->ai_next) {
        socket_fd s(::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol));
        if (!s) {
          last = errno_text(errno);
          continue;
        }
        int rc2 = ::connect(s.get(), ai->ai_addr, ai->ai_addrlen);
        if (rc2 != 0 && errno == EINPROGRESS) {
          pollfd pf{s.get(), POLLOUT, 0};
          rc2 = ::poll(&pf, 1, std::max(1, poll_ms(deadline)));
          int err = 0;
          socklen_t len = sizeof err;
          if (rc2 > 0 && ::getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
            rc2 = 0;
          } else {
            errno = rc2 == 0 ? ETIMEDOUT : err;
            rc2 = -1;
          }
        }
        if (rc2 != 0) {
          last = errno_text(errno);
          continue;
        }
        const int flags = ::fcntl(s.get(), F_GETFL);
        ::fcntl(s.get(), F_SETFL, flags & ~O_NONBLOCK);
        fd = std::move(s);
      }
      ::freeaddrinfo(res);
    }
    if (!fd) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::vector<unsigned char> hello;
  put_u32(hello, rendezvous_magic);
  put_u32(hello, rendezvous_version);
  put_u32(hello, std::uint32_t(rank));
  put_u32(hello, std::uint32_t(world_size));
  send_all(fd.get(), hello.data(), hello.size(), "saying hello to rank 0 at " + where);
  unsigned char head[5];
  bool timed_out = false;
  if (!recv_all(fd.get(), head, sizeof head, deadline, timed_out)) {
    if (timed_out)
      throw timeout_error(who + " reached rank 0 at " + where + " but got no answer within " + secs() +
                          " (rank 0 is still waiting for other ranks)");
    throw error(who + ": rank 0 at " + where + " closed the connection without answering (see rank 0's error)");
  }
  std::vector<std::byte> body(get_u32(head + 1));
  if (!recv_all(fd.get(), body.data(), body.size(), deadline, timed_out))
    throw error(who + ": the answer from rank 0 at " + where + " was cut short");
  if (head[0] != static_cast<unsigned char>(rendezvous_status::ok)) {
    const std::string message(reinterpret_cast<const char*>(body.data()), body.size());
    if (head[0] == static_cast<unsigned char>(rendezvous_status::timeout)) throw timeout_error(message);
    throw mismatch_error(message);
  }
  return body;
}

/// The address rank 0 listens on for MASTER_ADDR: itself when it is a loopback address, else every interface.
inline std::string rendezvous_listen_address(const std::string& master_addr) {
  return is_loopback(master_addr) ? master_addr : std::string("0.0.0.0");
}

/// Both sides at once: rank 0 serves `payload` at li.master_addr:li.rendezvous_port, the others fetch it. Every
/// rank returns rank 0's payload. A world of one needs no network (so a busy port cannot fail a single-process run).
inline std::vector<std::byte> rendezvous(const launch_info& li, const std::vector<std::byte>& payload,
                                         std::chrono::milliseconds timeout) {
  if (li.world_size == 1) return payload;
  if (li.rank == 0) {
    rendezvous_server server(rendezvous_listen_address(li.master_addr), li.rendezvous_port);
    server.serve(li.world_size, payload, timeout);
    return payload;
  }
  return rendezvous_fetch(li.master_addr, li.rendezvous_port, li.rank, li.world_size, timeout);
}

}  // namespace subspace::comm::detail
