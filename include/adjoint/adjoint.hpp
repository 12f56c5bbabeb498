#pragma once
// adjoint: selective state-space models whose gradients come from adjoint states instead of stored activation
// graphs — scan kernels and the BPTT / exact-adjoint / sharded-adjoint engines.
//
// adjoint builds on the subspace core and never the other way round; this umbrella brings that core, and each
// adjoint component joins it as it lands.
#include <subspace/subspace.hpp>

/// Selective SSMs trained with adjoint sharding, built on subspace's primitives.
namespace adjoint {}
