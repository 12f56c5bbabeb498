#pragma once
// compress::subspace_projection on exec::cuda: U and E_fix in device memory, and the wire rounding.
//
// Each device gets, on first use, Uᵀ as a contiguous [k, d] fp32 tensor (the kernels read it through its
// transposed view, U [d, k], so a warp's loads of U coalesce) and, when the fixed embedding is materialised, the
// fp32 E_fix table [V, d] filled on the device. Both are complete before the first call returns (a blocking copy,
// a synchronised fill), so any stream may use them; they live as long as the compressor and its copies.

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <type_traits>

#include "../../../core/cuda/error.cuh"
#include "../../../core/cuda/executor.cuh"
#include "../../../core/cuda/memory.cuh"
#include "../../../kernels/elementwise.hpp"
#include "../../../kernels/fixed_embedding.hpp"
#include "../../subspace_projection.hpp"

namespace subspace::compress::detail {

/// One device's copies of the tables.
struct subspace_device_tables {
  device_tensor<float> basis_t;  // Uᵀ [k, d]
  device_tensor<float> table;    // E_fix [V, d] when materialised, else empty
};

/// The current device's copies, made on first use.
inline const subspace_device_tables& device_tables(const subspace_tables& t, const exec::cuda& ex) {
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  const std::lock_guard lock(t.device_mutex);
  std::shared_ptr<void>& slot = t.on_device[device];
  if (!slot) {
    const subspace_projection_options& o = t.options;
    auto made = std::make_shared<subspace_device_tables>();
    host_tensor<float> transposed({o.k, o.d_model});
    for (std::int64_t i = 0; i < o.d_model; ++i)
      for (std::int64_t j = 0; j < o.k; ++j) transposed(j, i) = t.basis(i, j);
    made->basis_t = device_tensor<float>(transposed.shape());
    cuda_check(cudaMemcpy(made->basis_t.data(), transposed.data(), transposed.bytes(), cudaMemcpyHostToDevice));
    if (o.materialise_fixed_embedding) {
      made->table = device_tensor<float>({o.vocab, o.d_model});
      fill_fixed_embedding(ex, o.fixed_embedding_seed, made->table.v());
      ex.synchronize();
    }
    slot = made;
  }
  return *static_cast<const subspace_device_tables*>(slot.get());
}

template <>
struct subspace_on<exec::cuda> {
  template <class T>
  static view<const float, device_space> basis(const subspace_tables& t, const exec::cuda& ex) {
    static_assert(!std::is_same_v<T, double>, "compress::subspace_projection (CUDA): activations are float or bf16");
    return view<const float, device_space>(device_tables(t, ex).basis_t.v()).transposed();
  }

  static fixed_embedding<device_space> fixed(const subspace_tables& t, const exec::cuda& ex) {
    const subspace_projection_options& o = t.options;
    fixed_embedding<device_space> e{o.fixed_embedding_seed, o.vocab, o.d_model, {}};
    if (o.materialise_fixed_embedding) e.table = device_tables(t, ex).table.v();
    return e;
  }

  /// values <- values rounded to the wire type, where that is narrower than T: only fp32 values on a bf16 wire
  /// (bf16 activations are never wider than the wire).
  template <class T>
  static void round_to_wire(wire_dtype wire, const exec::cuda& ex, view<T, device_space> values) {
    if constexpr (std::is_same_v<T, float>) {
      if (wire != wire_dtype::bf16 || values.numel() == 0) return;
      cuda_detail::stream_scratch memory(std::size_t(values.numel()) * sizeof(bf16), ex.stream);
      const view<bf16, device_space> narrow(memory.as<bf16>(), values.shape());
      cast(ex, view<const float, device_space>(values), narrow);
      cast(ex, view<const bf16, device_space>(narrow), values);
    }
  }
};

}  // namespace subspace::compress::detail
