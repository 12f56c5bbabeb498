// bench_ssm: the selective SSM's gradient engines on one GPU (docs/ssm.md).
//
// Memory (default): a bf16 model of --layers, --d-model, --state (K 8, P 512, N 64) at batch 1; for each engine
// (exact, exact with C recomputed, sharded, bptt) and each --seqs length, one forward and backward: the activation
// bytes the model allocated, the engine's formula, the device memory in use above the model's weights (cudaMemGetInfo,
// the transient buffers of the loss and the GEMMs included) and the step time. With --probe, the longest sequence
// each engine trains (forward + backward without running out of memory), found by doubling from 4096 up to
// --probe-limit and then three bisections; the ratio to bptt's is the claim to check (the paper: up to 3x).
//
// Scans (--scan): scan_forward and scan_reverse on bf16 [--scan-batch x --scan-seq, --state] against a
// device-to-device copy of the same bytes in the same run: the fraction of the copy bandwidth each reaches.
//
// Deviation (--deviation): the sharded engine against bptt (fp32, random tokens, --dev-seq tokens), per layer:
// relative norm error and cosine of each layer's gradients, for K in {2, 4, 8} and windows {none, T/4, 16}.
//
//   bench_ssm [--layers 8] [--d-model 512] [--state 64] [--seqs 1024,4096,16384] [--probe] [--probe-limit N]
//             [--scan] [--deviation] [--out FILE.json] [--commit SHA]
#include <cuda_runtime.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <adjoint/adjoint.hpp>

#include "common/bench.hpp"
#include "common/format.hpp"

using namespace subspace;

namespace {

struct options {
  std::int64_t layers = 8, d_model = 512, state = 64, probe_limit = std::int64_t(1) << 22;
  std::int64_t scan_batch = 4, scan_seq = 65536, dev_seq = 512;
  std::string seqs = "1024,4096,16384";
  bool probe = false, scan = false, deviation = false;
  std::string out, commit = "unknown";
};

adjoint::ssm_config model_of(const options& o) {
  adjoint::ssm_config c = adjoint::presets::bench();
  c.layers = o.layers;
  c.d_model = o.d_model;
  c.state = o.state;
  c.validate();
  return c;
}

std::size_t device_used() {
  std::size_t free = 0, total = 0;
  cuda_check(cudaMemGetInfo(&free, &total));
  return total - free;
}

/// Returns the pool's cached scratch to the driver, so the next measurement starts clean.
void trim_pool() {
  int device = 0;
  cuda_check(cudaGetDevice(&device));
  cudaMemPool_t pool = nullptr;
  cuda_check(cudaDeviceGetDefaultMemPool(&pool, device));
  cuda_check(cudaDeviceSynchronize());
  cuda_check(cudaMemPoolTrimTo(pool, 0));
}

struct step_memory {
  bool fits = false;
  double activation_bytes = 0, used_bytes = 0, seconds = 0;
};

/// One forward and backward of `engine` on random tokens of length T; out of memory gives fits = false.
template <class Engine>
step_memory measure(const adjoint::ssm_config& cfg, Engine engine, std::int64_t T) {
  trim_pool();
  step_memory m;
  try {
    const exec::cuda ex{};
    adjoint::selective_ssm<exec::cuda, bf16, Engine> model(cfg, ex, engine);
    model.init(1);
    ex.synchronize();
    const std::size_t before = device_used();
    host_tensor<std::int32_t> tokens({1, T}), targets({1, T});
    for (std::int64_t i = 0; i < T; ++i) {
      tokens.data()[i] = std::int32_t((i * 7919) % cfg.vocab);
      targets.data()[i] = std::int32_t((i * 104729 + 3) % cfg.vocab);
    }
    const auto t0 = std::chrono::steady_clock::now();
    model.forward(tokens.v(), targets.v());
    model.backward();
    ex.synchronize();
    m.seconds = bench::seconds_since(t0);
    m.used_bytes = double(device_used() - before);
    m.activation_bytes = double(model.activation_bytes());
    m.fits = true;
  } catch (const std::exception& e) {
    if (std::string(e.what()).find("out of memory") == std::string::npos) throw;
    cudaGetLastError();  // clear the failed allocation
  }
  trim_pool();
  return m;
}

/// The longest T (batch 1) that fits: doubling from 4096 to `limit`, then three bisections.
template <class Engine>
std::pair<std::int64_t, bool> longest(const adjoint::ssm_config& cfg, Engine engine, std::int64_t limit) {
  std::int64_t good = 0, bad = 0;
  for (std::int64_t T = 4096; T <= limit; T *= 2) {
    if (measure(cfg, engine, T).fits) good = T;
    else {
      bad = T;
      break;
    }
  }
  if (bad == 0) return {good, true};  // reached the limit
  for (int i = 0; i < 3 && good > 0; ++i) {
    const std::int64_t mid = (good + bad) / 2;
    if (measure(cfg, engine, mid).fits) good = mid;
    else bad = mid;
  }
  return {good, false};
}

template <class Engine>
void memory_rows(const std::vector<std::int64_t>& seqs, const adjoint::ssm_config& cfg, Engine engine,
                 const std::string& name, io::json& results) {
  for (const std::int64_t T : seqs) {
    const step_memory m = measure(cfg, engine, T);
    const double formula = adjoint::activation_values(engine, T, cfg.layers, cfg.d_model, cfg.state) * sizeof(bf16);
    if (m.fits)
      std::printf("%-16s T %-8lld activations %8.1f MiB (formula %8.1f MiB, %+.1f%%), in use %8.1f MiB, %.3f s\n",
                  name.c_str(), (long long)T, m.activation_bytes / 1048576, formula / 1048576,
                  100 * (m.activation_bytes / formula - 1), m.used_bytes / 1048576, m.seconds);
    else std::printf("%-16s T %-8lld out of memory\n", name.c_str(), (long long)T);
    results.push_back(io::json::object({{"engine", io::json(name)},
                                        {"seq", io::json(T)},
                                        {"fits", io::json(m.fits)},
                                        {"activation_bytes", io::json(m.activation_bytes)},
                                        {"formula_bytes", io::json(formula)},
                                        {"device_bytes_in_use", io::json(m.used_bytes)},
                                        {"step_s", io::json(m.seconds)}}));
  }
}

template <class Engine>
std::int64_t probe_row(const options& o, const adjoint::ssm_config& cfg, Engine engine, const std::string& name,
                       io::json& results) {
  const auto [T, capped] = longest(cfg, engine, o.probe_limit);
  std::printf("%-16s longest trainable sequence %lld tokens%s\n", name.c_str(), (long long)T,
              capped ? " (the probe's limit)" : "");
  results.push_back(io::json::object(
      {{"engine", io::json(name)}, {"max_context", io::json(T)}, {"reached_probe_limit", io::json(capped)}}));
  return T;
}

io::json scan_bandwidth(const options& o, const exec::cuda& ex) {
  const std::int64_t n = o.scan_batch * o.scan_seq, N = o.state;
  tensor<bf16, device_space> a({n, N}), x({n, N}), h({n, N}), copy_dst({3 * n, N}), copy_src({3 * n, N});
  fill(ex, a.v(), bf16(0.9f));
  fill_normal(ex, x.v(), 1, 0, 0.0f, 1.0f);
  fill(ex, copy_src.v(), bf16(1.0f));
  // The scan reads a and x and writes h (or μ): `bytes` of traffic; a copy of bytes / 2 moves as many.
  const double bytes = 3.0 * double(n * N) * sizeof(bf16);
  const auto copy3 = [&] {
    cuda_check(
        cudaMemcpyAsync(copy_dst.data(), copy_src.data(), std::size_t(bytes / 2), cudaMemcpyDeviceToDevice, ex.stream));
  };
  const auto fwd = bench::time_alternating(
      ex.stream, 2, 10, [&] { adjoint::scan_forward<bf16>(ex, a.v(), x.v(), h.v(), o.scan_seq); }, copy3);
  const auto rev = bench::time_alternating(
      ex.stream, 2, 10, [&] { adjoint::scan_reverse<bf16>(ex, a.v(), x.v(), h.v(), o.scan_seq); }, copy3);
  const double copy_bw = bytes / (fwd.ref_ms * 1e-3);
  const double fwd_bw = bytes / (fwd.ours_ms * 1e-3), rev_bw = bytes / (rev.ours_ms * 1e-3);
  std::printf(
      "scans on [%lld x %lld, %lld] bf16: forward %.1f GB/s, reverse %.1f GB/s, device copy %.1f GB/s "
      "(%.0f%% and %.0f%% of it)\n",
      (long long)o.scan_batch, (long long)o.scan_seq, (long long)N, fwd_bw / 1e9, rev_bw / 1e9, copy_bw / 1e9,
      100 * fwd_bw / copy_bw, 100 * rev_bw / copy_bw);
  return io::json::object({{"batch", io::json(o.scan_batch)},
                           {"seq", io::json(o.scan_seq)},
                           {"state", io::json(N)},
                           {"forward_ms", io::json(fwd.ours_ms)},
                           {"reverse_ms", io::json(rev.ours_ms)},
                           {"forward_gb_s", io::json(fwd_bw / 1e9)},
                           {"reverse_gb_s", io::json(rev_bw / 1e9)},
                           {"copy_gb_s", io::json(copy_bw / 1e9)},
                           {"forward_fraction_of_copy", io::json(fwd_bw / copy_bw)},
                           {"reverse_fraction_of_copy", io::json(rev_bw / copy_bw)}});
}

/// Each layer's gradient (its six tensors as one vector) of a fp32 device model.
template <class Engine>
std::vector<std::vector<double>> layer_gradients(const adjoint::ssm_config& cfg, Engine engine,
                                                 const host_tensor<std::int32_t>& tokens,
                                                 const host_tensor<std::int32_t>& targets) {
  const exec::cuda ex{};
  adjoint::selective_ssm<exec::cuda, float, Engine> model(cfg, ex, engine);
  model.init(7);
  model.zero_grad();
  model.forward(tokens.v(), targets.v());
  model.backward();
  const auto flat = model.parameters().flat_grads();
  host_tensor<float> h(flat.shape());
  copy(ex, view<const float, device_space>(flat), h.v());
  ex.synchronize();
  std::vector<std::vector<double>> out;
  for (std::int64_t k = 0; k < cfg.layers; ++k) {
    const auto [first, last] = model.layer_parameters(k);
    std::vector<double> g;
    for (std::size_t i = first; i < last; ++i) {
      const std::int64_t off = model.parameters().offset(i), count = model.parameters().info(i).shape.numel();
      g.insert(g.end(), h.data() + off, h.data() + off + count);
    }
    out.push_back(std::move(g));
  }
  return out;
}

io::json deviation(const options& o) {
  io::json rows = io::json::array();
  const std::int64_t T = o.dev_seq;
  host_tensor<std::int32_t> tokens({1, T}), targets({1, T});
  for (std::int64_t i = 0; i < T; ++i) {
    tokens.data()[i] = std::int32_t((i * 7919 + 11) % 256);
    targets.data()[i] = std::int32_t((i * 104729 + 5) % 256);
  }
  for (const std::int64_t K : {2, 4, 8}) {
    adjoint::ssm_config cfg = adjoint::presets::tiny();
    cfg.d_model = 128;
    cfg.state = 32;
    cfg.layers = K;
    cfg.init_std = 0.05f;
    const auto reference = layer_gradients(cfg, adjoint::bptt{}, tokens, targets);
    for (const std::int64_t window : {std::int64_t(0), T / 4, std::int64_t(16)}) {
      const auto got = layer_gradients(cfg, adjoint::sharded_adjoint{.window = window}, tokens, targets);
      io::json layers = io::json::array();
      std::printf("K %lld window %-5s:", (long long)K, window ? std::to_string(window).c_str() : "none");
      for (std::int64_t k = 0; k < K; ++k) {
        double num = 0, den = 0, dot = 0, nn = 0;
        const auto& a = got[std::size_t(k)];
        const auto& b = reference[std::size_t(k)];
        for (std::size_t i = 0; i < a.size(); ++i) {
          num += (a[i] - b[i]) * (a[i] - b[i]);
          den += b[i] * b[i];
          dot += a[i] * b[i];
          nn += a[i] * a[i];
        }
        const double rel = std::sqrt(num / den), cosine = dot / std::sqrt(nn * den);
        std::printf(" [%lld] %.3f/%.3f", (long long)k, rel, cosine);
        layers.push_back(
            io::json::object({{"layer", io::json(k)}, {"rel_error", io::json(rel)}, {"cosine", io::json(cosine)}}));
      }
      std::printf("  (relative error / cosine per layer)\n");
      rows.push_back(io::json::object(
          {{"layers", io::json(K)}, {"window", io::json(window)}, {"seq", io::json(T)}, {"per_layer", layers}}));
    }
  }
  return rows;
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  bench::cli c("bench_ssm",
               "The selective SSM's gradient engines on one GPU: activation memory against the formulas and the "
               "longest\ntrainable context per engine, the scans against the copy bandwidth, and the sharded "
               "engine's deviation\nfrom bptt (see the top of bench/ssm/ssm.cu).");
  c.flag("layers", o.layers, "layers K of the memory model")
      .flag("d-model", o.d_model, "width P of the memory model")
      .flag("state", o.state, "state size N (memory model and scans)")
      .flag("seqs", o.seqs, "sequence lengths of the memory table, comma-separated")
      .toggle("probe", o.probe, "find the longest trainable sequence per engine")
      .flag("probe-limit", o.probe_limit, "longest sequence the probe tries")
      .toggle("scan", o.scan, "time the scans against a device copy")
      .flag("scan-batch", o.scan_batch, "sequences of the scan timing")
      .flag("scan-seq", o.scan_seq, "tokens per sequence of the scan timing")
      .toggle("deviation", o.deviation, "the sharded engine's per-layer deviation from bptt")
      .flag("dev-seq", o.dev_seq, "tokens of the deviation runs");
  bench::output_flags(c, o.out, o.commit);
  return bench::guarded_main("bench_ssm", [&] {
    if (!c.parse(argc, argv)) return 0;
    const std::vector<std::int64_t> seqs = bench::split_ints("seqs", o.seqs);
    for (const std::int64_t T : seqs) bench::check_range("seqs", T, 1, std::int64_t(1) << 40);
    const adjoint::ssm_config cfg = model_of(o);
    io::json doc = bench::document("ssm", bench::device_properties().name, o.commit);
    doc.set("config", io::json::object({{"layers", io::json(cfg.layers)},
                                        {"d_model", io::json(cfg.d_model)},
                                        {"state", io::json(cfg.state)},
                                        {"vocab", io::json(cfg.vocab)},
                                        {"dtype", io::json("bf16")},
                                        {"batch", io::json(1)}}));
    io::json memory = io::json::array(), probes = io::json::array();
    std::printf("model: K %lld, P %lld, N %lld, %s parameters\n", (long long)cfg.layers, (long long)cfg.d_model,
                (long long)cfg.state, examples::human(double(cfg.parameters())).c_str());
    memory_rows(seqs, cfg, adjoint::exact_adjoint{}, "exact", memory);
    memory_rows(seqs, cfg, adjoint::exact_adjoint{.recompute_c = true}, "exact_recompute", memory);
    memory_rows(seqs, cfg, adjoint::sharded_adjoint{}, "sharded", memory);
    memory_rows(seqs, cfg, adjoint::bptt{}, "bptt", memory);
    doc.set("memory", memory);
    if (o.probe) {
      const std::int64_t b = probe_row(o, cfg, adjoint::bptt{}, "bptt", probes);
      const std::int64_t e = probe_row(o, cfg, adjoint::exact_adjoint{}, "exact", probes);
      const std::int64_t r = probe_row(o, cfg, adjoint::exact_adjoint{.recompute_c = true}, "exact_recompute", probes);
      std::printf("longest context vs bptt: exact %.2fx, exact with C recomputed %.2fx\n", double(e) / double(b),
                  double(r) / double(b));
      doc.set("max_context", probes);
    }
    if (o.scan) doc.set("scans", scan_bandwidth(o, exec::cuda{}));
    if (o.deviation) doc.set("deviation", deviation(o));
    if (!o.out.empty()) bench::write_document(o.out, doc);
    return 0;
  });
}
