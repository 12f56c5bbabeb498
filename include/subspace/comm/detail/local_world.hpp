#pragma once
// comm::local's shared world: the matching engine behind comm::local (comm/local.hpp). Internal.
//
// A world holds, for every ordered pair of ranks (src, dst), the FIFOs of unmatched sends and recvs, and for
// every collective sequence number a slot that fills as the ranks call it. Operations are type-erased records
// (a buffer's address, extents, strides, element type and memory space); the data moves when the last
// participant posts, through a function that participant instantiated for the element type and the memory
// space (so the work needs no virtual dispatch and no knowledge of every type here). Posting never blocks;
// wait() blocks on the world's condition variable with the world's timeout.
//
// Locking: one mutex per world guards the queues, the slots and the status of every operation. Data moves
// outside the lock; an operation is then `moving`, and a timed-out wait keeps waiting for a moving operation
// (a copy in progress finishes) instead of abandoning it.
//
// Aborting. abort_world fails every operation posted and not yet moving, in the world and in every world split
// from it, and every operation posted afterwards: the peers of a rank that gave up fail at once instead of each
// waiting out the timeout.

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "../../core/dtype.hpp"
#include "../../core/error.hpp"
#include "../../core/tensor.hpp"
#include "../concepts.hpp"
#include "../error.hpp"

namespace subspace::comm {

/// Options of a comm::local world.
struct local_options {
  /// How long wait() waits for the peers of an operation (and split() for the other ranks) before raising
  /// comm::timeout_error. Keep it above the longest compute a rank does between matching operations.
  std::chrono::milliseconds timeout = std::chrono::minutes(5);
  /// Device memory only: rank r's operations are ordered on streams[r] (a cudaStream_t). Empty: the world
  /// creates one non-blocking stream per rank on its first device operation (local::stream() then names it).
  std::vector<void*> streams;
};

namespace detail {

enum class local_kind : std::uint8_t { send, recv, all_reduce, all_gather, reduce_scatter, broadcast, barrier, split };

inline const char* to_string(local_kind k) {
  switch (k) {
    case local_kind::send: return "send";
    case local_kind::recv: return "recv";
    case local_kind::all_reduce: return "all_reduce";
    case local_kind::all_gather: return "all_gather";
    case local_kind::reduce_scatter: return "reduce_scatter";
    case local_kind::broadcast: return "broadcast";
    case local_kind::barrier: return "barrier";
    case local_kind::split: return "split";
  }
  return "?";
}

/// Name of an element type in messages.
template <class T>
constexpr const char* element_name() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, std::int8_t>) return "int8";
  else if constexpr (std::is_same_v<U, std::uint8_t>) return "uint8";
  else if constexpr (std::is_same_v<U, std::uint32_t>) return "uint32";
  else if constexpr (std::is_same_v<U, std::int64_t>) return "int64";
  else if constexpr (std::is_same_v<U, std::uint64_t>) return "uint64";
  else if constexpr (std::is_same_v<U, std::int16_t>) return "int16";
  else if constexpr (std::is_same_v<U, char>) return "char";
  else if constexpr (std::is_same_v<U, std::byte>) return "byte";
  else return dtype_name<U>();
}

/// A buffer with its type erased: enough to rebuild the view in the code that knows the type.
struct local_buffer {
  const std::type_info* element = &typeid(void);  // without const
  const char* element_name = "";
  bool device = false;  // device_space, else host_space
  void* data = nullptr;
  shape extents{};
  std::array<std::int64_t, max_rank> strides{};

  std::int64_t numel() const { return extents.numel(); }
};

template <class T, class S>
local_buffer make_buffer(view<T, S> v) {
  using U = std::remove_const_t<T>;
  return local_buffer{&typeid(U), element_name<U>(), std::is_same_v<S, device_space>, const_cast<U*>(v.data()),
                      v.shape(),  v.strides()};
}

/// The view of a buffer, as U (which may be const) in space S.
template <class U, class S>
view<U, S> as_view(const local_buffer& b) {
  return view<U, S>(static_cast<U*>(b.data), b.extents, b.strides);
}

/// Calls f(element) for every element of a host view, in row-major order.
template <class T, class F>
void for_each_element(view<T, host_space> v, F&& f) {
  if (v.is_contiguous()) {
    T* p = v.data();
    for (std::int64_t i = 0, n = v.numel(); i < n; ++i) f(p[i]);
    return;
  }
  for_each_offset(v.shape(), v.strides(), v.strides(), [&](std::int64_t a, std::int64_t) { f(v.data()[a]); });
}

/// The type a reduction over T accumulates in: double for double, 64-bit integers for integers, float for the
/// rest (float, bf16, fp16). Host and device reduce in the same type and the same rank order, so their results
/// agree bit for bit.
template <class T>
using local_accum_t =
    std::conditional_t<std::is_same_v<T, double>, double,
                       std::conditional_t<std::is_integral_v<T>,
                                          std::conditional_t<std::is_signed_v<T>, std::int64_t, std::uint64_t>, float>>;

template <class T>
inline constexpr bool local_reducible_v = is_element_v<T> || (std::is_integral_v<T> && !std::is_same_v<T, bool>);

/// One step of a reduction over ranks: max keeps the larger, every other op adds (avg divides afterwards).
template <class A>
SUBSPACE_HD inline A local_combine(A acc, A x, reduce_op op) {
  return op == reduce_op::max ? (x > acc ? x : acc) : acc + x;
}

enum class local_status : std::uint8_t { posted, moving, done, failed };
enum class local_failure : std::uint8_t { none, mismatch, aborted, timeout };

struct local_world;

/// The state one request shares with the world.
struct local_op {
  local_kind kind = local_kind::barrier;
  int rank = 0;             // the posting rank
  int peer = -1;            // send/recv: the peer; broadcast: the root
  std::uint64_t index = 0;  // send/recv: the index-th (from 0) to/from peer; collectives: the sequence number
  reduce_op rop = reduce_op::sum;
  std::int64_t numel = 0;
  const char* element = "";
  std::uint64_t group = 0;  // the posting rank's open group, 0 outside groups
  local_status status = local_status::posted;
  local_failure failure = local_failure::none;
  std::string message;
  // Device memory: wait() makes `stream` wait for `done_event` (through `join`, set in nvcc code).
  void* stream = nullptr;
  std::shared_ptr<void> done_event;
  void (*join)(void* stream, void* event) = nullptr;
  bool joined = false;
  // split: the new world and this rank's place in it (no world: not a member)
  std::shared_ptr<local_world> split_world;
  int split_rank = -1;
};

struct local_p2p_entry;
struct local_coll_entry;
/// Moves a matched send's data into its recv; returns the device event that marks the end of the copy (null
/// for host memory).
using local_mover = std::shared_ptr<void> (*)(local_world&, const local_p2p_entry& send, const local_p2p_entry& recv);
/// Runs a matched collective over every rank's entry; returns the device event that marks its end (or null).
using local_runner = std::shared_ptr<void> (*)(local_world&, const std::vector<local_coll_entry>& entries);

struct local_p2p_entry {
  std::shared_ptr<local_op> op;
  local_buffer buf;
  std::shared_ptr<void> ready;  // device: recorded on the rank's stream when the operation was posted
  local_mover move = nullptr;
};

struct local_p2p_channel {
  std::deque<local_p2p_entry> sends, recvs;  // unmatched, in posting order (one of the two is always empty)
  std::uint64_t sends_posted = 0, recvs_posted = 0;
};

struct local_coll_entry {
  std::shared_ptr<local_op> op;  // null: this rank has not called the collective yet
  local_buffer in, out;
  std::shared_ptr<void> ready;
  int color = 0, key = 0;  // split
  local_runner run = nullptr;
};

struct local_coll_slot {
  std::vector<local_coll_entry> entries;
  int arrived = 0;
  int abandoned_by = -1;  // a rank whose wait timed out
};

struct local_rank_state {
  std::atomic<int> group_depth{0};
  std::atomic<std::uint64_t> group_seq{0};
};

struct local_world {
  int n = 0;
  std::string name;
  local_options options;
  // A split world keeps its parent alive: rank r's stream is its parent rank's stream.
  std::shared_ptr<local_world> parent;
  std::vector<int> parent_ranks;

  std::mutex mutex;
  std::condition_variable cv;
  std::vector<local_p2p_channel> channels;  // [src * n + dst]
  std::map<std::uint64_t, local_coll_slot> slots;
  std::vector<std::uint64_t> collectives_issued;
  std::unique_ptr<local_rank_state[]> ranks;
  std::string aborted;                               // why the world was aborted; empty: it was not
  std::vector<std::weak_ptr<local_world>> children;  // the worlds split from this one

  // Device resources (streams, created on the first device operation by detail/cuda/local.cuh).
  std::once_flag device_once;
  std::shared_ptr<void> device;
  std::vector<void*> streams;  // per rank, the stream its device operations are ordered on (null: not yet)

  local_world(int size, std::string world_name, local_options opts)
      : n(size),
        name(std::move(world_name)),
        options(std::move(opts)),
        channels(std::size_t(size) * std::size_t(size)),
        collectives_issued(std::size_t(size), 0),
        ranks(new local_rank_state[std::size_t(size)]),
        streams(std::size_t(size), nullptr) {
    if (!options.streams.empty()) streams = options.streams;
  }
};

// --- messages ---------------------------------------------------------------------------------------------------

inline std::string seconds_text(std::chrono::milliseconds t) {
  std::ostringstream s;
  s.precision(3);
  s << std::fixed << double(t.count()) / 1000.0 << " s";
  return s.str();
}

inline std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (std::size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s.empty() ? "none" : s;
}

/// "all_reduce(sum) of 37 fp32 elements", "broadcast from root 2 of 5 fp64 elements", "barrier".
inline std::string describe_call(const local_op& op) {
  std::string s = to_string(op.kind);
  if (op.kind == local_kind::all_reduce || op.kind == local_kind::reduce_scatter)
    s += "(" + std::string(to_string(op.rop)) + ")";
  if (op.kind == local_kind::broadcast) s += " from root " + std::to_string(op.peer);
  if (op.kind != local_kind::barrier && op.kind != local_kind::split)
    s += " of " + std::to_string(op.numel) + " " + op.element + " elements";
  return s;
}

/// "rank 1's recv #2 from rank 0 (5 fp32 elements)", "rank 3's all_reduce(sum) of 7 fp32 elements
/// (collective #4)".
inline std::string describe(const local_op& op) {
  const std::string who = "rank " + std::to_string(op.rank) + "'s ";
  switch (op.kind) {
    case local_kind::send:
      return who + "send #" + std::to_string(op.index + 1) + " to rank " + std::to_string(op.peer) + " (" +
             std::to_string(op.numel) + " " + op.element + " elements)";
    case local_kind::recv:
      return who + "recv #" + std::to_string(op.index + 1) + " from rank " + std::to_string(op.peer) + " (" +
             std::to_string(op.numel) + " " + op.element + " elements)";
    default: return who + describe_call(op) + " (collective #" + std::to_string(op.index + 1) + ")";
  }
}

/// What an exception says (its what(), when it is a std::exception).
inline std::string what_of(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  } catch (...) {
    return "an exception that is not a std::exception";
  }
}

inline std::string world_text(const local_world& w) {
  return w.name + " (" + std::to_string(w.n) + (w.n == 1 ? " rank)" : " ranks)");
}

// --- completion ---------------------------------------------------------------------------------------------------

inline void fail(local_op& op, local_failure f, std::string message) {
  op.status = local_status::failed;
  op.failure = f;
  op.message = std::move(message);
}

[[noreturn]] inline void rethrow_failure(const local_op& op) {
  if (op.failure == local_failure::mismatch) throw mismatch_error(op.message);
  if (op.failure == local_failure::timeout) throw timeout_error(op.message);
  throw aborted_error(op.message);
}

/// Under the lock: what a timed-out operation was waiting for.
inline std::string diagnose_timeout(local_world& w, const local_op& op) {
  std::string s = "comm::local: " + describe(op) + " in " + world_text(w) + " timed out after " +
                  seconds_text(w.options.timeout) + ": ";
  if (op.kind == local_kind::send) {
    const auto& c = w.channels[std::size_t(op.rank) * std::size_t(w.n) + std::size_t(op.peer)];
    s += "rank " + std::to_string(op.peer) + " has issued " + std::to_string(c.recvs_posted) + " recv(s) from rank " +
         std::to_string(op.rank) + " so far, so this send has no matching recv (a send with no recv, or rank " +
         std::to_string(op.peer) + " is stuck elsewhere)";
  } else if (op.kind == local_kind::recv) {
    const auto& c = w.channels[std::size_t(op.peer) * std::size_t(w.n) + std::size_t(op.rank)];
    s += "rank " + std::to_string(op.peer) + " has issued " + std::to_string(c.sends_posted) + " send(s) to rank " +
         std::to_string(op.rank) + " so far, so this recv has no matching send (a recv with no send, or rank " +
         std::to_string(op.peer) + " is stuck elsewhere)";
  } else {
    std::vector<int> in, out;
    const auto it = w.slots.find(op.index);
    for (int r = 0; r < w.n; ++r) {
      const bool arrived = it != w.slots.end() && it->second.entries[std::size_t(r)].op != nullptr;
      (arrived ? in : out).push_back(r);
    }
    s += "rank(s) " + rank_list(in) + " called it; rank(s) " + rank_list(out) + " did not";
    std::string issued;
    for (const int r : out)
      issued += (issued.empty() ? "" : ", ") + std::string("rank ") + std::to_string(r) + " has issued " +
                std::to_string(w.collectives_issued[std::size_t(r)]) + " collective(s)";
    if (!issued.empty()) s += " (" + issued + ")";
  }
  return s;
}

/// Under the lock: makes a finished device operation's stream wait for its data (once).
inline void join_stream(local_op& op) {
  if (op.status == local_status::done && op.join && op.done_event && !op.joined) {
    op.join(op.stream, op.done_event.get());
    op.joined = true;
  }
}

inline void check_not_in_own_group(local_world& w, const local_op& op) {
  const local_rank_state& rs = w.ranks[std::size_t(op.rank)];
  if (op.group != 0 && rs.group_depth.load() > 0 && rs.group_seq.load() == op.group)
    throw invalid_argument("comm::local: " + describe(op) + " in " + world_text(w) +
                           " is waited on inside the group_start()/group_end() that issued it; wait after "
                           "group_end() (NCCL would never complete it)");
}

/// Blocks until op completes; raises its failure, or timeout_error after the world's timeout.
inline void wait_op(local_world& w, local_op& op) {
  check_not_in_own_group(w, op);
  std::unique_lock lock(w.mutex);
  const auto deadline = std::chrono::steady_clock::now() + w.options.timeout;
  while (op.status == local_status::posted) {
    if (w.cv.wait_until(lock, deadline) == std::cv_status::timeout && op.status == local_status::posted) {
      std::string message = diagnose_timeout(w, op);
      // Abandon it: a partner that matches it later fails instead of writing into a buffer nobody waits for.
      if (op.kind != local_kind::send && op.kind != local_kind::recv)
        if (auto it = w.slots.find(op.index); it != w.slots.end() && it->second.abandoned_by < 0)
          it->second.abandoned_by = op.rank;
      fail(op, local_failure::timeout, message);
      throw timeout_error(message);
    }
  }
  while (op.status == local_status::moving) w.cv.wait(lock);  // data in flight: it finishes
  if (op.status == local_status::failed) rethrow_failure(op);
  join_stream(op);
}

/// True once op is complete; raises its failure. Never blocks (beyond the world's lock).
inline bool test_op(local_world& w, local_op& op) {
  std::lock_guard lock(w.mutex);
  if (op.status == local_status::failed) rethrow_failure(op);
  if (op.status != local_status::done) return false;
  join_stream(op);
  return true;
}

// --- aborting -----------------------------------------------------------------------------------------------------

inline std::string abort_text(const local_world& w, const local_op& op) {
  return "comm::local: " + describe(op) + " in " + world_text(w) + " cannot complete: " + w.aborted;
}

/// Under the lock: fails op (posted into an aborted world) at once; false when the world was not aborted.
inline bool refuse_if_aborted(local_world& w, local_op& op) {
  if (w.aborted.empty()) return false;
  fail(op, local_failure::aborted, abort_text(w, op));
  return true;
}

/// Aborts w and every world split from it (once; a second abort keeps the first reason): each operation posted and
/// not yet moving fails with comm::aborted_error naming `why`, and so does each one posted later.
inline void abort_world(local_world& w, const std::string& why) {
  std::vector<std::shared_ptr<local_world>> children;
  {
    std::lock_guard lock(w.mutex);
    if (!w.aborted.empty()) return;
    w.aborted = why;
    const auto stop = [&](local_op& op) {
      if (op.status == local_status::posted) fail(op, local_failure::aborted, abort_text(w, op));
    };
    for (auto& c : w.channels) {
      for (auto& e : c.sends) stop(*e.op);
      for (auto& e : c.recvs) stop(*e.op);
    }
    for (auto& [index, slot] : w.slots)
      for (auto& e : slot.entries)
        if (e.op) stop(*e.op);
    for (const auto& c : w.children)
      if (auto child = c.lock()) children.push_back(std::move(child));
  }
  w.cv.notify_all();
  for (const auto& child : children) abort_world(*child, why);
}

// --- matching -----------------------------------------------------------------------------------------------------

/// Posts a send (from op.rank to op.peer) or a recv (at op.rank from op.peer); moves the data when the partner
/// is already there.
inline void post_p2p(local_world& w, local_p2p_entry e) {
  local_op& op = *e.op;
  const bool is_send = op.kind == local_kind::send;
  const int src = is_send ? op.rank : op.peer, dst = is_send ? op.peer : op.rank;
  std::unique_lock lock(w.mutex);
  local_p2p_channel& c = w.channels[std::size_t(src) * std::size_t(w.n) + std::size_t(dst)];
  op.index = is_send ? c.sends_posted++ : c.recvs_posted++;
  if (refuse_if_aborted(w, op)) return;
  std::deque<local_p2p_entry>& partners = is_send ? c.recvs : c.sends;
  if (partners.empty()) {
    (is_send ? c.sends : c.recvs).push_back(std::move(e));
    return;
  }
  local_p2p_entry partner = std::move(partners.front());
  partners.pop_front();
  local_op& other = *partner.op;
  const local_p2p_entry& send = is_send ? e : partner;
  const local_p2p_entry& recv = is_send ? partner : e;
  const std::string head =
      "comm::local: " + describe(*send.op) + " meets " + describe(*recv.op) + " in " + world_text(w) + ", but ";
  if (other.status == local_status::failed) {  // abandoned after a timeout
    fail(op, local_failure::aborted,
         "comm::local: " + describe(op) + " in " + world_text(w) + " matched " + describe(other) + ", which rank " +
             std::to_string(other.rank) + " abandoned when its wait timed out");
  } else if (send.buf.device != recv.buf.device) {
    const std::string m = head + "one is in host memory and the other in device memory";
    fail(op, local_failure::mismatch, m);
    fail(other, local_failure::mismatch, m);
  } else if (*send.buf.element != *recv.buf.element) {
    const std::string m =
        head + "their element types differ (" + send.buf.element_name + " vs " + recv.buf.element_name + ")";
    fail(op, local_failure::mismatch, m);
    fail(other, local_failure::mismatch, m);
  } else if (send.buf.numel() != recv.buf.numel()) {
    const std::string m = head + "their element counts differ (" + std::to_string(send.buf.numel()) + " vs " +
                          std::to_string(recv.buf.numel()) + ")";
    fail(op, local_failure::mismatch, m);
    fail(other, local_failure::mismatch, m);
  } else {
    op.status = other.status = local_status::moving;
    lock.unlock();
    std::shared_ptr<void> event;
    std::string error;
    try {
      event = e.move(w, send, recv);
    } catch (const std::exception& ex) {
      error = "comm::local: moving the data of " + describe(*send.op) + " failed: " + ex.what();
    }
    lock.lock();
    if (error.empty()) {
      op.status = other.status = local_status::done;
      op.done_event = other.done_event = event;
    } else {
      fail(op, local_failure::aborted, error);
      fail(other, local_failure::aborted, error);
    }
  }
  w.cv.notify_all();
}

/// Under the lock: why the ranks' calls of one collective do not match (empty when they do).
inline std::string collective_mismatch(const local_world& w, const std::vector<local_coll_entry>& es) {
  const local_op& a = *es[0].op;
  bool same = true;
  for (const auto& e : es) {
    const local_op& b = *e.op;
    if (b.kind != a.kind) same = false;
    else if (a.kind == local_kind::barrier || a.kind == local_kind::split) continue;
    else if (*e.out.element != *es[0].out.element || e.out.device != es[0].out.device || b.numel != a.numel)
      same = false;
    else if ((a.kind == local_kind::all_reduce || a.kind == local_kind::reduce_scatter) && b.rop != a.rop) same = false;
    else if (a.kind == local_kind::broadcast && b.peer != a.peer) same = false;
  }
  if (same) return {};
  std::string s = "comm::local: collective #" + std::to_string(a.index + 1) + " of " + world_text(w) +
                  " does not match across ranks:";
  for (std::size_t r = 0; r < es.size(); ++r)
    s += std::string(r ? ";" : "") + " rank " + std::to_string(r) + " called " + describe_call(*es[r].op) +
         (es[r].out.device ? " in device memory" : "");
  return s;
}

/// Under the lock: forms the groups of a split (by color, ordered by (key, rank)) and hands each rank its world.
inline void run_split(const std::shared_ptr<local_world>& w, std::vector<local_coll_entry>& es) {
  std::map<int, std::vector<int>> groups;
  for (int r = 0; r < w->n; ++r)
    if (es[std::size_t(r)].color >= 0) groups[es[std::size_t(r)].color].push_back(r);
  for (auto& [color, members] : groups) {
    std::stable_sort(members.begin(), members.end(),
                     [&](int a, int b) { return es[std::size_t(a)].key < es[std::size_t(b)].key; });
    local_options opts = w->options;
    opts.streams.clear();
    auto sub = std::make_shared<local_world>(int(members.size()),
                                             w->name + "/split(color " + std::to_string(color) + ")", opts);
    sub->parent = w;
    sub->parent_ranks = members;
    w->children.push_back(sub);
    for (std::size_t i = 0; i < members.size(); ++i) {
      local_op& op = *es[std::size_t(members[i])].op;
      op.split_world = sub;
      op.split_rank = int(i);
    }
  }
}

/// Posts rank e.op->rank's call of its next collective; the last rank to call it runs it.
inline void post_collective(const std::shared_ptr<local_world>& wp, local_coll_entry e) {
  local_world& w = *wp;
  local_op& op = *e.op;
  std::unique_lock lock(w.mutex);
  op.index = w.collectives_issued[std::size_t(op.rank)]++;
  if (refuse_if_aborted(w, op)) return;
  local_coll_slot& slot = w.slots[op.index];
  if (slot.entries.empty()) slot.entries.resize(std::size_t(w.n));
  slot.entries[std::size_t(op.rank)] = std::move(e);
  if (++slot.arrived < w.n) return;

  std::vector<local_coll_entry> es = std::move(slot.entries);
  const int abandoned_by = slot.abandoned_by;
  w.slots.erase(op.index);
  const auto fail_all = [&](local_failure f, const std::string& m) {
    for (auto& x : es)
      if (x.op->status != local_status::failed) fail(*x.op, f, m);
  };
  if (abandoned_by >= 0) {
    fail_all(local_failure::aborted, "comm::local: " + describe(op) + " in " + world_text(w) +
                                         " cannot complete: rank " + std::to_string(abandoned_by) +
                                         " abandoned this collective when its wait timed out");
  } else if (std::string m = collective_mismatch(w, es); !m.empty()) {
    fail_all(local_failure::mismatch, m);
  } else if (op.kind == local_kind::split) {
    run_split(wp, es);
    for (auto& x : es) x.op->status = local_status::done;
  } else if (op.kind == local_kind::barrier || es[0].run == nullptr) {
    for (auto& x : es) x.op->status = local_status::done;
  } else {
    for (auto& x : es) x.op->status = local_status::moving;
    lock.unlock();
    std::shared_ptr<void> event;
    std::string error;
    try {
      event = es[std::size_t(op.rank)].run(w, es);
    } catch (const std::exception& ex) {
      error = "comm::local: running " + describe_call(op) + " (collective #" + std::to_string(op.index + 1) + " of " +
              world_text(w) + ") failed: " + ex.what();
    }
    lock.lock();
    for (auto& x : es) {
      if (error.empty()) {
        x.op->status = local_status::done;
        x.op->done_event = event;
      } else {
        fail(*x.op, local_failure::aborted, error);
      }
    }
  }
  w.cv.notify_all();
}

}  // namespace detail
}  // namespace subspace::comm
