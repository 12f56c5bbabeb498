#pragma once
// The training-data position of every data-parallel replica, kept in one checkpoint. Replicas read their own
// shards with their own shuffle seeds, so replica 0's position alone cannot resume the others: save() records
// each replica's position in the sidecar's extra, and resume() seeks each replica's loader to its own.
//
//   ts.extra = with_replica_positions(comm, replica, replicas, loader.position(), std::move(extra));  // save
//   loader.seek(replica_position(ts, replica, replicas, dir));                                       // resume

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "../core/error.hpp"
#include "../data/loader.hpp"
#include "../io/checkpoint_state.hpp"
#include "bucket.hpp"

namespace subspace::dist {

/// The key of the replicas' positions in a checkpoint's extra values: an array, entry q for replica q.
inline constexpr const char* replica_positions_key = "replica_train_data";

/// Collective over `comm` (every rank of the run, each giving its replica's index in [0, replicas) and its loader's
/// position): `extra` with every replica's position under replica_positions_key. The ranks of one replica read the
/// same batches, so any of them speaks for it; they must agree.
template <class C>
io::json with_replica_positions(C& comm, int replica, int replicas, const data::loader_position& mine, io::json extra) {
  constexpr std::size_t fields = 6;
  const std::vector<std::uint64_t> all = detail::all_gather_host(
      comm, {std::uint64_t(replica), mine.epoch, mine.cursor, mine.windows, std::uint64_t(mine.shuffle), mine.seed});
  std::vector<io::json> by_replica(static_cast<std::size_t>(replicas));
  for (std::size_t r = 0; r < std::size_t(comm.size()); ++r) {
    const std::uint64_t* f = all.data() + r * fields;
    require(f[0] < std::uint64_t(replicas), [&] {
      return "dist::with_replica_positions: rank " + std::to_string(r) + " names replica " + std::to_string(f[0]) +
             " of " + std::to_string(replicas);
    });
    const data::loader_position p{f[1], f[2], f[3], f[4] != 0, f[5]};
    io::json& slot = by_replica[std::size_t(f[0])];
    if (slot.is_null()) {
      slot = p.to_json();
    } else {
      require(data::loader_position::from_json(slot) == p, [&] {
        return "dist::with_replica_positions: rank " + std::to_string(r) + " of replica " + std::to_string(f[0]) +
               " is at another data position than the replica's other ranks";
      });
    }
  }
  io::json positions = io::json::array();
  for (std::size_t q = 0; q < by_replica.size(); ++q) {
    require(!by_replica[q].is_null(),
            [&] { return "dist::with_replica_positions: no rank speaks for replica " + std::to_string(q); });
    positions.push_back(std::move(by_replica[q]));
  }
  if (extra.is_null()) extra = io::json::object();
  extra.set(replica_positions_key, std::move(positions));
  return extra;
}

/// Where replica `replica` of `replicas` resumes reading: its own saved position, or the checkpoint's single one
/// when it was written without replica positions (one replica). `dir` names the checkpoint in errors.
inline data::loader_position replica_position(const io::trainer_state& ts, int replica, int replicas,
                                              const std::filesystem::path& dir) {
  const io::json* positions = ts.extra.is_object() ? ts.extra.find(replica_positions_key) : nullptr;
  if (positions == nullptr) {
    require(replicas == 1, [&] {
      return dir.string() + ": the checkpoint holds one data position and this run has " + std::to_string(replicas) +
             " data replicas (resume it with one replica)";
    });
    return ts.train_data;
  }
  require(positions->is_array() && positions->size() == std::size_t(replicas), [&] {
    return dir.string() + ": \"" + replica_positions_key + "\" holds " +
           (positions->is_array() ? std::to_string(positions->size()) + " data replicas' positions"
                                  : std::string("no array")) +
           " and this run has " + std::to_string(replicas) + " data replicas (resume it with as many)";
  });
  return data::loader_position::from_json(positions->at(std::size_t(replica)));
}

}  // namespace subspace::dist
