#pragma once
// Moved to util/file.hpp (below data/ and io/). This forwarder remains until io/checkpoint.hpp includes
// "../util/file.hpp" itself; new code includes <subspace/util/file.hpp>.

#include "../util/file.hpp"
