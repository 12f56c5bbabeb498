// llama_eval: evaluates and samples a Llama checkpoint — ours or a Hugging Face LlamaForCausalLM directory — on the
// host (fp32) or on CUDA (bf16 weights, fp32 logits).
//
//   llama_eval --model DIR --tokens "1,2,3;4,5,6" --out eval.json     # loss + last-position logits, as JSON
//   llama_eval --model DIR --prompt "In the beginning" --generate 200  # a byte-tokenizer sample
//   llama_eval --model DIR --tokenizer DIR/tokenizer.json --prompt "In the beginning" --generate 200
//   llama_eval --init-random 7 --preset tiny --save DIR                # a random model, saved for transformers
//
// The model directory holds config.json (read by io::read_hf_config) and model.safetensors or a sharded
// model.safetensors.index.json (io::load_weights; tensors the model does not have are reported and ignored).
// --init-random builds the --preset configuration (optionally with Llama 3.1 RoPE scaling or a tied head) and
// initialises it with llama::init(seed) instead; --save writes the model with io::save_model, which
// transformers' LlamaForCausalLM.from_pretrained loads as it is. tests/hf/ uses both directions.
//
// --tokens takes rows of equal length: the loss is the mean cross-entropy of every next-token target (token s+1
// of a row predicted at position s, as transformers computes it with labels = input_ids), and the logits are
// those of the last position of every row. --out receives {"loss", "targets", "logits": [[V floats] per row],
// ...}, written atomically. This file compiles as C++ (host only) or, in a CUDA build, as CUDA (--device cuda).
#include <subspace/nn/generate.hpp>
#include <subspace/subspace.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common/cli.hpp"
#include "common/device.hpp"
#include "common/flag_checks.hpp"
#include "common/text_tokenizer.hpp"

namespace {

using namespace subspace;

struct options {
  std::string device = "auto";
  int threads = 0;
  // Where the weights come from: a directory, or a random initialisation of a preset.
  std::string model;
  std::string init_random;  // a seed, as text: empty means "load --model"
  std::string preset = "tiny";
  bool tied = false;
  float rope_scaling_factor = 0.0f;
  float rope_low_freq_factor = 1.0f;
  float rope_high_freq_factor = 4.0f;
  std::int64_t rope_original_max = 8192;
  // What to do with the model.
  std::string save;
  std::string save_dtype = "native";
  std::string tokens;
  std::string out;
  std::string prompt, tokenizer;
  std::int64_t generate = 0;
  float temperature = 0.8f;
  std::int64_t top_k = 0;
  std::uint64_t seed = 0;
};

/// Weights and activations on each executor: fp32 on the host, bf16 on CUDA.
template <class Exec>
using weight_t = std::conditional_t<std::is_same_v<Exec, exec::host>, float, bf16>;

/// Parses --tokens "1,2,3;4,5,6" into a [rows, len] tensor; every row must have the same length.
host_tensor<std::int32_t> parse_token_rows(const std::string& text) {
  std::vector<std::vector<std::int32_t>> rows(1);
  std::string number;
  const auto flush = [&](std::size_t at) {
    if (number.empty()) {
      throw examples::cli_error("--tokens: empty token at character " + std::to_string(at) + " of '" + text +
                                "' (expected comma-separated integers, rows separated by ';')");
    }
    std::size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(number, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != number.size() || v < 0 || v > 2147483647LL)
      throw examples::cli_error("--tokens: '" + number + "' is not a token id (expected an integer in [0, 2^31))");
    rows.back().push_back(std::int32_t(v));
    number.clear();
  };
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (c == ' ' || c == '\t' || c == '\n') continue;
    if (c == ',') {
      flush(i);
    } else if (c == ';') {
      flush(i);
      rows.emplace_back();
    } else {
      number += c;
    }
  }
  flush(text.size());
  for (std::size_t r = 1; r < rows.size(); ++r)
    if (rows[r].size() != rows[0].size())
      throw examples::cli_error("--tokens: row " + std::to_string(r) + " has " + std::to_string(rows[r].size()) +
                                " tokens, row 0 has " + std::to_string(rows[0].size()) +
                                " (every row must have the same length)");
  const auto b = std::int64_t(rows.size()), s = std::int64_t(rows[0].size());
  host_tensor<std::int32_t> out({b, s});
  for (std::int64_t r = 0; r < b; ++r)
    for (std::int64_t t = 0; t < s; ++t) out(r, t) = rows[std::size_t(r)][std::size_t(t)];
  return out;
}

/// A non-negative integer seed from a flag value (decimal digits only: " -1" is no seed).
std::uint64_t parse_seed(const std::string& flag, const std::string& text) {
  const std::optional<std::uint64_t> v = parse_unsigned(text);
  if (!v) throw examples::cli_error("--" + flag + ": got '" + text + "', expected a non-negative integer seed");
  return *v;
}

/// The configuration of the model to run: config.json of --model, or --preset with the --init-random overrides.
nn::llama_config model_config(const options& o) {
  if (o.init_random.empty()) return io::read_hf_config(std::filesystem::path(o.model) / io::config_file_name);
  nn::llama_config cfg = nn::presets::by_name(o.preset);
  cfg.tied_embeddings = o.tied;
  if (o.rope_scaling_factor > 0.0f) {
    cfg.rope.llama31_scaling = true;
    cfg.rope.factor = o.rope_scaling_factor;
    cfg.rope.low_freq_factor = o.rope_low_freq_factor;
    cfg.rope.high_freq_factor = o.rope_high_freq_factor;
    cfg.rope.original_max_position = o.rope_original_max;
  }
  cfg.validate();
  return cfg;
}

/// A host copy of a [rows, cols] view of the executor's memory.
template <class Exec, class U>
host_tensor<U> host_copy(const Exec& ex, view<const U, space_of_t<Exec>> v) {
  host_tensor<U> h(v.shape());
  copy(ex, v, h.v());
  ex.synchronize();
  return h;
}

/// The loss and the last-position logits of every --tokens row, written to --out as JSON.
template <class Model>
void evaluate_rows(Model& model, const options& o, const char* device_name) {
  using Exec = typename Model::executor_type;
  using S = space_of_t<Exec>;
  const nn::llama_config& cfg = model.config();
  host_tensor<std::int32_t> tokens = parse_token_rows(o.tokens);
  const std::int64_t b = tokens.dim(0), s = tokens.dim(1);
  if (s > cfg.max_seq)
    throw examples::cli_error("--tokens: rows of " + std::to_string(s) + " tokens exceed the model's max_seq " +
                              std::to_string(cfg.max_seq));
  for (std::int64_t r = 0; r < b; ++r)
    for (std::int64_t t = 0; t < s; ++t)
      if (tokens(r, t) >= cfg.vocab)
        throw examples::cli_error("--tokens: token " + std::to_string(tokens(r, t)) + " (row " + std::to_string(r) +
                                  ", position " + std::to_string(t) + ") is outside the vocabulary [0, " +
                                  std::to_string(cfg.vocab) + ")");

  // Targets: the next token of the row; the last position has none (-1 is ignored by the loss).
  host_tensor<std::int32_t> targets({b, s});
  for (std::int64_t r = 0; r < b; ++r)
    for (std::int64_t t = 0; t < s; ++t) targets(r, t) = t + 1 < s ? tokens(r, t + 1) : -1;
  const std::int64_t counted = b * (s - 1);
  const double loss = model.evaluate(tokens.v(), targets.v());

  tensor<float, S> logits({b, cfg.vocab});
  model.logits(view<const std::int32_t, host_space>(tokens.v()), logits.v());
  const host_tensor<float> logits_h = host_copy(model.executor(), view<const float, S>(logits.v()));

  if (counted > 0)
    std::printf("loss %.6f over %lld next-token targets (%lld rows of %lld tokens)\n", loss, (long long)counted,
                (long long)b, (long long)s);
  else std::printf("no next-token targets (rows of one token): loss not defined; logits only\n");
  if (o.out.empty()) return;

  io::json rows = io::json::array();
  for (std::int64_t r = 0; r < b; ++r) {
    io::json row = io::json::array();
    for (std::int64_t v = 0; v < cfg.vocab; ++v) row.push_back(io::json(logits_h(r, v)));
    rows.push_back(std::move(row));
  }
  const io::json doc = io::json::object({
      {"model",
       io::json(o.init_random.empty() ? o.model : "random init, seed " + o.init_random + ", preset " + o.preset)},
      {"device", io::json(device_name)},
      {"dtype", io::json(std::is_same_v<typename Model::value_type, float> ? "float32" : "bfloat16")},
      {"rows", io::json(b)},
      {"seq_len", io::json(s)},
      {"vocab", io::json(cfg.vocab)},
      {"targets", io::json(counted)},
      {"loss", counted > 0 ? io::json(loss) : io::json(nullptr)},
      {"logits", std::move(rows)},
  });
  io::atomic_write_text(o.out, doc.dump() + "\n");
  std::printf("wrote %s\n", o.out.c_str());
}

template <class Exec>
int run(const Exec& ex, const options& o, const char* device_name) {
  using T = weight_t<Exec>;
  const nn::llama_config cfg = model_config(o);
  nn::llama<Exec, T> model(cfg, ex);
  if (o.init_random.empty()) {
    const io::load_report report = io::load_weights(ex, o.model, model);
    if (!report.unexpected.empty()) {
      std::string names;
      for (std::size_t i = 0; i < report.unexpected.size() && i < 5; ++i)
        names += (i ? ", " : "") + report.unexpected[i];
      std::fprintf(stderr, "llama_eval: note: ignored %zu tensor(s) the model does not have: %s%s\n",
                   report.unexpected.size(), names.c_str(), report.unexpected.size() > 5 ? ", ..." : "");
    }
  } else {
    model.init(parse_seed("init-random", o.init_random));
  }
  const std::string source = o.init_random.empty() ? "'" + o.model + "'" : "random '" + cfg.name + "'";
  std::printf(
      "llama_eval: %s (vocab %lld, d %lld, %lld layers, %lld/%lld heads, ffn %lld, max_seq %lld%s%s), "
      "%lld parameters, device %s\n",
      source.c_str(), (long long)cfg.vocab, (long long)cfg.d_model, (long long)cfg.n_layers, (long long)cfg.n_heads,
      (long long)cfg.n_kv_heads, (long long)cfg.ffn_hidden, (long long)cfg.max_seq,
      cfg.tied_embeddings ? ", tied head" : "", cfg.rope.llama31_scaling ? ", Llama 3.1 RoPE scaling" : "",
      (long long)model.parameter_count(), device_name);
  std::fflush(stdout);

  if (!o.save.empty()) {
    io::save_options so;
    so.dtype = o.save_dtype == "f32"    ? io::weights_dtype::f32
               : o.save_dtype == "bf16" ? io::weights_dtype::bf16
                                        : io::weights_dtype::native;
    io::save_model(ex, o.save, cfg, model, so);
    std::printf("saved %s (model.safetensors, config.json)\n", o.save.c_str());
  }
  if (!o.tokens.empty()) evaluate_rows(model, o, device_name);
  if (o.generate > 0) {
    const examples::text_tokenizer tok(o.tokenizer);
    if (!tok.byte_level()) tok.check_model_vocab(cfg.vocab, "the model's vocab");
    const std::vector<std::int32_t> prompt = tok.encode(o.prompt, "--prompt");
    for (std::size_t i = 0; i < prompt.size(); ++i)
      if (prompt[i] >= cfg.vocab)
        throw examples::cli_error("--prompt: token " + std::to_string(prompt[i]) + " at position " + std::to_string(i) +
                                  " is outside the vocabulary [0, " + std::to_string(cfg.vocab) + ") of '" + cfg.name +
                                  "' (" + tok.described() + ": give the model's --tokenizer)");
    const std::vector<std::int32_t> sample =
        nn::generate(model, prompt, o.generate, nn::sampling{o.temperature, o.top_k, o.seed});
    std::printf("sample (temperature %g, top_k %lld, seed %llu):\n%s%s\n", double(o.temperature), (long long)o.top_k,
                (unsigned long long)o.seed, tok.printable(prompt).c_str(), tok.printable(sample).c_str());
  }
  return 0;
}

/// The combinations of flags that make sense; cli_error (exit 2) for the others.
void check_options(const options& o) {
  using examples::cli_error;
  if (o.model.empty() == o.init_random.empty())
    throw cli_error("give exactly one of --model DIR (load weights) and --init-random SEED (a random model)");
  if (!o.model.empty()) {
    if (!std::filesystem::is_directory(o.model))
      throw cli_error("--model: '" + o.model +
                      "' is not a directory (expected one holding config.json and "
                      "model.safetensors or model.safetensors.index.json)");
    if (o.tied || o.rope_scaling_factor != 0.0f)
      throw cli_error(
          "--tied and --rope-scaling-factor shape a random model (--init-random); a loaded model "
          "takes its architecture from config.json");
  } else {
    parse_seed("init-random", o.init_random);
  }
  examples::need_finite("rope-scaling-factor", o.rope_scaling_factor);
  examples::need_finite("rope-low-freq-factor", o.rope_low_freq_factor);
  examples::need_finite("rope-high-freq-factor", o.rope_high_freq_factor);
  if (o.rope_scaling_factor < 0.0f || o.rope_low_freq_factor <= 0.0f || o.rope_high_freq_factor <= 0.0f ||
      o.rope_original_max < 1)
    throw cli_error(
        "--rope-scaling-factor must be >= 0 (0: off), --rope-low-freq-factor and "
        "--rope-high-freq-factor > 0, --rope-original-max >= 1");
  if (o.generate < 0) throw cli_error("--generate: got " + std::to_string(o.generate) + ", expected N >= 0");
  examples::need_sample_tokens("generate", o.generate);
  if (o.generate > 0 && o.prompt.empty())
    throw cli_error("--generate needs a non-empty --prompt (the text the sample continues)");
  if (!o.prompt.empty() && o.generate == 0) throw cli_error("--prompt needs --generate N > 0 (tokens to sample)");
  if (!o.tokenizer.empty() && o.generate == 0)
    throw cli_error("--tokenizer encodes --prompt and decodes the sample: it needs --prompt with --generate N > 0");
  if (!o.tokenizer.empty()) examples::text_tokenizer{o.tokenizer};  // a bad file fails before the model loads
  if (!(o.temperature >= 0.0f) || !std::isfinite(o.temperature))
    throw cli_error("--temperature must be a finite number >= 0 (0: greedy)");
  if (o.top_k < 0) throw cli_error("--top-k must be >= 0 (0: the whole vocabulary)");
  if (!o.out.empty() && o.tokens.empty()) throw cli_error("--out needs --tokens (the rows to evaluate)");
  if (o.tokens.empty() && o.generate == 0 && o.save.empty())
    throw cli_error("nothing to do: give --tokens, --prompt with --generate, or --save (see --help)");
  // Last, as they create directories: every path the run writes.
  if (!o.save.empty()) examples::need_writable_directory("save", o.save);
  if (!o.out.empty()) examples::need_writable_file("out", o.out);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  examples::cli cli(
      "llama_eval",
      "Loads a Llama checkpoint (ours or a Hugging Face LlamaForCausalLM directory), or initialises a random one,\n"
      "then evaluates token rows (loss and last-position logits as JSON), samples text (byte-level or with "
      "--tokenizer),\n"
      "and/or saves the model as a Hugging Face directory. Host: fp32; CUDA: bf16 weights, fp32 logits.\n"
      "Exit status: 0 done, 1 an error (a message says which file or value), 2 bad flags.");
  cli.flag("device", o.device, "where to run: auto picks cuda when a GPU is present", {"auto", "host", "cuda"})
      .flag("threads", o.threads, "host worker threads (0: all cores)")
      .flag("model", o.model,
            "model directory: config.json + model.safetensors or model.safetensors.index.json (ours or Hugging "
            "Face's)")
      .flag("init-random", o.init_random, "instead of --model: a random model (llama::init) from this seed")
      .flag("preset", o.preset, "with --init-random: the configuration", nn::presets::names())
      .flag("tied", o.tied, "with --init-random: tie the LM head to the token embedding")
      .flag("rope-scaling-factor", o.rope_scaling_factor,
            "with --init-random: Llama 3.1 RoPE frequency scaling with this factor (0: off)")
      .flag("rope-low-freq-factor", o.rope_low_freq_factor, "Llama 3.1 RoPE scaling: low_freq_factor")
      .flag("rope-high-freq-factor", o.rope_high_freq_factor, "Llama 3.1 RoPE scaling: high_freq_factor")
      .flag("rope-original-max", o.rope_original_max, "Llama 3.1 RoPE scaling: original_max_position_embeddings")
      .flag("save", o.save, "write the model to this directory (model.safetensors + config.json)")
      .flag("save-dtype", o.save_dtype, "dtype of the saved weights (native: the model's own)",
            {"native", "f32", "bf16"})
      .flag("tokens", o.tokens,
            "token rows to evaluate, e.g. \"1,2,3;4,5,6\" (rows of equal length, at most max_seq tokens)")
      .flag("out", o.out, "with --tokens: write the loss and last-position logits to this JSON file (atomically)")
      .flag("prompt", o.prompt, "text to continue (encoded by --tokenizer, else byte-level: token = byte)")
      .flag("tokenizer", o.tokenizer,
            "Hugging Face tokenizer.json (byte-level BPE) for --prompt and the sample, e.g. the model directory's")
      .flag("generate", o.generate, "with --prompt: tokens to sample")
      .flag("temperature", o.temperature, "sampling temperature (0: greedy)")
      .flag("top-k", o.top_k, "sample from the k most likely tokens (0: all)")
      .flag("seed", o.seed, "sampling seed (Philox; the same seed gives the same sample)");
  return examples::guarded_main("llama_eval", [&] {
    if (!cli.parse(argc, argv)) return 0;
    check_options(o);
    const examples::device_choice d = examples::choose_device(o.device);
#if defined(__CUDACC__)
    if (d.cuda) return run(exec::cuda{}, o, d.name.c_str());
#endif
    return run(exec::host{o.threads}, o, d.name.c_str());
  });
}
