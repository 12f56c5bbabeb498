#pragma once
// pipeline::any_schedule: one of the pipeline schedules, chosen at run time by name (a command-line flag): a
// Scheduler whose plans are those of the schedule it holds.
//
//   pipeline::any_schedule s("1f1b", /*microbatches*/ 8, /*stages*/ 4);       // gpipe, 1f1b, interleaved, zb
//   pipeline::any_schedule s("interleaved", 8, 4, /*virtual stages*/ 2);

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "../core/error.hpp"
#include "../schedule/concepts.hpp"
#include "gpipe.hpp"
#include "interleaved.hpp"
#include "one_f_one_b.hpp"
#include "zero_bubble.hpp"

namespace subspace::pipeline {

class any_schedule {
 public:
  using plan_type = std::vector<schedule::action>;

  /// The schedule `name` (gpipe, 1f1b, interleaved, zb) of m micro-batches over p stages (v chunks per rank for
  /// interleaved; 1 otherwise). The schedule's own checks apply (e.g. interleaved needs m a multiple of p).
  any_schedule(const std::string& name, int microbatches, int stages, int virtual_stages = 1)
      : s_(make(name, microbatches, stages, virtual_stages)) {}

  plan_type plan(std::int64_t step, int rank) const {
    return std::visit([&](const auto& s) { return s.plan(step, rank); }, s_);
  }
  int world_size() const {
    return std::visit([](const auto& s) { return s.world_size(); }, s_);
  }
  int microbatches() const {
    return std::visit([](const auto& s) { return s.microbatches(); }, s_);
  }
  int chunks() const {
    return std::visit([](const auto& s) { return s.chunks(); }, s_);
  }
  /// The closed-form bubble (idle over compute time, a forward 1 and a backward 2): (p−1)/(v·m), and (p−1)/(3m)
  /// for the zero-bubble plan (its exact value when m >= p).
  double bubble() const {
    const double p = world_size(), m = microbatches(), v = chunks();
    return std::holds_alternative<zero_bubble_h1>(s_) ? (p - 1) / (3 * m) : (p - 1) / (v * m);
  }

 private:
  using any = std::variant<gpipe, one_f_one_b, interleaved_1f1b, zero_bubble_h1>;
  static any make(const std::string& name, int m, int p, int v) {
    require(name == "interleaved" || v == 1, [&] {
      return "pipeline::any_schedule: " + std::to_string(v) + " virtual stages need the interleaved schedule, not '" +
             name + "'";
    });
    if (name == "gpipe") return gpipe{m, p};
    if (name == "1f1b") return one_f_one_b{m, p};
    if (name == "interleaved") return interleaved_1f1b{m, p, v};
    if (name == "zb") return zero_bubble_h1{m, p};
    throw invalid_argument("pipeline::any_schedule: no schedule '" + name + "' (gpipe, 1f1b, interleaved, zb)");
  }
  any s_;
};

static_assert(Scheduler<any_schedule>);

}  // namespace subspace::pipeline
