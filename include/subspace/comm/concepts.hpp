#pragma once
// The Communicator policy: who talks to whom, and how bytes move between ranks.
//
// A communicator is one rank's handle on a group of `size()` ranks. Every operation is asynchronous and returns
// a request (a completion handle) so that compute can overlap communication: issue the operation, do other work,
// then wait() on the request before touching the buffers again.
//
// Requirements (checked on host-space float views; device views are each implementation's business):
//
//   c.rank() -> int, c.size() -> int                       0 <= rank < size
//   c.send(view<const T, S> buf, int peer) -> Request       point to point; matched by (peer, order):
//   c.recv(view<T, S> buf, int peer) -> Request               the k-th send from a to b meets the k-th recv
//                                                             at b from a; the element counts must agree
//   c.all_reduce(view<T, S> buf, reduce_op op) -> Request   in place: every rank ends with op over all ranks
//   c.all_gather(view<const T, S> in, view<T, S> out)       out contiguous with size()·in.numel() elements;
//       -> Request                                            block r (elements [r·n, (r+1)·n), n = in.numel();
//                                                             row r when out is [size, ...]) holds rank r's in
//   c.reduce_scatter(view<const T, S> in, view<T, S> out,   in contiguous with size()·out.numel() elements;
//       reduce_op op) -> Request                              rank r's out = op over the ranks of their block r
//   c.broadcast(view<T, S> buf, int root) -> Request        every rank ends with root's buf
//   c.barrier() -> Request                                   completes once every rank has entered it
//   c.group_start(), c.group_end()                           point-to-point operations issued between them
//                                                             are submitted together (a ring exchange of
//                                                             sends and recvs cannot then deadlock); wait on
//                                                             their requests only after group_end()
//   c.split(int color, int key) -> same communicator type   collective: ranks passing the same color >= 0
//                                                             form a new group, ranked by (key, old rank)
//
// A Request r has r.wait() (blocks until complete; calling it again returns at once) and r.test() -> bool
// (true once complete; never blocks). Buffers passed to an operation must stay alive and, for inputs,
// unmodified until its request completes. For device-space buffers "complete" means "ordered on the
// communicator's stream", as with NCCL: later work on that stream sees the result.
//
// Collectives are called by every rank of the group in the same order. Arguments a rank can check alone
// (peer or root out of range, inconsistent element counts) raise subspace::invalid_argument. Failures that
// involve peers surface from wait() (and test()) as the errors of comm/error.hpp: comm::mismatch_error (matched
// operations disagree), comm::timeout_error (a partner never came), comm::aborted_error (the communicator or the
// partner gave up), each naming the ranks and the operation.

#include <concepts>
#include <string_view>
#include <type_traits>

#include "../core/tensor.hpp"

namespace subspace {
namespace comm {

/// How all_reduce and reduce_scatter combine the ranks' values. `avg` is the sum divided by size().
enum class reduce_op { sum, avg, max };

inline constexpr std::string_view to_string(reduce_op op) {
  switch (op) {
    case reduce_op::sum: return "sum";
    case reduce_op::avg: return "avg";
    case reduce_op::max: return "max";
  }
  return "?";
}

}  // namespace comm

/// A completion handle: wait() blocks until the operation is complete, test() polls without blocking.
template <class R>
concept Request = std::movable<R> && requires(R r) {
  r.wait();
  { r.test() } -> std::convertible_to<bool>;
};

namespace comm::requirement {
// The requirements one at a time, so that diagnostics (check_communicator below, subspace::check_stack) can
// name the one that failed.
using in_t = view<const float, host_space>;
using out_t = view<float, host_space>;

template <class C>
concept ranks = requires(const C& c) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
};
template <class C>
concept point_to_point = requires(C& c, in_t in, out_t out, int peer) {
  { c.send(in, peer) } -> Request;
  { c.recv(out, peer) } -> Request;
};
template <class C>
concept all_reduce = requires(C& c, out_t buf, reduce_op op) {
  { c.all_reduce(buf, op) } -> Request;
};
template <class C>
concept all_gather = requires(C& c, in_t in, out_t out) {
  { c.all_gather(in, out) } -> Request;
};
template <class C>
concept reduce_scatter = requires(C& c, in_t in, out_t out, reduce_op op) {
  { c.reduce_scatter(in, out, op) } -> Request;
};
template <class C>
concept broadcast = requires(C& c, out_t buf, int root) {
  { c.broadcast(buf, root) } -> Request;
};
template <class C>
concept barrier = requires(C& c) {
  { c.barrier() } -> Request;
};
template <class C>
concept groups = requires(C& c) {
  c.group_start();
  c.group_end();
};
template <class C>
concept split = requires(C& c, int color, int key) {
  { c.split(color, key) } -> std::same_as<C>;
};
}  // namespace comm::requirement

/// One rank's handle on a group of ranks; see the requirements at the top of comm/concepts.hpp.
template <class C>
concept Communicator = std::movable<C> && comm::requirement::ranks<C> && comm::requirement::point_to_point<C> &&
                       comm::requirement::all_reduce<C> && comm::requirement::all_gather<C> &&
                       comm::requirement::reduce_scatter<C> && comm::requirement::broadcast<C> &&
                       comm::requirement::barrier<C> && comm::requirement::groups<C> && comm::requirement::split<C>;

/// static_assert(check_communicator<C>()) names the first requirement C misses, in one readable message
/// (the compiler's "in instantiation of ... [with C = ...]" line names the type).
template <class C>
consteval bool check_communicator() {
  namespace r = comm::requirement;
  if constexpr (!std::movable<C>) {
    static_assert(dependent_false<C>, "`communicator` does not satisfy subspace::Communicator: not movable");
    return false;
  } else if constexpr (!r::ranks<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `rank() const -> int` or "
                  "`size() const -> int`");
    return false;
  } else if constexpr (!r::point_to_point<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `send(view<const T, S>, int "
                  "peer) -> Request` or `recv(view<T, S>, int peer) -> Request`");
    return false;
  } else if constexpr (!r::all_reduce<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `all_reduce(view<T, S>, "
                  "comm::reduce_op) -> Request`");
    return false;
  } else if constexpr (!r::all_gather<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `all_gather(view<const T, S> "
                  "in, view<T, S> out) -> Request`");
    return false;
  } else if constexpr (!r::reduce_scatter<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `reduce_scatter(view<const T, "
                  "S> in, view<T, S> out, comm::reduce_op) -> Request`");
    return false;
  } else if constexpr (!r::broadcast<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `broadcast(view<T, S>, int "
                  "root) -> Request`");
    return false;
  } else if constexpr (!r::barrier<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `barrier() -> Request`");
    return false;
  } else if constexpr (!r::groups<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `group_start()` or "
                  "`group_end()`");
    return false;
  } else if constexpr (!r::split<C>) {
    static_assert(dependent_false<C>,
                  "`communicator` does not satisfy subspace::Communicator: missing `split(int color, int key)` "
                  "returning the same communicator type");
    return false;
  } else {
    return true;
  }
}

}  // namespace subspace
