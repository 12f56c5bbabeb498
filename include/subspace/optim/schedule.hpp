#pragma once
// Training-schedule utilities: the learning-rate schedule and global gradient-norm clipping.
//
// lr_schedule, for the 1-based optimizer step t (step_context::step):
//   warmup   t <= warmup_steps:        peak_lr * t / warmup_steps              (linear from peak/warmup to peak)
//   decay    warmup_steps < t <= total: with r = (t - warmup_steps) / (total_steps - warmup_steps) in (0, 1]
//              cosine:   min_lr + (peak_lr - min_lr) * (1 + cos(pi r)) / 2
//              linear:   peak_lr - (peak_lr - min_lr) * r
//              constant: peak_lr
//   after    t > total_steps:          min_lr (peak_lr for constant)
// So the first step runs at peak/warmup, step warmup_steps at the peak, and step total_steps at min_lr.
//
// grad_norm(ex, grads): the global L2 norm over every gradient view (squared_norm per view, summed in double).
// clip_factor(norm, max_norm): max_norm / (norm + 1e-6) when max_norm > 0 and the norm exceeds it, else 1 (as
// torch.nn.utils.clip_grad_norm_); the trainers hand it to the optimizer as step_context::grad_scale.
// clip_grad_norm(ex, grads, max_norm): the norm, with every gradient scaled in memory by the factor. Returns the
// norm before clipping. A non-finite norm leaves the gradients untouched (the caller decides whether to skip the
// step).

#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>

#include "../core/error.hpp"
#include "../kernels/elementwise.hpp"
#include "../kernels/reduce.hpp"

namespace subspace::optim {

enum class decay_kind { cosine, linear, constant };

namespace detail {
/// The shortest decimal form of x that reads back as the same float ("0.001", "3e-05"), for messages.
inline std::string show(float x) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, x);
  return std::string(buf, r.ptr);
}
}  // namespace detail

inline const char* name_of(decay_kind d) {
  switch (d) {
    case decay_kind::cosine: return "cosine";
    case decay_kind::linear: return "linear";
    case decay_kind::constant: return "constant";
  }
  return "?";
}
/// "cosine", "linear" or "constant"; invalid_argument listing them otherwise.
inline decay_kind parse_decay(std::string_view s) {
  if (s == "cosine") return decay_kind::cosine;
  if (s == "linear") return decay_kind::linear;
  if (s == "constant") return decay_kind::constant;
  throw invalid_argument("lr schedule: unknown decay '" + std::string(s) + "' (expected cosine, linear or constant)");
}

struct lr_schedule {
  float peak_lr = 3e-4f;
  float min_lr = 3e-5f;
  std::int64_t warmup_steps = 0;
  std::int64_t total_steps = 1;
  decay_kind decay = decay_kind::cosine;

  /// Throws invalid_argument naming the field and the expected range.
  void validate() const {
    // `what` builds the message only when the check fails (validate() runs on every at()).
    const auto need = [](bool ok, const auto& what) { require(ok, [&] { return "lr schedule: " + what(); }); };
    need(std::isfinite(peak_lr) && peak_lr > 0,
         [&] { return "peak_lr must be a positive number, got " + detail::show(peak_lr); });
    need(std::isfinite(min_lr) && min_lr >= 0 && min_lr <= peak_lr, [&] {
      return "min_lr must lie in [0, peak_lr = " + detail::show(peak_lr) + "], got " + detail::show(min_lr);
    });
    need(total_steps >= 1, [&] { return "total_steps must be >= 1, got " + std::to_string(total_steps); });
    need(warmup_steps >= 0 && warmup_steps <= total_steps, [&] {
      return "warmup_steps must lie in [0, total_steps = " + std::to_string(total_steps) + "], got " +
             std::to_string(warmup_steps);
    });
  }

  /// The learning rate of 1-based optimizer step `step`.
  float at(std::int64_t step) const {
    validate();
    require(step >= 1, [&] { return "lr schedule: steps are 1-based, got " + std::to_string(step); });
    const double peak = peak_lr, lo = min_lr;
    if (step <= warmup_steps) return float(peak * double(step) / double(warmup_steps));
    if (decay == decay_kind::constant) return peak_lr;
    if (step >= total_steps) return min_lr;
    const double r = double(step - warmup_steps) / double(total_steps - warmup_steps);
    if (decay == decay_kind::linear) return float(peak - (peak - lo) * r);
    return float(lo + (peak - lo) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * r)));
  }
};

/// The sum of squares of every element of `grads` (a range of views in the executor's memory space), in double.
template <class Exec, class Range>
double grad_squares(const Exec& ex, const Range& grads) {
  double total = 0;
  for (const auto& g : grads) total += double(subspace::squared_norm(ex, g));
  return total;
}

/// The global L2 norm of `grads`.
template <class Exec, class Range>
double grad_norm(const Exec& ex, const Range& grads) {
  return std::sqrt(grad_squares(ex, grads));
}

/// The factor that scales gradients of global norm `norm` to max_norm when it exceeds it (max_norm <= 0: no
/// clipping), else 1; 1 for a non-finite norm.
inline float clip_factor(double norm, double max_norm) {
  require(!std::isnan(max_norm), "clip_factor: max_norm is NaN (expected a number; <= 0 disables clipping)");
  return max_norm > 0 && std::isfinite(norm) && norm > max_norm ? float(max_norm / (norm + 1e-6)) : 1.0f;
}

/// The global L2 norm of `grads` before clipping; scales them in memory to max_norm when it is exceeded. See the
/// top of this file.
template <class Exec, class Range>
double clip_grad_norm(const Exec& ex, const Range& grads, double max_norm) {
  const double norm = grad_norm(ex, grads);
  const float factor = clip_factor(norm, max_norm);
  if (factor != 1.0f)
    for (const auto& g : grads) subspace::scale(ex, factor, g);
  return norm;
}

}  // namespace subspace::optim
