#pragma once
// subspace: everything in one include. In translation units compiled by nvcc the CUDA implementations come
// along; elsewhere the host build alone.

#include "core/config.hpp"
#include "core/dtype.hpp"
#include "core/error.hpp"
#include "core/exact.hpp"
#include "core/executor.hpp"
#include "core/memory.hpp"
#include "core/rng.hpp"
#include "core/tensor.hpp"

#include "kernels/elementwise.hpp"
#include "kernels/gemm.hpp"
#include "kernels/random.hpp"
#include "kernels/reduce.hpp"

#include "policies.hpp"  // the four concepts and their first policies
