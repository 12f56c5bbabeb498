// bench_gemm: subspace::gemm (exec::cuda) against a direct cuBLASLt call written here, in the same run, on the
// same random data. The reference builds its descriptors and asks the heuristic once per problem, outside the
// timed loop, so it is the best a caller of cuBLASLt can do; ours pays its per-call cost (descriptor setup and
// the algorithm-cache lookup) inside the timed loop, as a training loop would.
//
//   bench_gemm [--reps N] [--warmup N] [--sizes 8192x8192x8192,8192x2048x8192:nt,...] [--dtype bf16|fp32]
//              [--out FILE.json] [--commit SHA]
//
// Each size is MxNxK, optionally :XY with X, Y in {n, t} for op_a, op_b (row-major: C[M,N] = op_a(A) op_b(B)).
// Every call is timed alone with CUDA events, ours and the reference alternating; the median gives TFLOP/s as
// 2*M*N*K / t.
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <ctime>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <subspace/kernels/gemm.hpp>

#include "common/bench.hpp"

using namespace subspace;

namespace {

struct problem {
  std::int64_t m, n, k;
  op op_a, op_b;
};

struct config {
  int reps = 100;
  int warmup = 20;
  std::string dtype = "bf16";
  std::string out;
  std::string commit = "unknown";
  std::vector<problem> sizes;
};

struct result {
  problem p;
  std::string dtype;
  double ours_ms, ref_ms, ours_tflops, ref_tflops, rel_diff;
};

const char* op_letter(op o) { return o == op::none ? "n" : "t"; }

std::string label(const problem& p) {
  return std::to_string(p.m) + "x" + std::to_string(p.n) + "x" + std::to_string(p.k) + ":" + op_letter(p.op_a) +
         op_letter(p.op_b);
}

std::vector<problem> parse_sizes(const std::string& list) {
  std::vector<problem> out;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    problem p{0, 0, 0, op::none, op::none};
    std::string dims = item, ops = "nn";
    if (const auto colon = item.find(':'); colon != std::string::npos) {
      dims = item.substr(0, colon);
      ops = item.substr(colon + 1);
    }
    char x1 = 0, x2 = 0;
    long long m = 0, n = 0, k = 0;
    char tail = 0;
    if (std::sscanf(dims.c_str(), "%lld%c%lld%c%lld%c", &m, &x1, &n, &x2, &k, &tail) != 5 || x1 != 'x' || x2 != 'x' ||
        m <= 0 || n <= 0 || k <= 0 || ops.size() != 2 || (ops[0] != 'n' && ops[0] != 't') ||
        (ops[1] != 'n' && ops[1] != 't'))
      throw bench::cli_error("--sizes: cannot read '" + item + "' (expected MxNxK or MxNxK:nt)");
    p.m = m;
    p.n = n;
    p.k = k;
    p.op_a = ops[0] == 't' ? op::transpose : op::none;
    p.op_b = ops[1] == 't' ? op::transpose : op::none;
    out.push_back(p);
  }
  if (out.empty()) throw bench::cli_error("--sizes: empty list");
  return out;
}

template <class T>
constexpr cudaDataType_t cuda_type() {
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

/// The reference: a row-major C[M,N] = op_a(A) op_b(B) through cuBLASLt directly, as the column-major
/// C^T[N,M] = op_b(B)^T op_a(A)^T. Descriptors and the heuristic's choice are prepared once per problem.
template <class T>
class direct_cublaslt {
 public:
  direct_cublaslt(cublasLtHandle_t handle, void* workspace, std::size_t workspace_bytes, const problem& p)
      : handle_(handle), workspace_(workspace), workspace_bytes_(workspace_bytes) {
    const cublasOperation_t ta = p.op_b == op::none ? CUBLAS_OP_N : CUBLAS_OP_T;  // cuBLASLt's A is our B
    const cublasOperation_t tb = p.op_a == op::none ? CUBLAS_OP_N : CUBLAS_OP_T;  // cuBLASLt's B is our A
    cublas_check(cublasLtMatmulDescCreate(&desc_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublas_check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    cublas_check(cublasLtMatmulDescSetAttribute(desc_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    // Our B as stored: [K, N] row-major = (N x K) column-major, ld N; transposed: [N, K] = (K x N), ld K.
    if (p.op_b == op::none)
      cublas_check(cublasLtMatrixLayoutCreate(&la_, cuda_type<T>(), std::uint64_t(p.n), std::uint64_t(p.k), p.n));
    else cublas_check(cublasLtMatrixLayoutCreate(&la_, cuda_type<T>(), std::uint64_t(p.k), std::uint64_t(p.n), p.k));
    // Our A as stored: [M, K] = (K x M) column-major, ld K; transposed: [K, M] = (M x K), ld M.
    if (p.op_a == op::none)
      cublas_check(cublasLtMatrixLayoutCreate(&lb_, cuda_type<T>(), std::uint64_t(p.k), std::uint64_t(p.m), p.k));
    else cublas_check(cublasLtMatrixLayoutCreate(&lb_, cuda_type<T>(), std::uint64_t(p.m), std::uint64_t(p.k), p.m));
    cublas_check(cublasLtMatrixLayoutCreate(&lc_, cuda_type<T>(), std::uint64_t(p.n), std::uint64_t(p.m), p.n));

    cublasLtMatmulPreference_t pref = nullptr;
    cublas_check(cublasLtMatmulPreferenceCreate(&pref));
    const std::uint64_t ws = workspace_bytes_;
    cublas_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    cublasLtMatmulHeuristicResult_t heuristic{};
    int found = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle_, desc_, la_, lb_, lc_, lc_, pref, 1, &heuristic, &found);
    cublasLtMatmulPreferenceDestroy(pref);
    cublas_check(status);
    if (found == 0) throw std::runtime_error("reference: cuBLASLt heuristic found no algorithm for " + label(p));
    algo_ = heuristic.algo;
  }
  ~direct_cublaslt() {
    cublasLtMatrixLayoutDestroy(lc_);
    cublasLtMatrixLayoutDestroy(lb_);
    cublasLtMatrixLayoutDestroy(la_);
    cublasLtMatmulDescDestroy(desc_);
  }
  direct_cublaslt(const direct_cublaslt&) = delete;
  direct_cublaslt& operator=(const direct_cublaslt&) = delete;

  void run(const T* a, const T* b, T* c, cudaStream_t stream) const {
    const float alpha = 1.0f, beta = 0.0f;
    cublas_check(cublasLtMatmul(handle_, desc_, &alpha, b, la_, a, lb_, &beta, c, lc_, c, lc_, &algo_, workspace_,
                                workspace_bytes_, stream));
  }

 private:
  cublasLtHandle_t handle_;
  void* workspace_;
  std::size_t workspace_bytes_;
  cublasLtMatmulDesc_t desc_ = nullptr;
  cublasLtMatrixLayout_t la_ = nullptr, lb_ = nullptr, lc_ = nullptr;
  cublasLtMatmulAlgo_t algo_{};
};

template <class T>
result run_one(const config& cfg, const problem& p, cudaStream_t stream, cublasLtHandle_t handle, void* workspace,
               std::size_t workspace_bytes, std::uint64_t seed) {
  const exec::cuda ex{stream};
  const shape a_shape = p.op_a == op::none ? shape{p.m, p.k} : shape{p.k, p.m};
  const shape b_shape = p.op_b == op::none ? shape{p.k, p.n} : shape{p.n, p.k};
  device_tensor<T> A(a_shape), B(b_shape), c_ours({p.m, p.n}), c_ref({p.m, p.n});
  std::uint64_t offset = 0;
  for (device_tensor<T>* t : {&A, &B, &c_ours, &c_ref})
    bench::fill_normal(t->data(), t->numel(), seed, offset++, stream);
  const direct_cublaslt<T> reference(handle, workspace, workspace_bytes, p);
  const auto ours = [&] { gemm(ex, p.op_a, p.op_b, 1.0f, A.v(), B.v(), 0.0f, c_ours.v()); };
  const auto ref = [&] { reference.run(A.data(), B.data(), c_ref.data(), stream); };

  const bench::pair_timing t = bench::time_alternating(stream, cfg.warmup, cfg.reps, ours, ref);
  result res;
  res.p = p;
  res.dtype = cfg.dtype;
  res.ours_ms = t.ours_ms;
  res.ref_ms = t.ref_ms;
  const double flop = 2.0 * double(p.m) * double(p.n) * double(p.k);
  res.ours_tflops = flop / (res.ours_ms * 1e-3) / 1e12;
  res.ref_tflops = flop / (res.ref_ms * 1e-3) / 1e12;
  // Both computed the same product: their relative difference (0 when they chose the same kernel).
  res.rel_diff = bench::rel_diff(c_ours.data(), c_ref.data(), c_ours.numel(), stream);
  return res;
}

void write_json(const config& cfg, const std::string& device, const std::vector<result>& results) {
  io::json sizes = io::json::array(), rows = io::json::array();
  for (const problem& p : cfg.sizes) sizes.push_back(label(p));
  for (const result& r : results)
    rows.push_back(io::json::object({{"m", r.p.m},
                                     {"n", r.p.n},
                                     {"k", r.p.k},
                                     {"dtype", r.dtype},
                                     {"op_a", to_string(r.p.op_a)},
                                     {"op_b", to_string(r.p.op_b)},
                                     {"ours_tflops", r.ours_tflops},
                                     {"cublaslt_tflops", r.ref_tflops},
                                     {"ratio", r.ours_tflops / r.ref_tflops},
                                     {"ours_ms", r.ours_ms},
                                     {"cublaslt_ms", r.ref_ms},
                                     {"rel_diff", r.rel_diff}}));
  io::json doc = bench::document("gemm", device, cfg.commit);
  doc.set("config", io::json::object({{"reps", cfg.reps},
                                      {"warmup", cfg.warmup},
                                      {"dtype", cfg.dtype},
                                      {"accumulate", "fp32"},
                                      {"alpha", 1},
                                      {"beta", 0},
                                      {"workspace_mib", 32},
                                      {"timing", "median of per-call CUDA event times, ours and reference alternating"},
                                      {"sizes", sizes}}));
  doc.set("results", rows);
  bench::write_document(cfg.out, doc);
}

int run(int argc, char** argv) {
  config cfg;
  std::string sizes =
      "8192x8192x8192:nn,4096x4096x4096:nn,8192x2048x8192:nn,8192x2048x8192:nt,8192x8192x2048:nn,2048x8192x8192:tn";
  bench::cli cli("bench_gemm", "subspace::gemm on CUDA vs a direct cuBLASLt call (same data, same run)");
  cli.flag("reps", cfg.reps, "timed calls per size and implementation")
      .flag("warmup", cfg.warmup, "untimed calls first")
      .flag("sizes", sizes,
            "comma-separated MxNxK[:XY], X/Y in {n,t} = op_a/op_b; the default: 8192^3 and 4096^3 nn, and "
            "Llama-like shapes")
      .flag("dtype", cfg.dtype, "bf16 (bf16 in/out, fp32 accumulate) or fp32 (pure fp32, no TF32)", {"bf16", "fp32"});
  bench::output_flags(cli, cfg.out, cfg.commit);
  if (!cli.parse(argc, argv)) return 0;
  bench::check_range("reps", cfg.reps, 1);
  bench::check_range("warmup", cfg.warmup, 1);
  cfg.sizes = parse_sizes(sizes);

  const cudaDeviceProp prop = bench::device_properties();
  std::printf("bench_gemm on %s (sm_%d%d), %s, %d reps after %d warm-up calls\n", prop.name, prop.major, prop.minor,
              cfg.dtype == "bf16" ? "bf16 in/out, fp32 accumulate" : "fp32 (no TF32)", cfg.reps, cfg.warmup);

  cudaStream_t stream = nullptr;
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cublasLtHandle_t handle = nullptr;
  cublas_check(cublasLtCreate(&handle));
  const std::size_t workspace_bytes = std::size_t(32) << 20;  // the same budget as ours, its own buffer
  void* workspace = nullptr;
  cuda_check(cudaMalloc(&workspace, workspace_bytes));

  std::vector<result> results;
  const std::uint64_t seed = 0x5eed0000ull + std::uint64_t(std::time(nullptr));
  for (std::size_t i = 0; i < cfg.sizes.size(); ++i) {
    const problem& p = cfg.sizes[i];
    const result r = cfg.dtype == "bf16"
                         ? run_one<bf16>(cfg, p, stream, handle, workspace, workspace_bytes, seed + 16 * i)
                         : run_one<float>(cfg, p, stream, handle, workspace, workspace_bytes, seed + 16 * i);
    std::printf(
        "[%zu/%zu] %-20s ours %7.1f TFLOP/s (%.3f ms)  cuBLASLt %7.1f TFLOP/s (%.3f ms)  ratio %.3f  "
        "rel.diff %.1e\n",
        i + 1, cfg.sizes.size(), label(p).c_str(), r.ours_tflops, r.ours_ms, r.ref_tflops, r.ref_ms,
        r.ours_tflops / r.ref_tflops, r.rel_diff);
    std::fflush(stdout);
    results.push_back(r);
  }

  cuda_check(cudaFree(workspace));
  cublas_check(cublasLtDestroy(handle));
  cuda_check(cudaStreamDestroy(stream));

  std::printf("\n%-22s %-5s %12s %16s %8s\n", "MxNxK:ops", "dtype", "ours TFLOP/s", "cuBLASLt TFLOP/s", "ratio");
  for (const result& r : results)
    std::printf("%-22s %-5s %12.1f %16.1f %8.3f\n", label(r.p).c_str(), r.dtype.c_str(), r.ours_tflops, r.ref_tflops,
                r.ours_tflops / r.ref_tflops);
  if (!cfg.out.empty()) write_json(cfg, prop.name, results);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return bench::guarded_main("bench_gemm", [&] { return run(argc, argv); });
}
