#pragma once
// Checkpoints of the tensors of an nn::parameter_store (a model's parameters(), or anything with size(),
// info(i) and value(i), such as with_values(...)), named as the store names them (Hugging Face Llama names for
// nn::llama):
//
// A checkpoint directory holds
//   model.safetensors          every parameter value, in its own dtype (fp32 master weights stay exact);
//                              __metadata__ {"format": "pt", "step": "<step>"} — transformers loads it as is
//   config.json                the model's configuration through io::config_io<Config> (io/config_io.hpp): the
//                              Hugging Face LlamaConfig for nn::llama_config (io/hf_config.hpp)
//   trainer_state.safetensors  the optimizer state tensors, named "<hf_name>.<state name>" (adamw: exp_avg,
//                              exp_avg_sq); __metadata__ step
//   trainer_state.json         the trainer state and the size and fingerprint of every other file
//                              (io/checkpoint_state.hpp), written last
// save_checkpoint builds the directory under a hidden staging name and publishes it whole with one rename
// (util/directory.hpp), replacing a checkpoint of the same name only once the new one is complete; a trainer whose
// ranks write parts of one checkpoint fills the staging directory with write_checkpoint and publishes it itself.
// load_checkpoint first checks every file against the sidecar's fingerprints, so files of two saves are refused.
//
// Loading checks every tensor: a missing tensor, a shape mismatch (naming the tensor and both shapes), a
// checkpoint saved for another architecture (naming the differing config.json fields). Floating-point tensors
// convert on load (F32/BF16/F16/F64 into the parameter's dtype). load_weights also reads Hugging Face Llama
// checkpoints (one model.safetensors, or shards listed by model.safetensors.index.json, each a file inside the
// directory) as initial weights.
//
// Views may live on the device: they are copied through host memory with copy(ex, ...) (an nvcc translation
// unit, exec::cuda), one tensor at a time. A trainer that keeps fp32 master weights beside a bf16 model saves
// and restores the masters with with_values(model, masters).

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/executor.hpp"
#include "../core/parameter.hpp"
#include "../core/tensor.hpp"
#include "../data/loader.hpp"
#include "../nn/config.hpp"
#include "../optim/concepts.hpp"
#include "../util/directory.hpp"
#include "../util/file.hpp"
#include "../util/json.hpp"
#include "checkpoint_state.hpp"
#include "hf_config.hpp"
#include "safetensors.hpp"

namespace subspace::io {

/// No optimizer state (save_checkpoint / load_checkpoint without one).
struct no_optimizer_state {};

// An optimizer state names its tensors for checkpoints through optim::for_each_state_tensor (optim/concepts.hpp):
// its member for_each_tensor(f), or a specialisation of optim::state_tensors<State>.
using optim::for_each_state_tensor;

/// A tensor's view, or the view itself (overloads, not `if constexpr (requires ...)`, which nvcc mis-handles in
/// generic lambdas).
template <class T, class S>
view<T, S> as_view(tensor<T, S>& t) {
  return t.v();
}
template <class T, class S>
view<T, S> as_view(view<T, S> v) {
  return v;
}

/// The tensors of a parameter store (or a model's, through model.parameters()) with values[i] in place of the
/// i-th value: e.g. the optimizer's fp32 master weights of a bf16 model, so that a checkpoint holds (and a resume
/// restores) the masters. `values` is a vector of tensors or of views, in store order.
template <class Store, class Values>
struct substituted_values {
  Store& store;
  Values& values;

  std::size_t size() const { return store.size(); }
  const parameter_info& info(std::size_t i) const { return store.info(i); }
  auto value(std::size_t i) {
    require(i < values.size(), [&] {
      return "with_values: " + std::to_string(values.size()) + " values, but parameter '" + store.info(i).name +
             "' is number " + std::to_string(i + 1);
    });
    return as_view(values[i]);
  }
};
template <class Model, class Values>
auto with_values(Model& model, Values& values) {
  auto& store = [&]() -> auto& {
    if constexpr (requires { model.parameters(); }) return model.parameters();
    else return model;
  }();
  return substituted_values<std::remove_reference_t<decltype(store)>, Values>{store, values};
}

/// The parameter dtype model.safetensors is written in by save_model.
enum class weights_dtype { native, f32, bf16 };

struct save_options {
  weights_dtype dtype = weights_dtype::native;
  hf_config_options config{};  // bos/eos ids; torch_dtype follows the saved dtype
};

struct load_options {
  bool allow_missing = false;    // parameters absent from the file keep their current values
  bool allow_unexpected = true;  // tensors the model does not have are ignored (else an error)
};

struct load_report {
  std::vector<std::string> loaded, missing, unexpected;
};

namespace detail::ckpt {

template <class States>
decltype(auto) state_for(States& states, const std::string& name, std::size_t index) {
  if constexpr (requires { states.find(name) != states.end(); }) {
    auto it = states.find(name);
    require(it != states.end(), [&] { return "checkpoint: no optimizer state for parameter '" + name + "'"; });
    return (it->second);
  } else if constexpr (requires {
                         states[index];
                         states.size();
                       }) {
    require(index < states.size(), [&] {
      return "checkpoint: " + std::to_string(states.size()) + " optimizer states, but parameter '" + name +
             "' is number " + std::to_string(index + 1) + " (one state per parameter, in order)";
    });
    return (states[index]);
  } else {
    return states(name, index);
  }
}

/// Adds view v (any space) to the writer as dtype To; device views are copied to the host while writing.
template <class To, class Exec, class T, class S>
void add_view(safetensors_writer& w, const Exec& ex, const std::string& name, view<T, S> v) {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<S, host_space>) {
    w.add_as<To>(name, v);
  } else {
    const view<const U, S> cv = v;
    w.add_bytes(name, st_dtype_of<To>(), dims_of(v.shape()), [&ex, cv](file_sink& out) {
      host_tensor<U> h(cv.shape());
      copy(ex, cv, h.v());
      ex.synchronize();
      st::write_view<To, U>(out, view<const U, host_space>(h.v()));
    });
  }
}

/// Reads tensor t into view v (any space), converting the dtype.
template <class Exec, class T, class S>
void read_view(const safetensors_file& f, const st_tensor& t, const Exec& ex, view<T, S> v) {
  if constexpr (std::is_same_v<S, host_space>) {
    f.read(t, v);
  } else {
    host_tensor<T> h(v.shape());
    f.read(t, h.v());
    copy(ex, view<const T, host_space>(h.v()), v);
    ex.synchronize();
  }
}

/// Calls f(name, value view, index) for every tensor of `params`: a parameter store, a model (its parameters()),
/// or with_values(...).
template <class Params, class F>
void for_each_parameter(Params& params, F&& f) {
  if constexpr (requires { params.parameters(); }) {
    for_each_parameter(params.parameters(), f);
  } else {
    for (std::size_t i = 0; i < params.size(); ++i) {
      const parameter_info& info = params.info(i);
      const auto value = params.value(i);
      require(value.shape() == info.shape, [&] {
        return "checkpoint: parameter '" + info.name + "' has a view of shape " + to_string(value.shape()) +
               " but its description says " + to_string(info.shape);
      });
      f(info.name, value, i);
    }
  }
}

/// Files of a weights checkpoint: a .safetensors file, or a directory with model.safetensors or a sharded index.
struct weight_files {
  std::vector<std::unique_ptr<safetensors_file>> files;
  std::map<std::string, std::pair<const safetensors_file*, const st_tensor*>> tensors;
  std::string where;

  explicit weight_files(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    where = detail::quoted(path);
    if (!fs::is_directory(path)) {
      add(path);
      return;
    }
    const fs::path index = path / model_index_file_name;
    if (fs::exists(index)) {
      const std::string iw = "safetensors index " + detail::quoted(index);
      const json j = json::parse(read_text(index, "safetensors index"), iw);
      const json* map = j.find("weight_map");
      require(map && map->is_object(), [&] { return iw + ": missing object \"weight_map\""; });
      std::map<std::string, const safetensors_file*> opened;
      for (const auto& [name, file] : map->as_object()) {
        require(file.is_string(), [&] { return iw + ": weight_map[\"" + name + "\"] must be a file name"; });
        // Shards live in the model directory: a name that climbs out of it (or is absolute) is refused, while
        // symbolic links inside it (a Hugging Face cache's snapshot links to its blobs) are followed.
        const std::filesystem::path shard = std::filesystem::path(file.as_string()).lexically_normal();
        const bool inside = !file.as_string().empty() && shard.is_relative() && !shard.has_root_name() &&
                            !shard.empty() && *shard.begin() != ".." && shard != ".";
        if (!inside)
          throw invalid_argument(iw + ": weight_map[\"" + name + "\"] names '" + file.as_string() +
                                 "', which is not a file inside the model directory " + where);
        if (!opened.count(file.as_string())) opened[file.as_string()] = &add(path / shard);
        require(opened[file.as_string()]->find(name) != nullptr,
                [&] { return iw + ": tensor '" + name + "' is not in " + file.as_string(); });
      }
      return;
    }
    const fs::path single = path / model_file_name;
    require(fs::exists(single), [&] {
      return "checkpoint " + where + ": no " + model_file_name + " or " + model_index_file_name + " in the directory";
    });
    add(single);
  }

  const safetensors_file& add(const std::filesystem::path& file) {
    files.push_back(std::make_unique<safetensors_file>(file));
    const safetensors_file& f = *files.back();
    for (const auto& t : f.tensors()) {
      require(!tensors.count(t.name),
              [&] { return "checkpoint " + where + ": tensor '" + t.name + "' appears in two files"; });
      tensors[t.name] = {&f, &t};
    }
    return f;
  }
};

inline std::string list_names(const std::vector<std::string>& names, std::size_t max = 5) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < max; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > max) s += ", ... (" + std::to_string(names.size()) + " in all)";
  return s;
}

}  // namespace detail::ckpt

/// Loads every parameter of `model` from a safetensors file, or a directory holding model.safetensors or a
/// sharded model.safetensors.index.json (Hugging Face layout), converting dtypes; see the top of this file.
template <class Exec, class Model>
load_report load_weights(const Exec& ex, const std::filesystem::path& path, Model& model, const load_options& o = {}) {
  detail::ckpt::weight_files w(path);
  load_report report;
  std::vector<std::string> missing_detail;
  detail::ckpt::for_each_parameter(model, [&](const std::string& name, auto value, std::size_t) {
    const auto it = w.tensors.find(name);
    if (it == w.tensors.end()) {
      report.missing.push_back(name);
      missing_detail.push_back("'" + name + "' (shape " + to_string(value.shape()) + ")");
      return;
    }
    detail::ckpt::read_view(*it->second.first, *it->second.second, ex, value);
    report.loaded.push_back(name);
  });
  for (const auto& [name, entry] : w.tensors) {
    bool used = false;
    for (const auto& l : report.loaded) used = used || l == name;
    if (!used) report.unexpected.push_back(name);
  }
  if (!o.allow_missing && !report.missing.empty()) {
    std::string hint;
    for (const auto& m : report.missing)
      if (m == "lm_head.weight" && w.tensors.count("model.embed_tokens.weight"))
        hint =
            " (the checkpoint ties the LM head to model.embed_tokens.weight: build the model with tied "
            "embeddings, as its config.json says)";
    throw invalid_argument("checkpoint " + w.where + ": " + std::to_string(report.missing.size()) +
                           " parameter(s) missing: " + detail::ckpt::list_names(missing_detail) + hint);
  }
  require(o.allow_unexpected || report.unexpected.empty(), [&] {
    return "checkpoint " + w.where + ": " + std::to_string(report.unexpected.size()) +
           " tensor(s) that the model does not have: " + detail::ckpt::list_names(report.unexpected);
  });
  return report;
}

/// Writes dir/model.safetensors and dir/config.json (for a Llama: a Hugging Face LlamaForCausalLM directory).
template <class Exec, class Config, class Model>
void save_model(const Exec& ex, const std::filesystem::path& dir, const Config& cfg, Model& model,
                const save_options& o = {}, std::int64_t step = 0) {
  safetensors_writer w;
  w.metadata("format", "pt");
  w.metadata("step", std::to_string(step));
  std::string torch_dtype;
  detail::ckpt::for_each_parameter(model, [&](const std::string& name, auto value, std::size_t) {
    using U = std::remove_const_t<typename decltype(value)::element_type>;
    st_dtype saved = st_dtype_of<U>();
    if constexpr (is_element_v<U>) {
      if (o.dtype == weights_dtype::bf16) {
        detail::ckpt::add_view<bf16>(w, ex, name, value);
        saved = st_dtype::BF16;
      } else if (o.dtype == weights_dtype::f32) {
        detail::ckpt::add_view<float>(w, ex, name, value);
        saved = st_dtype::F32;
      } else {
        detail::ckpt::add_view<U>(w, ex, name, value);
      }
    } else {
      detail::ckpt::add_view<U>(w, ex, name, value);  // not floating point: kept as it is
    }
    const std::string td = saved == st_dtype::BF16 ? "bfloat16" : saved == st_dtype::F16 ? "float16" : "float32";
    if (torch_dtype.empty()) torch_dtype = td;
  });
  require(w.size() > 0, [&] { return "save_model " + detail::quoted(dir) + ": the model enumerated no parameters"; });
  hf_config_options co = o.config;
  co.torch_dtype = torch_dtype;
  ensure_directory(dir);
  w.write(dir / model_file_name);
  atomic_write_text(dir / config_file_name, config_io<Config>::to_json(cfg, co).dump(2) + "\n");
}

/// Fills `dir`, a staging directory that the caller publishes (util/directory.hpp), with a full checkpoint:
/// weights (native dtype), config.json, optimizer states (`states`: a vector in for_each_parameter order, a map
/// from hf_name, or a callable (name, index) -> State&) and, last, trainer_state.json, which fingerprints every
/// file then in `dir` (so files other ranks wrote there before belong to the checkpoint); see the top of this file.
template <class Exec, class Config, class Model, class States>
void write_checkpoint(const Exec& ex, const std::filesystem::path& dir, const Config& cfg, Model& model, States& states,
                      const trainer_state& ts, const hf_config_options& config = {}) {
  save_options so;
  so.config = config;
  save_model(ex, dir, cfg, model, so, ts.step);

  safetensors_writer w;
  w.metadata("format", "pt");
  w.metadata("step", std::to_string(ts.step));
  std::size_t n_state = 0;
  if constexpr (!std::is_same_v<std::remove_const_t<States>, no_optimizer_state>) {
    detail::ckpt::for_each_parameter(model, [&](const std::string& name, auto, std::size_t index) {
      auto& state = detail::ckpt::state_for(states, name, index);
      for_each_state_tensor(state, [&](const std::string& sname, auto v) {
        using U = std::remove_const_t<typename decltype(v)::element_type>;
        detail::ckpt::add_view<U>(w, ex, name + "." + sname, v);
        ++n_state;
      });
    });
  }
  w.write(dir / state_tensors_file_name);
  write_trainer_state(dir, ts, n_state);
}

/// Writes a full checkpoint as the directory `dir`, published whole (replacing a previous checkpoint `dir` only once
/// the new one is complete; any other existing, non-empty `dir` is refused): write_checkpoint into its staging
/// directory, then one rename.
template <class Exec, class Config, class Model, class States>
void save_checkpoint(const Exec& ex, const std::filesystem::path& dir, const Config& cfg, Model& model, States& states,
                     const trainer_state& ts, const hf_config_options& config = {}) {
  check_replaceable(dir);
  atomic_write_directory(dir, [&](const std::filesystem::path& staging) {
    write_checkpoint(ex, staging, cfg, model, states, ts, config);
  });
}

template <class Exec, class Config, class Model>
void save_checkpoint(const Exec& ex, const std::filesystem::path& dir, const Config& cfg, Model& model,
                     const trainer_state& ts, const hf_config_options& config = {}) {
  no_optimizer_state none;
  save_checkpoint(ex, dir, cfg, model, none, ts, config);
}

/// Loads a checkpoint written by save_checkpoint into `model` and `states` (initialised for the same
/// parameters) and returns the trainer state. Strict: every file must be the one trainer_state.json fingerprints,
/// and the architecture, every tensor name and shape, and the step recorded in each file must match.
template <class Exec, class Config, class Model, class States>
trainer_state load_checkpoint(const Exec& ex, const std::filesystem::path& dir, const Config& cfg, Model& model,
                              States& states) {
  const std::string where = "checkpoint " + detail::quoted(dir);
  trainer_state ts = verify_checkpoint_files(dir);
  const std::filesystem::path config_path = dir / config_file_name;
  const std::string config_where = "config.json " + detail::quoted(config_path);
  const Config saved =
      config_io<Config>::from_json(json::parse(read_text(config_path, "config.json"), config_where), config_where);
  const std::string diff = config_io<Config>::difference(saved, cfg);
  require(diff.empty(),
          [&] { return where + " was saved for a different model: " + diff + " (checkpoint vs this run)"; });

  const auto check_step = [&](const safetensors_file& f) {
    const auto s = f.metadata("step");
    require(s && *s == std::to_string(ts.step), [&] {
      return where + ": " + f.path().filename().string() + " is from step " + (s ? *s : std::string("(unknown)")) +
             ", " + state_json_file_name + " from step " + std::to_string(ts.step) +
             " (a save was interrupted; use an older checkpoint)";
    });
  };
  {
    const safetensors_file mf(dir / model_file_name);
    check_step(mf);
  }
  load_options lo;
  lo.allow_missing = false;
  lo.allow_unexpected = false;
  load_weights(ex, dir / model_file_name, model, lo);

  const safetensors_file sf(dir / state_tensors_file_name);
  check_step(sf);
  std::size_t used = 0;
  if constexpr (!std::is_same_v<std::remove_const_t<States>, no_optimizer_state>) {
    detail::ckpt::for_each_parameter(model, [&](const std::string& name, auto, std::size_t index) {
      auto& state = detail::ckpt::state_for(states, name, index);
      for_each_state_tensor(state, [&](const std::string& sname, auto v) {
        const std::string tname = name + "." + sname;
        const st_tensor* t = sf.find(tname);
        require(t != nullptr, [&] {
          return where + ": " + state_tensors_file_name + " has no optimizer state tensor '" + tname +
                 "' (expected shape " + to_string(v.shape()) + "; saved with another optimizer?)";
        });
        detail::ckpt::read_view(sf, *t, ex, v);
        ++used;
      });
    });
  }
  require(used == sf.tensors().size(), [&] {
    return where + ": " + state_tensors_file_name + " holds " + std::to_string(sf.tensors().size()) +
           " optimizer tensors, this run uses " + std::to_string(used) + " (saved with another optimizer?)";
  });
  return ts;
}

template <class Exec, class Config, class Model>
trainer_state load_checkpoint(const Exec& ex, const std::filesystem::path& dir, const Config& cfg, Model& model) {
  no_optimizer_state none;
  return load_checkpoint(ex, dir, cfg, model, none);
}

}  // namespace subspace::io
