#pragma once
// Small helpers the training examples share: human-readable numbers and durations for progress lines, and the
// bf16 dense peak of well-known GPUs (for MFU).

#include <algorithm>
#include <cstdio>
#include <string>

namespace examples {

/// 1.23G, 4.56M, 7.8k, 12: a count or rate for a progress line.
inline std::string human(double x) {
  char buf[32];
  if (x >= 1e9) std::snprintf(buf, sizeof buf, "%.2fG", x / 1e9);
  else if (x >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM", x / 1e6);
  else if (x >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk", x / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f", x);
  return buf;
}

/// 1h02m or 3m07s.
inline std::string duration(double s) {
  char buf[32];
  const long t = long(std::max(0.0, s) + 0.5);
  if (t >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", t / 3600, t / 60 % 60);
  else std::snprintf(buf, sizeof buf, "%ldm%02lds", t / 60, t % 60);
  return buf;
}

/// The bf16 dense peak of the GPU in TFLOP/s for MFU (0: unknown).
inline double peak_tflops_of(const std::string& device) {
  if (device.find("H100") != std::string::npos && device.find("PCIe") != std::string::npos) return 756.0;
  if (device.find("H100") != std::string::npos || device.find("H200") != std::string::npos ||
      device.find("H800") != std::string::npos || device.find("GH200") != std::string::npos)
    return 989.4;
  if (device.find("A100") != std::string::npos) return 312.0;
  return 0.0;
}

}  // namespace examples
