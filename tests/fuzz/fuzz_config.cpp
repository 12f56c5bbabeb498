// Fuzz target: a model's config.json — the Llama's (Hugging Face LlamaConfig, io/hf_config.hpp, read from a file
// as llama_eval and --init-from read it) and the selective SSM's (io/struct_config.hpp, as its checkpoints read
// it). A configuration either reader accepts must be valid and survive a write and a read unchanged: a field that
// changed on the way back would resume another model.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include <adjoint/config.hpp>
#include <subspace/io/hf_config.hpp>
#include <subspace/io/struct_config.hpp>
#include <subspace/util/json.hpp>

#include "fuzz_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace io = subspace::io;
  using subspace::fuzz::accepts;
  using subspace::fuzz::promise;
  const auto path = subspace::fuzz::write_scratch_file("config.json", data, size);
  subspace::nn::llama_config llama;
  const bool llama_accepted = accepts([&] { llama = io::read_hf_config(path); });
  if (llama_accepted) {
    llama.validate();
    const auto back = io::llama_config_from_hf(io::json::parse(io::to_hf_config(llama).dump(2)), "written back");
    promise(io::architecture_difference(llama, back).empty(),
            "config.json (Llama): an accepted configuration reads back unchanged");
  }

  using ssm_io = io::config_io<adjoint::ssm_config>;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  adjoint::ssm_config ssm;
  if (accepts([&] {
        ssm = ssm_io::from_json(io::json::parse(text, "config.json"), "config.json");
        ssm.validate();
      })) {
    const auto back = ssm_io::from_json(io::json::parse(ssm_io::to_json(ssm, {}).dump(2)), "written back");
    back.validate();
    promise(ssm_io::difference(ssm, back).empty(), "config.json (SSM): an accepted configuration reads back unchanged");
  }
  subspace::fuzz::accepted = subspace::fuzz::accepted || llama_accepted;
  return 0;
}
