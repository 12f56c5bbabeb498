// bench_context: context-parallel attention (context::attention) against single-device attention, and the K/V
// bytes of the dense exchange against Mixture of Subspaces.
//
// Efficiency (default): on one GPU, --ranks D ranks are threads sharing it through comm::local, each with its own
// stream; each runs the forward and backward of context::attention (bf16, its rows of a --seq sequence, --layouts
// contiguous and zigzag, --exchanges ring and all_gather) on random q, k, v and dout. Since the ranks share the
// GPU, the wall time of all of them finishing one forward+backward is the device time the D ranks' kernels and
// copies take together; efficiency = the single-device attention's time (the library's flash kernels on the whole
// sequence, forward + backward) / that time. 1.0 would be attention split over D ranks at no cost. A shared GPU
// hides the causal imbalance of a contiguous layout (its ranks overlap), which D separate GPUs would not; the JSON
// also has the slowest rank's own time, which on a shared GPU is about the wall time. Beside each (D, layout) it
// times the attention kernels alone on the same blocks (every rank's visible blocks of every owner, forward and
// backward, its own K and V standing in for the owner's; no exchange, merge, gradient add, RoPE or copy): the
// floor the context-parallel attention stands on, so the JSON's kernels_only entries split the gap to the single
// device into the kernels' own loss on smaller blocks and what the context-parallel machinery adds.
//
// Bytes (--bytes): on the host (fp32), a model of --kv-dim wide K/V with one compressed layer and the dense last
// layer, D in-process ranks through comm::throttled, one forward and backward, dense and Mixture of Subspaces
// (default ranks 2% and 5% of d_kv, after the switch): the K/V bytes per layer, per rank and token, measured; the
// whole-model figure for --layers layers (all but the last compressed).
//
//   bench_context [--ranks 4,8] [--seq 16384] [--heads 32] [--kv-heads 8] [--head-dim 64] [--layouts
//                 contiguous,zigzag] [--exchanges ring,all_gather] [--repeat 5] [--bytes] [--kv-dim 2048]
//                 [--layers 8] [--out FILE.json] [--commit SHA]
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

#include <subspace/compress/kv_subspace_mixture.hpp>
#include <subspace/context/attention.hpp>
#include <subspace/context/layout.hpp>
#include <subspace/subspace.hpp>

#include "common/bench.hpp"
#include "common/ranks.hpp"

using namespace subspace;

namespace {

struct options {
  std::string ranks = "4,8", layouts = "contiguous,zigzag", exchanges = "ring,all_gather";
  std::int64_t seq = 16384, heads = 32, kv_heads = 8, head_dim = 64, repeat = 5;
  bool bytes = false;
  std::int64_t kv_dim = 2048, layers = 8;
  std::string out, commit = "unknown";
};

/// Random bf16 [shape] on the device.
tensor<bf16, device_space> random_device(const shape& s, std::uint64_t seed, const exec::cuda& ex) {
  tensor<bf16, device_space> t(s);
  fill_normal(ex, t.v(), seed, 0, 0.0f, 1.0f);
  return t;
}

/// Seconds of `f()` on `stream`, the median of `repeat` runs after one untimed.
template <class F>
double time_on(cudaStream_t stream, int repeat, F&& f) {
  f();
  cuda_check(cudaStreamSynchronize(stream));
  std::vector<double> t;
  for (int i = 0; i < repeat; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    cuda_check(cudaStreamSynchronize(stream));
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

struct attention_case {
  std::int64_t seq, heads, kv_heads, head_dim;
};

/// Forward + backward of dense attention on the whole sequence (one stream).
double single_device(const attention_case& c, int repeat) {
  cudaStream_t st;
  cuda_check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  const exec::cuda ex{st};
  const shape qs{1, c.seq, c.heads, c.head_dim}, ks{1, c.seq, c.kv_heads, c.head_dim};
  auto q0 = random_device(qs, 1, ex), k0 = random_device(ks, 2, ex), v = random_device(ks, 3, ex),
       dout = random_device(qs, 4, ex);
  tensor<bf16, device_space> q(qs), k(ks), out(qs), dq(qs), dk(ks), dv(ks);
  tensor<float, device_space> lse(shape{1, c.heads, c.seq});
  const std::vector<float> f = rope_inv_freq(rope_config{}, c.head_dim);
  tensor<float, device_space> inv(shape{std::int64_t(f.size())});
  copy(ex, view<const float, host_space>(f.data(), inv.shape()), inv.v());
  const std::vector<nn::position_chunk> pos{{c.seq, 0}};
  nn::dense_attention a;
  const double s = time_on(st, repeat, [&] {
    copy(ex, view<const bf16, device_space>(q0.v()), q.v());
    copy(ex, view<const bf16, device_space>(k0.v()), k.v());
    a.forward(ex, nn::attention_forward_args<bf16, device_space>{q.v(), k.v(), v.v(), out.v(), lse.v(), pos, inv.v()});
    a.backward(ex, nn::attention_backward_args<bf16, device_space>{q.v(), k.v(), v.v(), out.v(), lse.v(), dout.v(),
                                                                   dq.v(), dk.v(), dv.v(), pos, inv.v()});
  });
  cuda_check(cudaStreamDestroy(st));
  return s;
}

struct cp_result {
  double wall_s = 0, max_rank_s = 0;
};

/// Times `once` of every rank together: D threads sharing the GPU, each on its own stream (`make(r, ex)` builds rank
/// r's buffers and returns its `once`), one untimed run to size every buffer, then `repeat` runs started together;
/// the median of the group's wall time and of each rank's own.
template <class Make>
cp_result time_ranks(const examples::local_ranks<exec::cuda>& ranks, int d, int repeat, Make&& make) {
  std::barrier sync(d);
  std::vector<double> own(static_cast<std::size_t>(d));
  double wall = 0;
  std::mutex mu;
  examples::on_threads(d, [&](int r) {
    cuda_check(cudaSetDevice(0));
    const exec::cuda ex = ranks.exec(r);
    auto once = make(r, ex);
    once();
    cuda_check(cudaStreamSynchronize(ex.stream));
    std::vector<double> walls, mine;
    for (int i = 0; i < repeat; ++i) {
      sync.arrive_and_wait();
      const auto t0 = std::chrono::steady_clock::now();
      once();
      cuda_check(cudaStreamSynchronize(ex.stream));
      mine.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      sync.arrive_and_wait();  // every rank done: the wall time of the group
      walls.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(walls.begin(), walls.end());
    std::sort(mine.begin(), mine.end());
    std::lock_guard lock(mu);
    own[std::size_t(r)] = mine[mine.size() / 2];
    if (r == 0) wall = walls[walls.size() / 2];
    return 0;
  });
  return {wall, *std::max_element(own.begin(), own.end())};
}

/// Forward + backward of context::attention over `d` ranks on one GPU.
cp_result context_parallel(const attention_case& c, int d, context::placement p, context::exchange how, int repeat) {
  const examples::local_ranks<exec::cuda> ranks(d, 120.0, 0);
  std::vector<comm::local> world = ranks.world();
  const context::layout lay(c.seq, d, p);
  return time_ranks(ranks, d, repeat, [&](int r, const exec::cuda& ex) {
    const std::int64_t rows = lay.rows_per_rank();
    const shape qs{1, rows, c.heads, c.head_dim}, ks{1, rows, c.kv_heads, c.head_dim};
    auto q0 = random_device(qs, 10 + r, ex), k0 = random_device(ks, 20 + r, ex), v = random_device(ks, 30 + r, ex),
         dout = random_device(qs, 40 + r, ex);
    tensor<bf16, device_space> q(qs), k(ks), out(qs), dq(qs), dk(ks), dv(ks);
    tensor<float, device_space> lse(shape{1, c.heads, rows});
    const std::vector<float> f = rope_inv_freq(rope_config{}, c.head_dim);
    tensor<float, device_space> inv(shape{std::int64_t(f.size())});
    copy(ex, view<const float, host_space>(f.data(), inv.shape()), inv.v());
    auto g = std::make_shared<context::group<comm::local>>();
    g->communicator = &world[std::size_t(r)];
    g->layout = lay;
    return [=, &ex, q0 = std::move(q0), k0 = std::move(k0), v = std::move(v), dout = std::move(dout), q = std::move(q),
            k = std::move(k), out = std::move(out), dq = std::move(dq), dk = std::move(dk), dv = std::move(dv),
            lse = std::move(lse), inv = std::move(inv), pos = lay.positions(r),
            a = context::attention<comm::local, bf16, device_space>(g, how)]() mutable {
      copy(ex, view<const bf16, device_space>(q0.v()), q.v());
      copy(ex, view<const bf16, device_space>(k0.v()), k.v());
      a.forward(ex,
                nn::attention_forward_args<bf16, device_space>{q.v(), k.v(), v.v(), out.v(), lse.v(), pos, inv.v()});
      a.backward(ex, nn::attention_backward_args<bf16, device_space>{q.v(), k.v(), v.v(), out.v(), lse.v(), dout.v(),
                                                                     dq.v(), dk.v(), dv.v(), pos, inv.v()});
    };
  });
}

/// Rows [s0, s0 + n) of a [1, S, H, hd] view.
template <class U>
view<U, device_space> rows_of(view<U, device_space> x, std::int64_t s0, std::int64_t n) {
  return view<U, device_space>(x.data() + s0 * x.dim(2) * x.dim(3), shape{1, n, x.dim(2), x.dim(3)});
}

/// The attention kernels alone over the blocks context::attention computes on `d` ranks of layout `p` (see the top).
cp_result kernels_only(const attention_case& c, int d, context::placement p, int repeat) {
  const examples::local_ranks<exec::cuda> ranks(d, 120.0, 0);
  const context::layout lay(c.seq, d, p);
  return time_ranks(ranks, d, repeat, [&](int r, const exec::cuda& ex) {
    const std::int64_t rows = lay.rows_per_rank();
    const shape qs{1, rows, c.heads, c.head_dim}, ks{1, rows, c.kv_heads, c.head_dim};
    std::vector<context::visible_block> blocks;
    for (int owner = 0; owner < d; ++owner)
      for (const context::visible_block& vb : lay.visible_blocks(r, owner)) blocks.push_back(vb);
    return
        [=, &ex, q = random_device(qs, 10 + r, ex), k = random_device(ks, 20 + r, ex),
         v = random_device(ks, 30 + r, ex), dout = random_device(qs, 40 + r, ex), out = tensor<bf16, device_space>(qs),
         dq = tensor<bf16, device_space>(qs), dk = tensor<bf16, device_space>(ks), dv = tensor<bf16, device_space>(ks),
         lse = tensor<float, device_space>(shape{1, c.heads, rows})]() mutable {
          const auto ro = [](auto x) { return view<const bf16, device_space>(x); };
          for (const context::visible_block& vb : blocks) {
            attention_params ap;
            ap.scale = float(1.0 / std::sqrt(double(c.head_dim)));
            ap.causal = vb.masked;
            ap.q_pos0 = vb.q_pos0;
            ap.kv_pos0 = vb.k_pos0;
            const auto qb = rows_of(q.v(), vb.q0, vb.q_rows), ob = rows_of(out.v(), vb.q0, vb.q_rows);
            const auto kb = rows_of(k.v(), vb.k0, vb.k_rows), vbv = rows_of(v.v(), vb.k0, vb.k_rows);
            const view<float, device_space> lb(lse.data(), shape{1, c.heads, vb.q_rows});
            attention_forward(ex, qb, ro(kb), ro(vbv), ob, lb, ap);
            attention_backward(ex, qb, ro(kb), ro(vbv), ro(ob), view<const float, device_space>(lb),
                               ro(rows_of(dout.v(), vb.q0, vb.q_rows)), rows_of(dq.v(), vb.q0, vb.q_rows),
                               rows_of(dk.v(), vb.k0, vb.k_rows), rows_of(dv.v(), vb.k0, vb.k_rows), ap);
          }
        };
  });
}

/// K/V bytes per rank of one forward + backward of a 2-layer model (layer 0 compressed when `mos`, the last dense)
/// over `d` host ranks through comm::throttled: {layer 0, layer 1}.
std::pair<double, double> measured_bytes(std::int64_t kv_dim, int d, std::int64_t seq, bool mos) {
  nn::llama_config cfg;
  cfg.name = "bytes";
  cfg.vocab = 256;
  cfg.n_heads = kv_dim / 64;
  cfg.n_kv_heads = kv_dim / 64;
  cfg.d_model = kv_dim;
  cfg.n_layers = 2;
  cfg.ffn_hidden = 64;
  cfg.max_seq = seq;
  compress::kv_subspace_options mo;
  mo.layers = 2;
  mo.kv_dim = kv_dim;
  mo.warmup_steps = 1;
  mo.pca_steps = 1;
  const context::layout lay(seq, d, context::placement::zigzag);
  comm::local_options lo;
  lo.timeout = std::chrono::seconds(600);
  std::vector<comm::local> base = comm::local::world(d, lo);
  std::vector<comm::throttled<comm::local>> world;
  for (auto& c : base) world.emplace_back(c, comm::network{});
  std::vector<double> per_rank(static_cast<std::size_t>(d));
  comm::local::run_ranks(world, [&](comm::throttled<comm::local>& c) {
    using blocks_t = context::blocks<comm::throttled<comm::local>, compress::kv_subspace_mixture>;
    blocks_t blocks(context::exchange::ring, compress::kv_subspace_mixture(mo));
    nn::llama<exec::host, float, blocks_t> model(cfg, exec::host{1}, nn::llama_stage{}, nullptr, blocks);
    blocks.connect(c, lay);
    model.set_positions(lay.positions(c.rank()));
    model.init(1);
    auto& codec = model.block(0).attention.codec();
    if (mos) {
      // Any orthonormal bases: the bytes depend on the ranks alone.
      const auto basis = [&](compress::kv_part part, std::uint64_t seed) {
        const std::int64_t r = codec.rank(part);
        host_tensor<double> g(shape{kv_dim, r}), q(shape{kv_dim, r});
        fill_normal(exec::host{}, g.v(), seed, 0, 0.0f, 1.0f);
        orthonormalize(exec::host{1}, view<const double, host_space>(g.v()), q.v());
        return compress::kv_tables::from_basis(q.v(), 1, 7, 0, part);
      };
      codec.set_tables(basis(compress::kv_part::key, 1), basis(compress::kv_part::value, 2));
    }
    codec.begin_step(mos ? 2 : 1);
    model.block(1).attention.codec().begin_step(2);
    host_tensor<std::int32_t> tok(shape{1, lay.rows_per_rank()});
    std::fill(tok.data(), tok.data() + tok.numel(), 7);
    const comm::traffic before = c.metrics();
    model.forward(tok.v(), tok.v());
    model.backward();
    per_rank[std::size_t(c.rank())] = double(c.metrics().bytes_sent() - before.bytes_sent());
  });
  // The two layers' bytes apart: the dense last layer's are known exactly (2 (D − 1) blocks of 2 · S/D · d_kv fp32).
  const double dense_layer = 2.0 * double(d - 1) * 2.0 * double(seq / d) * double(kv_dim) * 4.0;
  const double most = *std::max_element(per_rank.begin(), per_rank.end());
  return {most - dense_layer, dense_layer};
}

/// The --ranks list, each in [1, 64].
std::vector<int> rank_counts(const std::string& list) {
  std::vector<int> out;
  for (const std::int64_t d : bench::split_ints("ranks", list)) {
    bench::check_range("ranks", d, 1, 64);
    out.push_back(int(d));
  }
  return out;
}

/// cli_error naming the flag unless `name` is one of `allowed` (checked before any timing).
void one_of(const char* flag, const std::string& name, std::initializer_list<const char*> allowed) {
  for (const char* a : allowed)
    if (name == a) return;
  std::string expected;
  for (const char* a : allowed) expected += (expected.empty() ? "" : " or ") + std::string(a);
  throw bench::cli_error(std::string("--") + flag + ": got '" + name + "', expected " + expected);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  bench::cli c("bench_context",
               "Context-parallel attention on one GPU against single-device attention, and the K/V bytes of "
               "the dense exchange against Mixture of Subspaces (see the top of bench/context/context.cu).");
  c.flag("ranks", o.ranks, "context-parallel ranks, comma-separated")
      .flag("seq", o.seq, "tokens of the sequence")
      .flag("heads", o.heads, "query heads")
      .flag("kv-heads", o.kv_heads, "key/value heads")
      .flag("head-dim", o.head_dim, "head dim (16, 32, 64 or 128)")
      .flag("layouts", o.layouts, "placements, comma-separated: contiguous, zigzag")
      .flag("exchanges", o.exchanges, "K/V exchanges, comma-separated: ring, all_gather")
      .flag("repeat", o.repeat, "timed runs per case (the median is reported)")
      .toggle("bytes", o.bytes, "measure the K/V bytes, dense against Mixture of Subspaces, instead of the time")
      .flag("kv-dim", o.kv_dim, "K/V width of the bytes measurement (a multiple of 64)")
      .flag("layers", o.layers, "layers of the whole-model bytes figure (all but the last compressed)");
  bench::output_flags(c, o.out, o.commit);
  return bench::guarded_main("bench_context", [&] {
    if (!c.parse(argc, argv)) return 0;
    bench::check_range("repeat", o.repeat, 1);
    const std::vector<int> rank_list = rank_counts(o.ranks);
    for (const std::string& l : bench::split_list("layouts", o.layouts)) one_of("layouts", l, {"contiguous", "zigzag"});
    for (const std::string& e : bench::split_list("exchanges", o.exchanges))
      one_of("exchanges", e, {"ring", "all_gather"});
    // The bytes run on the host alone (no GPU needed).
    io::json doc = bench::document("context", o.bytes ? "host, fp32" : bench::device_properties().name, o.commit);
    io::json results = io::json::array(), kernel_floor = io::json::array();
    if (o.bytes) {
      bench::check_range("kv-dim", o.kv_dim, 64);
      for (const int d : rank_list) {
        const std::int64_t seq = 16 * d;  // bytes per token do not depend on the length
        const double dense0 = measured_bytes(o.kv_dim, d, seq, false).first;
        const auto [mos0, mos1] = measured_bytes(o.kv_dim, d, seq, true);
        const double tokens = double(seq / d);
        const double whole_dense = double(o.layers) * dense0, whole_mos = double(o.layers - 1) * mos0 + mos1;
        std::printf(
            "D %d  d_kv %lld: per rank and token per layer: dense %.0f B, MoS %.0f B (%.1f%% fewer); "
            "%lld layers: %.0f B vs %.0f B (%.1f%% fewer)\n",
            d, (long long)o.kv_dim, dense0 / tokens, mos0 / tokens, 100 * (1 - mos0 / dense0), (long long)o.layers,
            whole_dense / tokens, whole_mos / tokens, 100 * (1 - whole_mos / whole_dense));
        results.push_back(io::json::object({{"ranks", io::json(d)},
                                            {"kv_dim", io::json(o.kv_dim)},
                                            {"dense_bytes_per_token_per_layer", io::json(dense0 / tokens)},
                                            {"mos_bytes_per_token_per_layer", io::json(mos0 / tokens)},
                                            {"compressed_layer_saving", io::json(1 - mos0 / dense0)},
                                            {"layers", io::json(o.layers)},
                                            {"whole_model_saving", io::json(1 - whole_mos / whole_dense)}}));
      }
    } else {
      const attention_case ac{o.seq, o.heads, o.kv_heads, o.head_dim};
      const double single = single_device(ac, int(o.repeat));
      std::printf("single device: %.3f ms (forward + backward, %lld tokens)\n", 1e3 * single, (long long)o.seq);
      for (const int d : rank_list)
        for (const std::string& ls : bench::split_list("layouts", o.layouts)) {
          const auto p = ls == "zigzag" ? context::placement::zigzag : context::placement::contiguous;
          const cp_result floor = kernels_only(ac, d, p, int(o.repeat));
          std::printf("D %-2d %-10s kernels only  all ranks %.3f ms (efficiency %.2f)\n", d, ls.c_str(),
                      1e3 * floor.wall_s, single / floor.wall_s);
          kernel_floor.push_back(io::json::object({{"ranks", io::json(d)},
                                                   {"layout", io::json(ls)},
                                                   {"all_ranks_s", io::json(floor.wall_s)},
                                                   {"single_device_s", io::json(single)},
                                                   {"efficiency", io::json(single / floor.wall_s)}}));
          for (const std::string& es : bench::split_list("exchanges", o.exchanges)) {
            const auto e = es == "ring" ? context::exchange::ring : context::exchange::all_gather;
            const cp_result m = context_parallel(ac, d, p, e, int(o.repeat));
            std::printf("D %-2d %-10s %-10s  all ranks %.3f ms (efficiency %.2f)\n", d, ls.c_str(), es.c_str(),
                        1e3 * m.wall_s, single / m.wall_s);
            results.push_back(io::json::object({{"ranks", io::json(d)},
                                                {"layout", io::json(ls)},
                                                {"exchange", io::json(es)},
                                                {"all_ranks_s", io::json(m.wall_s)},
                                                {"slowest_rank_s", io::json(m.max_rank_s)},
                                                {"single_device_s", io::json(single)},
                                                {"efficiency", io::json(single / m.wall_s)}}));
          }
        }
    }
    doc.set("config", io::json::object({{"seq", io::json(o.seq)},
                                        {"heads", io::json(o.heads)},
                                        {"kv_heads", io::json(o.kv_heads)},
                                        {"head_dim", io::json(o.head_dim)},
                                        {"repeat", io::json(o.repeat)}}));
    doc.set("results", results);
    if (!o.bytes) doc.set("kernels_only", kernel_floor);
    if (!o.out.empty()) bench::write_document(o.out, doc);
    return 0;
  });
}
