#pragma once
// What a context-parallel trainer does for a Mixture-of-Subspaces model (compress::kv_subspace_mixture) besides
// running its steps: tell every layer's codec the step (warm-up, compressed, unplugged; whether the training
// forwards add to Σ), switch to compression after the warm-up — Σ summed over the world, U_0, P and Q computed on
// rank 0 and broadcast, then checked equal on every rank by hash — and keep the codecs' state (their tables, a
// partial Σ) in checkpoints. For a model whose K/V codec is kv_identity every function here does nothing.

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../comm/concepts.hpp"
#include "../compress/kv_subspace_mixture.hpp"
#include "../core/error.hpp"
#include "../dist/bucket.hpp"
#include "../io/safetensors.hpp"
#include "../util/file.hpp"

namespace subspace::context {

/// The file next to a checkpoint's tensors that holds the codecs' tables and partial second moments.
inline constexpr const char* kv_state_file_name = "kv_subspace.safetensors";

namespace detail {
template <class Codec>
inline constexpr bool is_mos_codec = requires(Codec& c) { c.set_tables(compress::kv_tables{}, compress::kv_tables{}); };

inline std::string kv_tensor_name(std::int64_t layer, compress::kv_part p, const char* what) {
  return "layers." + std::to_string(layer) + (p == compress::kv_part::key ? ".k." : ".v.") + what;
}
}  // namespace detail

/// f(codec) for every layer's codec of `model` (a whole model or a pipeline stage) that compresses (none for
/// kv_identity).
template <class Model, class F>
void for_each_mos_codec(Model& model, F&& f) {
  using codec_type = std::remove_cvref_t<decltype(model.block(0).attention.codec())>;
  if constexpr (detail::is_mos_codec<codec_type>)
    for (std::int64_t l = model.stage().first_layer; l < model.stage().last_layer; ++l) {
      auto& c = model.block(l).attention.codec();
      if (!c.is_final()) f(c);
    }
}
/// The same over a rank's pipeline chunks, in order: every function below takes either.
template <class Model, class F>
void for_each_mos_codec(std::vector<Model>& chunks, F&& f) {
  for (Model& m : chunks) for_each_mos_codec(m, f);
}

/// Before step `step` (1-based) of training; end_kv_step after its forwards and backwards.
template <class Model>
void begin_kv_step(Model& model, std::int64_t step) {
  for_each_mos_codec(model, [&](auto& c) { c.begin_step(step); });
}
template <class Model>
void end_kv_step(Model& model) {
  for_each_mos_codec(model, [&](auto& c) { c.end_step(); });
}
/// The phase of `step` without accumulating (evaluation, or after a resume).
template <class Model>
void set_kv_phase(Model& model, std::int64_t step) {
  begin_kv_step(model, step);
  end_kv_step(model);
}

/// Collective over `world`: every compressing layer's U_0 from Σ summed over the ranks (uncentered PCA on rank 0),
/// P and Q from the seeded generators, broadcast in fp32 and installed; then every rank's tables are compared by
/// hash. Call once, after the last warm-up step.
template <class Model, class Comm>
void switch_to_compressed(Model& model, Comm& world, const compress::kv_subspace_options& o) {
  std::vector<std::uint64_t> hashes;
  for_each_mos_codec(model, [&](auto& c) {
    compress::kv_tables tables[2];
    for (const auto p : {compress::kv_part::key, compress::kv_part::value}) {
      host_tensor<double>& sigma = c.second_moment(p);
      require(c.has_second_moment(p), [&] {
        return "context::switch_to_compressed: layer " + std::to_string(c.layer()) +
               " gathered no second moment of its K/V (the warm-up's last pca_steps must run as training steps)";
      });
      world.all_reduce(sigma.v(), comm::reduce_op::sum).wait();
      compress::kv_tables& t = tables[int(p)];
      if (world.rank() == 0) {
        t = compress::kv_tables::from_basis(compress::top_eigenbasis(sigma.v(), c.rank(p)).v(), o.generators,
                                            o.generator_seed, c.layer(), p);
      } else {
        t.d = o.kv_dim;
        t.r = c.rank(p);
        t.m = o.generators;
        t.data = host_tensor<float>(shape{(1 + t.m + t.m * t.m) * t.d * t.r});
      }
      world.broadcast(t.data.v(), 0).wait();
      hashes.push_back(t.hash());
    }
    c.set_tables(std::move(tables[0]), std::move(tables[1]));
  });
  if (hashes.empty()) return;
  const std::vector<std::uint64_t> all = dist::detail::all_gather_host(world, hashes);
  for (int r = 0; r < world.size(); ++r)
    for (std::size_t i = 0; i < hashes.size(); ++i)
      require(all[std::size_t(r) * hashes.size() + i] == hashes[i], [&] {
        return "context::switch_to_compressed: rank " + std::to_string(r) + " holds other K/V tables than rank " +
               std::to_string(world.rank()) + " (table " + std::to_string(i) + ")";
      });
}

/// The file of rank r's partial second moments (a checkpoint inside the PCA window).
inline std::string kv_sigma_file_name(int rank) {
  return "kv_subspace_sigma.rank-" + std::to_string(rank) + ".safetensors";
}

namespace detail {
inline void write_atomically(const io::safetensors_writer& w, const std::filesystem::path& path) {
  std::filesystem::create_directories(path.parent_path());
  const std::filesystem::path tmp = path.string() + ".tmp";
  w.write(tmp);
  std::filesystem::rename(tmp, path);
}
}  // namespace detail

/// Writes this rank's part of the codecs' state into `dir`: the tables (once switched, when write_tables: rank 0
/// of a shared checkpoint, every rank of per-rank ones) to kv_subspace.safetensors; every rank its partial second
/// moments (inside the PCA window: each rank's own sum,
/// so a resume continues them exactly) to kv_subspace_sigma.rank-<r>.safetensors. Nothing without compressing
/// codecs.
template <class Model>
void save_kv_state(Model& model, const std::filesystem::path& dir, int rank, bool write_tables) {
  io::safetensors_writer tables, sigmas;
  bool any_tables = false, any_sigma = false;
  for_each_mos_codec(model, [&](auto& c) {
    for (const auto p : {compress::kv_part::key, compress::kv_part::value}) {
      if (c.switched()) {
        tables.add(detail::kv_tensor_name(c.layer(), p, "tables"), view<const float, host_space>(c.tables(p).data.v()));
        any_tables = true;
      }
      if (c.has_second_moment(p)) {
        sigmas.add(detail::kv_tensor_name(c.layer(), p, "sigma"),
                   view<const double, host_space>(c.second_moment(p).v()));
        any_sigma = true;
      }
    }
  });
  if (any_tables && write_tables) detail::write_atomically(tables, dir / kv_state_file_name);
  if (any_sigma) detail::write_atomically(sigmas, dir / kv_sigma_file_name(rank));
}

/// Restores what save_kv_state wrote for `rank` of `ranks` (a checkpoint from before the PCA window restores
/// nothing; a shared one from inside it needs as many ranks as saved it, each its own partial second moment).
template <class Model>
void load_kv_state(Model& model, const std::filesystem::path& dir, int rank, int ranks, bool shared,
                   const compress::kv_subspace_options& o) {
  bool any = false;
  for_each_mos_codec(model, [&](auto&) { any = true; });
  if (!any) return;
  if (shared) {
    int saved = 0;
    for (const auto& e : std::filesystem::directory_iterator(dir)) {
      const std::string name = e.path().filename().string();
      saved += name.rfind("kv_subspace_sigma.rank-", 0) == 0 && name.size() > 12 &&
               name.compare(name.size() - 12, 12, ".safetensors") == 0;
    }
    require(saved == 0 || saved == ranks, [&] {
      return "context::load_kv_state: " + dir.string() + " was saved inside the Mixture-of-Subspaces PCA window by " +
             std::to_string(saved) + " ranks, each with its own partial second moment; resume it with " +
             std::to_string(saved) + " ranks, not " + std::to_string(ranks);
    });
  }
  std::optional<io::safetensors_file> tables, sigmas;
  if (std::filesystem::exists(dir / kv_state_file_name)) tables.emplace(dir / kv_state_file_name);
  if (std::filesystem::exists(dir / kv_sigma_file_name(rank))) sigmas.emplace(dir / kv_sigma_file_name(rank));
  for_each_mos_codec(model, [&](auto& c) {
    compress::kv_tables loaded[2];
    bool switched = false;
    for (const auto p : {compress::kv_part::key, compress::kv_part::value}) {
      if (const io::st_tensor* t = tables ? tables->find(detail::kv_tensor_name(c.layer(), p, "tables")) : nullptr) {
        compress::kv_tables& k = loaded[int(p)];
        k.d = o.kv_dim;
        k.r = c.rank(p);
        k.m = o.generators;
        k.data = host_tensor<float>(shape{(1 + k.m + k.m * k.m) * k.d * k.r});
        tables->read(*t, k.data.v());
        switched = true;
      }
      if (const io::st_tensor* t = sigmas ? sigmas->find(detail::kv_tensor_name(c.layer(), p, "sigma")) : nullptr) {
        host_tensor<double>& sigma = c.second_moment(p);
        sigma = host_tensor<double>(shape{o.kv_dim, o.kv_dim});
        sigmas->read(*t, sigma.v());
      }
    }
    if (switched) c.set_tables(std::move(loaded[0]), std::move(loaded[1]));
  });
}

}  // namespace subspace::context
