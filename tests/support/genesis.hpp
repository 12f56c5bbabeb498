#pragma once
// The first 50 chapters of the King James Bible (Genesis, public domain) as byte-level token shards, and loaders
// over them: the real text the trainer tests train on.
#include <cstdint>
#include <filesystem>
#include <string>

#include <subspace/data/loader.hpp>
#include <subspace/data/text.hpp>
#include <subspace/data/tokens.hpp>

namespace subspace::testing {

/// Writes genesis_{train,val}_*.bin shards (10% held out) into `dir`.
inline subspace::data::shards_written genesis_shards(const std::filesystem::path& dir) {
  subspace::data::text_to_shards_options o;
  o.prefix = "genesis";
  o.val_fraction = 0.1;
  return subspace::data::text_to_shards({std::filesystem::path(SUBSPACE_TEST_DATA_DIR) / "kjv_genesis.txt"}, dir, o);
}

/// A loader over the `part` ("train" or "val") shards genesis_shards wrote into `dir`.
inline subspace::data::batch_loader loader_for(const std::filesystem::path& dir, const char* part, std::int64_t batch,
                                               std::int64_t seq, bool shuffle, std::uint64_t seed = 7) {
  subspace::data::loader_options o;
  o.batch = batch;
  o.seq = seq;
  o.vocab = 256;
  o.shuffle = shuffle;
  o.seed = seed;
  o.name = part;
  return subspace::data::batch_loader(
      subspace::data::token_dataset::open((dir / (std::string("genesis_") + part + "_*.bin")).string()), o);
}

}  // namespace subspace::testing
