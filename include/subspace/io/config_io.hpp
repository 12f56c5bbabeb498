#pragma once
// io::config_io<Config>: how a checkpoint writes and reads a model's configuration (config.json) and names the
// differences between two of them. Checkpoints are generic over the configuration type through it:
//
//   config_io<Config>::to_json(cfg, options) -> json          config.json's content
//   config_io<Config>::from_json(json, source) -> Config      the same, read back (errors name `source`)
//   config_io<Config>::difference(saved, current) -> string   "field a vs b, ..." ("" when the architectures
//                                                             agree), for "saved for a different model"
//
// nn::llama_config's is Hugging Face's LlamaConfig (io/hf_config.hpp). A configuration struct described with
// BOOST_HANA_DEFINE_STRUCT gets one generically from io/struct_config.hpp (every member a JSON field).

#include <cstdint>
#include <optional>
#include <string>

#include "../core/config.hpp"

namespace subspace::io {

/// What a config.json records besides the architecture.
struct hf_config_options {
  std::string torch_dtype = "float32";       // the dtype the weights are saved in: float32 or bfloat16
  std::optional<std::int64_t> bos_token_id;  // null when absent
  std::optional<std::int64_t> eos_token_id;  // null when absent
};

template <class Config>
struct config_io {
  static_assert(dependent_false<Config>,
                "io::config_io<Config>: no config.json serialiser for this model configuration; specialise "
                "io::config_io, or describe the struct with BOOST_HANA_DEFINE_STRUCT and include "
                "<subspace/io/struct_config.hpp>");
};

}  // namespace subspace::io
