#pragma once
// adjoint: selective state-space models whose gradients come from adjoint states instead of stored activation
// graphs — the model (selective_ssm), its scan kernels and the bptt / exact_adjoint / sharded_adjoint engines
// (docs/ssm.md).
//
// adjoint builds on the subspace core and never the other way round.
#include <subspace/io/struct_config.hpp>
#include <subspace/subspace.hpp>

#include "config.hpp"
#include "engines.hpp"
#include "kernels/scan.hpp"
#include "layout.hpp"
#include "selective_ssm.hpp"
