#pragma once
// Token ids on the wire: int32 ids packed into `width` little-endian bytes each (2 when every id is below 65536,
// 4 otherwise), and unpacked back. A boundary that sends token ids beside its payload (a subspace network's)
// halves their bytes this way when the vocabulary allows.
//
//   pack_token_ids(ex, ids[N], bytes[N·width], width)     ids outside [0, 2^(8·width)) raise invalid_argument
//   unpack_token_ids(ex, bytes[N·width], ids[N], width)     naming the position (CUDA: checked when unpacking)

#include <cstdint>
#include <string>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/tensor.hpp"

namespace subspace {

namespace detail::token_ids {
inline void check(std::int64_t ids, std::int64_t bytes, int width, const char* op) {
  require(width == 2 || width == 4,
          [&] { return std::string(op) + ": width must be 2 or 4 bytes, got " + std::to_string(width); });
  require(bytes == ids * width, [&] {
    return std::string(op) + ": " + std::to_string(ids) + " ids need " + std::to_string(ids * width) + " bytes, got " +
           std::to_string(bytes);
  });
}
}  // namespace detail::token_ids

/// bytes[width·i ..] = ids[i], little-endian (contiguous views).
inline void pack_token_ids(const exec::host&, view<const std::int32_t, host_space> ids,
                           view<std::uint8_t, host_space> bytes, int width) {
  detail::token_ids::check(ids.numel(), bytes.numel(), width, "pack_token_ids");
  for (std::int64_t i = 0; i < ids.numel(); ++i) {
    const std::int32_t t = ids.data()[i];
    if (t < 0 || (width == 2 && t > 0xffff)) [[unlikely]]
      throw invalid_argument("pack_token_ids: id " + std::to_string(t) + " at position " + std::to_string(i) +
                             " does not fit " + std::to_string(width) + " unsigned bytes");
    const auto u = std::uint32_t(t);
    for (int b = 0; b < width; ++b) bytes.data()[i * width + b] = std::uint8_t(u >> (8 * b));
  }
}

/// ids[i] = the little-endian value of bytes[width·i ..].
inline void unpack_token_ids(const exec::host&, view<const std::uint8_t, host_space> bytes,
                             view<std::int32_t, host_space> ids, int width) {
  detail::token_ids::check(ids.numel(), bytes.numel(), width, "unpack_token_ids");
  for (std::int64_t i = 0; i < ids.numel(); ++i) {
    std::uint32_t u = 0;
    for (int b = 0; b < width; ++b) u |= std::uint32_t(bytes.data()[i * width + b]) << (8 * b);
    ids.data()[i] = std::int32_t(u);
  }
}

}  // namespace subspace

#if defined(__CUDACC__)
#include "detail/cuda/token_ids.cuh"
#endif
