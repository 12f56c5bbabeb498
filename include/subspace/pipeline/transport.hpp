#pragma once
// pipeline::transport: moves a pipeline's boundary payloads between neighbouring ranks over a Communicator, for
// the plan engine's pipelined mode (train/engine.hpp).
//
// Forward, a payload is its values and, for a compressor that sends them, the token ids of its rows; backward,
// dL/d(payload values). Values travel as the wire type W (a cast on each side when W differs from the model's
// T: e.g. an fp32 model with a bf16 wire); token ids as int32.
//
// Sends return at once: the transport copies the payload into a send buffer of its own and posts the send, so
// the engine may reuse its buffers, and the transfer overlaps whatever the rank computes next. Send buffers are
// recycled once their sends completed; finish() waits for every send (the end of a step). Receives post and wait:
// the plan puts each one directly before the computation that needs it. On the device the copies into send
// buffers are ordered on the executor's stream, which the communicator's operations must share (as for the
// data-parallel trainers: comm::local_options::streams, comm::nccl_options::stream).

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../compress/concepts.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../kernels/elementwise.hpp"

namespace subspace::pipeline {

template <class Comm, class Exec, class T, class W = T>
class transport {
 public:
  using space = space_of_t<Exec>;
  using request_type = decltype(std::declval<Comm&>().send(std::declval<view<const W, space>>(), 0));

  transport(Comm& comm, Exec ex) : comm_(&comm), ex_(ex) {}
  transport(transport&&) noexcept = default;
  transport& operator=(transport&&) noexcept = default;
  ~transport() {
    try {
      finish();
    } catch (...) {  // a peer that failed: its error surfaced elsewhere
    }
  }

  /// Sends payload p (values, and the token ids when p has them) to `peer`.
  void send_activation(compress::payload<const T, space> p, int peer) {
    outgoing& o = take(p.values.shape(), p.tokens.data() != nullptr ? p.tokens.shape() : shape{});
    put(p.values, o.values.v());
    if (p.tokens.data() != nullptr) copy(ex_, p.tokens, o.tokens.v());
    o.requests.push_back(comm_->send(view<const W, space>(o.values.v()), peer));
    if (p.tokens.data() != nullptr) o.requests.push_back(comm_->send(view<const std::int32_t, space>(o.tokens.v()), peer));
  }
  /// Receives a payload from `peer` into p (the same shapes as the sender's).
  void recv_activation(compress::payload<T, space> p, int peer) {
    receive(p.values, peer);
    if (p.tokens.data() != nullptr) comm_->recv(p.tokens, peer).wait();
  }
  /// Sends dL/d(payload values) to `peer`.
  void send_gradient(view<const T, space> g, int peer) {
    outgoing& o = take(g.shape(), shape{});
    put(g, o.values.v());
    o.requests.push_back(comm_->send(view<const W, space>(o.values.v()), peer));
  }
  /// Receives dL/d(payload values) from `peer` into g.
  void recv_gradient(view<T, space> g, int peer) { receive(g, peer); }

  /// Waits for every send posted so far.
  void finish() {
    for (outgoing& o : out_) wait(o);
  }

 private:
  struct outgoing {
    tensor<W, space> values;
    tensor<std::int32_t, space> tokens;
    std::vector<request_type> requests;
  };

  static void wait(outgoing& o) {
    for (request_type& r : o.requests) r.wait();
    o.requests.clear();
  }
  static bool idle(outgoing& o) {
    for (request_type& r : o.requests)
      if (!r.test()) return false;
    o.requests.clear();
    return true;
  }

  /// A send buffer whose sends completed, shaped for (values, tokens).
  outgoing& take(const shape& values, const shape& tokens) {
    outgoing* o = nullptr;
    for (outgoing& c : out_)
      if (idle(c)) {
        o = &c;
        break;
      }
    if (o == nullptr) o = &out_.emplace_back();
    if (o->values.data() == nullptr || o->values.shape() != values) o->values = tensor<W, space>(values);
    if (tokens.rank > 0 && (o->tokens.data() == nullptr || o->tokens.shape() != tokens))
      o->tokens = tensor<std::int32_t, space>(tokens);
    return *o;
  }

  void put(view<const T, space> from, view<W, space> to) {
    if constexpr (std::is_same_v<T, W>) copy(ex_, from, to);
    else cast(ex_, from, to);
  }

  void receive(view<T, space> into, int peer) {
    if constexpr (std::is_same_v<T, W>) {
      comm_->recv(into, peer).wait();
    } else {
      if (staging_.data() == nullptr || staging_.shape() != into.shape()) staging_ = tensor<W, space>(into.shape());
      comm_->recv(staging_.v(), peer).wait();
      cast(ex_, view<const W, space>(staging_.v()), into);
    }
  }

  Comm* comm_;
  Exec ex_;
  std::vector<outgoing> out_;
  tensor<W, space> staging_;
};

}  // namespace subspace::pipeline
