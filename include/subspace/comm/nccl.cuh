#pragma once
// comm::nccl: one process per GPU, over NCCL. nvcc translation units only (like exec::cuda): the host build
// never sees NCCL.
//
//   auto world = comm::nccl::from_env();          // torchrun-style or mpirun environment, see comm/bootstrap.hpp
//   world.all_reduce(grad.v(), comm::reduce_op::avg).wait();
//   auto tp = world.split(world.rank() / 4, world.rank());
//
// Bootstrap. Rank 0 draws NCCL's unique id and hands it to every rank through the TCP rendezvous of
// comm/detail/rendezvous.hpp at MASTER_ADDR:MASTER_PORT (a world of one needs none); then every rank joins the
// communicator on its GPU (by default LOCAL_RANK modulo the visible devices). The communicator is non-blocking
// (ncclConfig_t::blocking = 0), so initialisation, split and every wait() can give up: after
// nccl_options::timeout, or on an asynchronous NCCL error (ncclCommGetAsyncError), the communicator is aborted
// (ncclCommAbort) and comm::timeout_error or comm::aborted_error says which rank, which operation, and why,
// instead of a hang. Later operations on an aborted communicator raise comm::aborted_error.
//
// Settings. NCCL's own environment variables apply as usual. NVLink multicast (NVLS) stays off: when
// NCCL_NVLS_ENABLE is unset, the first communicator sets it to 0 for this process; an explicit setting is left
// as it is. Nothing here calls cuMulticastCreate.
//
// Operations are ordered on the communicator's stream (nccl_options::stream, or one it creates). wait() blocks
// the host until the operation has finished on the GPU (polling for errors and the timeout); work enqueued on
// stream() after an operation sees its result without any wait. Buffers must be contiguous. Host-space views are
// accepted for small metadata: they are staged through device memory, and the request copies the result back in
// wait()/test(). Operations issued between group_start() and group_end() go to NCCL as one group (grouped
// point-to-point: a ring exchange cannot deadlock); their requests can be waited on after group_end(). A send
// to this very rank must be in the same group as its recv.
//
// A handle is cheap to copy; copies share the communicator, which is destroyed with the last handle or request.

#if !defined(__CUDACC__)
#error "subspace/comm/nccl.cuh needs nvcc: include it from a .cu file (host-only builds have no NCCL)"
#endif

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <source_location>
#include <sstream>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/cuda/error.cuh"
#include "../core/cuda/executor.cuh"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "bootstrap.hpp"
#include "concepts.hpp"
#include "detail/local_world.hpp"
#include "detail/rendezvous.hpp"
#include "error.hpp"

namespace subspace::comm {

/// Options of comm::nccl.
struct nccl_options {
  /// How long the rendezvous, initialisation, split and each wait() may take before the communicator is aborted.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  /// The CUDA device; -1: launch_info::local_rank modulo the number of visible devices.
  int device = -1;
  /// The stream operations are ordered on; null: a new non-blocking stream owned by the communicator.
  cudaStream_t stream = nullptr;
};

namespace detail {

template <class T>
constexpr ncclDataType_t nccl_type() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<U, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<U, bf16>) return ncclBfloat16;
  else if constexpr (std::is_same_v<U, fp16>) return ncclFloat16;
  else if constexpr (std::is_same_v<U, std::int8_t> || std::is_same_v<U, char>) return ncclInt8;
  else if constexpr (std::is_same_v<U, std::uint8_t> || std::is_same_v<U, std::byte>) return ncclUint8;
  else if constexpr (std::is_same_v<U, std::int32_t>) return ncclInt32;
  else if constexpr (std::is_same_v<U, std::uint32_t>) return ncclUint32;
  else if constexpr (std::is_same_v<U, std::int64_t>) return ncclInt64;
  else if constexpr (std::is_same_v<U, std::uint64_t>) return ncclUint64;
  else static_assert(dependent_false<T>, "comm::nccl: NCCL has no type for this element type");
}

inline ncclRedOp_t nccl_op(reduce_op op) {
  switch (op) {
    case reduce_op::sum: return ncclSum;
    case reduce_op::avg: return ncclAvg;
    case reduce_op::max: return ncclMax;
  }
  return ncclSum;
}

/// Raises cuda_error naming the call site, the NCCL call and NCCL's messages unless `status` is success or
/// in progress.
inline void nccl_check(ncclResult_t status, const char* call, ncclComm_t comm = nullptr,
                       const std::source_location& loc = std::source_location::current()) {
  if (status == ncclSuccess || status == ncclInProgress) return;
  std::string m = subspace::detail::where(loc) + ": NCCL error in " + call + ": " + ncclGetErrorString(status);
  if (comm != nullptr)
    if (const char* last = ncclGetLastError(comm); last != nullptr && *last != '\0')
      m += std::string(" (") + last + ")";
  throw cuda_error(m);
}

/// NVLink multicast stays off unless the environment says otherwise (see the top of comm/nccl.cuh).
inline void default_nvls_off() { ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); }

inline std::string nccl_seconds(std::chrono::milliseconds t) { return seconds_text(t); }

/// What the handles and requests of one communicator share.
struct nccl_state {
  ncclComm_t comm = nullptr;
  int rank = -1, size = 0, device = 0;
  std::chrono::milliseconds timeout{};
  std::string name;
  std::shared_ptr<void> stream_owner;  // keeps a created stream alive for every communicator split from it
  cudaStream_t stream = nullptr;
  cudaStream_t staging = nullptr;  // host-view copies back to the host
  float* barrier_value = nullptr;
  bool aborted = false;
  std::string abort_reason;
  // Where ncclCommSplit's non-blocking job stores the new communicator (NCCL_COMM_NULL for a negative color). The
  // job writes it from NCCL's thread when it finishes, possibly after split() has returned (a negative color
  // waits for nothing): so the slot lives on the heap, owned by the parent, never on split()'s stack.
  std::vector<std::unique_ptr<ncclComm_t>> split_slots;

  nccl_state() = default;
  nccl_state(const nccl_state&) = delete;
  nccl_state& operator=(const nccl_state&) = delete;
  ~nccl_state() {
    int current = 0;
    cudaGetDevice(&current);
    cudaSetDevice(device);
    if (comm != nullptr && !aborted) {
      // Finish what was issued, then tear down; give up (abort) rather than hang.
      ncclResult_t r = ncclCommFinalize(comm);
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      while (r == ncclInProgress && std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
        ncclCommGetAsyncError(comm, &r);
      }
      if (r == ncclSuccess) ncclCommDestroy(comm);
      else ncclCommAbort(comm);
    }
    if (barrier_value != nullptr) cudaFree(barrier_value);
    if (staging != nullptr) cudaStreamDestroy(staging);
    cudaSetDevice(current);
  }

  /// Aborts the communicator once; later operations raise aborted_error with `reason`.
  void abort(const std::string& reason) {
    if (aborted) return;
    aborted = true;
    abort_reason = reason;
    if (comm != nullptr) ncclCommAbort(comm);
  }

  std::string who() const {
    return "rank " + std::to_string(rank) + " of " + name + " (" + std::to_string(size) +
           (size == 1 ? " rank)" : " ranks)");
  }

  /// Polls a non-blocking call's communicator until it leaves ncclInProgress; aborts after the timeout. The
  /// communicator's state is polled even when the call itself returned ncclSuccess: NCCL may still have marked
  /// it in progress (a split's job, a group), and the next call on it would fail with ncclInvalidArgument.
  void settle(ncclComm_t c, ncclResult_t r, const std::string& what) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    if (r == ncclSuccess && c != nullptr) ncclCommGetAsyncError(c, &r);
    while (r == ncclInProgress) {
      if (std::chrono::steady_clock::now() > deadline) {
        const std::string m = "comm::nccl: " + who() + ": " + what + " did not finish within " + nccl_seconds(timeout) +
                              "; the communicator was aborted (is every rank calling it?)";
        abort(m);
        throw timeout_error(m);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
      ncclCommGetAsyncError(c, &r);
    }
    if (r != ncclSuccess) {
      const std::string m =
          "comm::nccl: " + who() + ": " + what + " failed: " + ncclGetErrorString(r) + " (" + ncclGetLastError(c) + ")";
      abort(m);
      throw aborted_error(m);
    }
  }

  void check_usable(const char* what) const {
    require(comm != nullptr, [&] {
      return std::string("comm::nccl::") + what +
             ": this handle belongs to no communicator (split() with a negative color)";
    });
    if (aborted)
      throw aborted_error(std::string("comm::nccl::") + what + " on " + who() +
                          ": the communicator was aborted earlier: " + abort_reason);
  }
};

/// One issued operation.
struct nccl_pending {
  std::string what;  // "all_reduce(sum) of 37 fp32 elements"
  cudaEvent_t event = nullptr;
  bool recorded = false, finished = false;
  std::vector<std::shared_ptr<void>> keep;  // staging buffers, freed in stream order
  std::function<void()> finish;             // host views: copy the result back
  nccl_pending() = default;
  nccl_pending(const nccl_pending&) = delete;
  nccl_pending& operator=(const nccl_pending&) = delete;
  ~nccl_pending() {
    if (event != nullptr) cudaEventDestroy(event);
  }
};

/// NCCL groups belong to the calling thread, whatever communicators their operations use: so do ours. The
/// operations issued inside get their completion events at the outermost group_end().
struct nccl_group_state {
  int depth = 0;
  std::vector<std::pair<std::shared_ptr<nccl_state>, std::shared_ptr<nccl_pending>>> ops;
};
inline nccl_group_state& nccl_group() {
  static thread_local nccl_group_state g;
  return g;
}

}  // namespace detail

/// One process's handle on an NCCL communicator. See the top of comm/nccl.cuh.
class nccl {
 public:
  /// Completion handle of one operation.
  class request {
   public:
    request() = default;

    /// Blocks until the operation has finished on the GPU. Raises timeout_error after the communicator's timeout
    /// and aborted_error on an asynchronous NCCL error (the communicator is then aborted), invalid_argument
    /// inside the group that issued it.
    void wait() {
      if (!op_ || op_->finished) return;
      detail::nccl_state& st = *state_;
      if (st.aborted)
        throw aborted_error("comm::nccl: " + op_->what + " on " + st.who() +
                            " cannot complete: the communicator was aborted: " + st.abort_reason);
      if (!op_->recorded)
        throw invalid_argument("comm::nccl: " + op_->what + " on " + st.who() +
                               " is waited on inside the group_start()/group_end() that issued it; wait after "
                               "group_end()");
      const auto t0 = std::chrono::steady_clock::now();
      const auto deadline = t0 + st.timeout;
      for (int spins = 0;; ++spins) {
        if (st.aborted)
          throw aborted_error("comm::nccl: " + op_->what + " on " + st.who() +
                              " cannot complete: the communicator was aborted: " + st.abort_reason);
        const cudaError_t q = cudaEventQuery(op_->event);
        if (q == cudaSuccess) break;
        if (q != cudaErrorNotReady) cuda_check(q);
        poll_async_error();
        if (std::chrono::steady_clock::now() > deadline) {
          const std::string m = "comm::nccl: " + op_->what + " on " + st.who() + " did not complete within " +
                                detail::nccl_seconds(st.timeout) +
                                "; the communicator was aborted (a peer may have died, be stuck, or have called a "
                                "different operation)";
          st.abort(m);
          throw timeout_error(m);
        }
        if (spins < 2000) std::this_thread::yield();
        else std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      complete();
    }

    /// True once the operation has finished on the GPU; raises an asynchronous NCCL error. Never blocks.
    bool test() {
      if (!op_ || op_->finished) return true;
      if (state_->aborted)
        throw aborted_error("comm::nccl: " + op_->what + " on " + state_->who() +
                            " cannot complete: the communicator was aborted: " + state_->abort_reason);
      if (!op_->recorded) return false;
      const cudaError_t q = cudaEventQuery(op_->event);
      if (q == cudaErrorNotReady) {
        poll_async_error();
        return false;
      }
      cuda_check(q);
      complete();
      return true;
    }

   private:
    friend class nccl;
    request(std::shared_ptr<detail::nccl_state> st, std::shared_ptr<detail::nccl_pending> op)
        : state_(std::move(st)), op_(std::move(op)) {}

    void poll_async_error() {
      detail::nccl_state& st = *state_;
      ncclResult_t a = ncclSuccess;
      ncclCommGetAsyncError(st.comm, &a);
      if (a != ncclSuccess && a != ncclInProgress) {
        const std::string m = "comm::nccl: " + op_->what + " on " + st.who() +
                              " failed asynchronously: " + ncclGetErrorString(a) + " (" + ncclGetLastError(st.comm) +
                              "); the communicator was aborted";
        st.abort(m);
        throw aborted_error(m);
      }
    }
    void complete() {
      if (op_->finish) op_->finish();
      op_->finished = true;
    }

    std::shared_ptr<detail::nccl_state> state_;
    std::shared_ptr<detail::nccl_pending> op_;
  };

  /// A handle on no communicator (what split() returns for a negative color). size() == 0.
  nccl() = default;

  /// Joins the world described by the environment (comm::launch_from_env).
  static nccl from_env(const nccl_options& options = {}) { return connect(launch_from_env(), options); }

  /// Joins the world `li` describes: rendezvous at li.master_addr:li.rendezvous_port, then NCCL initialisation.
  static nccl connect(const launch_info& li, const nccl_options& options = {}) {
    detail::default_nvls_off();
    int devices = 0;
    cuda_check(cudaGetDeviceCount(&devices));
    require(devices > 0, "comm::nccl: no CUDA device");
    auto st = std::make_shared<detail::nccl_state>();
    st->rank = li.rank;
    st->size = li.world_size;
    st->timeout = options.timeout;
    st->name = "nccl world";
    st->device = options.device >= 0 ? options.device : li.local_rank % devices;
    require(st->device < devices, [&] {
      return "comm::nccl: device " + std::to_string(st->device) + " of " + std::to_string(devices) + " visible";
    });
    cuda_check(cudaSetDevice(st->device));

    ncclUniqueId id{};
    if (li.rank == 0) detail::nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    std::vector<std::byte> payload(sizeof id);
    std::memcpy(payload.data(), &id, sizeof id);
    const std::vector<std::byte> got = detail::rendezvous(li, payload, options.timeout);
    require(got.size() == sizeof id, [&] {
      return "comm::nccl: the rendezvous delivered " + std::to_string(got.size()) +
             " bytes instead of an NCCL unique id";
    });
    std::memcpy(&id, got.data(), sizeof id);

    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    const ncclResult_t r = ncclCommInitRankConfig(&comm, li.world_size, id, li.rank, &config);
    st->comm = comm;
    if (r != ncclSuccess && r != ncclInProgress) st->aborted = true;  // nothing to finalize
    if (r != ncclSuccess && r != ncclInProgress && comm != nullptr) ncclCommAbort(comm);
    detail::nccl_check(r, "ncclCommInitRankConfig");
    st->settle(comm, r, "joining the communicator (ncclCommInitRankConfig)");

    if (options.stream != nullptr) {
      st->stream = options.stream;
    } else {
      cudaStream_t s = nullptr;
      cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
      const int device = st->device;
      st->stream_owner = std::shared_ptr<void>(static_cast<void*>(s), [device](void* p) {
        int current = 0;
        cudaGetDevice(&current);
        cudaSetDevice(device);
        cudaStreamDestroy(static_cast<cudaStream_t>(p));
        cudaSetDevice(current);
      });
      st->stream = s;
    }
    finish_setup(*st);
    return nccl(std::move(st));
  }

  int rank() const { return state_ ? state_->rank : -1; }
  int size() const { return state_ ? state_->size : 0; }
  bool member() const { return state_ != nullptr; }
  int device() const { return state_ ? state_->device : -1; }
  /// The stream operations are ordered on.
  cudaStream_t stream() const { return state_ ? state_->stream : nullptr; }
  /// The NCCL communicator, for calls this class does not wrap.
  ncclComm_t handle() const { return state_ ? state_->comm : nullptr; }

  /// Raises comm::aborted_error when NCCL reported an asynchronous error (the communicator is then aborted).
  void check() {
    state().check_usable("check");
    ncclResult_t a = ncclSuccess;
    ncclCommGetAsyncError(state_->comm, &a);
    if (a != ncclSuccess && a != ncclInProgress) {
      const std::string m = "comm::nccl: " + state_->who() + ": asynchronous NCCL error " + ncclGetErrorString(a) +
                            " (" + ncclGetLastError(state_->comm) + "); the communicator was aborted";
      state_->abort(m);
      throw aborted_error(m);
    }
  }

  /// Aborts the communicator now (every pending and later operation fails with `reason`).
  void abort(const std::string& reason = "aborted by the application") { state().abort(reason); }

  template <class T, class S>
  request send(view<const T, S> buf, int peer) {
    check_rank(peer, "send", "peer");
    auto op = start("send of " + count_text(buf) + " to rank " + std::to_string(peer));
    const T* p = input(*op, buf);
    return issue(op, [&] {
      return ncclSend(p, std::size_t(buf.numel()), detail::nccl_type<T>(), peer, state_->comm, state_->stream);
    });
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request send(view<T, S> buf, int peer) {
    return send(view<const T, S>(buf), peer);
  }

  template <class T, class S>
    requires(!std::is_const_v<T>)
  request recv(view<T, S> buf, int peer) {
    check_rank(peer, "recv", "peer");
    auto op = start("recv of " + count_text(buf) + " from rank " + std::to_string(peer));
    T* p = output(*op, buf, false);
    return issue(op, [&] {
      return ncclRecv(p, std::size_t(buf.numel()), detail::nccl_type<T>(), peer, state_->comm, state_->stream);
    });
  }

  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_reduce(view<T, S> buf, reduce_op op) {
    auto o = start("all_reduce(" + std::string(to_string(op)) + ") of " + count_text(buf));
    T* p = output(*o, buf, true);
    return issue(o, [&] {
      return ncclAllReduce(p, p, std::size_t(buf.numel()), detail::nccl_type<T>(), detail::nccl_op(op), state_->comm,
                           state_->stream);
    });
  }

  template <class T, class S>
  request all_gather(view<const T, S> in, view<std::remove_const_t<T>, S> out) {
    using U = std::remove_const_t<T>;
    require(out.numel() == std::int64_t(size()) * in.numel(), [&] {
      return "comm::nccl::all_gather: out needs size() * in.numel() = " + std::to_string(size()) + " * " +
             std::to_string(in.numel()) + " elements, got shape " + to_string(out.shape());
    });
    auto o = start("all_gather of " + count_text(in) + " per rank");
    const U* pi = input(*o, in);
    U* po = output(*o, out, false);
    return issue(o, [&] {
      return ncclAllGather(pi, po, std::size_t(in.numel()), detail::nccl_type<U>(), state_->comm, state_->stream);
    });
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request all_gather(view<T, S> in, view<T, S> out) {
    return all_gather(view<const T, S>(in), out);
  }

  template <class T, class S>
  request reduce_scatter(view<const T, S> in, view<std::remove_const_t<T>, S> out, reduce_op op) {
    using U = std::remove_const_t<T>;
    require(in.numel() == std::int64_t(size()) * out.numel(), [&] {
      return "comm::nccl::reduce_scatter: in needs size() * out.numel() = " + std::to_string(size()) + " * " +
             std::to_string(out.numel()) + " elements, got shape " + to_string(in.shape());
    });
    auto o = start("reduce_scatter(" + std::string(to_string(op)) + ") to " + count_text(out) + " per rank");
    const U* pi = input(*o, in);
    U* po = output(*o, out, false);
    return issue(o, [&] {
      return ncclReduceScatter(pi, po, std::size_t(out.numel()), detail::nccl_type<U>(), detail::nccl_op(op),
                               state_->comm, state_->stream);
    });
  }
  template <class T, class S>
    requires(!std::is_const_v<T>)
  request reduce_scatter(view<T, S> in, view<T, S> out, reduce_op op) {
    return reduce_scatter(view<const T, S>(in), out, op);
  }

  template <class T, class S>
    requires(!std::is_const_v<T>)
  request broadcast(view<T, S> buf, int root) {
    check_rank(root, "broadcast", "root");
    auto o = start("broadcast from root " + std::to_string(root) + " of " + count_text(buf));
    T* p = output(*o, buf, true);
    return issue(o, [&] {
      return ncclBroadcast(p, p, std::size_t(buf.numel()), detail::nccl_type<T>(), root, state_->comm, state_->stream);
    });
  }

  /// An all-reduce of one float: complete (wait()) once every rank has entered it.
  request barrier() {
    auto o = start("barrier");
    return issue(o, [&] {
      return ncclAllReduce(state_->barrier_value, state_->barrier_value, 1, ncclFloat32, ncclSum, state_->comm,
                           state_->stream);
    });
  }

  /// ncclGroupStart: operations until the matching group_end() go to NCCL together. Like NCCL's, the group
  /// belongs to the calling thread and may hold operations of several communicators.
  void group_start() {
    state().check_usable("group_start");
    detail::nccl_check(ncclGroupStart(), "ncclGroupStart");
    ++detail::nccl_group().depth;
  }
  /// ncclGroupEnd; at the outermost one, the group's requests become waitable.
  void group_end() {
    detail::nccl_state& st = state();
    detail::nccl_group_state& g = detail::nccl_group();
    require(g.depth > 0, "comm::nccl::group_end: no group_start to close");
    const ncclResult_t r = ncclGroupEnd();
    --g.depth;
    if (r != ncclSuccess && r != ncclInProgress) {
      const std::string m = "comm::nccl: " + st.who() +
                            ": a group of operations (ncclGroupEnd) failed: " + ncclGetErrorString(r) + " (" +
                            ncclGetLastError(st.comm) + ")";
      for (auto& [owner, op] : g.ops) owner->abort(m);
      st.abort(m);
      g.ops.clear();
      throw aborted_error(m);
    }
    for (auto& [owner, op] : g.ops)
      if (owner.get() != &st) owner->settle(owner->comm, r, "a group of operations (ncclGroupEnd)");
    st.settle(st.comm, r, "a group of operations (ncclGroupEnd)");
    if (g.depth == 0) {
      for (auto& [owner, op] : g.ops) {
        cuda_check(cudaEventRecord(op->event, owner->stream));
        op->recorded = true;
      }
      g.ops.clear();
    }
  }

  /// ncclCommSplit: ranks passing the same color >= 0 form a new communicator, ranked by (key, rank); a negative
  /// color gives a handle on no communicator. Collective; shares this communicator's stream.
  nccl split(int color, int key) {
    detail::nccl_state& st = state();
    st.check_usable("split");
    cuda_check(cudaSetDevice(st.device));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    st.split_slots.push_back(std::make_unique<ncclComm_t>(nullptr));
    ncclComm_t* const slot = st.split_slots.back().get();
    const ncclResult_t r = ncclCommSplit(st.comm, color < 0 ? NCCL_SPLIT_NOCOLOR : color, key, slot, &config);
    detail::nccl_check(r, "ncclCommSplit", st.comm);
    const std::string what = "split(" + std::to_string(color) + ", " + std::to_string(key) + ") (ncclCommSplit)";
    st.settle(st.comm, r, what);
    if (color < 0) return nccl{};
    // Non-blocking mode: NCCL's init thread stores the new communicator into `*slot` only when the split job
    // finishes (an atomic store from another thread), which may be after ncclCommSplit returned and even after
    // the parent reports ncclSuccess. Wait for it (polling the parent drives the group job) before using it.
    {
      const auto deadline = std::chrono::steady_clock::now() + st.timeout;
      while (__atomic_load_n(slot, __ATOMIC_ACQUIRE) == nullptr) {
        if (std::chrono::steady_clock::now() > deadline) {
          const std::string m = "comm::nccl: " + st.who() + ": " + what +
                                " did not deliver the new communicator within " + detail::nccl_seconds(st.timeout) +
                                "; the communicator was aborted";
          st.abort(m);
          throw timeout_error(m);
        }
        ncclResult_t a = ncclSuccess;
        ncclCommGetAsyncError(st.comm, &a);
        if (a != ncclSuccess && a != ncclInProgress) st.settle(st.comm, a, what);  // throws
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
    }
    ncclComm_t const sub = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    auto child = std::make_shared<detail::nccl_state>();
    child->comm = sub;
    child->device = st.device;
    child->timeout = st.timeout;
    child->name = st.name + "/split(color " + std::to_string(color) + ")";
    child->stream = st.stream;
    child->stream_owner = st.stream_owner;
    child->settle(sub, ncclInProgress, "joining the split communicator");
    detail::nccl_check(ncclCommUserRank(sub, &child->rank), "ncclCommUserRank", sub);
    detail::nccl_check(ncclCommCount(sub, &child->size), "ncclCommCount", sub);
    finish_setup(*child);
    return nccl(std::move(child));
  }

 private:
  explicit nccl(std::shared_ptr<detail::nccl_state> st) : state_(std::move(st)) {}

  static void finish_setup(detail::nccl_state& st) {
    cuda_check(cudaMalloc(&st.barrier_value, sizeof(float)));
    cuda_check(cudaMemsetAsync(st.barrier_value, 0, sizeof(float), st.stream));
    cuda_check(cudaStreamCreateWithFlags(&st.staging, cudaStreamNonBlocking));
  }

  detail::nccl_state& state() const {
    require(state_ != nullptr, "comm::nccl: this handle belongs to no communicator (split() with a negative color)");
    return *state_;
  }

  void check_rank(int r, const char* what, const char* role) const {
    state();
    require(0 <= r && r < state_->size, [&] {
      return std::string("comm::nccl::") + what + ": " + role + " " + std::to_string(r) + " outside [0, " +
             std::to_string(state_->size) + ") on rank " + std::to_string(state_->rank);
    });
  }

  template <class T, class S>
  static std::string count_text(view<T, S> v) {
    return std::to_string(v.numel()) + " " + detail::element_name<std::remove_const_t<T>>() + " elements" +
           (std::is_same_v<S, host_space> ? " (host memory)" : "");
  }

  std::shared_ptr<detail::nccl_pending> start(std::string what) {
    state().check_usable("operation");
    cuda_check(cudaSetDevice(state_->device));
    auto op = std::make_shared<detail::nccl_pending>();
    op->what = std::move(what);
    return op;
  }

  template <class T, class S>
  static void check_contiguous(const detail::nccl_pending& op, view<T, S> v) {
    require(v.is_contiguous(),
            [&] { return "comm::nccl: " + op.what + ": views must be contiguous, got shape " + to_string(v.shape()); });
  }

  /// Device memory of `bytes` freed in stream order when the operation is gone.
  void* scratch(detail::nccl_pending& op, std::size_t bytes) {
    void* p = nullptr;
    cuda_check(cudaMallocAsync(&p, std::max<std::size_t>(bytes, 1), state_->stream));
    cudaStream_t s = state_->stream;
    op.keep.push_back(std::shared_ptr<void>(p, [s](void* q) { cudaFreeAsync(q, s); }));
    return p;
  }

  /// An input buffer on the device (host views: a staged copy).
  template <class T, class S>
  const std::remove_const_t<T>* input(detail::nccl_pending& op, view<T, S> v) {
    check_contiguous(op, v);
    if constexpr (std::is_same_v<S, device_space>) {
      return v.data();
    } else {
      void* p = scratch(op, v.bytes());
      if (v.numel() > 0) cuda_check(cudaMemcpyAsync(p, v.data(), v.bytes(), cudaMemcpyHostToDevice, state_->stream));
      return static_cast<const std::remove_const_t<T>*>(p);
    }
  }

  /// An output buffer on the device (host views: staged; `copy_in` for in-place operations; the request copies
  /// it back).
  template <class T, class S>
  T* output(detail::nccl_pending& op, view<T, S> v, bool copy_in) {
    check_contiguous(op, v);
    if constexpr (std::is_same_v<S, device_space>) {
      return v.data();
    } else {
      void* p = scratch(op, v.bytes());
      if (copy_in && v.numel() > 0)
        cuda_check(cudaMemcpyAsync(p, v.data(), v.bytes(), cudaMemcpyHostToDevice, state_->stream));
      T* host = v.data();
      const std::size_t bytes = v.bytes();
      cudaStream_t staging = state_->staging;
      op.finish = [host, p, bytes, staging] {
        if (bytes == 0) return;
        cuda_check(cudaMemcpyAsync(host, p, bytes, cudaMemcpyDeviceToHost, staging));
        cuda_check(cudaStreamSynchronize(staging));
      };
      return static_cast<T*>(p);
    }
  }

  /// Issues the NCCL call; records the completion event now, or at the group's end.
  template <class F>
  request issue(const std::shared_ptr<detail::nccl_pending>& op, F&& call) {
    detail::nccl_state& st = *state_;
    // The communicator must be out of ncclInProgress before the next call on it.
    st.settle(st.comm, ncclSuccess, "the operation before " + op->what);
    const ncclResult_t r = call();
    if (r != ncclSuccess && r != ncclInProgress) {
      // Leave no NCCL group open behind the exception: it would poison every later call on this thread.
      detail::nccl_group_state& g = detail::nccl_group();
      for (; g.depth > 0; --g.depth) (void)ncclGroupEnd();
      g.ops.clear();
      const char* last = ncclGetLastError(st.comm);
      const std::string m = "comm::nccl: " + st.who() + ": " + op->what + " failed: " + ncclGetErrorString(r) +
                            (last != nullptr && *last != '\0' ? std::string(" (") + last + ")" : std::string());
      st.abort(m);
      throw aborted_error(m);
    }
    st.settle(st.comm, r, op->what);
    cuda_check(cudaEventCreateWithFlags(&op->event, cudaEventDisableTiming));
    if (detail::nccl_group().depth > 0) {
      detail::nccl_group().ops.emplace_back(state_, op);
    } else {
      cuda_check(cudaEventRecord(op->event, st.stream));
      op->recorded = true;
    }
    return request(state_, op);
  }

  std::shared_ptr<detail::nccl_state> state_;
};

static_assert(Request<nccl::request>);
static_assert(Communicator<nccl>);

}  // namespace subspace::comm
