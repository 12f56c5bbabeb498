#pragma once
// decent: gossip (decentralised) data parallelism — topologies as Scheduler policies, decentralised Adam and
// AccumAdam as Optimizer policies, and the gossip trainer (spec: shared/specs/decent-dp.md).
//
// decent builds on the subspace core and never the other way round; this umbrella brings that core, and each
// decent component joins it as it lands.
#include <subspace/subspace.hpp>

/// Gossip data parallelism built on subspace's policies.
namespace decent {}
