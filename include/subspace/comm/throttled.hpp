#pragma once
// comm::throttled<C>: any communicator, seen through a network of given bandwidth and latency.
//
//   comm::network net{comm::links::mbit300};             // every link 300 Mbit/s, 10 ms
//   net.set_both(0, 3, comm::links::mbit80);              // one slow pair
//   comm::throttled<comm::local> c{std::move(ranks[r]), net};
//   c.all_reduce(grad.v(), comm::reduce_op::avg).wait();
//   c.metrics().seconds;                                  // modelled time on this rank's network so far
//
// The data moves through the wrapped communicator unchanged; throttled counts the bytes the modelled algorithm
// moves, per peer and per kind of operation, and the time they take on the modelled links:
//   * account mode (the default) adds the modelled time to a virtual clock (metrics().seconds) without
//     sleeping: repeatable figures for tests and benchmarks;
//   * enforce mode also delays each request's completion (wait() sleeps, test() stays false) until the
//     modelled time has passed, so a real run feels the network.
//
// The model. Ranks are those of the communicator throttled first wraps (its "world"; splits keep naming links by
// those ranks). A link from a to b has latency α(a,b) and bandwidth β(a,b) in bit/s; t(a,b,x) = α + 8x/β is the
// time to move x bytes over it. Links are independent and full duplex. A collective runs as a sequence of
// synchronous steps; a step lasts as long as its slowest message. The algorithms are the ones NCCL uses for
// bandwidth-bound messages, in group rank order (rank r sends to r+1 mod n); s is the element size, n the group
// size, B the buffer's bytes:
//
//   send/recv of B bytes from a to b   one message; T = t(a,b,B), charged to both ranks. A message to oneself is
//                                      free and not counted.
//   all_reduce of m elements (ring)    reduce-scatter then all-gather over n chunks; chunk k holds
//                                      c_k = floor(m/n) + (k < m mod n) elements. Step j = 0..n-2 of the
//                                      reduce-scatter: r sends chunk (r-j) mod n; step j of the all-gather: r sends
//                                      chunk (r+1-j) mod n. Rank r sends s·(2m - c_{(r+1) mod n} - c_{(r+2) mod n})
//                                      bytes (= 2(n-1)/n·B when n divides m) and receives what r-1 sends.
//                                      T = sum over the 2(n-1) steps of max_r t(r, r+1, s·chunk)
//                                        = 2(n-1)·(α + 8·s·ceil(m/n)/β) on uniform links.
//   all_gather, m elements per rank    step j = 0..n-2: r sends block (r-j) mod n (m elements) to r+1.
//   (ring)                             Each rank sends and receives (n-1)·m·s bytes; T = (n-1)·(α + 8ms/β).
//   reduce_scatter, m out elements     step j = 0..n-2: r sends the partial block (r-j-1) mod n to r+1.
//   (ring)                             Each rank sends and receives (n-1)·m·s bytes; T = (n-1)·(α + 8ms/β).
//   broadcast of B bytes (pipelined    chain root -> root+1 -> ... -> root+n-1 in k = max(1, ceil(B/C)) chunks of
//   chain, chunk C =                   C bytes (the last one shorter). Every rank but the last of the chain sends
//   network::broadcast_chunk_bytes)    B to its successor, every rank but the root receives B, in k messages.
//                                      T = the makespan of k chunks through n-1 hops: chunk j leaves hop h at
//                                      F(j,h) = max(F(j-1,h), F(j,h-1)) + t(hop h, c_j); on uniform links
//                                      T = k·α + 8B/β + (n-2)·(α + 8·min(B,C)/β).
//   barrier (dissemination)            ceil(log2 n) rounds; in round j rank r sends an empty message to
//                                      (r + 2^j) mod n. No bytes; T = sum over rounds of max_r α(r, r+2^j).
//
// A rank's operations occupy its network one after another: the virtual clock is their sum, except that the
// operations issued between group_start() and group_end() run concurrently (the group adds the longest of
// them). Bookkeeping traffic (split() exchanges the colors and keys through the wrapped communicator) is not
// counted.
//
// Enforce mode. An operation starts when the rank's network is free (or when it is issued, if later; a group's
// operations all start with the group). A collective holds the network for its T and completes at start + T. A
// message is a link's latency in flight, not on the wire: a send holds the sender's network for 8B/β and
// completes then, and the message arrives at start + α + 8B/β, so back-to-back messages overlap their latencies
// as on a real link. A receive completes when its message arrives: between ranks of one process (a wrapped
// communicator with `in_process`, as comm::local) the sender posts each message's arrival time on a board that
// copies of one `network` share, and the receive waits for it; a receive from another process cannot see when
// its message left, and completes at T after it is posted (or after the rank's network is free, if later).

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/hash.hpp"
#include "../core/tensor.hpp"
#include "concepts.hpp"
#include "self.hpp"

namespace subspace::comm {

/// One direction of a network link.
struct link {
  double bits_per_second = 1e9;
  double latency_seconds = 0.0;

  /// Seconds to move `bytes` over the link: latency + 8 * bytes / bandwidth.
  constexpr double seconds(std::uint64_t bytes) const {
    return latency_seconds + 8.0 * double(bytes) / bits_per_second;
  }
  friend constexpr bool operator==(const link&, const link&) = default;

  /// A preset by the name of its constant ("mbit80", "gbit1", ...: links::presets), or
  /// "<number><kbit|mbit|gbit>[@<number><s|ms|us>]", e.g. "2.5gbit@50us" — exactly that link, latency 0 unless
  /// given ("1gbit" is 1 Gbit/s with no latency; the preset gbit1 has 100 us). Raises invalid_argument naming
  /// what it could not read.
  static link parse(std::string_view text);
};

/// Link presets: the bandwidths of the scenarios with a typical latency for such a link. Override the
/// latency where you know better: link{links::mbit80.bits_per_second, 0.05}.
namespace links {
inline constexpr link mbit80{80e6, 20e-3};    // a home or small-office uplink, across a region
inline constexpr link mbit300{300e6, 10e-3};  // a good internet link between sites
inline constexpr link gbit1{1e9, 100e-6};     // 1 GbE inside a building
inline constexpr link gbit25{25e9, 10e-6};    // 25 GbE in a datacenter
inline constexpr link gbit100{100e9, 5e-6};   // 100 Gbit/s InfiniBand or RoCE

/// The presets by the names of their constants: what link::parse and the examples' --bandwidth read.
struct named_link {
  std::string_view name;
  link value;
};
inline constexpr std::array<named_link, 5> presets{
    {{"mbit80", mbit80}, {"mbit300", mbit300}, {"gbit1", gbit1}, {"gbit25", gbit25}, {"gbit100", gbit100}}};

/// "mbit80, mbit300, gbit1, gbit25, gbit100": for messages and help texts.
inline std::string preset_names() {
  std::string out;
  for (const named_link& p : presets) out += (out.empty() ? "" : ", ") + std::string(p.name);
  return out;
}
}  // namespace links

inline link link::parse(std::string_view text) {
  const std::string t(text);
  for (const links::named_link& p : links::presets)
    if (t == p.name) return p.value;
  const auto bad = [&] {
    return invalid_argument("comm::link::parse: cannot read '" + t + "' (expected " + links::preset_names() +
                            " or <number><kbit|mbit|gbit>[@<number><s|ms|us>])");
  };
  const auto number_unit = [&](const std::string& s, std::string& unit) {
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (end == s.c_str() || !(v >= 0) || !std::isfinite(v)) throw bad();
    unit = std::string(end);
    return v;
  };
  const auto at = t.find('@');
  std::string unit;
  const double bw = number_unit(t.substr(0, at), unit);
  double scale = 0;
  if (unit == "kbit") scale = 1e3;
  else if (unit == "mbit") scale = 1e6;
  else if (unit == "gbit") scale = 1e9;
  else throw bad();
  link l{bw * scale, 0.0};
  if (!(l.bits_per_second > 0)) throw bad();
  if (at != std::string::npos) {
    const double lat = number_unit(t.substr(at + 1), unit);
    if (unit == "s") l.latency_seconds = lat;
    else if (unit == "ms") l.latency_seconds = lat * 1e-3;
    else if (unit == "us") l.latency_seconds = lat * 1e-6;
    else throw bad();
  }
  return l;
}

enum class throttle_mode { account, enforce };

namespace detail {
/// When each point-to-point message between in-process ranks arrives (see the top): the sender posts the time
/// before it hands the data to the wrapped communicator, the receiver takes it once the data is there.
class arrival_board {
 public:
  using time_point = std::chrono::steady_clock::time_point;
  using key = std::tuple<std::uint64_t, int, int, std::uint64_t>;  // communicator, from, to, message number

  void post(const key& k, time_point arrival) {
    const std::lock_guard lock(mu_);
    arrivals_[k] = arrival;
  }
  std::optional<time_point> take(const key& k) {
    const std::lock_guard lock(mu_);
    const auto it = arrivals_.find(k);
    if (it == arrivals_.end()) return std::nullopt;
    const time_point t = it->second;
    arrivals_.erase(it);
    return t;
  }

 private:
  std::mutex mu_;
  std::map<key, time_point> arrivals_;
};
}  // namespace detail

/// The modelled network: a default link, directed per-pair overrides, the mode and the broadcast chunk.
struct network {
  link default_link = links::gbit1;
  std::map<std::pair<int, int>, link> overrides;  // (from, to) in the ranks of the first wrapped communicator
  throttle_mode mode = throttle_mode::account;
  std::uint64_t broadcast_chunk_bytes = std::uint64_t(1) << 20;
  /// Enforce mode's arrival times of messages between in-process ranks, shared by the copies of this network:
  /// give every rank of one world a copy of the same network.
  std::shared_ptr<detail::arrival_board> arrivals = std::make_shared<detail::arrival_board>();

  network() = default;
  explicit network(link l, throttle_mode m = throttle_mode::account) : default_link(l), mode(m) {}

  /// The link from `from` to `to` (one direction).
  network& set(int from, int to, link l) {
    overrides[{from, to}] = l;
    return *this;
  }
  /// Both directions between a and b.
  network& set_both(int a, int b, link l) { return set(a, b, l).set(b, a, l); }

  link between(int from, int to) const {
    const auto it = overrides.find({from, to});
    return it == overrides.end() ? default_link : it->second;
  }
};

/// The kinds of operation throttled counts separately.
enum class op_kind : int { send, recv, all_reduce, all_gather, reduce_scatter, broadcast, barrier };
inline constexpr int op_kind_count = 7;

inline constexpr std::string_view to_string(op_kind k) {
  switch (k) {
    case op_kind::send: return "send";
    case op_kind::recv: return "recv";
    case op_kind::all_reduce: return "all_reduce";
    case op_kind::all_gather: return "all_gather";
    case op_kind::reduce_scatter: return "reduce_scatter";
    case op_kind::broadcast: return "broadcast";
    case op_kind::barrier: return "barrier";
  }
  return "?";
}

/// Bytes and messages in each direction.
struct traffic_counts {
  std::uint64_t bytes_sent = 0, bytes_received = 0, messages_sent = 0, messages_received = 0;
};

/// One kind of operation: calls, traffic and modelled seconds (summed; grouped operations each count their own).
struct op_traffic : traffic_counts {
  std::uint64_t calls = 0;
  double seconds = 0;
};

/// What one rank moved over the modelled network (the rank and every communicator split from it).
struct traffic {
  std::array<op_traffic, op_kind_count> by_op{};
  std::map<int, traffic_counts> by_peer;  // peer: a rank of the first wrapped communicator
  double seconds = 0;                     // the virtual clock: modelled time the rank's network was busy

  const op_traffic& operator[](op_kind k) const { return by_op[std::size_t(k)]; }
  std::uint64_t bytes_sent() const {
    std::uint64_t b = 0;
    for (const auto& o : by_op) b += o.bytes_sent;
    return b;
  }
  std::uint64_t bytes_received() const {
    std::uint64_t b = 0;
    for (const auto& o : by_op) b += o.bytes_received;
    return b;
  }
  /// One line per kind that was called, then the clock.
  std::string summary() const {
    std::ostringstream s;
    for (int k = 0; k < op_kind_count; ++k) {
      const op_traffic& o = by_op[std::size_t(k)];
      if (o.calls == 0) continue;
      s << to_string(op_kind(k)) << ": " << o.calls << " calls, " << o.bytes_sent << " B sent, " << o.bytes_received
        << " B received, " << o.seconds << " s\n";
    }
    s << "modelled network time: " << seconds << " s\n";
    return s.str();
  }
};

namespace model {

/// One message of a step, between group ranks.
struct message {
  int from = 0, to = 0;
  std::uint64_t bytes = 0;
};
/// A collective as synchronous steps.
using steps = std::vector<std::vector<message>>;

/// Elements of chunk k when m elements are cut into n chunks (the first m mod n chunks one longer).
inline std::int64_t chunk(std::int64_t m, int n, int k) { return m / n + (k < m % n ? 1 : 0); }

inline steps ring_all_reduce(int n, std::int64_t m, std::size_t element_bytes) {
  steps out;
  if (n < 2) return out;
  const auto bytes = [&](int k) { return std::uint64_t(chunk(m, n, ((k % n) + n) % n)) * element_bytes; };
  for (int phase = 0; phase < 2; ++phase)
    for (int j = 0; j < n - 1; ++j) {
      std::vector<message> step;
      for (int r = 0; r < n; ++r) step.push_back({r, (r + 1) % n, bytes(phase == 0 ? r - j : r + 1 - j)});
      out.push_back(std::move(step));
    }
  return out;
}

/// all_gather and reduce_scatter: n-1 steps, every rank sends one block to the next.
inline steps ring_blocks(int n, std::uint64_t block_bytes) {
  steps out;
  for (int j = 0; j + 1 < n; ++j) {
    std::vector<message> step;
    for (int r = 0; r < n; ++r) step.push_back({r, (r + 1) % n, block_bytes});
    out.push_back(std::move(step));
  }
  return out;
}

inline steps dissemination_barrier(int n) {
  steps out;
  for (int d = 1; d < n; d *= 2) {
    std::vector<message> step;
    for (int r = 0; r < n; ++r) step.push_back({r, (r + d) % n, 0});
    out.push_back(std::move(step));
  }
  return out;
}

/// Sum over steps of the slowest message; link_of(from, to) gives the link between group ranks.
template <class LinkOf>
double seconds(const steps& s, LinkOf&& link_of) {
  double t = 0;
  for (const auto& step : s) {
    double slowest = 0;
    for (const message& m : step) slowest = std::max(slowest, link_of(m.from, m.to).seconds(m.bytes));
    t += slowest;
  }
  return t;
}

/// The pipelined chain broadcast's makespan (see the top of comm/throttled.hpp).
template <class LinkOf>
double chain_broadcast_seconds(int n, int root, std::uint64_t bytes, std::uint64_t chunk_bytes, LinkOf&& link_of) {
  if (n < 2) return 0;
  const std::uint64_t c = std::max<std::uint64_t>(chunk_bytes, 1);
  const std::uint64_t k = std::max<std::uint64_t>(1, (bytes + c - 1) / c);
  std::vector<double> f(std::size_t(n), 0.0);  // f[h]: when the previous chunk left hop h (h = 1..n-1)
  std::vector<link> hop(static_cast<std::size_t>(n));
  for (int h = 1; h < n; ++h) hop[std::size_t(h)] = link_of((root + h - 1) % n, (root + h) % n);
  for (std::uint64_t j = 0; j < k; ++j) {
    const std::uint64_t cj = std::min(c, bytes - std::min(bytes, j * c));
    double prev = 0;  // when chunk j left hop h-1 (the root holds every chunk at 0)
    for (int h = 1; h < n; ++h) {
      f[std::size_t(h)] = std::max(f[std::size_t(h)], prev) + hop[std::size_t(h)].seconds(cj);
      prev = f[std::size_t(h)];
    }
  }
  return f[std::size_t(n - 1)];
}

}  // namespace model

namespace detail {
/// What the rank and its splits share: the network, the counters and the clock.
struct throttle_state {
  network net;
  traffic t;
  int group_depth = 0;
  double group_longest = 0, group_hold = 0;
  std::chrono::steady_clock::time_point group_start{}, busy_until{};
  // Per communicator (its id): messages sent to and received from each peer, and splits made.
  std::map<std::pair<std::uint64_t, int>, std::uint64_t> sent, received;
  std::map<std::uint64_t, std::uint64_t> splits;
};

/// The id of a communicator split from `parent` (its `nth` split) with `color`: the same on every member.
inline std::uint64_t split_id(std::uint64_t parent, std::uint64_t nth, int color) {
  fnv1a_64 h;
  for (const std::uint64_t v : {parent, nth}) {
    h.add_u32(std::uint32_t(v));
    h.add_u32(std::uint32_t(v >> 32));
  }
  h.add_u32(std::uint32_t(color));
  return h.value();
}
}  // namespace detail

/// A communicator C seen through a modelled network. See the top of comm/throttled.hpp.
template <class C>
class throttled {
 public:
  using inner_request = std::remove_cvref_t<decltype(std::declval<C&>().barrier())>;

  /// Completion handle: the wrapped request, and in enforce mode the modelled completion time.
  class request {
   public:
    request() = default;
    void wait() {
      if (inner_) inner_->wait();
      if (const auto d = deadline()) std::this_thread::sleep_until(*d);
    }
    bool test() {
      if (inner_ && !inner_->test()) return false;
      const auto d = deadline();
      return !d || std::chrono::steady_clock::now() >= *d;
    }

   private:
    friend class throttled;
    using time_point = std::chrono::steady_clock::time_point;
    struct arrival {
      std::shared_ptr<detail::arrival_board> board;
      detail::arrival_board::key key;
    };
    request(inner_request r, std::optional<time_point> d, std::optional<arrival> a = std::nullopt)
        : inner_(std::move(r)), deadline_(d), arrival_(std::move(a)) {}
    // Called once the wrapped request is complete: a receive from an in-process rank then takes its message's
    // arrival from the board (kept from the first call on); without one it keeps the deadline it was issued with.
    std::optional<time_point> deadline() {
      if (arrival_) {
        if (const auto t = arrival_->board->take(arrival_->key)) deadline_ = *t;
        arrival_.reset();
      }
      return deadline_;
    }
    std::optional<inner_request> inner_;
    std::optional<time_point> deadline_;
    std::optional<arrival> arrival_;
  };

  /// Wraps `inner`; its ranks name the network's links.
  throttled(C inner, network net) : inner_(std::move(inner)), state_(std::make_shared<detail::throttle_state>()) {
    state_->net = std::move(net);
    require(state_->net.default_link.bits_per_second > 0, "comm::throttled: link bandwidth must be positive");
    for (const auto& [pair, l] : state_->net.overrides)
      require(l.bits_per_second > 0, [&link = pair] {
        return "comm::throttled: the link " + std::to_string(link.first) + " -> " + std::to_string(link.second) +
               " has no bandwidth";
      });
    for (int r = 0; r < inner_.size(); ++r) members_.push_back(r);
  }

  int rank() const { return inner_.rank(); }
  int size() const { return inner_.size(); }
  C& inner() { return inner_; }
  const C& inner() const { return inner_; }
  const network& config() const { return state_->net; }
  /// This rank's counters and virtual clock (shared with the communicators split from it).
  const traffic& metrics() const { return state_->t; }
  void reset_metrics() { state_->t = traffic{}; }
  /// This rank in the network (a rank of the first wrapped communicator).
  int network_rank() const { return members_.empty() ? -1 : members_[std::size_t(rank())]; }

  template <class T, class S>
  request send(view<const T, S> buf, int peer) {
    if (peer < 0 || peer >= size()) return request(inner_.send(buf, peer), std::nullopt);  // it names the error
    if (peer == rank()) {  // free: a call, no traffic, no time
      charge(op_kind::send, 0.0, 0.0);
      return request(inner_.send(buf, peer), std::nullopt);
    }
    const int to = members_[std::size_t(peer)];
    const double t = point_to_point(op_kind::send, network_rank(), to, buf.bytes());
    const double wire = t - state_->net.between(network_rank(), to).latency_seconds;
    const auto start = charge(op_kind::send, t, wire);
    std::optional<std::chrono::steady_clock::time_point> deadline;
    if (enforcing()) {
      deadline = start + to_duration(wire);
      // Posted before the wrapped send, so a receiver whose data is there finds it.
      if constexpr (in_process)
        state_->net.arrivals->post({id_, rank(), peer, state_->sent[{id_, peer}]++}, start + to_duration(t));
    }
    return request(inner_.send(buf, peer), deadline);
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request send(view<T, S> buf, int peer) {
    return send(view<const T, S>(buf), peer);
  }

  template <class T, class S>
    requires(!std::is_const_v<T>)
  request recv(view<T, S> buf, int peer) {
    if (peer < 0 || peer >= size()) return request(inner_.recv(buf, peer), std::nullopt);
    if (peer == rank()) {
      charge(op_kind::recv, 0.0, 0.0);
      return request(inner_.recv(buf, peer), std::nullopt);
    }
    const double t = point_to_point(op_kind::recv, members_[std::size_t(peer)], network_rank(), buf.bytes());
    const auto start = charge(op_kind::recv, t, 0.0);  // the incoming link is the sender's to hold
    std::optional<std::chrono::steady_clock::time_point> deadline;
    std::optional<typename request::arrival> arrival;
    if (enforcing()) {
      deadline = start + to_duration(t);  // when the sender is in another process
      if constexpr (in_process)
        arrival = typename request::arrival{state_->net.arrivals, {id_, peer, rank(), state_->received[{id_, peer}]++}};
    }
    return request(inner_.recv(buf, peer), deadline, std::move(arrival));
  }

  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_reduce(view<T, S> buf, reduce_op op) {
    auto r = inner_.all_reduce(buf, op);
    return finish(std::move(r), op_kind::all_reduce,
                  apply(op_kind::all_reduce, model::ring_all_reduce(size(), buf.numel(), sizeof(T))));
  }

  template <class T, class S>
  request all_gather(view<const T, S> in, view<std::remove_const_t<T>, S> out) {
    auto r = inner_.all_gather(in, out);
    return finish(std::move(r), op_kind::all_gather,
                  apply(op_kind::all_gather, model::ring_blocks(size(), in.bytes())));
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_gather(view<T, S> in, view<T, S> out) {
    return all_gather(view<const T, S>(in), out);
  }

  template <class T, class S>
  request reduce_scatter(view<const T, S> in, view<std::remove_const_t<T>, S> out, reduce_op op) {
    auto r = inner_.reduce_scatter(in, out, op);
    return finish(std::move(r), op_kind::reduce_scatter,
                  apply(op_kind::reduce_scatter, model::ring_blocks(size(), out.bytes())));
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request reduce_scatter(view<T, S> in, view<T, S> out, reduce_op op) {
    return reduce_scatter(view<const T, S>(in), out, op);
  }

  template <class T, class S>
    requires(!std::is_const_v<T>)
  request broadcast(view<T, S> buf, int root) {
    auto r = inner_.broadcast(buf, root);
    const int n = size(), me = rank();
    const std::uint64_t bytes = buf.bytes();
    const std::uint64_t c = std::max<std::uint64_t>(state_->net.broadcast_chunk_bytes, 1);
    const std::uint64_t k = std::max<std::uint64_t>(1, (bytes + c - 1) / c);
    op_traffic& o = state_->t.by_op[std::size_t(op_kind::broadcast)];
    if (n > 1) {
      const int pos = (me - root + n) % n;  // place in the chain
      if (pos + 1 < n) count_sent(o, members_[std::size_t((me + 1) % n)], bytes, k);
      if (pos > 0) count_received(o, members_[std::size_t((me + n - 1) % n)], bytes, k);
    }
    const double t = model::chain_broadcast_seconds(n, root, bytes, c, link_of());
    return finish(std::move(r), op_kind::broadcast, t);
  }

  request barrier() {
    auto r = inner_.barrier();
    return finish(std::move(r), op_kind::barrier, apply(op_kind::barrier, model::dissemination_barrier(size())));
  }

  /// Operations issued until the matching group_end() run concurrently in the model (see the header's top).
  void group_start() {
    inner_.group_start();
    detail::throttle_state& st = *state_;
    if (st.group_depth++ == 0) {
      st.group_longest = st.group_hold = 0;
      st.group_start = std::max(std::chrono::steady_clock::now(), st.busy_until);
    }
  }
  void group_end() {
    inner_.group_end();
    detail::throttle_state& st = *state_;
    require(st.group_depth > 0, "comm::throttled::group_end: no group_start to close");
    if (--st.group_depth == 0) {
      st.t.seconds += st.group_longest;
      st.busy_until = st.group_start + to_duration(st.group_hold);
    }
  }

  /// Aborts the wrapped communicator (comm::local and comm::nccl have abort; others do not, and this is then absent).
  void abort(const std::string& why = "abort() called")
    requires requires(C& c, const std::string& w) { c.abort(w); }
  {
    inner_.abort(why);
  }

  /// Splits the wrapped communicator; the new one keeps this rank's network, counters and clock.
  throttled split(int color, int key) {
    const int n = size();
    // Every rank's (color, key), exactly, as floats: high and low 16 bits.
    const auto hi = [](int x) { return float(x >> 16); };
    const auto lo = [](int x) { return float(x & 0xffff); };
    std::vector<float> mine{hi(color), lo(color), hi(key), lo(key)}, all(std::size_t(4 * n));
    inner_.all_gather(view<const float, host_space>(mine.data(), {4}), view<float, host_space>(all.data(), {n, 4}))
        .wait();
    C sub = inner_.split(color, key);
    std::vector<int> members;
    if (color >= 0) {
      const auto value = [&](int q, int i) {
        return int(all[std::size_t(4 * q + i)]) * 65536 + int(all[std::size_t(4 * q + i + 1)]);
      };
      std::vector<int> group;
      for (int q = 0; q < n; ++q)
        if (value(q, 0) == color) group.push_back(q);
      std::stable_sort(group.begin(), group.end(), [&](int a, int b) { return value(a, 2) < value(b, 2); });
      for (const int q : group) members.push_back(members_[std::size_t(q)]);
    }
    const std::uint64_t id = detail::split_id(id_, state_->splits[id_]++, color);
    return throttled(std::move(sub), state_, std::move(members), id);
  }

 private:
  throttled(C inner, std::shared_ptr<detail::throttle_state> st, std::vector<int> members, std::uint64_t id)
      : inner_(std::move(inner)), state_(std::move(st)), members_(std::move(members)), id_(id) {}

  static std::chrono::steady_clock::duration to_duration(double seconds) {
    return std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(seconds));
  }

  auto link_of() const {
    return [this](int from, int to) {
      return state_->net.between(members_[std::size_t(from)], members_[std::size_t(to)]);
    };
  }

  void count_sent(op_traffic& o, int peer, std::uint64_t bytes, std::uint64_t messages) {
    o.bytes_sent += bytes;
    o.messages_sent += messages;
    traffic_counts& p = state_->t.by_peer[peer];
    p.bytes_sent += bytes;
    p.messages_sent += messages;
  }
  void count_received(op_traffic& o, int peer, std::uint64_t bytes, std::uint64_t messages) {
    o.bytes_received += bytes;
    o.messages_received += messages;
    traffic_counts& p = state_->t.by_peer[peer];
    p.bytes_received += bytes;
    p.messages_received += messages;
  }

  /// Counts a point-to-point message between network ranks; returns its time.
  double point_to_point(op_kind k, int from, int to, std::uint64_t bytes) {
    op_traffic& o = state_->t.by_op[std::size_t(k)];
    if (k == op_kind::send) count_sent(o, to, bytes, 1);
    else count_received(o, from, bytes, 1);
    return state_->net.between(from, to).seconds(bytes);
  }

  /// Counts this rank's messages of a stepped collective; returns its time.
  double apply(op_kind k, const model::steps& s) {
    op_traffic& o = state_->t.by_op[std::size_t(k)];
    const int me = rank();
    for (const auto& step : s)
      for (const model::message& m : step) {
        if (m.from == m.to) continue;
        if (m.from == me) count_sent(o, members_[std::size_t(m.to)], m.bytes, 1);
        if (m.to == me) count_received(o, members_[std::size_t(m.from)], m.bytes, 1);
      }
    return model::seconds(s, link_of());
  }

  /// Charges an operation of kind k: t modelled seconds to the clock (a group adds its longest operation) and, in
  /// enforce mode, `hold` seconds of the rank's network. Returns when it starts on the modelled network.
  std::chrono::steady_clock::time_point charge(op_kind k, double t, double hold) {
    detail::throttle_state& st = *state_;
    op_traffic& o = st.t.by_op[std::size_t(k)];
    ++o.calls;
    o.seconds += t;
    if (st.group_depth > 0) {
      st.group_longest = std::max(st.group_longest, t);
      st.group_hold = std::max(st.group_hold, hold);
      return st.group_start;
    }
    st.t.seconds += t;
    if (!enforcing()) return {};
    const auto start = std::max(std::chrono::steady_clock::now(), st.busy_until);
    st.busy_until = start + to_duration(hold);
    return start;
  }

  /// A collective holds the rank's network for its whole time t and completes after it.
  request finish(inner_request r, op_kind k, double t) {
    const auto start = charge(k, t, t);
    return request(std::move(r), enforcing() ? std::optional(start + to_duration(t)) : std::nullopt);
  }

  bool enforcing() const { return state_->net.mode == throttle_mode::enforce; }
  /// Whether every rank of the wrapped communicator lives in this process (arrival times go through the board).
  static constexpr bool in_process = requires { requires C::in_process; };

  C inner_;
  std::shared_ptr<detail::throttle_state> state_;
  std::vector<int> members_;  // group rank -> network rank
  std::uint64_t id_ = 0;      // the same on every member: 0 for the first wrapped, detail::split_id for splits
};

static_assert(Communicator<throttled<self>>);

}  // namespace subspace::comm
