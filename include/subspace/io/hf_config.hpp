#pragma once
// Hugging Face config.json for LlamaForCausalLM, from and to nn::llama_config.
//
// to_hf_config writes every field transformers' LlamaConfig reads, so `LlamaForCausalLM.from_pretrained(dir)`
// builds the same architecture: sizes, rms_norm_eps, rope_theta, rope_scaling ({"rope_type": "llama3", ...} when
// Llama 3.1 scaling is on, else null), tie_word_embeddings, head_dim, hidden_act "silu", no attention or MLP
// bias. bos/eos token ids are null unless given (a byte vocabulary has no special tokens).
//
// llama_config_from_hf reads such a file back; fields that HF's LlamaConfig defaults are optional with HF's
// defaults (num_key_value_heads = num_attention_heads, rms_norm_eps 1e-6, rope_theta 10000, ...). Anything the
// model cannot represent (another architecture, an activation other than silu, biases, a head_dim other than
// hidden_size / num_attention_heads, a rope_scaling type other than llama3) is an invalid_argument naming the
// file, the field and the expected value. transformers 5's "rope_parameters" (rope_theta and the scaling in one
// object, rope_type "default" or "llama3") is read as well; we write the older form, which both versions read.

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

#include "../core/error.hpp"
#include "../nn/config.hpp"
#include "../util/file.hpp"
#include "../util/json.hpp"
#include "config_io.hpp"

namespace subspace::io {

/// config.json content for `cfg` (a LlamaForCausalLM).
inline json to_hf_config(const nn::llama_config& cfg, const hf_config_options& o = {}) {
  cfg.validate();
  require(o.torch_dtype == "float32" || o.torch_dtype == "bfloat16" || o.torch_dtype == "float16",
          [&] { return "to_hf_config: torch_dtype '" + o.torch_dtype + "' (expected float32, bfloat16 or float16)"; });
  json rope_scaling = nullptr;
  if (cfg.rope.llama31_scaling) {
    rope_scaling = json::object({{"rope_type", json("llama3")},
                                 {"factor", json(cfg.rope.factor)},
                                 {"low_freq_factor", json(cfg.rope.low_freq_factor)},
                                 {"high_freq_factor", json(cfg.rope.high_freq_factor)},
                                 {"original_max_position_embeddings", json(cfg.rope.original_max_position)}});
  }
  const auto id = [](const std::optional<std::int64_t>& v) { return v ? json(*v) : json(nullptr); };
  return json::object({
      {"architectures", json::array({json("LlamaForCausalLM")})},
      {"model_type", json("llama")},
      {"vocab_size", json(cfg.vocab)},
      {"hidden_size", json(cfg.d_model)},
      {"intermediate_size", json(cfg.ffn_hidden)},
      {"num_hidden_layers", json(cfg.n_layers)},
      {"num_attention_heads", json(cfg.n_heads)},
      {"num_key_value_heads", json(cfg.n_kv_heads)},
      {"head_dim", json(cfg.head_dim())},
      {"max_position_embeddings", json(cfg.max_seq)},
      {"rms_norm_eps", json(cfg.norm_eps)},
      {"rope_theta", json(cfg.rope.theta)},
      {"rope_scaling", rope_scaling},
      {"hidden_act", json("silu")},
      {"attention_bias", json(false)},
      {"attention_dropout", json(0.0)},
      {"mlp_bias", json(false)},
      {"tie_word_embeddings", json(cfg.tied_embeddings)},
      {"initializer_range", json(0.02)},
      {"pretraining_tp", json(1)},
      {"use_cache", json(true)},
      {"bos_token_id", id(o.bos_token_id)},
      {"eos_token_id", id(o.eos_token_id)},
      {"torch_dtype", json(o.torch_dtype)},
      {"subspace_name", json(cfg.name)},
  });
}

/// Reads a LlamaForCausalLM config.json document; `source` names it in errors.
inline nn::llama_config llama_config_from_hf(const json& j, std::string_view source = "config.json") {
  const std::string where(source);
  require(j.is_object(), [&] { return where + ": expected a JSON object"; });
  const auto field = [&](const char* key) { return where + ": \"" + key + "\""; };
  const auto integer = [&](const char* key, std::optional<std::int64_t> fallback) -> std::int64_t {
    const json* v = j.find(key);
    if (!v || v->is_null()) {
      require(fallback.has_value(), [&] { return field(key) + " is missing (expected a positive integer)"; });
      return *fallback;
    }
    require(v->is_number(), [&] { return field(key) + " must be a positive integer, got " + v->kind_name(); });
    const double d = v->as_double();
    // Bounded before the conversion: a double at or above 2^63 has no int64 value.
    require(d >= 1 && d < 9.2233720368547758e18 && d == std::floor(d),
            [&] { return field(key) + " must be a positive integer below 2^63, got " + v->dump(); });
    return v->as_int();
  };
  const auto number = [&](const json& parent, const char* key, std::optional<double> fallback) -> float {
    const json* v = parent.find(key);
    if (!v || v->is_null()) {
      require(fallback.has_value(), [&] { return field(key) + " is missing (expected a positive number)"; });
      return float(*fallback);
    }
    // Within float's range: a larger value would become inf and be written back as null, a smaller one (below
    // the least subnormal) would become 0 and be refused when read back.
    require(v->is_number() && v->as_double() <= double(std::numeric_limits<float>::max()) && float(v->as_double()) > 0,
            [&] { return field(key) + " must be a positive number within float range, got " + v->dump(); });
    return float(v->as_double());
  };
  const auto boolean = [&](const char* key, bool fallback) {
    const json* v = j.find(key);
    if (!v || v->is_null()) return fallback;
    require(v->is_bool(), [&] { return field(key) + " must be true or false, got " + v->dump(); });
    return v->as_bool();
  };

  if (const json* arch = j.find("architectures"); arch && !arch->is_null()) {
    bool llama = false;
    if (arch->is_array())
      for (const auto& a : arch->as_array()) llama = llama || (a.is_string() && a.as_string() == "LlamaForCausalLM");
    require(llama,
            [&] { return field("architectures") + " is " + arch->dump() + " (expected [\"LlamaForCausalLM\"])"; });
  } else {
    const json* type = j.find("model_type");
    require(type && type->is_string() && type->as_string() == "llama", [&] {
      return where +
             ": neither \"architectures\" nor \"model_type\" names a Llama model (expected "
             "\"architectures\": [\"LlamaForCausalLM\"])";
    });
  }
  if (const json* act = j.find("hidden_act"); act && !act->is_null())
    require(act->is_string() && act->as_string() == "silu",
            [&] { return field("hidden_act") + " is " + act->dump() + " (expected \"silu\")"; });
  require(!boolean("attention_bias", false),
          [&] { return field("attention_bias") + " is true (expected false: no biases)"; });
  require(!boolean("mlp_bias", false), [&] { return field("mlp_bias") + " is true (expected false: no biases)"; });

  nn::llama_config cfg;
  if (const json* n = j.find("subspace_name"); n && n->is_string()) cfg.name = n->as_string();
  else cfg.name = "hf";
  cfg.vocab = integer("vocab_size", 32000);
  cfg.d_model = integer("hidden_size", 4096);
  cfg.ffn_hidden = integer("intermediate_size", 11008);
  cfg.n_layers = integer("num_hidden_layers", 32);
  cfg.n_heads = integer("num_attention_heads", 32);
  cfg.n_kv_heads = integer("num_key_value_heads", cfg.n_heads);
  cfg.max_seq = integer("max_position_embeddings", 2048);
  cfg.norm_eps = number(j, "rms_norm_eps", 1e-6);
  // transformers 5 writes rope_parameters {rope_type, rope_theta, ...} in place of rope_theta and rope_scaling.
  const json* rope_parameters = j.find("rope_parameters");
  if (rope_parameters && rope_parameters->is_null()) rope_parameters = nullptr;
  require(!rope_parameters || rope_parameters->is_object(),
          [&] { return field("rope_parameters") + " must be an object or null"; });
  if (rope_parameters && !j.find("rope_theta")) cfg.rope.theta = number(*rope_parameters, "rope_theta", 10000.0);
  else cfg.rope.theta = number(j, "rope_theta", 10000.0);
  cfg.tied_embeddings = boolean("tie_word_embeddings", false);
  if (const json* hd = j.find("head_dim"); hd && !hd->is_null()) {
    const std::int64_t head_dim = integer("head_dim", std::nullopt);
    require(cfg.n_heads > 0 && cfg.d_model % cfg.n_heads == 0 && head_dim == cfg.d_model / cfg.n_heads, [&] {
      return field("head_dim") + " is " + std::to_string(head_dim) +
             " (expected hidden_size / num_attention_heads = " + std::to_string(cfg.d_model) + " / " +
             std::to_string(cfg.n_heads) + ")";
    });
  }
  const json* rs = j.find("rope_scaling");
  const char* rs_key = "rope_scaling";
  if (!rs || rs->is_null()) {
    rs = rope_parameters;
    rs_key = "rope_parameters";
  }
  bool scaled = false;
  if (rs && !rs->is_null()) {
    require(rs->is_object(), [&] { return field(rs_key) + " must be an object or null"; });
    const json* type = rs->find("rope_type");
    if (!type) type = rs->find("type");
    const std::string t = type && type->is_string() ? type->as_string() : std::string("(none)");
    const bool from_parameters = rs == rope_parameters;
    require(t == "llama3" || (from_parameters && t == "default"), [&] {
      return field(rs_key) + " has rope_type \"" + t + "\" (supported: \"llama3\"" +
             (from_parameters ? ", \"default\")" : ", or null)");
    });
    scaled = t == "llama3";
  }
  if (scaled) {
    cfg.rope.llama31_scaling = true;
    cfg.rope.factor = number(*rs, "factor", std::nullopt);
    cfg.rope.low_freq_factor = number(*rs, "low_freq_factor", std::nullopt);
    cfg.rope.high_freq_factor = number(*rs, "high_freq_factor", std::nullopt);
    const json* omp = rs->find("original_max_position_embeddings");
    require(omp && omp->is_int() && omp->as_int() > 0,
            [&] { return field(rs_key) + ".original_max_position_embeddings must be a positive integer"; });
    cfg.rope.original_max_position = omp->as_int();
  }
  try {
    cfg.validate();
  } catch (const invalid_argument& e) {
    throw invalid_argument(where + ": the configuration is not usable: " + e.what());
  }
  return cfg;
}

/// Writes `dir`/config.json (or the named file) atomically.
inline void write_hf_config(const std::filesystem::path& path, const nn::llama_config& cfg,
                            const hf_config_options& o = {}) {
  atomic_write_text(path, to_hf_config(cfg, o).dump(2) + "\n");
}

/// Reads a config.json file.
inline nn::llama_config read_hf_config(const std::filesystem::path& path) {
  const std::string where = "config.json " + detail::quoted(path);
  return llama_config_from_hf(json::parse(read_text(path, "Hugging Face config.json"), where), where);
}

/// The fields in which two configurations differ in architecture (the name aside), e.g.
/// "hidden_size 128 vs 64"; empty when they describe the same model.
inline std::string architecture_difference(const nn::llama_config& a, const nn::llama_config& b) {
  std::string out;
  const auto cmp = [&](const char* name, auto x, auto y) {
    if (x != y) {
      if (!out.empty()) out += ", ";
      out += std::string(name) + " " + json(x).dump() + " vs " + json(y).dump();
    }
  };
  cmp("vocab_size", a.vocab, b.vocab);
  cmp("hidden_size", a.d_model, b.d_model);
  cmp("num_hidden_layers", a.n_layers, b.n_layers);
  cmp("num_attention_heads", a.n_heads, b.n_heads);
  cmp("num_key_value_heads", a.n_kv_heads, b.n_kv_heads);
  cmp("intermediate_size", a.ffn_hidden, b.ffn_hidden);
  cmp("max_position_embeddings", a.max_seq, b.max_seq);
  cmp("rms_norm_eps", a.norm_eps, b.norm_eps);
  cmp("tie_word_embeddings", a.tied_embeddings, b.tied_embeddings);
  cmp("rope_theta", a.rope.theta, b.rope.theta);
  cmp("rope_scaling", a.rope.llama31_scaling, b.rope.llama31_scaling);
  if (a.rope.llama31_scaling && b.rope.llama31_scaling) {
    cmp("rope_scaling.factor", a.rope.factor, b.rope.factor);
    cmp("rope_scaling.low_freq_factor", a.rope.low_freq_factor, b.rope.low_freq_factor);
    cmp("rope_scaling.high_freq_factor", a.rope.high_freq_factor, b.rope.high_freq_factor);
    cmp("rope_scaling.original_max_position_embeddings", a.rope.original_max_position, b.rope.original_max_position);
  }
  return out;
}

/// The Llama model's config.json serialiser for checkpoints (io/checkpoint.hpp): Hugging Face's LlamaConfig.
template <>
struct config_io<nn::llama_config> {
  static json to_json(const nn::llama_config& cfg, const hf_config_options& o) { return to_hf_config(cfg, o); }
  static nn::llama_config from_json(const json& j, std::string_view source) { return llama_config_from_hf(j, source); }
  static std::string difference(const nn::llama_config& saved, const nn::llama_config& current) {
    return architecture_difference(saved, current);
  }
};

}  // namespace subspace::io
