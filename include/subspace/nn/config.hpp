#pragma once
// Llama 3 model configuration and the named presets (tests, benchmarks, the papers' models).

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/checked.hpp"
#include "../core/error.hpp"
#include "../kernels/rope_config.hpp"

namespace subspace::nn {

/// Rotary position embedding: defined with the kernel that reads it (kernels/rope_config.hpp).
using rope_config = subspace::rope_config;

struct llama_config {
  std::string name = "custom";
  std::int64_t vocab = 256;
  std::int64_t d_model = 64;
  std::int64_t n_layers = 2;
  std::int64_t n_heads = 4;
  std::int64_t n_kv_heads = 2;
  std::int64_t ffn_hidden = 172;
  std::int64_t max_seq = 256;
  float norm_eps = 1e-5f;
  bool tied_embeddings = false;  // LM head shares the token embedding when true
  rope_config rope{};

  std::int64_t head_dim() const { return d_model / n_heads; }
  std::int64_t kv_dim() const { return head_dim() * n_kv_heads; }

  /// Throws invalid_argument naming the field and the expected value when the configuration is unusable.
  void validate() const {
    const auto need = [&](bool ok, auto&& what) {  // what: a literal, or a callable building the text
      require(ok, [&] {
        if constexpr (std::is_invocable_v<decltype(what)>) return "llama_config '" + name + "': " + what();
        else return "llama_config '" + name + "': " + std::string(what);
      });
    };
    need(vocab > 0 && d_model > 0 && n_layers > 0 && n_heads > 0 && n_kv_heads > 0 && ffn_hidden > 0 && max_seq > 0,
         "vocab, d_model, n_layers, n_heads, n_kv_heads, ffn_hidden and max_seq must be positive");
    need(d_model % n_heads == 0, [&] {
      return "d_model (" + std::to_string(d_model) + ") must be divisible by n_heads (" + std::to_string(n_heads) + ")";
    });
    need(n_heads % n_kv_heads == 0, [&] {
      return "n_heads (" + std::to_string(n_heads) + ") must be a multiple of n_kv_heads (" +
             std::to_string(n_kv_heads) + ")";
    });
    need(head_dim() % 2 == 0, [&] { return "head_dim (" + std::to_string(head_dim()) + ") must be even for RoPE"; });
    // Every tensor, one sequence's activations and the whole model stay within max_elements (core/checked.hpp),
    // so nothing downstream multiplies sizes into an overflow.
    const auto within = [&](std::optional<std::int64_t> elements, const char* product, auto... factors) {
      need(elements.has_value(), [&] {
        std::string values;
        for (const std::int64_t f : {std::int64_t(factors)...})
          values += (values.empty() ? "" : " · ") + std::to_string(f);
        return std::string(product) + " = " + values + " exceeds 2^48 elements";
      });
    };
    within(checked_product(vocab, d_model), "vocab · d_model", vocab, d_model);
    within(checked_product(ffn_hidden, d_model), "ffn_hidden · d_model", ffn_hidden, d_model);
    within(checked_product(max_seq, d_model), "max_seq · d_model", max_seq, d_model);
    within(checked_product(d_model, d_model), "d_model · d_model", d_model, d_model);
    within(checked_product(n_layers, layer_parameters()), "n_layers · (parameters per layer)", n_layers,
           layer_parameters());
    need(checked_add(n_layers * layer_parameters(), (tied_embeddings ? 1 : 2) * vocab * d_model + d_model).has_value(),
         [&] { return "the parameters exceed 2^48 elements"; });
    need(norm_eps > 0, "norm_eps must be positive");
    need(rope.theta > 0, "rope.theta must be positive");
  }

  /// Parameters of one transformer block: q, o, k, v, the SwiGLU's three matrices and two norm gains.
  std::int64_t layer_parameters() const {
    const std::int64_t attn = d_model * d_model * 2 + d_model * kv_dim() * 2;  // q, o, k, v
    const std::int64_t mlp = 3 * d_model * ffn_hidden;
    const std::int64_t norms = 2 * d_model;
    return attn + mlp + norms;
  }
  /// Parameters in the transformer blocks, the final norm and the LM head — everything but the token
  /// embedding (an untied LM head counts; a tied one is the embedding). The N of FLOP/token = 6N + 12 L d T.
  std::int64_t non_embedding_parameters() const {
    return n_layers * layer_parameters() + d_model + vocab * d_model;  // + final norm + LM head
  }
  std::int64_t parameters() const { return non_embedding_parameters() + (tied_embeddings ? 0 : vocab * d_model); }
  /// Training FLOP per token at sequence length t: 6 N + 12 L d t (attention scores and values, fwd + bwd).
  double flops_per_token(std::int64_t t) const {
    return 6.0 * double(non_embedding_parameters()) + 12.0 * double(n_layers * d_model * t);
  }
};

namespace presets {

/// A few thousand parameters: gradient checks in double on the host.
inline llama_config micro() { return {"micro", 32, 16, 2, 4, 2, 24, 16, 1e-5f, false, {10000.0f}}; }
/// Byte-level vocabulary, small enough for the CPU demo and CI.
inline llama_config tiny() { return {"tiny", 256, 128, 4, 4, 2, 344, 256, 1e-5f, false, {500000.0f}}; }
/// GaLore/GoLore's 60M comparison model (hidden 512, FFN 1376, 8 layers, 8 heads, 32k vocabulary, T 256).
inline llama_config llama_60m() { return {"60m", 32000, 512, 8, 8, 8, 1376, 256, 1e-5f, false, {500000.0f}}; }
inline llama_config llama_124m() { return {"124m", 50304, 768, 12, 12, 4, 2048, 1024, 1e-5f, false, {500000.0f}}; }
inline llama_config llama_1b() { return {"1b", 50304, 2048, 16, 32, 8, 8192, 2048, 1e-5f, false, {500000.0f}}; }
/// The Subspace Networks base model (d 4096, 8 layers, 32 / 8 heads, FFN 11008, context 1024).
inline llama_config llama_2b() { return {"2b", 50304, 4096, 8, 32, 8, 11008, 1024, 1e-5f, false, {500000.0f}}; }

inline std::vector<std::string> names() { return {"micro", "tiny", "60m", "124m", "1b", "2b"}; }

/// The preset called `name`; invalid_argument listing the known names otherwise.
inline llama_config by_name(const std::string& name) {
  if (name == "micro") return micro();
  if (name == "tiny") return tiny();
  if (name == "60m") return llama_60m();
  if (name == "124m") return llama_124m();
  if (name == "1b") return llama_1b();
  if (name == "2b") return llama_2b();
  std::string known;
  for (const auto& n : names()) known += (known.empty() ? "" : ", ") + n;
  throw invalid_argument("unknown Llama preset '" + name + "' (known: " + known + ")");
}

}  // namespace presets
}  // namespace subspace::nn
