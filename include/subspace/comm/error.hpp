#pragma once
// The errors a communicator raises beyond subspace::invalid_argument (arguments a rank can check alone).
//
// Every message names the communicator, the ranks and the operation involved, so that a failed multi-rank run
// says which rank waited for which peer, instead of hanging.

#include "../core/error.hpp"

namespace subspace::comm {

/// An operation did not complete within the communicator's timeout: a peer never issued the matching
/// operation (a recv with no send, a rank missing from a collective), died, or is stuck elsewhere.
class timeout_error : public error {
 public:
  using error::error;
};

/// Matched operations disagree: element counts, element types, memory spaces, or (for collectives) the kind
/// of collective, the reduction or the root. Raised on every rank involved.
class mismatch_error : public invalid_argument {
 public:
  using invalid_argument::invalid_argument;
};

/// The communicator or the operation can no longer complete: it was aborted after a timeout or an asynchronous
/// error (NCCL), or a peer abandoned the matching operation after its own timeout.
class aborted_error : public error {
 public:
  using error::error;
};

}  // namespace subspace::comm
