#pragma once
// The selective SSM's kernels on CUDA (the host versions in kernels/scan.hpp are their reference). Values are
// bf16 or fp32, everything is computed in fp32 and every scan carries its state in a register.
//
//   norms               one warp per row
//   element-wise        grid-stride over the elements
//   column_sums         one thread per column, walking the rows (adjacent threads read adjacent columns)
//   scan_forward,       one pass: a block takes a tile of one sequence, 16 channels by 1024 tokens for 16-bit
//   scan_reverse        values (512 for fp32) in 4-channel vectors; each thread loads 16 rows (8) of one vector
//                       into registers, 16-bit values packed two a register, and composes them into an affine map
//                       s ↦ A s + X (fp32); the block scans its segments' maps and finds the state entering the
//                       tile by decoupled look-back over the tiles before it, 32 at a time (tile numbers come from
//                       a ticket, so a tile waits only on running tiles); every thread then rescans its registers.
//                       Each input is read once and each output written once.
//   scan_window         one thread per (sequence, token, channel): its window of at most W terms

#include <cuda_runtime.h>
#include <cuda/atomic>

#include <cstdint>
#include <string>

#include <subspace/core/cuda/error.cuh>
#include <subspace/core/cuda/memory.cuh>
#include <subspace/kernels/detail/cuda/layer_common.cuh>

#include "../../scan.hpp"

namespace adjoint {
namespace cuda_detail::scan {

using subspace::cuda_detail::layer::warp_sum;
inline constexpr int warps_per_block = 8;
inline constexpr unsigned threads = 256;

inline unsigned blocks_for(std::int64_t items) {
  const std::int64_t b = (items + threads - 1) / threads;
  return unsigned(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

template <class T>
__global__ void unit_norm_forward(const T* y, T* yhat, float* rstd, std::int64_t n, std::int64_t P, float eps) {
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; row < n;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    float ss = 0;
    for (std::int64_t j = lane; j < P; j += 32) ss += float(y[row * P + j]) * float(y[row * P + j]);
    const float r = __frcp_rn(__fsqrt_rn(warp_sum(ss) / float(P) + eps));
    if (lane == 0) rstd[row] = r;
    for (std::int64_t j = lane; j < P; j += 32) yhat[row * P + j] = T(float(y[row * P + j]) * r);
  }
}

template <class T>
__global__ void unit_norm_backward(const T* yhat, const float* rstd, const T* dyhat, T* dy, std::int64_t n,
                                   std::int64_t P) {
  const int lane = int(threadIdx.x % 32);
  for (std::int64_t row = std::int64_t(blockIdx.x) * warps_per_block + threadIdx.x / 32; row < n;
       row += std::int64_t(gridDim.x) * warps_per_block) {
    float dot = 0;
    for (std::int64_t j = lane; j < P; j += 32) dot += float(dyhat[row * P + j]) * float(yhat[row * P + j]);
    const float c = warp_sum(dot) / float(P), r = rstd[row];
    for (std::int64_t j = lane; j < P; j += 32) {
      const std::int64_t i = row * P + j;
      dy[i] = T(float(dy[i]) + r * (float(dyhat[i]) - float(yhat[i]) * c));
    }
  }
}

template <class T>
__global__ void add_rows(const T* bias, T* x, std::int64_t n, std::int64_t m) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * m;
       i += std::int64_t(gridDim.x) * blockDim.x)
    x[i] = T(float(x[i]) + float(bias[i % m]));
}

template <class T, class G>
__global__ void column_sums(const T* dx, G* db, std::int64_t n, std::int64_t m) {
  for (std::int64_t j = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < m;
       j += std::int64_t(gridDim.x) * blockDim.x) {
    float s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += float(dx[i * m + j]);
    db[j] = G(float(db[j]) + s);
  }
}

template <class T>
__global__ void sigmoid_rows(const T* u, const T* bias, T* a, std::int64_t n, std::int64_t m) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * m;
       i += std::int64_t(gridDim.x) * blockDim.x)
    a[i] = T(1.0f / (1.0f + expf(-(float(u[i]) + float(bias[i % m])))));
}

template <class T>
__global__ void gate_backward(const T* a, const T* abar, T* du, std::int64_t count) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const float s = float(a[i]);
    du[i] = T(float(abar[i]) * s * (1.0f - s));
  }
}

template <class T>
__global__ void shifted_product(const T* mu, const T* h, T* out, std::int64_t n, std::int64_t N, std::int64_t seq) {
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * N;
       i += std::int64_t(gridDim.x) * blockDim.x)
    out[i] = (i / N) % seq == 0 ? T(0.0f) : T(float(mu[i]) * float(h[i - N]));
}

/// Vector columns (of 4 channels) per tile. Narrow tiles are long: each tile's look-back reads every channel's map
/// of the tiles still unresolved before it, as many as run at once, so it costs about as much as the tile's own
/// data unless tiles are hundreds of tokens long. On an H100 (N 64 and 256) 4 columns beat 2, 8, 16 and 32 in
/// both directions and dtypes; 1 column, less than a 32-byte sector of each row, falls behind. Tiles over whole
/// 64-channel rows (512-thread blocks) scan 1–3 points slower, although their loads alone reach 92% of the copy
/// bandwidth against 76% for these 32-byte slices of each row.
inline constexpr int tile_columns = 4;

/// Tiles whose flags one look-back round reads at once (a warp's lanes).
inline constexpr int lookback = 32;

/// Rows each scan thread holds in registers: a thread scans `rows_per_thread` consecutive tokens of `V` channels.
/// Longer tiles spread the block's scan and look-back over more bytes: in a sweep on an H100 (launches back to
/// back), bf16 at 16 rows moved 51% of the copy bandwidth against 45% at 8 and 34% at 4, two or three blocks an SM
/// alike (bench_ssm, alternating with a copy, measures 49–50% at 16). fp32 rows take twice the registers, and 16
/// of them would not fit two blocks an SM.
template <class T>
inline constexpr int rows_per_thread = sizeof(T) == 4 ? 8 : 16;

/// Scan blocks an SM holds at once: the registers are bounded to fit them, so that while one block waits in its
/// look-back another one's loads keep the memory busy.
inline constexpr int scan_blocks_per_sm = 2;

/// V values loaded or stored as one vector.
template <class T, int V>
struct alignas(sizeof(T) * V) pack {
  T v[V];
};

/// V values of T in registers, packed into 32-bit words where they fill them (two bf16 or fp16 a word): the scan
/// holds 2 · rows_per_thread of these through its look-back, and one 16-bit value per register would double them.
template <class T, int V, bool Words = (sizeof(T) * V) % 4 == 0>
struct row_values {
  static constexpr int count = int(sizeof(T)) * V / 4;
  unsigned w[count];
  __device__ static row_values load(const T* p) {
    return __builtin_bit_cast(row_values, *reinterpret_cast<const pack<T, V>*>(p));
  }
  __device__ void store(T* p) const { *reinterpret_cast<pack<T, V>*>(p) = __builtin_bit_cast(pack<T, V>, *this); }
  __device__ static row_values fill(float f) {
    row_values r;
    for (int v = 0; v < V; ++v) r.set(v, f);
    return r;
  }
  __device__ float get(int v) const {
    if constexpr (sizeof(T) == 4) return __uint_as_float(w[v]);
    else return float(T::from_bits(std::uint16_t(w[v / 2] >> (16 * (v % 2)))));
  }
  __device__ void set(int v, float f) {
    if constexpr (sizeof(T) == 4) w[v] = __float_as_uint(f);
    else {
      const unsigned bits = T(f).bits, shift = 16 * (v % 2);
      w[v / 2] = (w[v / 2] & ~(0xffffu << shift)) | (bits << shift);
    }
  }
};

template <class T, int V>
struct row_values<T, V, false> {  // a single 16-bit value
  pack<T, V> p;
  __device__ static row_values load(const T* q) { return {*reinterpret_cast<const pack<T, V>*>(q)}; }
  __device__ void store(T* q) const { *reinterpret_cast<pack<T, V>*>(q) = p; }
  __device__ static row_values fill(float f) {
    row_values r;
    for (int v = 0; v < V; ++v) r.p.v[v] = T(f);
    return r;
  }
  __device__ float get(int v) const { return float(p.v[v]); }
  __device__ void set(int v, float f) { p.v[v] = T(f); }
};

/// How the single-pass scan tiles [seqs · seq, N]: a tile is `segments() · rows` tokens of one sequence
/// and `cols · V` channels (one channel group). The tiles of one (sequence, group) form a chain along the sequence;
/// the status slots are numbered (chain, tile along the sequence), the last fastest.
struct scan_tiling {
  std::int64_t seqs, seq, N;
  int cols;                    // vector columns per tile
  int rows;                    // rows per thread
  int block;                   // threads per block
  std::int64_t groups;         // channel groups across N
  std::int64_t tiles_per_seq;  // tiles along one sequence
  __host__ __device__ int segments() const { return block / cols; }
  __host__ __device__ std::int64_t tile_tokens() const { return std::int64_t(segments()) * rows; }
  __host__ __device__ std::int64_t tiles() const { return seqs * groups * tiles_per_seq; }
};

/// What the decoupled look-back reads: per tile, `flag` 0 (nothing yet), 1 (the tile's own maps, per channel, in
/// `aggregate`) or 2 (also the states leaving the tile, from the sequence's start, in `inclusive`); the ticket
/// hands out tile numbers in the order blocks start, so every tile waits only on tiles already running.
struct scan_status {
  int* flag;
  float2* aggregate;
  float* inclusive;
  unsigned* ticket;
};

__device__ inline void publish(int& flag, int value) {
  cuda::atomic_ref<int, cuda::thread_scope_device>(flag).store(value, cuda::memory_order_release);
}

__device__ inline int await(int& flag) {
  const cuda::atomic_ref<int, cuda::thread_scope_device> f(flag);
  int value;
  while ((value = f.load(cuda::memory_order_acquire)) == 0) {
  }
  return value;
}

/// The single-pass scan. Forward: h_t = a_t h_{t−1} + x_t from h_{−1} = 0. Reverse: μ_t = x_t + a_{t+1} μ_{t+1}
/// from μ_{seq} = 0, walked as a forward scan over the reversed sequence whose coefficients are `a` one token later
/// (each thread loads its `a` rows one row back along the walk).
/// Each thread loads its rows once into registers and composes them into one affine map s ↦ A s + X; the block
/// scans its segments' maps in shared memory; the block then finds the state entering the tile by decoupled
/// look-back over the tiles before it; and every thread rescans its registers from its entering state.
template <class T, int V, bool Reverse, int R = rows_per_thread<T>, int MinBlocks = scan_blocks_per_sm,
          int Block = int(threads), int Columns = tile_columns>
__global__ void __launch_bounds__(Block, MinBlocks)
    scan_tiles(const T* a, const T* x, T* out, scan_tiling z, scan_status st) {
  using vec = row_values<T, V>;
  __shared__ unsigned tile_number;
  __shared__ float seg_A[Block * V], seg_X[Block * V];  // per (segment, channel): its map, then its prefix
  __shared__ float tile_A[Columns * V], tile_X[Columns * V], entering[Columns * V];
  __shared__ float2 window_maps[lookback * Columns * V];
  __shared__ int window;  // tiles in the look-back window, negated while none of them knows its leaving state

  if (threadIdx.x == 0) tile_number = atomicAdd(st.ticket, 1u);
  __syncthreads();
  // Tickets go round the chains (sequence, group) first, so the tiles running at once spread over all of them
  // and each look-back passes fewer tiles still unresolved.
  const std::int64_t chains = z.seqs * z.groups, chain = tile_number % chains, j = tile_number / chains,
                     g = chain % z.groups, b = chain / z.groups, tile = chain * z.tiles_per_seq + j;
  const int S = z.segments(), CG = z.cols * V, col = int(threadIdx.x) % z.cols, s = int(threadIdx.x) / z.cols;
  const std::int64_t channel = (g * z.cols + col) * V, p0 = j * z.tile_tokens() + std::int64_t(s) * R;
  const bool active = s < S && channel < z.N;
  // This thread's channels of walk position p0 + r lie at row_offset + r * row_step.
  const std::int64_t row_offset = (b * z.seq + (Reverse ? z.seq - 1 - p0 : p0)) * z.N + channel,
                     row_step = Reverse ? -z.N : z.N;
  const int rows_here = active ? int(min(std::int64_t(R), z.seq - p0)) : 0;  // rows before the sequence's end

  // Reverse: the coefficient of walk position p is `a` at walk position p − 1 (zero at p = 0), one row back.
  const std::int64_t coef_offset = row_offset - (Reverse ? row_step : 0);
  vec coef[R], in[R];  // rows past the sequence (and idle threads) are the identity map
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (r < rows_here) {
      coef[r] = Reverse && p0 + r == 0 ? vec::fill(0.0f) : vec::load(a + coef_offset + r * row_step);
      in[r] = vec::load(x + row_offset + r * row_step);
    } else {
      coef[r] = vec::fill(1.0f), in[r] = vec::fill(0.0f);
    }
  }

#pragma unroll
  for (int v = 0; v < V; ++v) {
    float A = 1, X = 0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float c = coef[r].get(v);
      X = c * X + in[r].get(v);
      A *= c;
    }
    if (s < S) {
      seg_A[s * CG + col * V + v] = A;
      seg_X[s * CG + col * V + v] = X;
    }
  }
  __syncthreads();

  // Each warp scans the segments of some channels, 32 segments a round; the prefix of segment s is the map of
  // segments 0 .. s − 1 (composition: the later map applied after the earlier).
  const int lane = int(threadIdx.x) % 32;
  for (int ch = int(threadIdx.x) / 32; ch < CG; ch += Block / 32) {
    float carry_A = 1, carry_X = 0;
    for (int s0 = 0; s0 < S; s0 += 32) {
      const int seg = s0 + lane;
      float A = seg < S ? seg_A[seg * CG + ch] : 1.0f, X = seg < S ? seg_X[seg * CG + ch] : 0.0f;
      for (int off = 1; off < 32; off <<= 1) {
        const float Ap = __shfl_up_sync(0xffffffffu, A, off), Xp = __shfl_up_sync(0xffffffffu, X, off);
        if (lane >= off) {
          X = A * Xp + X;
          A = A * Ap;
        }
      }
      float before_A = __shfl_up_sync(0xffffffffu, A, 1), before_X = __shfl_up_sync(0xffffffffu, X, 1);
      if (lane == 0) before_A = 1, before_X = 0;
      if (seg < S) {
        seg_A[seg * CG + ch] = before_A * carry_A;
        seg_X[seg * CG + ch] = before_A * carry_X + before_X;
      }
      const float last_A = __shfl_sync(0xffffffffu, A, 31), last_X = __shfl_sync(0xffffffffu, X, 31);
      carry_X = last_A * carry_X + last_X;
      carry_A = last_A * carry_A;
    }
    if (lane == 0) tile_A[ch] = carry_A, tile_X[ch] = carry_X;
  }
  __syncthreads();

  // Decoupled look-back. The tile's own maps go out first, so later tiles can pass over it; then warp 0 reads the
  // flags of the 32 tiles before the nearest one not yet composed, all at once, and the block composes their
  // maps up to the nearest tile whose leaving state is known (a tile before the sequence's first leaves zero).
  const int t = int(threadIdx.x);  // the channel this thread composes, where t < CG
  if (j > 0) {
    if (t < CG) st.aggregate[tile * CG + t] = make_float2(tile_A[t], tile_X[t]);
    __threadfence();
    __syncthreads();
    if (t == 0) publish(st.flag[tile], 1);
  }
  const std::int64_t first = tile - j;  // the slot of the chain's first tile
  float acc_A = 1, acc_X = 0;           // the maps composed so far, the nearest tile's applied last
  for (std::int64_t newest = tile - 1; j > 0; newest -= lookback) {
    if (t < 32) {
      const std::int64_t q = newest - lane;
      const unsigned known = __ballot_sync(0xffffffffu, q < first || await(st.flag[q]) == 2);
      if (lane == 0) window = known ? __ffs(int(known)) : -lookback;  // negative: no known state yet
    }
    __syncthreads();
    const int count = window < 0 ? -window : window;
    for (int i = t; i < count * CG; i += Block) {  // the window's maps; a known state s is the map (0, s)
      const int k = i / CG, c = i % CG;
      const std::int64_t q = newest - k;
      window_maps[i] = window > 0 && k == count - 1
                           ? make_float2(0.0f, q < first ? 0.0f : __ldcg(st.inclusive + q * CG + c))
                           : __ldcg(st.aggregate + q * CG + c);
    }
    __syncthreads();
    if (t < CG)
      for (int k = 0; k < count; ++k) {
        const float2 m = window_maps[k * CG + t];
        acc_X = acc_A * m.y + acc_X;
        acc_A = acc_A * m.x;
      }
    const bool done = window > 0;
    __syncthreads();  // window and window_maps are rewritten by the next round
    if (done) break;
  }
  if (t < CG) {
    entering[t] = acc_X;
    st.inclusive[tile * CG + t] = tile_A[t] * acc_X + tile_X[t];
  }
  __threadfence();
  __syncthreads();
  if (t == 0) publish(st.flag[tile], 2);

  if (!active) return;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    const int ch = col * V + v;
    float state = seg_A[s * CG + ch] * entering[ch] + seg_X[s * CG + ch];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      state = coef[r].get(v) * state + in[r].get(v);
      in[r].set(v, state);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (r < rows_here) in[r].store(out + row_offset + r * row_step);
}

template <class T>
__global__ void scan_window(const T* a, const T* w, T* mu, std::int64_t n, std::int64_t seq, std::int64_t N,
                            std::int64_t window) {
  for (std::int64_t k = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n * N;
       k += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t i = (k / N) % seq, end = min(seq, i + window) - i;
    float sum = float(w[k]), running = 1;
    for (std::int64_t d = 1; d < end; ++d) {
      running *= float(a[k + d * N]);
      sum += float(w[k + d * N]) * running;
    }
    mu[k] = T(sum);
  }
}

}  // namespace cuda_detail::scan

using subspace::device_space;

template <class T>
void unit_rmsnorm_forward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> y,
                          float eps, view<T, device_space> yhat, std::type_identity_t<view<float, device_space>> rstd) {
  static_assert(subspace::cuda_detail::layer::is_activation_v<T>,
                "unit_rmsnorm_forward (CUDA): T must be bf16, fp16 or float");
  const std::int64_t n = y.dim(0), P = y.dim(1);
  detail::scan::require_rows(y, n, P, "unit_rmsnorm_forward", "y");
  detail::scan::require_rows(yhat, n, P, "unit_rmsnorm_forward", "yhat");
  subspace::require(rstd.numel() == n, "unit_rmsnorm_forward: rstd must hold one value per row");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::unit_norm_forward<<<subspace::cuda_detail::layer::grid_for_rows(n, S::warps_per_block), 32 * S::warps_per_block, 0,
                         ex.stream>>>(y.data(), yhat.data(), rstd.data(), n, P, eps);
  subspace::cuda_check_launch();
}

template <class T>
void unit_rmsnorm_backward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> yhat,
                           std::type_identity_t<view<const float, device_space>> rstd,
                           std::type_identity_t<view<const T, device_space>> dyhat, view<T, device_space> dy) {
  const std::int64_t n = yhat.dim(0), P = yhat.dim(1);
  detail::scan::require_rows(dyhat, n, P, "unit_rmsnorm_backward", "dyhat");
  detail::scan::require_rows(dy, n, P, "unit_rmsnorm_backward", "dy");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::unit_norm_backward<<<subspace::cuda_detail::layer::grid_for_rows(n, S::warps_per_block), 32 * S::warps_per_block,
                          0, ex.stream>>>(yhat.data(), rstd.data(), dyhat.data(), dy.data(), n, P);
  subspace::cuda_check_launch();
}

template <class T>
void add_rows(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> bias,
              view<T, device_space> x) {
  const std::int64_t n = x.dim(0), m = x.dim(1);
  detail::scan::require_rows(x, n, m, "add_rows", "x");
  subspace::require(bias.numel() == m, "add_rows: bias must hold one value per column");
  if (n * m == 0) return;
  namespace S = cuda_detail::scan;
  S::add_rows<<<S::blocks_for(n * m), S::threads, 0, ex.stream>>>(bias.data(), x.data(), n, m);
  subspace::cuda_check_launch();
}

template <class T, class G>
void column_sums(const subspace::exec::cuda& ex, view<const T, device_space> dx, view<G, device_space> db) {
  const std::int64_t n = dx.dim(0), m = dx.dim(1);
  detail::scan::require_rows(dx, n, m, "column_sums", "dx");
  subspace::require(db.numel() == m, "column_sums: db must hold one value per column");
  if (m == 0) return;
  namespace S = cuda_detail::scan;
  S::column_sums<<<S::blocks_for(m), S::threads, 0, ex.stream>>>(dx.data(), db.data(), n, m);
  subspace::cuda_check_launch();
}

template <class T>
void sigmoid_rows(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> u,
                  std::type_identity_t<view<const T, device_space>> bias, view<T, device_space> a) {
  const std::int64_t n = u.dim(0), m = u.dim(1);
  detail::scan::require_rows(a, n, m, "sigmoid_rows", "a");
  subspace::require(bias.numel() == m, "sigmoid_rows: bias must hold one value per column");
  if (n * m == 0) return;
  namespace S = cuda_detail::scan;
  S::sigmoid_rows<<<S::blocks_for(n * m), S::threads, 0, ex.stream>>>(u.data(), bias.data(), a.data(), n, m);
  subspace::cuda_check_launch();
}

template <class T>
void gate_backward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                   std::type_identity_t<view<const T, device_space>> abar, view<T, device_space> du) {
  detail::scan::require_rows(abar, a.dim(0), a.dim(1), "gate_backward", "abar");
  detail::scan::require_rows(du, a.dim(0), a.dim(1), "gate_backward", "du");
  if (a.numel() == 0) return;
  namespace S = cuda_detail::scan;
  S::gate_backward<<<S::blocks_for(a.numel()), S::threads, 0, ex.stream>>>(a.data(), abar.data(), du.data(), a.numel());
  subspace::cuda_check_launch();
}

/// The single-pass scan (forward or reverse) on [seqs · seq, N]: vectors of 4 channels where N and the pointers
/// allow, single channels otherwise.
template <class T, int V, bool Reverse, int R = cuda_detail::scan::rows_per_thread<T>,
          int MinBlocks = cuda_detail::scan::scan_blocks_per_sm, int Block = int(cuda_detail::scan::threads),
          int Columns = cuda_detail::scan::tile_columns>
void launch_scan_tiles(const subspace::exec::cuda& ex, const T* a, const T* x, T* out, std::int64_t n, std::int64_t seq,
                       std::int64_t N) {
  namespace S = cuda_detail::scan;
  S::scan_tiling z{n / seq, seq, N, 0, R, Block, 0, 0};
  const std::int64_t columns = N / V;
  z.cols = int(columns < Columns ? columns : Columns);
  z.groups = (columns + z.cols - 1) / z.cols;
  z.tiles_per_seq = (seq + z.tile_tokens() - 1) / z.tile_tokens();
  const std::int64_t tiles = z.tiles(), slots = tiles * z.cols * V;
  if (tiles > 0x7fffffff) [[unlikely]]
    throw subspace::invalid_argument("scan: " + std::to_string(tiles) + " tiles exceed the grid's 2^31 − 1 blocks");
  // One allocation: the flags (zeroed each call, with the ticket after them), then the maps and the states.
  const std::size_t flag_bytes = std::size_t(tiles + 1) * sizeof(int), map_offset = (flag_bytes + 15) / 16 * 16,
                    bytes = map_offset + std::size_t(slots) * (sizeof(float2) + sizeof(float));
  const subspace::cuda_detail::stream_scratch scratch(bytes, ex.stream);
  char* base = scratch.as<char>();
  subspace::cuda_check(cudaMemsetAsync(base, 0, flag_bytes, ex.stream));
  const S::scan_status st{reinterpret_cast<int*>(base), reinterpret_cast<float2*>(base + map_offset),
                          reinterpret_cast<float*>(base + map_offset + std::size_t(slots) * sizeof(float2)),
                          reinterpret_cast<unsigned*>(base) + tiles};
  S::scan_tiles<T, V, Reverse, R, MinBlocks, Block, Columns>
      <<<unsigned(tiles), Block, 0, ex.stream>>>(a, x, out, z, st);
  subspace::cuda_check_launch();
}

template <class T, bool Reverse>
void single_pass_scan(const subspace::exec::cuda& ex, const T* a, const T* x, T* out, std::int64_t n, std::int64_t seq,
                      std::int64_t N) {
  constexpr int wide = 4;  // 8 or 16 bytes: 8-channel bf16 vectors measured slower at every tile shape tried
  const auto aligned = [](const void* p) {
    return reinterpret_cast<std::uintptr_t>(p) % alignof(cuda_detail::scan::pack<T, wide>) == 0;
  };
  if (N % wide == 0 && aligned(a) && aligned(x) && aligned(out))
    launch_scan_tiles<T, wide, Reverse>(ex, a, x, out, n, seq, N);
  else launch_scan_tiles<T, 1, Reverse>(ex, a, x, out, n, seq, N);
}

template <class T>
void scan_forward(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                  std::type_identity_t<view<const T, device_space>> x, view<T, device_space> h, std::int64_t seq) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_forward");
  detail::scan::require_rows(x, n, N, "scan_forward", "x");
  detail::scan::require_rows(h, n, N, "scan_forward", "h");
  if (n == 0) return;
  single_pass_scan<T, false>(ex, a.data(), x.data(), h.data(), n, seq, N);
}

template <class T>
void scan_reverse(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                  std::type_identity_t<view<const T, device_space>> w, view<T, device_space> mu, std::int64_t seq) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_reverse");
  detail::scan::require_rows(w, n, N, "scan_reverse", "w");
  detail::scan::require_rows(mu, n, N, "scan_reverse", "mu");
  if (n == 0) return;
  single_pass_scan<T, true>(ex, a.data(), w.data(), mu.data(), n, seq, N);
}

template <class T>
void scan_window(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> a,
                 std::type_identity_t<view<const T, device_space>> w, view<T, device_space> mu, std::int64_t seq,
                 std::int64_t window) {
  const std::int64_t n = a.dim(0), N = a.dim(1);
  detail::scan::require_sequences(a, seq, "scan_window");
  detail::scan::require_rows(w, n, N, "scan_window", "w");
  detail::scan::require_rows(mu, n, N, "scan_window", "mu");
  subspace::require(window > 0,
                    [&] { return "scan_window: the window must be positive, got " + std::to_string(window); });
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::scan_window<<<S::blocks_for(n * N), S::threads, 0, ex.stream>>>(a.data(), w.data(), mu.data(), n, seq, N, window);
  subspace::cuda_check_launch();
}

template <class T>
void shifted_product(const subspace::exec::cuda& ex, std::type_identity_t<view<const T, device_space>> mu,
                     std::type_identity_t<view<const T, device_space>> h, view<T, device_space> out, std::int64_t seq) {
  const std::int64_t n = mu.dim(0), N = mu.dim(1);
  detail::scan::require_sequences(mu, seq, "shifted_product");
  detail::scan::require_rows(h, n, N, "shifted_product", "h");
  detail::scan::require_rows(out, n, N, "shifted_product", "out");
  if (n == 0) return;
  namespace S = cuda_detail::scan;
  S::shifted_product<<<S::blocks_for(n * N), S::threads, 0, ex.stream>>>(mu.data(), h.data(), out.data(), n, N, seq);
  subspace::cuda_check_launch();
}

}  // namespace adjoint
