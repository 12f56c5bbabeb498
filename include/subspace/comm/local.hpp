#pragma once
// comm::local: N ranks as threads of one process, sharing one world. The communicator of the CPU tests and of
// multi-rank runs on a single GPU.
//
//   comm::local::run_ranks(4, [&](comm::local& c) {     // a world of four ranks, each on its own thread
//     c.all_reduce(grads[c.rank()].v(), comm::reduce_op::avg).wait();
//   });
//
// or, with the handles in hand (to wrap them, e.g. in comm::throttled): auto ranks = comm::local::world(4), then
// comm::local::run_ranks(ranks, body).
//
// Matching. Sends and recvs match per ordered pair of ranks, in order (the k-th send from a to b meets the
// k-th recv at b from a); collectives match by their position in each rank's sequence of collective calls.
// Posting never blocks, so every pattern that matches (a ring of sends and recvs, issued in any order) completes.
// A pattern that does not match fails on every rank involved instead of hanging:
//   * element counts, element types or memory spaces that differ between a send and its recv, or between the
//     ranks of a collective (also the kind of collective, the reduction and the root) raise comm::mismatch_error
//     from wait() on each of those ranks, naming them and the operations;
//   * an operation whose partners never come (a recv with no send, a rank that skips a collective) raises
//     comm::timeout_error from wait() after the world's timeout (local_options::timeout), naming what each
//     peer has issued so far. The operation is then abandoned: a partner that arrives later fails with
//     comm::aborted_error instead of writing into a buffer nobody waits for.
//
// Giving up. abort(why) on any rank's handle fails every pending and later operation of its world, and of every
// world split from it, on every rank, with comm::aborted_error naming `why`. run_ranks does this for a rank that
// throws, so its peers stop at once (rather than after the timeout) and the rank's own exception reaches the caller.
//
// Asynchrony. Every operation returns a request at once. The data moves when the last participant posts:
// host memory on that participant's thread (so a rank that posted early computes while its peers catch up, and
// finds its request complete), device memory on the world's streams. Reductions accumulate in float (double
// for double, 64-bit integers for integers) in rank order, the same on host and device.
//
// Device memory (translation units compiled by nvcc): all ranks share the current GPU. Rank r's operations
// are ordered on its stream (local_options::streams, or one the world creates; stream_of(c) names it). Posting an
// operation records an event on that stream; the copy or the collective kernel runs on a stream of the world
// after the events of every participant; wait() (or test() returning true) makes the rank's stream wait for it.
// So "complete" means "ordered on the rank's stream", as with NCCL, and the host never blocks on the GPU.
// Device buffers must be contiguous; collectives on device memory take at most 64 ranks.
//
// A handle is cheap to copy (copies share the world and the rank) and belongs to its rank's thread. The world
// lives as long as any handle or request of it.

#include <chrono>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/parallel.hpp"
#include "../core/tensor.hpp"
#include "concepts.hpp"
#include "detail/local_host.hpp"
#include "detail/local_world.hpp"
#include "error.hpp"

#if defined(__CUDACC__)
#include "detail/cuda/local.cuh"
#endif

namespace subspace::comm {

namespace detail {

struct local_access;

template <class T, class S>
std::shared_ptr<void> local_move(local_world& w, const local_p2p_entry& send, const local_p2p_entry& recv) {
  if constexpr (std::is_same_v<S, host_space>) {
    return host_move<T>(w, send, recv);
  } else {
#if defined(__CUDACC__)
    return cuda_local::move<T>(w, send, recv);
#else
    static_assert(dependent_false<T, S>,
                  "comm::local: device-space views need a translation unit compiled by nvcc (a .cu file)");
    return nullptr;
#endif
  }
}

template <class T, class S>
std::shared_ptr<void> local_run(local_world& w, const std::vector<local_coll_entry>& entries) {
  if constexpr (std::is_same_v<S, host_space>) {
    return host_collective<T>(w, entries);
  } else {
#if defined(__CUDACC__)
    return cuda_local::collective<T>(w, entries);
#else
    static_assert(dependent_false<T, S>,
                  "comm::local: device-space views need a translation unit compiled by nvcc (a .cu file)");
    return nullptr;
#endif
  }
}

}  // namespace detail

/// One rank's handle on a world of in-process ranks. See the top of comm/local.hpp.
class local {
 public:
  /// Every rank lives in this process (comm::throttled then times each message from when it was sent).
  static constexpr bool in_process = true;

  /// Completion handle of one operation.
  class request {
   public:
    request() = default;  // a completed request

    /// Returns once the operation is complete (for device memory: ordered on the rank's stream). Raises
    /// comm::mismatch_error, comm::timeout_error or comm::aborted_error as described at the top of the header,
    /// and invalid_argument when called inside the group_start()/group_end() that issued the operation.
    void wait() const {
      if (op_) detail::wait_op(*world_, *op_);
    }
    /// True once the operation is complete; raises its failure like wait(). Never waits for peers.
    bool test() const { return !op_ || detail::test_op(*world_, *op_); }

   private:
    friend class local;
    request(std::shared_ptr<detail::local_world> w, std::shared_ptr<detail::local_op> op)
        : world_(std::move(w)), op_(std::move(op)) {}
    std::shared_ptr<detail::local_world> world_;
    std::shared_ptr<detail::local_op> op_;
  };

  /// The n ranks of a new world: element r is rank r's handle.
  static std::vector<local> world(int n, local_options options = {}) {
    require(n >= 1, [&] { return "comm::local::world: at least one rank, got " + std::to_string(n); });
    require(options.streams.empty() || options.streams.size() == std::size_t(n), [&] {
      return "comm::local::world: " + std::to_string(options.streams.size()) + " streams given for " +
             std::to_string(n) + " ranks (give one per rank, or none)";
    });
    require(options.timeout.count() > 0, "comm::local::world: the timeout must be positive");
    auto w = std::make_shared<detail::local_world>(n, "world", std::move(options));
    std::vector<local> ranks;
    ranks.reserve(std::size_t(n));
    for (int r = 0; r < n; ++r) ranks.push_back(local(w, r));
    return ranks;
  }

  /// Runs body(c) with the handle c of every rank of a new world of n ranks, each rank on its own thread (rank 0 on
  /// the calling thread, core/parallel.hpp's run_concurrently). A rank that throws aborts the world (abort(), so the
  /// other ranks' pending operations fail at once). Returns when every rank has returned or thrown; then rethrows
  /// the first exception a rank threw (the cause, not the aborted_error it set off in its peers).
  template <class Body>
  static void run_ranks(int n, Body&& body, local_options options = {}) {
    std::vector<local> ranks = world(n, std::move(options));
    run_ranks(ranks, body);
  }
  /// The same on handles made beforehand (a world's ranks, or communicators built on them, such as
  /// comm::throttled): body(ranks[r]) on a thread per element; a rank that throws aborts its handle's world when
  /// the handle has abort(why).
  template <class Comm, class Body>
  static void run_ranks(std::vector<Comm>& ranks, Body&& body) {
    std::exception_ptr first;
    std::mutex first_mutex;
    run_concurrently(int(ranks.size()), [&](int r) {
      try {
        body(ranks[std::size_t(r)]);
      } catch (...) {
        {
          const std::lock_guard lock(first_mutex);  // recorded before the abort that wakes the peers
          if (!first) first = std::current_exception();
        }
        if constexpr (requires(Comm& c) { c.abort(std::string()); })
          ranks[std::size_t(r)].abort("it threw \"" + detail::what_of(std::current_exception()) + "\"");
      }
    });
    if (first) std::rethrow_exception(first);
  }

  /// A handle on no world: what split() returns to a rank that passed a negative color. size() == 0.
  local() = default;

  int rank() const { return rank_; }
  int size() const { return world_ ? world_->n : 0; }
  /// False for the handle of a rank that split() left out (negative color).
  bool member() const { return world_ != nullptr; }
  /// "world", "world/split(color 1)", ...: how messages name this world.
  std::string name() const { return world_ ? world_->name : std::string("(no world)"); }
  std::chrono::milliseconds timeout() const { return world_ ? world_->options.timeout : std::chrono::milliseconds(0); }
  /// The cudaStream_t this rank's device operations are ordered on (null until the world creates it on its
  /// first device operation, when local_options::streams was empty).
  void* stream() const {
    if (!world_) return nullptr;
    std::lock_guard lock(world_->mutex);
    return world_->streams[std::size_t(rank_)];
  }

  /// Sends buf to `peer`. Matched in order with peer's recvs from this rank.
  template <class T, class S>
  request send(view<const T, S> buf, int peer) {
    check_member("send");
    check_rank(peer, "send", "peer");
    check_space(buf, "send");
    auto op = new_op(detail::local_kind::send, peer, buf.numel(), detail::element_name<T>());
    detail::local_p2p_entry e{op, detail::make_buffer(buf), nullptr, &detail::local_move<T, S>};
    prepare<S>(*op, e.ready);
    detail::post_p2p(*world_, std::move(e));
    return request(world_, std::move(op));
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request send(view<T, S> buf, int peer) {
    return send(view<const T, S>(buf), peer);
  }

  /// Receives into buf from `peer`; the matching send must carry as many elements of the same type.
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request recv(view<T, S> buf, int peer) {
    check_member("recv");
    check_rank(peer, "recv", "peer");
    check_space(buf, "recv");
    auto op = new_op(detail::local_kind::recv, peer, buf.numel(), detail::element_name<T>());
    detail::local_p2p_entry e{op, detail::make_buffer(buf), nullptr, &detail::local_move<T, S>};
    prepare<S>(*op, e.ready);
    detail::post_p2p(*world_, std::move(e));
    return request(world_, std::move(op));
  }

  /// In place: every rank ends with op over every rank's buf.
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_reduce(view<T, S> buf, reduce_op op) {
    static_assert(detail::local_reducible_v<T>, "comm::local::all_reduce: the element type cannot be reduced");
    check_member("all_reduce");
    check_space(buf, "all_reduce", true);
    auto o = new_op(detail::local_kind::all_reduce, -1, buf.numel(), detail::element_name<T>());
    o->rop = op;
    detail::local_coll_entry e;
    e.out = detail::make_buffer(buf);
    return post<T, S>(std::move(o), std::move(e));
  }

  /// out (size() * in.numel() elements) receives every rank's in, rank r's in block r.
  template <class T, class S>
  request all_gather(view<const T, S> in, view<std::remove_const_t<T>, S> out) {
    check_member("all_gather");
    require(out.numel() == std::int64_t(size()) * in.numel(), [&] {
      return "comm::local::all_gather: out needs size() * in.numel() = " + std::to_string(size()) + " * " +
             std::to_string(in.numel()) + " elements, got shape " + to_string(out.shape());
    });
    check_space(in, "all_gather", true);
    check_space(out, "all_gather", true);
    auto o = new_op(detail::local_kind::all_gather, -1, in.numel(), detail::element_name<T>());
    detail::local_coll_entry e;
    e.in = detail::make_buffer(in);
    e.out = detail::make_buffer(out);
    return post<std::remove_const_t<T>, S>(std::move(o), std::move(e));
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_gather(view<T, S> in, view<T, S> out) {
    return all_gather(view<const T, S>(in), out);
  }

  /// in holds size() blocks of out.numel() elements; rank r's out = op over the ranks' block r.
  template <class T, class S>
  request reduce_scatter(view<const T, S> in, view<std::remove_const_t<T>, S> out, reduce_op op) {
    static_assert(detail::local_reducible_v<std::remove_const_t<T>>,
                  "comm::local::reduce_scatter: the element type cannot be reduced");
    check_member("reduce_scatter");
    require(in.numel() == std::int64_t(size()) * out.numel(), [&] {
      return "comm::local::reduce_scatter: in needs size() * out.numel() = " + std::to_string(size()) + " * " +
             std::to_string(out.numel()) + " elements, got shape " + to_string(in.shape());
    });
    check_space(in, "reduce_scatter", true);
    check_space(out, "reduce_scatter", true);
    auto o = new_op(detail::local_kind::reduce_scatter, -1, out.numel(), detail::element_name<T>());
    o->rop = op;
    detail::local_coll_entry e;
    e.in = detail::make_buffer(in);
    e.out = detail::make_buffer(out);
    return post<std::remove_const_t<T>, S>(std::move(o), std::move(e));
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request reduce_scatter(view<T, S> in, view<T, S> out, reduce_op op) {
    return reduce_scatter(view<const T, S>(in), out, op);
  }

  /// Every rank ends with root's buf.
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request broadcast(view<T, S> buf, int root) {
    check_member("broadcast");
    check_rank(root, "broadcast", "root");
    check_space(buf, "broadcast", true);
    auto o = new_op(detail::local_kind::broadcast, root, buf.numel(), detail::element_name<T>());
    detail::local_coll_entry e;
    e.out = detail::make_buffer(buf);
    return post<T, S>(std::move(o), std::move(e));
  }

  /// Completes once every rank has called it (on the host: it orders no device stream).
  request barrier() {
    check_member("barrier");
    auto o = new_op(detail::local_kind::barrier, -1, 0, "");
    detail::local_coll_entry e;
    e.op = o;
    detail::post_collective(world_, std::move(e));
    return request(world_, std::move(o));
  }

  /// Operations match as they are posted, so a group needs no deferral; it only marks its operations, whose
  /// wait() inside the group raises invalid_argument (NCCL would never complete them). Groups nest.
  void group_start() {
    check_member("group_start");
    auto& rs = world_->ranks[std::size_t(rank_)];
    if (rs.group_depth.fetch_add(1) == 0) rs.group_seq.fetch_add(1);
  }
  void group_end() {
    check_member("group_end");
    auto& rs = world_->ranks[std::size_t(rank_)];
    require(rs.group_depth.load() > 0,
            [&] { return "comm::local::group_end: no group_start to close on rank " + std::to_string(rank_); });
    rs.group_depth.fetch_sub(1);
  }

  /// Aborts this handle's world and every world split from it, for every rank: each pending operation (and each one
  /// issued later) fails with comm::aborted_error naming this rank and `why`. Operations whose data is already
  /// moving finish. Aborting an aborted world keeps the first reason.
  void abort(const std::string& why = "abort() called") {
    check_member("abort");
    detail::abort_world(*world_,
                        "rank " + std::to_string(rank_) + " of " + detail::world_text(*world_) + " aborted it: " + why);
  }

  /// Collective (blocks until every rank has called it, or the timeout): ranks passing the same color >= 0 form
  /// a new world, ranked by (key, rank); a rank passing a negative color gets a handle on no world.
  local split(int color, int key) {
    check_member("split");
    auto o = new_op(detail::local_kind::split, -1, 0, "");
    detail::local_coll_entry e;
    e.op = o;
    e.color = color;
    e.key = key;
    detail::post_collective(world_, std::move(e));
    detail::wait_op(*world_, *o);
    if (!o->split_world) return local{};
    return local(o->split_world, o->split_rank);
  }

 private:
  local(std::shared_ptr<detail::local_world> w, int r) : world_(std::move(w)), rank_(r) {}

  void check_member(const char* what) const {
    require(world_ != nullptr, [&] {
      return std::string("comm::local::") + what + ": this handle belongs to no world (split() with a negative color)";
    });
  }
  void check_rank(int r, const char* what, const char* role) const {
    require(0 <= r && r < world_->n, [&] {
      return std::string("comm::local::") + what + ": " + role + " " + std::to_string(r) + " outside [0, " +
             std::to_string(world_->n) + ") on rank " + std::to_string(rank_);
    });
  }
  template <class T, class S>
  void check_space(view<T, S> v, const char* what, bool collective = false) const {
    if constexpr (std::is_same_v<S, device_space>) {
      require(v.is_contiguous(), [&] {
        return std::string("comm::local::") + what + ": device-space views must be contiguous, got shape " +
               to_string(v.shape());
      });
      require(!collective || world_->n <= 64, [&] {
        return std::string("comm::local::") + what + ": collectives on device memory take at most 64 ranks";
      });
    }
  }

  std::shared_ptr<detail::local_op> new_op(detail::local_kind kind, int peer, std::int64_t numel,
                                           const char* element) const {
    auto op = std::make_shared<detail::local_op>();
    op->kind = kind;
    op->rank = rank_;
    op->peer = peer;
    op->numel = numel;
    op->element = element;
    const auto& rs = world_->ranks[std::size_t(rank_)];
    op->group = rs.group_depth.load() > 0 ? rs.group_seq.load() : 0;
    return op;
  }

  template <class S>
  void prepare([[maybe_unused]] detail::local_op& op, [[maybe_unused]] std::shared_ptr<void>& ready) {
    if constexpr (std::is_same_v<S, device_space>) {
#if defined(__CUDACC__)
      detail::cuda_local::prepare(*world_, rank_, op, ready);
#endif
    }
  }

  template <class T, class S>
  request post(std::shared_ptr<detail::local_op> op, detail::local_coll_entry e) {
    e.op = op;
    e.run = &detail::local_run<T, S>;
    prepare<S>(*op, e.ready);
    detail::post_collective(world_, std::move(e));
    return request(world_, std::move(op));
  }

  friend struct detail::local_access;
  std::shared_ptr<detail::local_world> world_;
  int rank_ = -1;
};

static_assert(Request<local::request>);
static_assert(Communicator<local>);

namespace detail {
/// What the CUDA helpers below need of a handle.
struct local_access {
  static local_world* world(const local& c) { return c.world_.get(); }
};
}  // namespace detail

#if defined(__CUDACC__)
/// nvcc only: the stream rank c's device operations are ordered on, created now when the world creates its own
/// (local::stream() stays null until then).
inline cudaStream_t stream_of(const local& c) {
  require(c.member(), "comm::stream_of: this handle belongs to no world");
  return detail::cuda_local::rank_stream(*detail::local_access::world(c), c.rank());
}
#endif

}  // namespace subspace::comm
