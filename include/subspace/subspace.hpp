#pragma once
// subspace: everything in one include. In translation units compiled by nvcc the CUDA implementations come
// along (and comm::nccl where <nccl.h> is on the include path: link subspace::nccl); elsewhere the host build
// alone.

#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/exact.hpp"
#include "core/executor.hpp"
#include "core/memory.hpp"
#include "core/parallel.hpp"
#include "core/rng.hpp"
#include "core/tensor.hpp"

#include "util/file.hpp"
#include "util/json.hpp"

#include "kernels/attention.hpp"
#include "kernels/elementwise.hpp"
#include "kernels/embedding.hpp"
#include "kernels/fixed_embedding.hpp"
#include "kernels/gemm.hpp"
#include "kernels/linalg.hpp"
#include "kernels/loss.hpp"
#include "kernels/norm.hpp"
#include "kernels/random.hpp"
#include "kernels/reduce.hpp"
#include "kernels/rope.hpp"
#include "kernels/subspace_projection.hpp"
#include "kernels/swiglu.hpp"

#include "policies.hpp"  // the four concepts and their first policies

#include "compress/subspace_projection.hpp"

#include "comm/bootstrap.hpp"
#include "comm/local.hpp"
#include "comm/throttled.hpp"
#if defined(__CUDACC__) && __has_include(<nccl.h>)
#include "comm/nccl.cuh"
#endif

#include "optim/galore.hpp"
#include "optim/golore.hpp"
#include "optim/schedule.hpp"

#include "nn/config.hpp"
#include "nn/generate.hpp"
#include "nn/llama.hpp"

#include "data/bpe_tokenizer.hpp"
#include "data/loader.hpp"
#include "data/text.hpp"
#include "data/tokenizer.hpp"
#include "data/tokenizer_json.hpp"
#include "data/tokens.hpp"

#include "io/checkpoint.hpp"
#include "io/hf_config.hpp"
#include "io/metrics.hpp"
#include "io/safetensors.hpp"

#include "train/trainer.hpp"

#include "dist/bucket.hpp"
#include "dist/data_parallel_trainer.hpp"
