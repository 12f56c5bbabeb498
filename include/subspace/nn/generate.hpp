#pragma once
// Text generation from a language model with logits() (nn::llama on exec::host or exec::cuda, or a recurrent
// model such as adjoint::selective_ssm).
//
//   nn::sampling s{.temperature = 0.8f, .top_k = 40, .seed = 7};
//   std::vector<std::int32_t> next = nn::generate(model, prompt, 200, s);   // the 200 new tokens only
//
// Each new token comes from model.logits() on the last max_seq tokens of prompt + tokens generated so far (all of
// them for a model without max_seq), at batch 1. There is no KV cache or carried state: the whole window is
// recomputed for every token, so a token costs a full forward pass over the window (and the model's activation buffer
// is resized while the window grows). That is the simple, obviously-correct reference; it is meant for samples and
// checks, not for serving.
//
// Sampling runs on the host in double: the logits are divided by the temperature, restricted to the top_k
// largest (ties broken towards the lower token id), soft-maxed, and token i of the output is drawn by inverse CDF
// (in token-id order) with one uniform from Philox block i of the stream (seed, 0). The draw is therefore a pure
// function of (logits, sampling, i): the host and the CUDA model give the same tokens whenever their logits
// agree, and a seed always reproduces its sample. Temperature 0 is greedy decoding (argmax, lowest id on ties);
// top_k = 1 gives the same tokens as greedy at any positive temperature.

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/rng.hpp"
#include "../core/tensor.hpp"
#include "config.hpp"

namespace subspace::nn {

/// How generate() turns logits into tokens.
struct sampling {
  float temperature = 0.8f;  // 0: greedy argmax; otherwise logits / temperature before the softmax
  std::int64_t top_k = 0;    // 0: sample from the whole vocabulary; k: from the k largest logits (k > V: all)
  std::uint64_t seed = 0;    // Philox seed of the draws
};

namespace detail::gen {

/// Throws unless `s` is usable.
inline void check_sampling(const sampling& s, const char* op) {
  require(s.temperature >= 0.0f && std::isfinite(s.temperature), [&] {
    return std::string(op) + ": sampling.temperature must be a finite number >= 0 (0 = greedy), got " +
           std::to_string(s.temperature);
  });
  require(s.top_k >= 0, [&] {
    return std::string(op) + ": sampling.top_k must be >= 0 (0 = the whole vocabulary), got " + std::to_string(s.top_k);
  });
}

/// A uniform double on [0, 1) with 53 random bits: Philox block `index` of stream (seed, 0), words 0 and 1.
inline double uniform53(std::uint64_t seed, std::uint64_t index) {
  const rng::u32x4 r = rng::bits4(seed, 0, index);
  const std::uint64_t bits = (std::uint64_t(r.v[0]) << 21) ^ (std::uint64_t(r.v[1]) >> 11);
  return double(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

/// Strict total order "more likely first": larger logit, then lower token id.
struct more_likely {
  std::span<const double> logits;
  bool operator()(std::int32_t a, std::int32_t b) const {
    const double la = logits[std::size_t(a)], lb = logits[std::size_t(b)];
    return la > lb || (la == lb && a < b);
  }
};

/// Element type of the logits buffer for a model: its own floating type on the host (so a double model samples
/// from double logits), fp32 in device memory (bf16 weights, fp32 logits).
template <class Model, class = void>
struct logit_type {
  using type = float;
};
template <class Model>
struct logit_type<Model, std::void_t<typename Model::value_type>> {
  using type = std::conditional_t<std::is_same_v<typename Model::space, host_space> &&
                                      std::is_floating_point_v<typename Model::value_type>,
                                  typename Model::value_type, float>;
};
template <class Model>
using logit_t = typename logit_type<Model>::type;

}  // namespace detail::gen

/// The token chosen from one row of logits for output position `index` (see the top of the file): greedy at
/// temperature 0, else a draw from softmax(logits / temperature) restricted to the top_k largest. Throws on a
/// non-finite logit (a diverged model) or bad sampling settings.
inline std::int32_t sample_token(std::span<const double> logits, const sampling& s, std::uint64_t index) {
  detail::gen::check_sampling(s, "sample_token");
  require(!logits.empty(), "sample_token: no logits (the vocabulary is empty)");
  for (std::size_t i = 0; i < logits.size(); ++i)
    require(std::isfinite(logits[i]), [&] {
      return "sample_token: logit of token " + std::to_string(i) + " is " + std::to_string(logits[i]) +
             " (expected finite values; has the model diverged?)";
    });
  const auto vocab = std::int64_t(logits.size());
  const detail::gen::more_likely order{logits};

  std::vector<std::int32_t> ids(logits.size());
  std::iota(ids.begin(), ids.end(), 0);
  if (s.temperature == 0.0f) return *std::min_element(ids.begin(), ids.end(), order);

  // The candidates: the top_k most likely tokens (a unique set, because `order` is a strict total order), in
  // token-id order so the inverse-CDF walk does not depend on how they were selected.
  const std::int64_t k = s.top_k == 0 ? vocab : std::min(s.top_k, vocab);
  if (k < vocab) {
    std::nth_element(ids.begin(), ids.begin() + (k - 1), ids.end(), order);
    ids.resize(std::size_t(k));
    std::sort(ids.begin(), ids.end());
  }
  double top = logits[std::size_t(ids[0])];
  for (const std::int32_t id : ids) top = std::max(top, logits[std::size_t(id)]);
  const double inv_t = 1.0 / double(s.temperature);
  std::vector<double> weight(ids.size());
  double total = 0.0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    weight[i] = std::exp((logits[std::size_t(ids[i])] - top) * inv_t);  // the most likely has weight 1
    total += weight[i];
  }
  const double target = detail::gen::uniform53(s.seed, index) * total;
  double cumulative = 0.0;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    cumulative += weight[i];
    if (target < cumulative) return ids[i];
  }
  // Rounding left target at the very end of the CDF: the last candidate with any weight.
  for (std::size_t i = ids.size(); i-- > 0;)
    if (weight[i] > 0.0) return ids[i];
  return ids.back();  // unreachable: the most likely candidate has weight 1
}

/// What generate() needs of a model: its configuration (vocab; max_seq if bounded), its executor, and the last-position
/// logits of a [B, S] host token view into a [B, V] view of its memory space.
template <class Model>
concept generative_model = requires(Model& m, view<const std::int32_t, host_space> tokens,
                                    view<detail::gen::logit_t<Model>, typename Model::space> out) {
  { m.config().vocab } -> std::convertible_to<std::int64_t>;
  m.executor().synchronize();
  m.logits(tokens, out);
};

/// Generates `new_tokens` tokens after `prompt` and returns them (the prompt is not repeated). See the top of
/// the file for the window, the cost and the sampling. Throws invalid_argument for an empty prompt, a prompt
/// token outside [0, vocab), a negative count, a negative or non-finite temperature or a negative top_k.
template <class Model>
std::vector<std::int32_t> generate(Model& model, std::span<const std::int32_t> prompt, std::int64_t new_tokens,
                                   const sampling& s = {}) {
  static_assert(generative_model<Model>,
                "nn::generate: the model must provide config() (with vocab, and max_seq when its context is bounded), "
                "executor() and "
                "logits(tokens [B, S] host int32 view, out [B, V] view in the model's memory space), like nn::llama");
  using space = typename Model::space;
  using L = detail::gen::logit_t<Model>;

  const auto& cfg = model.config();
  // A model with a bounded context (max_seq) sees the last max_seq tokens; a recurrent one sees them all.
  const auto window_limit = [&] {
    if constexpr (requires { cfg.max_seq; }) return std::int64_t(cfg.max_seq);
    else return std::numeric_limits<std::int64_t>::max();
  }();
  require(!prompt.empty(), "nn::generate: the prompt is empty (expected at least one token to condition on)");
  for (std::size_t i = 0; i < prompt.size(); ++i)
    require(prompt[i] >= 0 && prompt[i] < cfg.vocab, [&] {
      return "nn::generate: prompt token " + std::to_string(prompt[i]) + " at position " + std::to_string(i) +
             " is outside the vocabulary [0, " + std::to_string(cfg.vocab) + ") of '" + cfg.name + "'";
    });
  require(new_tokens >= 0, [&] { return "nn::generate: new_tokens must be >= 0, got " + std::to_string(new_tokens); });
  detail::gen::check_sampling(s, "nn::generate");
  if constexpr (requires { model.position_offset(); })
    require(model.position_offset() == 0, [&] {
      return "nn::generate: the model has position offset " + std::to_string(model.position_offset()) +
             " (expected 0: generation starts its window at position 0)";
    });

  std::vector<std::int32_t> context(prompt.begin(), prompt.end());
  context.reserve(prompt.size() + std::size_t(new_tokens));
  tensor<L, space> logits(shape{1, cfg.vocab});
  host_tensor<L> logits_host;
  if constexpr (!std::is_same_v<space, host_space>) logits_host = host_tensor<L>(shape{1, cfg.vocab});
  std::vector<double> row(std::size_t(cfg.vocab));

  for (std::int64_t i = 0; i < new_tokens; ++i) {
    const auto window = std::min<std::int64_t>(std::int64_t(context.size()), window_limit);
    const view<const std::int32_t, host_space> tokens(context.data() + (std::int64_t(context.size()) - window),
                                                      shape{1, window});
    model.logits(tokens, logits.v());
    const L* values = logits.data();
    if constexpr (!std::is_same_v<space, host_space>) {
      const auto& ex = model.executor();
      copy(ex, view<const L, space>(logits.v()), logits_host.v());
      ex.synchronize();
      values = logits_host.data();
    }
    for (std::size_t v = 0; v < row.size(); ++v) {
      row[v] = double(values[v]);
      require(std::isfinite(row[v]), [&] {
        return "nn::generate: new token " + std::to_string(i) + ": the logit of token " + std::to_string(v) + " is " +
               std::to_string(row[v]) + " (expected finite values; has the model diverged?)";
      });
    }
    context.push_back(sample_token(row, s, std::uint64_t(i)));
  }
  return std::vector<std::int32_t>(context.end() - new_tokens, context.end());
}

}  // namespace subspace::nn
