#pragma once
// Moved to util/json.hpp (below data/ and io/). This forwarder remains until io/checkpoint.hpp includes
// "../util/json.hpp" itself; new code includes <subspace/util/json.hpp>.

#include "../util/json.hpp"
