#pragma once
// decent: gossip (decentralised) data parallelism — topologies as Scheduler policies, decentralised Adam and
// AccumAdam as Optimizer policies, the gossip trainer and the all-reduce baseline trainer (Decent-DP,
// Wang et al., ICLR 2025; guide: docs/decent.md).
//
// decent builds on the subspace core and never the other way round; this umbrella brings that core, and each
// decent component joins it as it lands.
#include <subspace/subspace.hpp>

#include "accum_adam.hpp"      // accum_adam, accum_adamw
#include "decent_adam.hpp"     // decent_adam, decent_adamw
#include "gossip_trainer.hpp"  // gossip_trainer and gossip_options: the bucketed, overlapped gossip loop
#include "plan.hpp"            // gossip_plan, mix_op, group_schedule, mixing_matrix
#include "topology.hpp"        // complete, ring, one_peer_exp, alternating_exp_ring, make_topology

/// Gossip data parallelism built on subspace's policies.
namespace decent {}
