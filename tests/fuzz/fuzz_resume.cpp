// Fuzz target: the whole resume path (io/checkpoint.hpp through train::trainer::resume) — a checkpoint directory
// of a tiny Llama with AdamW, loaded back into a trainer and positioned on its data. The first input byte picks
// one of the checkpoint's files (in name order); the rest replaces that file, the others stay as saved.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <utility>
#include <vector>

#include "fuzz_target.hpp"
#include "resume_fixture.hpp"

namespace {

struct world {
  std::filesystem::path dir = subspace::fuzz::scratch_directory() / "resume";
  std::vector<std::pair<std::string, std::string>> files;
  subspace::fuzz::resume_trainer trainer = subspace::fuzz::make_resume_trainer();
  subspace::data::batch_loader loader;
  std::size_t replaced = 0;  // the file the last input replaced

  world() : files(make_files(dir)), loader(subspace::fuzz::make_resume_loader(dir / "tokens.bin")) {}

  static std::vector<std::pair<std::string, std::string>> make_files(const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    return subspace::fuzz::write_resume_checkpoint(dir);
  }
  void put(std::size_t index, const void* bytes, std::size_t size) {
    subspace::fuzz::write_scratch_file("resume/checkpoint/" + files[index].first, bytes, size);
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static world w;
  if (size == 0) return 0;
  const std::size_t index = data[0] % w.files.size();
  if (w.replaced != index) {
    const auto& saved = w.files[w.replaced].second;
    w.put(w.replaced, saved.data(), saved.size());
  }
  w.put(index, data + 1, size - 1);
  w.replaced = index;
  (void)subspace::fuzz::accepts([&] { (void)w.trainer.resume(w.dir / "checkpoint", w.loader); });
  return 0;
}
