#pragma once
// batch_loader: batches of next-token-prediction windows from a token_dataset.
//
// Every segment of the dataset is cut into non-overlapping windows of seq + 1 tokens that start every seq
// tokens (window j of a segment covers tokens [j seq, j seq + seq]); a window never crosses a segment boundary
// (the end of a file or of an in-memory array). Row b of a batch is one window: tokens[b] = window[0, seq),
// targets[b] = window[1, seq + 1).
//
// An epoch visits the windows in order (sequential) or in a permutation (shuffled): a Fisher-Yates shuffle
// whose draws are Philox4x32-10 blocks of (seed, offset = shuffle_stream | epoch), so epoch e's order is a pure
// function of (seed, e) — the same on every machine and after a resume. A batch takes the next `batch` windows;
// when fewer remain, the epoch ends (the tail is skipped) and the next one starts.
//
// position() is everything needed to continue exactly: (epoch, cursor) plus the seed, the shuffle flag and the
// window count, which seek() checks so that a resume on different data or settings fails clearly.

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "../util/json.hpp"
#include "tokens.hpp"

namespace subspace::data {

/// Philox offsets used by the loader's shuffles: this tag in the high 16 bits, the epoch below.
inline constexpr std::uint64_t shuffle_stream = std::uint64_t(0xD47A) << 48;

struct loader_options {
  std::int64_t batch = 8;        // rows per batch (B)
  std::int64_t seq = 256;        // tokens per row (S)
  std::int64_t vocab = 256;      // every token must be below this
  bool shuffle = false;          // window order: sequential or a seeded permutation per epoch
  std::uint64_t seed = 0;        // the permutation's Philox seed
  bool check_all_tokens = true;  // scan every token against vocab at construction (else while batching)
  std::string name = "train";    // for messages ("train", "val")
};

/// Where a loader continues; saved in checkpoints.
struct loader_position {
  std::uint64_t epoch = 0;
  std::uint64_t cursor = 0;   // windows of this epoch already used
  std::uint64_t windows = 0;  // windows per epoch (checked on seek)
  bool shuffle = false;       // checked on seek
  std::uint64_t seed = 0;     // checked on seek

  friend bool operator==(const loader_position&, const loader_position&) = default;

  io::json to_json() const {
    return io::json::object({{"epoch", io::json(epoch)},
                             {"cursor", io::json(cursor)},
                             {"windows", io::json(windows)},
                             {"shuffle", io::json(shuffle)},
                             {"seed", io::json(std::to_string(seed))}});
  }
  static loader_position from_json(const io::json& j) {
    loader_position p;
    require(j.is_object(),
            [&] { return "loader_position: expected a JSON object, got " + std::string(j.kind_name()); });
    const auto u64 = [&](const char* key) {
      const io::json& v = j.at(key);
      require(v.is_int() && v.as_int() >= 0,
              [&] { return std::string("loader_position: \"") + key + "\" must be a non-negative integer"; });
      return std::uint64_t(v.as_int());
    };
    p.epoch = u64("epoch");
    p.cursor = u64("cursor");
    p.windows = u64("windows");
    p.shuffle = j.at("shuffle").as_bool();
    const std::string& s = j.at("seed").as_string();
    const std::optional<std::uint64_t> seed = parse_unsigned(s);
    require(seed.has_value(), [&] {
      return "loader_position: \"seed\" must be a decimal string of an unsigned 64-bit integer, got \"" + s + "\"";
    });
    p.seed = *seed;
    return p;
  }
};

/// Host tensors of one batch: tokens and targets, both [batch, seq] int32.
struct token_batch {
  host_tensor<std::int32_t> tokens, targets;
};

class batch_loader {
 public:
  batch_loader(token_dataset data, loader_options options) : data_(std::move(data)), o_(std::move(options)) {
    const std::string who = "batch_loader (" + o_.name + "): ";
    require(o_.batch >= 1, [&] { return who + "batch must be >= 1, got " + std::to_string(o_.batch); });
    require(o_.seq >= 1, [&] { return who + "seq must be >= 1, got " + std::to_string(o_.seq); });
    require(o_.vocab >= 1, [&] { return who + "vocab must be >= 1, got " + std::to_string(o_.vocab); });
    const std::uint64_t seq = std::uint64_t(o_.seq);
    for (const auto& s : data_.segments()) {
      const std::uint64_t n = s.size() >= seq + 1 ? (s.size() - 1) / seq : 0;
      starts_.push_back(windows_);
      windows_ += n;
    }
    require(windows_ >= std::uint64_t(o_.batch), [&] {
      return who + data_.describe() + ": " + std::to_string(data_.tokens()) + " tokens make " +
             std::to_string(windows_) + " windows of seq + 1 = " + std::to_string(seq + 1) +
             " tokens, one batch needs " + std::to_string(o_.batch) + " (at least " +
             std::to_string(std::uint64_t(o_.batch) * seq + 1) +
             " tokens in one file or in-memory array: a window never crosses one)";
    });
    require(windows_ < (std::uint64_t(1) << 32), [&] {
      return who + std::to_string(windows_) + " windows per epoch is more than this loader indexes (2^32)";
    });
    if (o_.check_all_tokens) data_.check_vocab(o_.vocab);
    start_epoch(0);
  }

  const loader_options& options() const { return o_; }
  const token_dataset& dataset() const { return data_; }
  /// Windows of seq + 1 tokens per epoch.
  std::uint64_t windows() const { return windows_; }
  /// Full batches per epoch.
  std::uint64_t batches_per_epoch() const { return windows_ / std::uint64_t(o_.batch); }

  /// Fills tokens and targets ([batch, seq] int32 host views) with the next batch and advances.
  void next(view<std::int32_t, host_space> tokens, view<std::int32_t, host_space> targets) {
    const shape want{o_.batch, o_.seq};
    require(tokens.shape() == want && targets.shape() == want, [&] {
      return "batch_loader (" + o_.name + ")::next: tokens and targets must be " + to_string(want) + ", got " +
             to_string(tokens.shape()) + " and " + to_string(targets.shape());
    });
    require(tokens.is_contiguous() && targets.is_contiguous(),
            [&] { return "batch_loader (" + o_.name + ")::next: tokens and targets must be contiguous"; });
    if (pos_.cursor + std::uint64_t(o_.batch) > windows_) start_epoch(pos_.epoch + 1);
    const std::size_t seq = std::size_t(o_.seq);
    row_.resize(seq + 1);
    for (std::int64_t b = 0; b < o_.batch; ++b) {
      read_window(window_at(pos_.cursor + std::uint64_t(b)), row_.data());
      std::int32_t* t = tokens.data() + std::size_t(b) * seq;
      std::int32_t* y = targets.data() + std::size_t(b) * seq;
      for (std::size_t i = 0; i < seq; ++i) {
        t[i] = row_[i];
        y[i] = row_[i + 1];
      }
    }
    pos_.cursor += std::uint64_t(o_.batch);
  }
  token_batch next() {
    token_batch b{host_tensor<std::int32_t>({o_.batch, o_.seq}), host_tensor<std::int32_t>({o_.batch, o_.seq})};
    next(b.tokens.v(), b.targets.v());
    return b;
  }

  /// The window used at position k of the current epoch's order.
  std::uint64_t window_at(std::uint64_t k) const { return o_.shuffle ? order_[std::size_t(k)] : k; }
  /// The seq + 1 tokens of window w.
  void read_window(std::uint64_t w, std::int32_t* out) const {
    const std::size_t s = segment_of(w);
    const auto& seg = data_.segments()[s];
    seg.source->read(seg.begin + (w - starts_[s]) * std::uint64_t(o_.seq), std::size_t(o_.seq) + 1, out, o_.vocab);
  }

  loader_position position() const { return pos_; }
  /// Continues from `p` (from position() of a loader on the same data and options).
  void seek(const loader_position& p) {
    const std::string who = "batch_loader (" + o_.name + ")::seek: ";
    require(p.windows == windows_, [&] {
      return who + "the saved position is for " + std::to_string(p.windows) + " windows per epoch, this data gives " +
             std::to_string(windows_) + " (different data, sequence length or split?)";
    });
    require(p.shuffle == o_.shuffle, [&] {
      return who + std::string("the saved position is for a ") + (p.shuffle ? "shuffled" : "sequential") +
             " loader, this one is " + (o_.shuffle ? "shuffled" : "sequential");
    });
    require(!o_.shuffle || p.seed == o_.seed, [&] {
      return who + "the saved position is for shuffle seed " + std::to_string(p.seed) + ", this loader has " +
             std::to_string(o_.seed);
    });
    require(p.cursor <= windows_, [&] {
      return who + "cursor " + std::to_string(p.cursor) + " beyond " + std::to_string(windows_) + " windows";
    });
    start_epoch(p.epoch);
    pos_.cursor = p.cursor;
  }
  /// Back to the start of epoch 0 (e.g. before each validation pass).
  void reset() { start_epoch(0); }

 private:
  void start_epoch(std::uint64_t epoch) {
    pos_ = loader_position{epoch, 0, windows_, o_.shuffle, o_.shuffle ? o_.seed : 0};
    if (!o_.shuffle) return;
    if (order_epoch_ == epoch && !order_.empty()) return;
    order_.resize(std::size_t(windows_));
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = std::uint32_t(i);
    const std::uint64_t offset = shuffle_stream | epoch;
    for (std::uint64_t i = windows_ - 1; i >= 1; --i) {
      const rng::u32x4 r = rng::bits4(o_.seed, offset, i);
      const std::uint64_t bits = (std::uint64_t(r.v[0]) << 32) | r.v[1];
      const auto j = std::uint64_t((static_cast<unsigned __int128>(bits) * (i + 1)) >> 64);  // uniform in [0, i]
      std::swap(order_[std::size_t(i)], order_[std::size_t(j)]);
    }
    order_epoch_ = epoch;
  }
  std::size_t segment_of(std::uint64_t w) const {
    // the last segment whose first window is <= w (segments without windows share their start with the next)
    std::size_t lo = 0, hi = starts_.size();
    while (hi - lo > 1) {
      const std::size_t mid = (lo + hi) / 2;
      if (starts_[mid] <= w) lo = mid;
      else hi = mid;
    }
    return lo;
  }

  token_dataset data_;
  loader_options o_;
  std::vector<std::uint64_t> starts_;  // first global window of each segment
  std::uint64_t windows_ = 0;
  loader_position pos_{};
  std::vector<std::uint32_t> order_;
  std::uint64_t order_epoch_ = ~std::uint64_t(0);
  std::vector<std::int32_t> row_;
};

}  // namespace subspace::data
