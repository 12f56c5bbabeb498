#pragma once
// comm::self: the world of one rank, the communicator of the single-device trainers.
//
// Collectives over one rank are copies or no-ops; send and recv to rank 0 (itself) are matched in order through
// a FIFO, so code written for many ranks runs unchanged on one. An operation completes as soon as it is matched:
// a send completes when its recv is issued and vice versa (the data moves then, straight from the send buffer to
// the recv buffer). Waiting on a send or recv that nothing has matched yet throws instead of hanging.
//
// Host-space views work everywhere. Device-space views work in translation units compiled by nvcc: copies are
// then ordered on the stream given at construction (`comm::self world{stream};`, null: the legacy default
// stream), and "complete" means "ordered on that stream".
//
// A self is a cheap handle: copies share one queue of pending operations. It is not thread-safe.

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <typeinfo>
#include <utility>

#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "concepts.hpp"

namespace subspace::comm {

namespace detail {

/// Copies between two views of the same element type and the same element count. Host to host always; any
/// other pair of spaces only under nvcc, ordered on `stream` (a cudaStream_t).
template <class S, class T>
void self_copy(void*, view<S, host_space> src, view<T, host_space> dst) {
  if (src.shape() == dst.shape()) {
    copy(exec::host{}, src, dst);
  } else {
    copy(exec::host{}, src.flat(), dst.flat());
  }
}

#if defined(__CUDACC__)
template <class S, class T, class SpaceA, class SpaceB>
  requires(!(std::is_same_v<SpaceA, host_space> && std::is_same_v<SpaceB, host_space>))
void self_copy(void* stream, view<S, SpaceA> src, view<T, SpaceB> dst) {
  const exec::cuda ex{static_cast<cudaStream_t>(stream)};
  if (src.shape() == dst.shape()) {
    copy(ex, src, dst);
  } else {
    copy(ex, src.flat(), dst.flat());
  }
}
#else
template <class S, class T, class SpaceA, class SpaceB>
  requires(!(std::is_same_v<SpaceA, host_space> && std::is_same_v<SpaceB, host_space>))
void self_copy(void*, view<S, SpaceA>, view<T, SpaceB>) {
  static_assert(dependent_false<S, SpaceA, SpaceB>,
                "comm::self: device-space views need a translation unit compiled by nvcc (a .cu file)");
}
#endif

/// The completion flag shared by a request and the queue that will complete it.
struct self_op_state {
  bool done = false;
  const char* what = "";
};

/// A send or recv waiting for its partner: the buffer with its type erased, and how to find the type again.
struct self_pending {
  std::shared_ptr<self_op_state> state;
  const std::type_info* element = nullptr;  // the element type, without const
  bool device = false;                      // device_space (else host_space)
  void* data = nullptr;
  shape extents{};
  std::array<std::int64_t, max_rank> strides{};
};

template <class T, class Space>
self_pending make_pending(std::shared_ptr<self_op_state> st, view<T, Space> v) {
  return self_pending{std::move(st),
                      &typeid(std::remove_const_t<T>),
                      std::is_same_v<Space, device_space>,
                      const_cast<std::remove_const_t<T>*>(v.data()),
                      v.shape(),
                      v.strides()};
}

/// Calls f with the pending buffer as a view<U, its space>.
template <class U, class F>
void with_pending_view(const self_pending& p, F&& f) {
  if (!p.device) {
    f(view<U, host_space>(static_cast<U*>(p.data), p.extents, p.strides));
    return;
  }
#if defined(__CUDACC__)
  f(view<U, device_space>(static_cast<U*>(p.data), p.extents, p.strides));
#else
  throw error("comm::self: a device-space buffer reached a translation unit compiled without nvcc");
#endif
}

struct self_queues {
  std::deque<self_pending> sends, recvs;
  int group_depth = 0;
};

}  // namespace detail

/// The world of one rank. See the top of comm/self.hpp.
class self {
 public:
  /// Completion handle of one operation of a self communicator.
  class request {
   public:
    request() = default;  // a completed request
    explicit request(std::shared_ptr<detail::self_op_state> st) : state_(std::move(st)) {}

    /// Returns once the operation is complete; throws subspace::error when it never can be (an unmatched send
    /// or recv in a world of one rank).
    void wait() const {
      if (!test())
        throw error(std::string("comm::self: waiting on a ") + state_->what +
                    " that nothing has matched; in a world of one rank it would wait forever (issue the matching " +
                    (std::string(state_->what) == "send" ? "recv" : "send") + " first)");
    }
    bool test() const { return !state_ || state_->done; }

   private:
    std::shared_ptr<detail::self_op_state> state_;
  };

  self() = default;
  /// Device copies are ordered on `cuda_stream` (a cudaStream_t; null: the legacy default stream).
  explicit self(void* cuda_stream) : stream_(cuda_stream) {}

  int rank() const { return 0; }
  int size() const { return 1; }
  /// The cudaStream_t device copies are ordered on.
  void* stream() const { return stream_; }

  /// Sends buf to `peer` (which must be 0). Completes when the matching recv is issued.
  template <class T, class S>
  request send(view<const T, S> buf, int peer) {
    check_peer(peer, "send");
    auto st = std::make_shared<detail::self_op_state>(detail::self_op_state{false, "send"});
    if (queues_->recvs.empty()) {
      queues_->sends.push_back(detail::make_pending(st, buf));
      return request(std::move(st));
    }
    detail::self_pending r = std::move(queues_->recvs.front());
    queues_->recvs.pop_front();
    check_match(r, typeid(T), buf.numel());
    detail::with_pending_view<T>(r, [&](auto dst) { detail::self_copy(stream_, buf, dst); });
    r.state->done = true;
    st->done = true;
    return request(std::move(st));
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request send(view<T, S> buf, int peer) {
    return send(view<const T, S>(buf), peer);
  }

  /// Receives into buf from `peer` (which must be 0). Completes when the matching send is issued.
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request recv(view<T, S> buf, int peer) {
    check_peer(peer, "recv");
    auto st = std::make_shared<detail::self_op_state>(detail::self_op_state{false, "recv"});
    if (queues_->sends.empty()) {
      queues_->recvs.push_back(detail::make_pending(st, buf));
      return request(std::move(st));
    }
    detail::self_pending s = std::move(queues_->sends.front());
    queues_->sends.pop_front();
    check_match(s, typeid(T), buf.numel());
    detail::with_pending_view<const T>(s, [&](auto src) { detail::self_copy(stream_, src, buf); });
    s.state->done = true;
    st->done = true;
    return request(std::move(st));
  }

  /// Over one rank every reduction leaves buf as it is.
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_reduce(view<T, S>, reduce_op) {
    return {};
  }

  /// out (contiguous, as many elements as in) receives a copy of in.
  template <class T, class S>
  request all_gather(view<const T, S> in, view<std::remove_const_t<T>, S> out) {
    require(out.numel() == in.numel(), [&] {
      return "comm::self::all_gather: out needs size() * in.numel() = " + std::to_string(in.numel()) +
             " elements, got shape " + to_string(out.shape());
    });
    detail::self_copy(stream_, in, out);
    return {};
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_gather(view<T, S> in, view<T, S> out) {
    return all_gather(view<const T, S>(in), out);
  }

  /// out (as many elements as in) receives a copy of in.
  template <class T, class S>
  request reduce_scatter(view<const T, S> in, view<std::remove_const_t<T>, S> out, reduce_op) {
    require(in.numel() == out.numel(), [&] {
      return "comm::self::reduce_scatter: in needs size() * out.numel() = " + std::to_string(out.numel()) +
             " elements, got shape " + to_string(in.shape());
    });
    detail::self_copy(stream_, in, out);
    return {};
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request reduce_scatter(view<T, S> in, view<T, S> out, reduce_op op) {
    return reduce_scatter(view<const T, S>(in), out, op);
  }

  /// root must be 0; buf already holds root's data.
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request broadcast(view<T, S>, int root) {
    require(root == 0,
            [&] { return "comm::self::broadcast: root " + std::to_string(root) + " outside a world of 1 rank"; });
    return {};
  }

  request barrier() { return {}; }

  /// Operations match as they are issued, so a group needs no deferral; nesting is allowed.
  void group_start() { ++queues_->group_depth; }
  void group_end() {
    require(queues_->group_depth > 0, "comm::self::group_end: no group_start to close");
    --queues_->group_depth;
  }

  /// A new world of one rank (with its own queue) for any color >= 0.
  self split(int color, int /*key*/) const {
    require(color >= 0, [&] { return "comm::self::split: color must be >= 0, got " + std::to_string(color); });
    return self(stream_);
  }

  /// Sends and recvs issued but not yet matched.
  std::size_t pending() const { return queues_->sends.size() + queues_->recvs.size(); }

 private:
  static void check_peer(int peer, const char* op) {
    require(peer == 0, [&] {
      return std::string("comm::self::") + op + ": peer " + std::to_string(peer) + " outside a world of 1 rank";
    });
  }
  static void check_match(const detail::self_pending& p, const std::type_info& element, std::int64_t numel) {
    require(*p.element == element, "comm::self: a send and its matching recv have different element types");
    require(p.extents.numel() == numel, [&] {
      return "comm::self: a send and its matching recv have different element counts (" +
             std::to_string(p.extents.numel()) + " vs " + std::to_string(numel) + ")";
    });
  }

  std::shared_ptr<detail::self_queues> queues_ = std::make_shared<detail::self_queues>();
  void* stream_ = nullptr;
};

static_assert(Request<self::request>);
static_assert(Communicator<self>);

}  // namespace subspace::comm
