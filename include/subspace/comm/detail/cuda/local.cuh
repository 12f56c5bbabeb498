#pragma once
// comm::local on device memory (translation units compiled by nvcc): streams, events and the collective kernels.
//
// Every rank posts on its own stream (given in local_options::streams, or created here): posting records a
// `ready` event there. A matched send/recv copies on the receiver's transfer stream after both ready events; a
// collective runs on the world's collective stream after every rank's ready event. Either records a `done`
// event, which wait() makes the rank's stream wait for. So data moves in stream order with the ranks' own work,
// without the host ever blocking on the GPU, and collectives of one world run in the order they were matched.
//
// Reductions accumulate in local_accum_t<T> over ranks 0, 1, ..., n-1, like the host path, so host and device
// results agree bit for bit.

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "../../../core/cuda/copy.cuh"
#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/launch.cuh"
#include "../local_world.hpp"

namespace subspace::comm::detail::cuda_local {

/// The most ranks a device collective takes (the kernels carry the ranks' pointers as parameters).
inline constexpr int max_ranks = 64;

/// A world's streams. Destroyed with the world (after finishing their work).
struct resources {
  int device = 0;
  std::vector<cudaStream_t> owned;     // created here, destroyed here
  std::vector<cudaStream_t> transfer;  // per rank: copies into that rank's buffers
  cudaStream_t collective = nullptr;

  resources() = default;
  resources(const resources&) = delete;
  resources& operator=(const resources&) = delete;
  ~resources() {
    int current = 0;
    cudaGetDevice(&current);
    cudaSetDevice(device);
    for (cudaStream_t s : owned) {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
    cudaSetDevice(current);
  }
  cudaStream_t create() {
    cudaStream_t s = nullptr;
    cuda_check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    owned.push_back(s);
    return s;
  }
};

inline cudaStream_t rank_stream(local_world& w, int r);

/// The world's resources, created on first use (on the calling thread's current device).
inline resources& get(local_world& w) {
  std::call_once(w.device_once, [&] {
    auto res = std::make_shared<resources>();
    cuda_check(cudaGetDevice(&res->device));
    for (int r = 0; r < w.n; ++r) res->transfer.push_back(res->create());
    res->collective = res->create();
    std::vector<void*> streams(std::size_t(w.n), nullptr);
    for (int r = 0; r < w.n; ++r) {
      if (w.parent) {
        streams[std::size_t(r)] = rank_stream(*w.parent, w.parent_ranks[std::size_t(r)]);
      } else {
        std::lock_guard lock(w.mutex);
        streams[std::size_t(r)] = w.streams[std::size_t(r)];
      }
      if (streams[std::size_t(r)] == nullptr) streams[std::size_t(r)] = res->create();
    }
    std::lock_guard lock(w.mutex);
    w.streams = std::move(streams);
    w.device = std::static_pointer_cast<void>(res);
  });
  return *static_cast<resources*>(w.device.get());
}

/// The stream rank r's device operations are ordered on (a split world's rank uses its parent rank's).
inline cudaStream_t rank_stream(local_world& w, int r) {
  get(w);
  std::lock_guard lock(w.mutex);
  return static_cast<cudaStream_t>(w.streams[std::size_t(r)]);
}

inline std::shared_ptr<void> new_event() {
  cudaEvent_t e = nullptr;
  cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return std::shared_ptr<void>(static_cast<void*>(e), [](void* p) { cudaEventDestroy(static_cast<cudaEvent_t>(p)); });
}

inline cudaEvent_t as_event(const std::shared_ptr<void>& e) { return static_cast<cudaEvent_t>(e.get()); }

/// Makes `stream` wait for `event`: how wait() orders a rank's stream after its operation (stored in local_op).
inline void join(void* stream, void* event) {
  cuda_check(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event), 0));
}

/// At posting: records `ready` on rank r's stream and tells op how to join that stream later.
inline void prepare(local_world& w, int r, local_op& op, std::shared_ptr<void>& ready) {
  cudaStream_t s = rank_stream(w, r);
  ready = new_event();
  cuda_check(cudaEventRecord(as_event(ready), s));
  op.stream = s;
  op.join = &join;
}

/// Copies a matched send into its recv on the receiver's transfer stream.
template <class T>
std::shared_ptr<void> move(local_world& w, const local_p2p_entry& send, const local_p2p_entry& recv) {
  resources& res = get(w);
  cudaStream_t s = res.transfer[std::size_t(recv.op->rank)];
  cuda_check(cudaStreamWaitEvent(s, as_event(send.ready), 0));
  cuda_check(cudaStreamWaitEvent(s, as_event(recv.ready), 0));
  const auto src = as_view<const T, device_space>(send.buf);
  const auto dst = as_view<T, device_space>(recv.buf);
  if (src.numel() > 0) cuda_check(cudaMemcpyAsync(dst.data(), src.data(), src.bytes(), cudaMemcpyDeviceToDevice, s));
  auto done = new_event();
  cuda_check(cudaEventRecord(as_event(done), s));
  return done;
}

/// The ranks' buffers, as a kernel parameter.
template <class T>
struct pointers {
  T* p[max_ranks];
};

/// In place: every rank's element i becomes op over the ranks' element i.
template <class T>
__global__ void all_reduce_kernel(pointers<T> bufs, int n, std::int64_t count, reduce_op op) {
  using A = local_accum_t<T>;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    A acc = A(bufs.p[0][i]);
    for (int r = 1; r < n; ++r) acc = local_combine(acc, A(bufs.p[r][i]), op);
    if (op == reduce_op::avg) acc = acc / A(n);
    const T v = T(acc);
    for (int r = 0; r < n; ++r) bufs.p[r][i] = v;
  }
}

/// outs[r][i] = op over q of ins[q][r * m + i].
template <class T>
__global__ void reduce_scatter_kernel(pointers<const T> ins, pointers<T> outs, int n, std::int64_t m, reduce_op op) {
  using A = local_accum_t<T>;
  const std::int64_t total = std::int64_t(n) * m;
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = k / m, i = k % m;
    A acc = A(ins.p[0][k]);
    for (int q = 1; q < n; ++q) acc = local_combine(acc, A(ins.p[q][k]), op);
    if (op == reduce_op::avg) acc = acc / A(n);
    outs.p[r][i] = T(acc);
  }
}

/// outs[r][q * m + i] = ins[q][i].
template <class T>
__global__ void all_gather_kernel(pointers<const T> ins, pointers<T> outs, int n, std::int64_t m) {
  const std::int64_t per_rank = std::int64_t(n) * m, total = std::int64_t(n) * per_rank;
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t r = k / per_rank, j = k % per_rank;
    outs.p[r][j] = ins.p[j / m][j % m];
  }
}

/// Runs a matched collective on the world's collective stream after every rank's ready event.
template <class T>
std::shared_ptr<void> collective(local_world& w, const std::vector<local_coll_entry>& es) {
  resources& res = get(w);
  cudaStream_t s = res.collective;
  const int n = w.n;
  const local_op& op = *es[0].op;
  for (const auto& e : es) cuda_check(cudaStreamWaitEvent(s, as_event(e.ready), 0));
  pointers<const T> ins{};
  pointers<T> outs{};
  for (int r = 0; r < n; ++r) {
    ins.p[r] = static_cast<const T*>(es[std::size_t(r)].in.data);
    outs.p[r] = static_cast<T*>(es[std::size_t(r)].out.data);
  }
  const std::int64_t m = op.numel;
  if (m > 0) {
    if (op.kind == local_kind::broadcast) {
      for (int r = 0; r < n; ++r)
        if (r != op.peer)
          cuda_check(
              cudaMemcpyAsync(outs.p[r], outs.p[op.peer], std::size_t(m) * sizeof(T), cudaMemcpyDeviceToDevice, s));
    } else if (op.kind == local_kind::all_gather) {
      const std::int64_t total = std::int64_t(n) * n * m;
      all_gather_kernel<T><<<cuda_detail::grid_for(total), cuda_detail::block_threads, 0, s>>>(ins, outs, n, m);
      cuda_check_launch();
    } else if constexpr (local_reducible_v<T>) {
      if (op.kind == local_kind::all_reduce) {
        all_reduce_kernel<T><<<cuda_detail::grid_for(m), cuda_detail::block_threads, 0, s>>>(outs, n, m, op.rop);
        cuda_check_launch();
      } else if (op.kind == local_kind::reduce_scatter) {
        reduce_scatter_kernel<T>
            <<<cuda_detail::grid_for(std::int64_t(n) * m), cuda_detail::block_threads, 0, s>>>(ins, outs, n, m, op.rop);
        cuda_check_launch();
      }
    }
  }
  auto done = new_event();
  cuda_check(cudaEventRecord(as_event(done), s));
  return done;
}

}  // namespace subspace::comm::detail::cuda_local
