// Fuzz target: a token file (data/tokens.hpp) and the batches a loader cuts from it (data/loader.hpp). The
// first input byte chooses how the file is read (its low bit: llm.c or raw uint16) and the loader's shape; the
// rest is the file.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <vector>

#include <subspace/data/loader.hpp>
#include <subspace/data/tokens.hpp>

#include "fuzz_target.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace d = subspace::data;
  if (size == 0) return 0;
  const std::uint8_t choice = data[0];
  const auto path = subspace::fuzz::write_scratch_file("tokens.bin", data + 1, size - 1);
  const d::token_format format = (choice & 1) ? d::token_format::raw_u16 : d::token_format::llmc;
  (void)subspace::fuzz::accepts([&] {
    const d::token_file file(path, format);
    if (file.size() > 0) {
      std::vector<std::int32_t> first(std::min<std::uint64_t>(file.size(), 64));
      file.read(0, first.size(), first.data(), std::int64_t(1) << 32);
    }
    d::loader_options o;
    o.batch = 1 + (choice >> 2) % 3;
    o.seq = 1 + (choice >> 4) % 8;
    o.vocab = (choice & 0x80) ? 65536 : 256;
    o.shuffle = (choice & 0x40) != 0;
    const auto [train, val] = d::token_dataset(std::vector<std::filesystem::path>{path}, format).split(0.25);
    d::batch_loader loader(train, o);
    for (int i = 0; i < 3; ++i) (void)loader.next();
    const d::loader_position at = loader.position();
    loader.reset();
    loader.seek(at);
  });
  return 0;
}
