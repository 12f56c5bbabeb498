// bench_attention: subspace::attention_forward / attention_backward (the fused flash-attention-style kernels)
// against a naive attention written here and measured in the same run on the same data: batched cuBLASLt GEMMs
// (through subspace::gemm) for Q K^T, P V and the four backward products, a softmax kernel and a dS kernel, with the
// full S x S score and probability matrices in memory (bf16, fp32 statistics). The naive version reads Q, K, V and
// dO in a head-major layout with the KV heads repeated per query head, prepared once outside the timed loop (as
// PyTorch's transpose + repeat_kv would do); its group sum of dK and dV is timed.
//
//   bench_attention [--configs LIST] [--reps N] [--warmup N] [--kernel fastest|portable] [--no-causal] [--no-reference]
//                   [--out FILE.json] [--commit SHA]
//
// A config is B,S,Hq,Hkv,hd (e.g. 8,2048,32,8,64). Default: the Llama benchmark shapes (1B: 8,2048,32,8,64;
// 124M: 16,1024,12,4,64; 2B: 8,1024,32,8,128) and two long hd-128 ones (4,2048,32,8,128; 2,8192,16,8,128). TFLOP/s
// count the useful FLOPs for both implementations: forward 4 B Hq S^2 hd (halved when causal), backward 2.5x the
// forward (five products against two). Every call is timed alone with CUDA events, ours and the reference alternating;
// the median is reported, with the relative difference between the two implementations' out, dq, dk and dv.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

#include <subspace/kernels/attention.hpp>
#include <subspace/kernels/gemm.hpp>

#include "common/bench.hpp"

using namespace subspace;

namespace {

struct problem {
  std::int64_t batch, seq, heads, kv_heads, head_dim;
  std::string label() const {
    return std::to_string(batch) + "," + std::to_string(seq) + "," + std::to_string(heads) + "," +
           std::to_string(kv_heads) + "," + std::to_string(head_dim);
  }
};

struct config {
  int reps = 20;
  int warmup = 5;
  bool causal = true;
  bool reference = true;
  attention_kernel kernel = attention_kernel::fastest;
  std::string out;
  std::string commit = "unknown";
  std::vector<problem> problems;
};

using timing = bench::pair_timing;

struct result {
  problem p;
  double fwd_flop = 0, bwd_flop = 0;
  timing fwd, bwd;
  double diff_out = -1, diff_dq = -1, diff_dk = -1, diff_dv = -1;  // -1: no reference run
};

std::vector<problem> parse_problems(const std::string& list) {
  std::vector<problem> out;
  for (const std::string& item : bench::split_list("configs", list, ';')) {
    long long b = 0, s = 0, hq = 0, hkv = 0, hd = 0;
    char tail = 0;
    if (std::sscanf(item.c_str(), "%lld,%lld,%lld,%lld,%lld%c", &b, &s, &hq, &hkv, &hd, &tail) != 5 || b <= 0 ||
        s <= 0 || hq <= 0 || hkv <= 0 || hq % hkv != 0 || (hd != 16 && hd != 32 && hd != 64 && hd != 128))
      throw bench::cli_error("--configs: cannot read '" + item +
                             "' (expected B,S,Hq,Hkv,hd with Hq a multiple of Hkv and hd in 16/32/64/128)");
    out.push_back({b, s, hq, hkv, hd});
  }
  return out;
}

// ---- Device helpers --------------------------------------------------------------------------------------------

/// dst[b, h, s, :] = src[b, s, h / rep, :] (head-major, KV heads repeated `rep` times).
__global__ void to_heads(const bf16* src, bf16* dst, std::int64_t B, std::int64_t S, std::int64_t H_src,
                         std::int64_t H_dst, std::int64_t hd) {
  const std::int64_t n = B * H_dst * S * hd, rep = H_dst / H_src;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t e = i % hd, s = (i / hd) % S, h = (i / (hd * S)) % H_dst, b = i / (hd * S * H_dst);
    dst[i] = src[((b * S + s) * H_src + h / rep) * hd + e];
  }
}

/// dst[b, s, hk, :] = sum over the rep query heads of src[b, hk * rep + r, s, :] (back to [B, S, H_dst, hd]).
__global__ void from_heads(const bf16* src, bf16* dst, std::int64_t B, std::int64_t S, std::int64_t H_src,
                           std::int64_t H_dst, std::int64_t hd) {
  const std::int64_t n = B * S * H_dst * hd, rep = H_src / H_dst;
  for (std::int64_t i = std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::int64_t(gridDim.x) * blockDim.x) {
    const std::int64_t e = i % hd, h = (i / hd) % H_dst, s = (i / (hd * H_dst)) % S, b = i / (hd * H_dst * S);
    float acc = 0;
    for (std::int64_t r = 0; r < rep; ++r) acc += float(src[((b * H_src + h * rep + r) * S + s) * hd + e]);
    dst[i] = bf16(acc);
  }
}

/// One warp per row of scores[rows, S] (bf16): P = softmax(scale * s, causal), written in place; lse in fp32.
__global__ void softmax_rows(bf16* scores, float* lse, std::int64_t rows, std::int64_t S, float scale, bool causal) {
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = int(threadIdx.x % 32);
  if (row >= rows) return;
  const std::int64_t i = row % S, end = causal ? i + 1 : S;
  bf16* x = scores + row * S;
  float m = -INFINITY;
  for (std::int64_t j = lane; j < end; j += 32) m = fmaxf(m, scale * float(x[j]));
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  float sum = 0;
  for (std::int64_t j = lane; j < end; j += 32) sum += __expf(scale * float(x[j]) - m);
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  const float l = m + logf(sum);
  for (std::int64_t j = lane; j < S; j += 32) x[j] = bf16(j < end ? __expf(scale * float(x[j]) - l) : 0.0f);
  if (lane == 0) lse[row] = l;
}

/// One warp per row: D = dO . O (hd elements), then dS = P (dP - D) written over dP.
__global__ void ds_rows(const bf16* p, bf16* dp, const bf16* dout, const bf16* out, std::int64_t rows, std::int64_t S,
                        std::int64_t hd) {
  const std::int64_t row = (std::int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = int(threadIdx.x % 32);
  if (row >= rows) return;
  float d = 0;
  for (std::int64_t e = lane; e < hd; e += 32) d += float(dout[row * hd + e]) * float(out[row * hd + e]);
  for (int off = 16; off > 0; off /= 2) d += __shfl_xor_sync(0xffffffffu, d, off);
  for (std::int64_t j = lane; j < S; j += 32)
    dp[row * S + j] = bf16(float(p[row * S + j]) * (float(dp[row * S + j]) - d));
}

/// Times `ours` and `ref` alternately (see bench::time_alternating); without the reference, ours alone.
template <class A, class B>
timing time_pair(const config& cfg, cudaStream_t stream, A&& ours, B&& ref, bool with_ref) {
  if (with_ref) return bench::time_alternating(stream, cfg.warmup, cfg.reps, ours, ref);
  return {bench::time_alternating(stream, cfg.warmup, cfg.reps, ours, [] {}).ours_ms, 0.0};
}

result run_one(const config& cfg, const problem& pr, cudaStream_t stream, std::uint64_t seed) {
  const exec::cuda ex{stream};
  const std::int64_t B = pr.batch, S = pr.seq, Hq = pr.heads, Hkv = pr.kv_heads, hd = pr.head_dim;
  const attention_params params{float(1.0 / std::sqrt(double(hd))), cfg.causal, 0, 0, cfg.kernel};
  device_tensor<bf16> q({B, S, Hq, hd}), k({B, S, Hkv, hd}), v({B, S, Hkv, hd}), dout({B, S, Hq, hd});
  device_tensor<bf16> out({B, S, Hq, hd}), dq({B, S, Hq, hd}), dk({B, S, Hkv, hd}), dv({B, S, Hkv, hd});
  device_tensor<float> lse({B, Hq, S});
  std::uint64_t offset = 0;
  for (device_tensor<bf16>* t : {&q, &k, &v, &dout}) bench::fill_normal(t->data(), t->numel(), seed, offset++, stream);
  const view<const bf16, device_space> cq = q.v(), ck = k.v(), cv = v.v(), cdout = dout.v(), cout_ = out.v();
  const view<const float, device_space> clse = lse.v();
  const auto ours_fwd = [&] { attention_forward(ex, cq, ck, cv, out.v(), lse.v(), params); };
  const auto ours_bwd = [&] { attention_backward(ex, cq, ck, cv, cout_, clse, cdout, dq.v(), dk.v(), dv.v(), params); };

  result res;
  res.p = pr;
  res.fwd_flop = 4.0 * double(B * Hq) * double(S) * double(S) * double(hd) * (cfg.causal ? 0.5 : 1.0);
  res.bwd_flop = 2.5 * res.fwd_flop;

  if (!cfg.reference) {
    res.fwd = time_pair(cfg, stream, ours_fwd, [] {}, false);
    ours_fwd();
    res.bwd = time_pair(cfg, stream, ours_bwd, [] {}, false);
    return res;
  }

  // The naive reference, head-major: [B Hq, S, hd] operands, [B Hq, S, S] scores.
  const std::int64_t BH = B * Hq;
  device_tensor<bf16> qh({BH, S, hd}), kh({BH, S, hd}), vh({BH, S, hd}), douth({BH, S, hd}), outh({BH, S, hd});
  device_tensor<bf16> dqh({BH, S, hd}), dkh({BH, S, hd}), dvh({BH, S, hd}), pm({BH, S, S}), dpm({BH, S, S});
  device_tensor<bf16> ref_out({B, S, Hq, hd}), ref_dq({B, S, Hq, hd}), ref_dk({B, S, Hkv, hd}), ref_dv({B, S, Hkv, hd});
  device_tensor<float> ref_lse({BH, S});
  const auto heads = [&](const device_tensor<bf16>& src, device_tensor<bf16>& dst, std::int64_t h_src) {
    to_heads<<<cuda_detail::grid_for(dst.numel()), cuda_detail::block_threads, 0, stream>>>(src.data(), dst.data(), B,
                                                                                            S, h_src, Hq, hd);
    cuda_check_launch();
  };
  heads(q, qh, Hq);
  heads(k, kh, Hkv);
  heads(v, vh, Hkv);
  heads(dout, douth, Hq);
  const auto back = [&](const device_tensor<bf16>& src, device_tensor<bf16>& dst, std::int64_t h_dst) {
    from_heads<<<cuda_detail::grid_for(dst.numel()), cuda_detail::block_threads, 0, stream>>>(src.data(), dst.data(), B,
                                                                                              S, Hq, h_dst, hd);
    cuda_check_launch();
  };
  const std::int64_t rows = BH * S;
  const unsigned row_blocks = unsigned((rows * 32 + 255) / 256);
  const auto ref_fwd = [&] {
    gemm(ex, op::none, op::transpose, 1.0f, qh.v(), kh.v(), 0.0f, pm.v());
    softmax_rows<<<row_blocks, 256, 0, stream>>>(pm.data(), ref_lse.data(), rows, S, params.scale, cfg.causal);
    gemm(ex, op::none, op::none, 1.0f, pm.v(), vh.v(), 0.0f, outh.v());
  };
  const auto ref_bwd = [&] {
    gemm(ex, op::none, op::transpose, 1.0f, douth.v(), vh.v(), 0.0f, dpm.v());  // dP = dO V^T
    gemm(ex, op::transpose, op::none, 1.0f, pm.v(), douth.v(), 0.0f, dvh.v());  // dV = P^T dO
    ds_rows<<<row_blocks, 256, 0, stream>>>(pm.data(), dpm.data(), douth.data(), outh.data(), rows, S, hd);
    gemm(ex, op::none, op::none, params.scale, dpm.v(), kh.v(), 0.0f, dqh.v());       // dQ = scale dS K
    gemm(ex, op::transpose, op::none, params.scale, dpm.v(), qh.v(), 0.0f, dkh.v());  // dK = scale dS^T Q
    back(dkh, ref_dk, Hkv);                                                           // the group sums
    back(dvh, ref_dv, Hkv);
  };

  res.fwd = time_pair(cfg, stream, ours_fwd, ref_fwd, true);
  res.bwd = time_pair(cfg, stream, ours_bwd, ref_bwd, true);  // both use their own latest forward results
  back(outh, ref_out, Hq);
  back(dqh, ref_dq, Hq);
  res.diff_out = bench::rel_diff(out.data(), ref_out.data(), out.numel(), stream);
  res.diff_dq = bench::rel_diff(dq.data(), ref_dq.data(), dq.numel(), stream);
  res.diff_dk = bench::rel_diff(dk.data(), ref_dk.data(), dk.numel(), stream);
  res.diff_dv = bench::rel_diff(dv.data(), ref_dv.data(), dv.numel(), stream);
  return res;
}

double tflops(double flop, double ms) { return ms > 0 ? flop / (ms * 1e-3) / 1e12 : 0.0; }

void write_json(const config& cfg, const std::string& device, const std::vector<result>& results) {
  io::json configs = io::json::array(), rows = io::json::array();
  for (const problem& p : cfg.problems) configs.push_back(p.label());
  for (const result& r : results) {
    const auto pass = [&](const timing& t, double flop) {
      io::json j = io::json::object({{"ours_ms", t.ours_ms}, {"ours_tflops", tflops(flop, t.ours_ms)}});
      if (cfg.reference) {
        j.set("reference_ms", t.ref_ms);
        j.set("reference_tflops", tflops(flop, t.ref_ms));
        j.set("speedup", t.ref_ms / t.ours_ms);
      }
      return j;
    };
    io::json row = io::json::object({{"batch", r.p.batch},
                                     {"seq", r.p.seq},
                                     {"heads", r.p.heads},
                                     {"kv_heads", r.p.kv_heads},
                                     {"head_dim", r.p.head_dim},
                                     {"forward", pass(r.fwd, r.fwd_flop)},
                                     {"backward", pass(r.bwd, r.bwd_flop)}});
    if (cfg.reference)
      row.set("rel_diff",
              io::json::object({{"out", r.diff_out}, {"dq", r.diff_dq}, {"dk", r.diff_dk}, {"dv", r.diff_dv}}));
    rows.push_back(row);
  }
  io::json doc = bench::document("attention", device, cfg.commit);
  doc.set("config",
          io::json::object(
              {{"reps", cfg.reps},
               {"warmup", cfg.warmup},
               {"causal", cfg.causal},
               {"dtype", "bf16"},
               {"statistics", "fp32"},
               {"scale", "1/sqrt(hd)"},
               {"kernel", cfg.kernel == attention_kernel::fastest ? "fastest" : "portable"},
               {"flop", "forward 4 B Hq S^2 hd (x 0.5 causal), backward 2.5 x forward, for both"},
               {"reference", cfg.reference ? "naive: batched cuBLASLt QK^T, softmax kernel, PV; backward 4 GEMMs + "
                                             "dS kernel + group sum"
                                           : "none"},
               {"timing", "median of per-call CUDA event times, ours and reference alternating"},
               {"configs", configs}}));
  doc.set("results", rows);
  bench::write_document(cfg.out, doc);
}

int run(int argc, char** argv) {
  config cfg;
  std::string configs = "8,2048,32,8,64;16,1024,12,4,64;8,1024,32,8,128;4,2048,32,8,128;2,8192,16,8,128";
  std::string kernel = "fastest";
  bool no_causal = false, no_reference = false;
  bench::cli cli("bench_attention",
                 "fused attention (ours) vs naive cuBLASLt + softmax attention, forward and backward");
  cli.flag("configs", configs,
           "';'-separated B,S,Hq,Hkv,hd; the default: the Llama 1B, 124M and 2B shapes and two long hd-128 ones")
      .flag("reps", cfg.reps, "timed calls per pass and implementation")
      .flag("warmup", cfg.warmup, "untimed calls first")
      .flag("kernel", kernel,
            "our kernels, forward and backward: fastest (the Hopper wgmma/TMA kernels where the GPU and build have "
            "them, head dims 64 and 128) or portable (the mma.sync kernels)")
      .toggle("no-causal", no_causal, "full (unmasked) attention instead of causal")
      .toggle("no-reference", no_reference, "time ours only (the naive reference holds two B Hq S^2 bf16 matrices)");
  bench::output_flags(cli, cfg.out, cfg.commit);
  if (!cli.parse(argc, argv)) return 0;
  bench::check_range("reps", cfg.reps, 1);
  bench::check_range("warmup", cfg.warmup, 1);
  if (kernel != "fastest" && kernel != "portable")
    throw bench::cli_error("--kernel: expected fastest or portable, got '" + kernel + "'");
  cfg.kernel = kernel == "fastest" ? attention_kernel::fastest : attention_kernel::portable;
  cfg.causal = !no_causal;
  cfg.reference = !no_reference;
  cfg.problems = parse_problems(configs);

  const cudaDeviceProp prop = bench::device_properties();
  std::printf("bench_attention on %s (sm_%d%d), bf16, %s, %s kernels, %d reps after %d warm-up calls%s\n", prop.name,
              prop.major, prop.minor, cfg.causal ? "causal" : "full", kernel.c_str(), cfg.reps, cfg.warmup,
              cfg.reference ? "" : ", no reference");

  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  std::vector<result> results;
  const std::uint64_t seed = 0xa77e0000ull + std::uint64_t(std::time(nullptr));
  for (std::size_t i = 0; i < cfg.problems.size(); ++i) {
    const result r = run_one(cfg, cfg.problems[i], stream, seed + 16 * i);
    std::printf("[%zu/%zu] B,S,Hq,Hkv,hd = %-18s fwd ours %6.1f TFLOP/s (%.3f ms)", i + 1, cfg.problems.size(),
                r.p.label().c_str(), tflops(r.fwd_flop, r.fwd.ours_ms), r.fwd.ours_ms);
    if (cfg.reference)
      std::printf("  naive %6.1f (%.3f ms, x%.2f)", tflops(r.fwd_flop, r.fwd.ref_ms), r.fwd.ref_ms,
                  r.fwd.ref_ms / r.fwd.ours_ms);
    std::printf("\n%38s bwd ours %6.1f TFLOP/s (%.3f ms)", "", tflops(r.bwd_flop, r.bwd.ours_ms), r.bwd.ours_ms);
    if (cfg.reference)
      std::printf("  naive %6.1f (%.3f ms, x%.2f)  rel.diff out %.1e dq %.1e dk %.1e dv %.1e",
                  tflops(r.bwd_flop, r.bwd.ref_ms), r.bwd.ref_ms, r.bwd.ref_ms / r.bwd.ours_ms, r.diff_out, r.diff_dq,
                  r.diff_dk, r.diff_dv);
    std::printf("\n");
    std::fflush(stdout);
    results.push_back(r);
  }
  cuda_check(cudaStreamDestroy(stream));
  if (!cfg.out.empty()) write_json(cfg, prop.name, results);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::guarded_main("bench_attention", [&] { return run(argc, argv); });
}
