#pragma once
// metrics_writer: training metrics as JSON Lines — one JSON object per line, flushed as soon as it is written, so
// a crashed or running job leaves a readable file (scripts/plot_metrics.py draws it).
//
// A line holds step, loss, val_loss (only when evaluated), lr, tokens, tok_per_s, wall_s, grad_norm, then any
// extra numeric fields in the order given. Non-finite values are written as null (JSON has no NaN).
//
//   io::metrics_writer m("run/metrics.jsonl");           // truncates; open_mode::append continues a resumed run
//   m.write({.step = 10, .loss = 2.31, .lr = 3e-4, ...});
//   m.write(record, {{"mfu", 0.41}});
//
// A run resumed from a checkpoint of step s first calls truncate_metrics_after(path, s): the lines the
// interrupted run wrote after step s (which the resumed run writes again) and a line torn by a crash or a full disk
// are dropped, so the file holds each step once.

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../util/file.hpp"
#include "../util/json.hpp"

namespace subspace::io {

struct metrics_record {
  std::int64_t step = 0;
  double loss = 0;
  std::optional<double> val_loss;  // written only when set
  double lr = 0;
  std::int64_t tokens = 0;  // training tokens consumed so far
  double tok_per_s = 0;
  double wall_s = 0;     // seconds since the start of the run
  double grad_norm = 0;  // before clipping
};

class metrics_writer {
 public:
  enum class open_mode { truncate, append };

  explicit metrics_writer(const std::filesystem::path& path, open_mode mode = open_mode::truncate) : path_(path) {
    ensure_directory(path.parent_path());
    file_ = std::fopen(path.c_str(), mode == open_mode::append ? "ab" : "wb");
    require(file_ != nullptr, [&, err = errno] {
      return "metrics_writer: cannot open " + detail::quoted(path) + " for writing: " + detail::sys_reason(err);
    });
  }
  metrics_writer(const metrics_writer&) = delete;
  metrics_writer& operator=(const metrics_writer&) = delete;
  ~metrics_writer() {
    if (file_) std::fclose(file_);
  }

  const std::filesystem::path& path() const { return path_; }

  /// Writes one line: the record's fields, then `extra` (name, value) pairs; flushes.
  void write(const metrics_record& r, const std::vector<std::pair<std::string, double>>& extra = {}) {
    json j = json::object({{"step", json(r.step)}, {"loss", json(r.loss)}});
    if (r.val_loss) j.set("val_loss", json(*r.val_loss));
    j.set("lr", json(r.lr));
    j.set("tokens", json(r.tokens));
    j.set("tok_per_s", json(r.tok_per_s));
    j.set("wall_s", json(r.wall_s));
    j.set("grad_norm", json(r.grad_norm));
    for (const auto& [k, v] : extra) {
      require(!j.contains(k),
              [&key = k] { return "metrics_writer: extra field \"" + key + "\" repeats a field of the line"; });
      j.set(k, json(v));
    }
    write(j);
  }
  /// Writes any JSON object as one line; flushes.
  void write(const json& object) {
    require(object.is_object(), "metrics_writer: a line must be a JSON object");
    const std::string line = object.dump() + "\n";
    const bool ok = std::fwrite(line.data(), 1, line.size(), file_) == line.size() && std::fflush(file_) == 0;
    require(ok, [&, err = errno] {
      return "metrics_writer: writing " + detail::quoted(path_) + " failed: " + detail::sys_reason(err);
    });
  }

 private:
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

/// Every line of a JSON Lines file as a JSON value (blank lines skipped); errors name the file and line.
inline std::vector<json> read_jsonl(const std::filesystem::path& path) {
  const std::string text = read_text(path, "JSON Lines file");
  std::vector<json> out;
  std::size_t at = 0, line = 0;
  while (at < text.size()) {
    const std::size_t eol = std::min(text.find('\n', at), text.size());
    ++line;
    const std::string_view s(text.data() + at, eol - at);
    at = eol + 1;
    if (s.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    out.push_back(json::parse(s, detail::quoted(path) + " line " + std::to_string(line)));
  }
  return out;
}

/// Drops the lines of the JSON Lines file `path` that a run resumed at step `step` writes again: every line whose
/// "step" exceeds `step`, and every line that is not a complete JSON object (the torn last line of a run killed or
/// out of disk space while writing); the other lines keep their bytes and order. The file is rewritten atomically;
/// a missing file is left missing. Returns the number of lines dropped.
inline std::size_t truncate_metrics_after(const std::filesystem::path& path, std::int64_t step) {
  if (!std::filesystem::exists(path)) return 0;
  const std::string text = read_text(path, "metrics file");
  std::string kept;
  std::size_t dropped = 0;
  for (std::size_t at = 0; at < text.size();) {
    const std::size_t eol = text.find('\n', at);
    const bool complete = eol != std::string::npos;
    const std::string_view line(text.data() + at, (complete ? eol : text.size()) - at);
    at = complete ? eol + 1 : text.size();
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    bool keep = false;
    if (complete) {
      try {
        const json j = json::parse(line, detail::quoted(path));
        const json* s = j.is_object() ? j.find("step") : nullptr;
        keep = j.is_object() && !(s && s->is_int() && s->as_int() > step);
      } catch (const invalid_argument&) {
        keep = false;
      }
    }
    if (!keep) {
      ++dropped;
      continue;
    }
    kept.append(line);
    kept.push_back('\n');
  }
  if (dropped > 0) atomic_write_text(path, kept);
  return dropped;
}

}  // namespace subspace::io
