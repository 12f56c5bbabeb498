#pragma once
// The bucket plan of the data-parallel trainers (dist::data_parallel_trainer, decent::gossip_trainer), the cursor
// that launches buckets as the backward completes them, and dist::trainer_options.
//
// A rank's parameters live in one nn::parameter_store: one flat allocation, each tensor padded, the padding zero.
// A model's backward reports finished gradients as ranges of store tensors (ready(first, last)); an nn::llama
// reports them from the last tensor towards the first. So the gradient-ready order is known without a tracing
// iteration, and a run of consecutive tensors is one contiguous range of the flat storage.
//
// bucket_plan cuts the tensors, in reverse storage order, into buckets of about `bucket_bytes` bytes of fp32 (the
// payload: fp32 master parameters for gossip, fp32 gradients for data parallelism on the GPU): a bucket takes
// whole tensors while its span stays within bucket_bytes; a tensor larger than that alone forms its own bucket; a
// tensor is never split. Bucket k covers tensors [first, last) and the flat elements [begin, end) =
// [offset(first), offset(last)), trailing padding included, so consecutive buckets tile the flat storage without
// gaps. Every tensor starts on a multiple of 32 elements (the store pads to 128), so every bucket does too.
//
// Bucket 0 holds the last tensors of storage (the final norm and the LM head) and usually completes first; the
// last bucket holds the embedding. bucket_cursor marks the ranges the backward reports and hands out buckets in
// plan order once all their tensors are final — every rank launches its collectives in the same order, whatever
// order its tensors complete in (a compressor's tensors, declared last, may complete in the middle). A tied LM head
// is the embedding, which completes last, so it sits in the bucket that becomes ready last.
//
// Every rank must cut the same plan. hash() digests (names, shapes, offsets, plan); check_same_plan(comm, plan,
// who) all-gathers it at trainer construction and, when the ranks disagree, raises subspace::invalid_argument on
// every rank naming the first differing tensor as each rank sees it.

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <subspace/comm/concepts.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/train/trainer.hpp>

namespace subspace::dist {

/// The options of the data-parallel trainers: the single-device trainer's (clip, schedule) plus the bucket size.
/// `clip` is the global gradient-norm clip of data_parallel_trainer and the per-bucket clip of gossip_trainer.
struct trainer_options : train::trainer_options {
  std::int64_t bucket_bytes = 25'000'000;  // about this many bytes of fp32 per bucket (25 MB, as PyTorch DDP)

  /// Throws invalid_argument naming the field and the expected value.
  void validate() const {
    train::trainer_options::validate();
    require(bucket_bytes >= 1,
            [&] { return "trainer_options: bucket_bytes must be >= 1, got " + std::to_string(bucket_bytes); });
  }
};

/// One bucket: parameters [first, last) in storage order, flat elements [begin, end).
struct bucket {
  std::size_t first = 0, last = 0;
  std::int64_t begin = 0, end = 0;

  std::int64_t numel() const { return end - begin; }
  std::size_t tensors() const { return last - first; }
  /// Bytes of the bucket in elements of `element_bytes` (fp32 by default).
  std::uint64_t bytes(std::size_t element_bytes = sizeof(float)) const {
    return std::uint64_t(numel()) * element_bytes;
  }

  friend bool operator==(const bucket&, const bucket&) = default;
};

/// The cut of a model's flat parameter storage into buckets, in gradient-ready order; see the top of this file.
class bucket_plan {
 public:
  /// Every tensor starts on a multiple of this many elements.
  static constexpr std::int64_t alignment = 32;

  /// A parameter tensor as the plan sees it.
  struct tensor_entry {
    std::string name;
    subspace::shape shape{};
    std::int64_t offset = 0;  // first element in the flat storage
  };

  bucket_plan() = default;

  /// Cuts `tensors` (storage order, ascending aligned offsets; `total` elements in all) into buckets of at most
  /// `bucket_bytes` bytes of fp32 unless a single tensor is larger.
  bucket_plan(std::vector<tensor_entry> tensors, std::int64_t total, std::int64_t bucket_bytes)
      : tensors_(std::move(tensors)), total_(total), bucket_bytes_(bucket_bytes) {
    const std::string who = "dist::bucket_plan: ";
    subspace::require(bucket_bytes >= 1,
                      [&] { return who + "bucket_bytes must be >= 1, got " + std::to_string(bucket_bytes); });
    subspace::require(!tensors_.empty(), [&] { return who + "the model has no parameters"; });
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      const tensor_entry& t = tensors_[i];
      const std::int64_t next = i + 1 < tensors_.size() ? tensors_[i + 1].offset : total_;
      subspace::require(t.offset % alignment == 0, [&] {
        return who + "tensor '" + t.name + "' starts at element " + std::to_string(t.offset) + ", not a multiple of " +
               std::to_string(alignment);
      });
      subspace::require(t.offset >= 0 && t.offset + t.shape.numel() <= next, [&] {
        return who + "tensor '" + t.name + "' of shape " + subspace::to_string(t.shape) + " at element " +
               std::to_string(t.offset) + " overlaps the next tensor or the end (" + std::to_string(next) + ")";
      });
    }
    subspace::require(tensors_.front().offset == 0,
                      [&] { return who + "the first tensor must start the flat storage"; });

    // Walk the ready order (last tensor first); close a bucket when the next tensor would push it over the size.
    const auto span = [&](std::size_t i) {
      return (i + 1 < tensors_.size() ? tensors_[i + 1].offset : total_) - tensors_[i].offset;
    };
    bucket current{tensors_.size(), tensors_.size(), total_, total_};
    for (std::size_t i = tensors_.size(); i-- > 0;) {
      const std::int64_t grown = (current.numel() + span(i)) * std::int64_t(sizeof(float));
      if (current.tensors() > 0 && grown > bucket_bytes_) {
        buckets_.push_back(current);
        current = bucket{i + 1, i + 1, current.begin, current.begin};
      }
      current.first = i;
      current.begin = tensors_[i].offset;
    }
    buckets_.push_back(current);
    bucket_of_.assign(tensors_.size(), 0);
    for (std::size_t k = 0; k < buckets_.size(); ++k)
      for (std::size_t i = buckets_[k].first; i < buckets_[k].last; ++i) bucket_of_[i] = k;
  }

  /// The plan of a parameter store (nn/parameters.hpp), or of a model's (its parameters()).
  template <class Params>
  static bucket_plan of(const Params& params, std::int64_t bucket_bytes) {
    const auto& store = [&]() -> const auto& {
      if constexpr (requires { params.parameters(); }) return params.parameters();
      else return params;
    }();
    std::vector<tensor_entry> tensors;
    for (std::size_t i = 0; i < store.size(); ++i)
      tensors.push_back({store.info(i).name, store.info(i).shape, store.offset(i)});
    return bucket_plan(std::move(tensors), store.total(), bucket_bytes);
  }

  /// The buckets in ready order: buckets()[0] completes first in backward.
  const std::vector<bucket>& buckets() const { return buckets_; }
  std::size_t size() const { return buckets_.size(); }
  const bucket& operator[](std::size_t k) const { return buckets_.at(k); }
  auto begin() const { return buckets_.begin(); }
  auto end() const { return buckets_.end(); }

  /// The tensors in storage order.
  const std::vector<tensor_entry>& tensors() const { return tensors_; }
  /// Elements of the flat storage the buckets tile.
  std::int64_t total() const { return total_; }
  std::int64_t bucket_bytes() const { return bucket_bytes_; }
  /// The bucket that holds tensor i.
  std::size_t bucket_of(std::size_t i) const { return bucket_of_.at(i); }

  /// A digest of tensor i as the model defines it: name, shape and offset in the flat storage.
  std::uint64_t tensor_hash(std::size_t i) const {
    const tensor_entry& t = tensors_.at(i);
    fnv h;
    h.add(t.name);
    h.add(std::uint64_t(t.shape.rank));
    for (int d = 0; d < t.shape.rank; ++d) h.add(std::uint64_t(t.shape[d]));
    h.add(std::uint64_t(t.offset));
    return h.value;
  }
  /// A digest of tensor i's place in the plan: its bucket and that bucket's tensors.
  std::uint64_t placement_hash(std::size_t i) const {
    const std::size_t k = bucket_of_.at(i);
    fnv h;
    h.add(std::uint64_t(k));
    h.add(std::uint64_t(buckets_[k].first));
    h.add(std::uint64_t(buckets_[k].last));
    return h.value;
  }
  /// A digest of the whole plan: every tensor_hash and placement_hash, the length and the bucket count.
  std::uint64_t hash() const {
    fnv h;
    h.add(std::uint64_t(tensors_.size()));
    h.add(std::uint64_t(total_));
    h.add(std::uint64_t(buckets_.size()));
    for (std::size_t i = 0; i < tensors_.size(); ++i) {
      h.add(tensor_hash(i));
      h.add(placement_hash(i));
    }
    return h.value;
  }
  /// "'model.norm.weight' [32] at element 4096 in bucket 0 (elements [4096, 4224))", for messages.
  std::string describe(std::size_t i) const {
    const tensor_entry& t = tensors_.at(i);
    const bucket& b = buckets_[bucket_of_[i]];
    return "'" + t.name + "' " + subspace::to_string(t.shape) + " at element " + std::to_string(t.offset) +
           " in bucket " + std::to_string(bucket_of_[i]) + " (elements [" + std::to_string(b.begin) + ", " +
           std::to_string(b.end) + "))";
  }

 private:
  /// 64-bit FNV-1a: a digest that is the same on every machine (no std::hash).
  struct fnv {
    std::uint64_t value = 0xcbf29ce484222325ull;
    void byte(unsigned char c) {
      value ^= c;
      value *= 0x100000001b3ull;
    }
    void add(std::uint64_t x) {
      for (int k = 0; k < 8; ++k) byte(static_cast<unsigned char>(x >> (8 * k)));
    }
    void add(std::string_view s) {
      add(std::uint64_t(s.size()));
      for (const char c : s) byte(static_cast<unsigned char>(c));
    }
  };

  std::vector<tensor_entry> tensors_;
  std::int64_t total_ = 0;
  std::int64_t bucket_bytes_ = 0;
  std::vector<bucket> buckets_;
  std::vector<std::size_t> bucket_of_;  // tensor -> bucket
};

/// Hands out the buckets of a plan in order as a backward reports its tensors final (ready(first, last)).
class bucket_cursor {
 public:
  explicit bucket_cursor(const bucket_plan& plan) : plan_(&plan), final_(plan.tensors().size(), false) {}

  /// Starts a new backward: nothing is final.
  void reset() {
    std::fill(final_.begin(), final_.end(), false);
    next_ = 0;
  }
  /// Marks tensors [first, last) final and calls launch(k) for each bucket that is now complete, in plan order.
  template <class Launch>
  void ready(std::size_t first, std::size_t last, Launch&& launch) {
    require(first <= last && last <= final_.size(), [&] {
      return "dist::bucket_cursor: ready range [" + std::to_string(first) + ", " + std::to_string(last) +
             ") is outside the plan's " + std::to_string(final_.size()) + " tensors";
    });
    std::fill(final_.begin() + std::ptrdiff_t(first), final_.begin() + std::ptrdiff_t(last), true);
    while (next_ < plan_->size() && complete((*plan_)[next_])) launch(next_++);
  }
  /// Every bucket was handed out.
  bool done() const { return next_ == plan_->size(); }
  std::size_t launched() const { return next_; }

 private:
  bool complete(const bucket& b) const {
    for (std::size_t i = b.first; i < b.last; ++i)
      if (!final_[i]) return false;
    return true;
  }

  const bucket_plan* plan_;
  std::vector<bool> final_;
  std::size_t next_ = 0;
};

namespace detail {

/// Text packed 8 characters to a uint64 (fixed width, truncated), so ranks can all-gather descriptions.
inline constexpr std::size_t packed_words = 32;

inline std::vector<std::uint64_t> pack_text(const std::string& s) {
  std::vector<std::uint64_t> out(packed_words, 0);
  for (std::size_t i = 0; i < std::min(s.size(), packed_words * 8); ++i)
    out[i / 8] |= std::uint64_t(static_cast<unsigned char>(s[i])) << (8 * (i % 8));
  return out;
}
inline std::string unpack_text(const std::uint64_t* words) {
  std::string s;
  for (std::size_t i = 0; i < packed_words * 8; ++i) {
    const char c = char((words[i / 8] >> (8 * (i % 8))) & 0xff);
    if (c == '\0') break;
    s += c;
  }
  return s;
}

/// The request C's all_reduce returns for a view<T, S>.
template <class C, class T, class S>
using all_reduce_request_t =
    std::remove_cvref_t<decltype(std::declval<C&>().all_reduce(std::declval<view<T, S>>(), comm::reduce_op::sum))>;

/// The mean of `x` over the ranks of `comm` (collective; host memory).
template <class C>
double mean_over_ranks(C& comm, double x) {
  double buf = x;
  comm.all_reduce(view<double, host_space>(&buf, {1}), comm::reduce_op::avg).wait();
  return buf;
}

/// All-gathers `mine` (host memory) over `comm`: element [r * mine.size() + k] is rank r's element k.
template <class C>
std::vector<std::uint64_t> all_gather_host(C& comm, const std::vector<std::uint64_t>& mine) {
  const auto n = std::size_t(comm.size());
  std::vector<std::uint64_t> all(n * mine.size());
  comm.all_gather(subspace::view<const std::uint64_t, subspace::host_space>(mine.data(), {std::int64_t(mine.size())}),
                  subspace::view<std::uint64_t, subspace::host_space>(all.data(), {std::int64_t(all.size())}))
      .wait();
  return all;
}

}  // namespace detail

/// Collective over `comm`: returns when every rank holds the same plan; otherwise raises invalid_argument on every
/// rank, naming the first tensor where the ranks differ as each rank sees it. `who` starts the message.
template <class C>
void check_same_plan(C& comm, const bucket_plan& plan, const std::string& who) {
  const int n = comm.size();
  const std::size_t count = plan.tensors().size();
  const std::vector<std::uint64_t> summary =
      detail::all_gather_host(comm, {plan.hash(), std::uint64_t(count), std::uint64_t(plan.bucket_bytes())});
  bool same = true;
  std::size_t most = 0;
  for (int r = 0; r < n; ++r) {
    same = same && summary[std::size_t(3 * r)] == summary[0];
    most = std::max(most, std::size_t(summary[std::size_t(3 * r + 1)]));
  }
  if (same) return;

  // The first tensor the models define differently; when the models agree, the first one placed differently.
  // (A missing tensor digests as 0.) Tensor digests come first: a changed shape moves the bucket boundaries of
  // the tensors stored before it, and the message should name the changed tensor.
  std::vector<std::uint64_t> digests(2 * most, 0);
  for (std::size_t i = 0; i < count; ++i) {
    digests[i] = plan.tensor_hash(i);
    digests[most + i] = plan.placement_hash(i);
  }
  const std::vector<std::uint64_t> all = detail::all_gather_host(comm, digests);
  const auto differs = [&](int r, std::size_t j) { return all[std::size_t(r) * 2 * most + j] != all[j]; };
  std::size_t first = most, column = 0;  // column j = first (tensor digests) or most + first (placements)
  for (std::size_t j = 0; j < 2 * most && first == most; ++j)
    for (int r = 1; r < n; ++r)
      if (differs(r, j)) {
        first = j % most;
        column = j;
        break;
      }

  // Everyone describes that tensor; every rank builds the same message.
  const std::string mine = first == most   ? std::string("(all tensors agree)")
                           : first < count ? plan.describe(first)
                                           : std::string("(none)");
  const std::vector<std::uint64_t> texts = detail::all_gather_host(comm, detail::pack_text(mine));
  std::string message = who + ": the ranks' models or bucket plans differ";
  if (first < most) {
    message += " at parameter " + std::to_string(first) + ": rank 0 has " + detail::unpack_text(texts.data());
    for (int r = 1; r < n; ++r)
      if (differs(r, column))
        message += "; rank " + std::to_string(r) + " has " +
                   detail::unpack_text(texts.data() + std::size_t(r) * detail::packed_words);
  }
  message += " (bucket_bytes:";
  for (int r = 0; r < n; ++r) message += " " + std::to_string(summary[std::size_t(3 * r + 2)]);
  message += "). Every rank must build the same model with the same bucket_bytes.";
  subspace::require(false, message);
}

}  // namespace subspace::dist
