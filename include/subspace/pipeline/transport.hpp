#pragma once
// pipeline::transport: moves a pipeline's boundary payloads between neighbouring ranks over a Communicator, for
// the plan engine's pipelined mode (train/engine.hpp).
//
// Forward, a payload is its values and, for a compressor that sends them, the token ids of its rows; backward,
// dL/d(payload values). The wire_format says how they travel: values as the boundary type T itself, fp32 or
// bf16 (a cast on each side), token ids as 2 or 4 little-endian bytes each (kernels/token_ids.hpp); a payload
// with token ids is one message, [values][ids], so a high-latency link pays its latency once. The
// pipeline trainer takes it from the compressor (wire_format_of): compress::subspace_projection's wire dtype and
// its 2-byte ids for vocabularies up to 65535; T and no ids for compress::identity.
//
// Sends return at once: the transport packs the payload into a send buffer of its own and posts the sends, so
// the engine may reuse its buffers, and the transfer overlaps whatever the rank computes next. Send buffers are
// recycled once their sends completed; finish() waits for every send (the end of a step). Receives post and wait:
// the plan puts each one directly before the computation that needs it. On the device the packing is ordered on
// the executor's stream, which the communicator's operations must share (as for the data-parallel trainers:
// comm::local_options::streams, comm::nccl_options::stream).

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../compress/concepts.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/token_ids.hpp"

namespace subspace::pipeline {

/// How payloads travel (see the top of this file).
struct wire_format {
  enum class values_as { boundary, fp32, bf16 };
  values_as values = values_as::boundary;
  int token_bytes = 4;  // 2 or 4

  friend bool operator==(const wire_format&, const wire_format&) = default;
};

/// The wire format compressor `c` asks for with payload values of type T: its wire_element_bytes(sizeof(T)) and
/// token_id_bytes() when it has them, else T and 4-byte ids.
template <class T, class C>
wire_format wire_format_of(const C& c) {
  wire_format w;
  if constexpr (requires { c.wire_element_bytes(sizeof(T)); }) {
    const std::size_t bytes = c.wire_element_bytes(sizeof(T));
    w.values = bytes == sizeof(T) ? wire_format::values_as::boundary
               : bytes == 4       ? wire_format::values_as::fp32
                                  : wire_format::values_as::bf16;
    require(bytes == sizeof(T) || bytes == 4 || bytes == 2, [&] {
      return "pipeline::wire_format_of: the compressor asks for " + std::to_string(bytes) +
             "-byte wire values; the transport carries the boundary type, fp32 or bf16";
    });
  }
  if constexpr (requires { c.token_id_bytes(); }) w.token_bytes = int(c.token_id_bytes());
  return w;
}

template <class Comm, class Exec, class T>
class transport {
 public:
  using space = space_of_t<Exec>;
  using request_type = decltype(std::declval<Comm&>().send(std::declval<view<const T, space>>(), 0));

  transport(Comm& comm, Exec ex, wire_format wire = {}) : comm_(&comm), ex_(ex), wire_(wire) {
    require(wire.token_bytes == 2 || wire.token_bytes == 4, [&] {
      return "pipeline::transport: token ids travel in 2 or 4 bytes, not " + std::to_string(wire.token_bytes);
    });
  }
  transport(transport&&) noexcept = default;
  transport& operator=(transport&&) noexcept = default;
  ~transport() {
    try {
      finish();
    } catch (...) {  // a peer that failed: its error surfaced elsewhere
    }
  }

  const wire_format& wire() const { return wire_; }
  /// Seconds this rank's thread spent blocked in receives so far: the pipeline's bubbles plus the transfers it
  /// could not hide (host time; on the device, the time the host waited for a receive to be ordered).
  double waited_seconds() const { return waited_; }

  /// Sends payload p (values, and the token ids when p has them) to `peer`.
  void send_activation(compress::payload<const T, space> p, int peer) {
    outgoing& o = take();
    if (p.tokens.data() == nullptr) return send_values(o, p.values, peer);
    const std::int64_t value_bytes = p.values.numel() * value_size();
    const view<std::uint8_t, space> message =
        sized(o.message, shape{value_bytes + p.tokens.numel() * wire_.token_bytes});
    put_values(p.values, message.data());
    pack_token_ids(ex_, p.tokens, message.slice(value_bytes, message.numel()), wire_.token_bytes);
    o.requests.push_back(comm_->send(view<const std::uint8_t, space>(message), peer));
  }
  /// Receives a payload from `peer` into p (the same shapes as the sender's).
  void recv_activation(compress::payload<T, space> p, int peer) {
    if (p.tokens.data() == nullptr) return receive(p.values, peer);
    const std::int64_t value_bytes = p.values.numel() * value_size();
    const view<std::uint8_t, space> message =
        sized(staging_message_, shape{value_bytes + p.tokens.numel() * wire_.token_bytes});
    const auto start = std::chrono::steady_clock::now();
    comm_->recv(message, peer).wait();
    waited_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    get_values(message.data(), p.values);
    unpack_token_ids(ex_, view<const std::uint8_t, space>(message.slice(value_bytes, message.numel())), p.tokens,
                     wire_.token_bytes);
  }
  /// Sends dL/d(payload values) to `peer`.
  void send_gradient(view<const T, space> g, int peer) { send_values(take(), g, peer); }
  /// Receives dL/d(payload values) from `peer` into g.
  void recv_gradient(view<T, space> g, int peer) { receive(g, peer); }

  /// Waits for every send posted so far.
  void finish() {
    for (outgoing& o : out_) {
      for (auto& r : o.requests) r.wait();
      o.requests.clear();
    }
  }

 private:
  /// One send buffer of each wire type, and the requests of the sends that read it.
  struct outgoing {
    tensor<T, space> values;
    tensor<float, space> fp32;
    tensor<bf16, space> half;
    tensor<std::uint8_t, space> message;  // [values][ids]
    std::vector<request_type> requests;
  };

  template <class U>
  static view<U, space> sized(tensor<U, space>& t, const shape& s) {
    if (t.data() == nullptr || t.shape() != s) t = tensor<U, space>(s);
    return t.v();
  }

  /// A send buffer whose sends completed.
  outgoing& take() {
    for (outgoing& o : out_) {
      bool idle = true;
      for (auto& r : o.requests) idle = idle && r.test();
      if (idle) {
        o.requests.clear();
        return o;
      }
    }
    return out_.emplace_back();
  }

  void send_values(outgoing& o, view<const T, space> v, int peer) {
    switch (wire_.values) {
      case wire_format::values_as::boundary: post(o, o.values, v, peer); break;
      case wire_format::values_as::fp32: post(o, o.fp32, v, peer); break;
      case wire_format::values_as::bf16: post(o, o.half, v, peer); break;
    }
  }
  template <class W>
  void post(outgoing& o, tensor<W, space>& buffer, view<const T, space> v, int peer) {
    const view<W, space> w = sized(buffer, v.shape());
    if constexpr (std::is_same_v<W, T>) copy(ex_, v, w);
    else cast(ex_, v, w);
    o.requests.push_back(comm_->send(view<const W, space>(w), peer));
  }

  /// Bytes per value on the wire.
  std::int64_t value_size() const {
    switch (wire_.values) {
      case wire_format::values_as::boundary: return sizeof(T);
      case wire_format::values_as::fp32: return 4;
      case wire_format::values_as::bf16: return 2;
    }
    return sizeof(T);
  }
  /// v -> the wire type at `to` (the start of a message: aligned for any element type).
  void put_values(view<const T, space> v, std::uint8_t* to) {
    const auto into = [&]<class W>(W*) {
      const view<W, space> w(reinterpret_cast<W*>(to), v.shape());
      if constexpr (std::is_same_v<W, T>) copy(ex_, v, w);
      else cast(ex_, v, w);
    };
    switch (wire_.values) {
      case wire_format::values_as::boundary: into(static_cast<T*>(nullptr)); break;
      case wire_format::values_as::fp32: into(static_cast<float*>(nullptr)); break;
      case wire_format::values_as::bf16: into(static_cast<bf16*>(nullptr)); break;
    }
  }
  /// The wire values at `from` -> v.
  void get_values(const std::uint8_t* from, view<T, space> v) {
    const auto out = [&]<class W>(W*) {
      const view<const W, space> w(reinterpret_cast<const W*>(from), v.shape());
      if constexpr (std::is_same_v<W, T>) copy(ex_, w, v);
      else cast(ex_, w, v);
    };
    switch (wire_.values) {
      case wire_format::values_as::boundary: out(static_cast<T*>(nullptr)); break;
      case wire_format::values_as::fp32: out(static_cast<float*>(nullptr)); break;
      case wire_format::values_as::bf16: out(static_cast<bf16*>(nullptr)); break;
    }
  }

  void receive(view<T, space> into, int peer) {
    const auto start = std::chrono::steady_clock::now();
    receive_values(into, peer);
    waited_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
  void receive_values(view<T, space> into, int peer) {
    switch (wire_.values) {
      case wire_format::values_as::boundary: comm_->recv(into, peer).wait(); break;
      case wire_format::values_as::fp32: receive_as(staging_fp32_, into, peer); break;
      case wire_format::values_as::bf16: receive_as(staging_half_, into, peer); break;
    }
  }
  template <class W>
  void receive_as(tensor<W, space>& staging, view<T, space> into, int peer) {
    if constexpr (std::is_same_v<W, T>) {
      comm_->recv(into, peer).wait();
    } else {
      const view<W, space> w = sized(staging, into.shape());
      comm_->recv(w, peer).wait();
      cast(ex_, view<const W, space>(w), into);
    }
  }

  Comm* comm_;
  Exec ex_;
  wire_format wire_;
  std::vector<outgoing> out_;
  tensor<float, space> staging_fp32_;
  tensor<bf16, space> staging_half_;
  tensor<std::uint8_t, space> staging_message_;
  double waited_ = 0;
};

}  // namespace subspace::pipeline
