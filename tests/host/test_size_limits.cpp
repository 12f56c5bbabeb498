// Sizes from hostile configurations and flags: element counts checked for overflow (core/checked.hpp) before
// anything multiplies or allocates, and models that cannot fit the machine refused before they are built, with
// errors naming the fields and the limit.
#include <doctest/doctest.h>

#include <cstdint>
#include <limits>
#include <string>

#include <adjoint/config.hpp>
#include <adjoint/selective_ssm.hpp>
#include <subspace/subspace.hpp>

#include "support/files.hpp"

using namespace subspace;

namespace {
using testing::has;
constexpr std::int64_t int64_max = std::numeric_limits<std::int64_t>::max();
constexpr std::int64_t two_62_plus_1 = (std::int64_t(1) << 62) + 1;
}  // namespace

TEST_CASE("checked sizes: products and sums within a limit, nullopt past it or for negative input") {
  CHECK(checked_mul(3, 4) == 12);
  CHECK(checked_mul(0, int64_max) == 0);
  CHECK(checked_mul(std::int64_t(1) << 24, std::int64_t(1) << 24) == max_elements);
  CHECK_FALSE(checked_mul(max_elements, 2).has_value());
  CHECK_FALSE(checked_mul(two_62_plus_1, 128, int64_max).has_value());  // wraps in plain int64
  CHECK_FALSE(checked_mul(-1, 5).has_value());
  CHECK(checked_add(max_elements - 1, 1) == max_elements);
  CHECK_FALSE(checked_add(max_elements, 1).has_value());
  CHECK_FALSE(checked_add(int64_max, 1, int64_max).has_value());
  CHECK(checked_product(2, 3, 4) == 24);
  CHECK(checked_product(std::int64_t(1) << 40, std::int64_t(1) << 40, 0) == 0);  // empty, not an overflow
  CHECK_FALSE(checked_product(std::int64_t(1) << 32, std::int64_t(1) << 32).has_value());
  CHECK_FALSE(checked_product(4, -1).has_value());
}

TEST_CASE("parse_unsigned: decimal digits within the type's range, nothing else") {
  CHECK(parse_unsigned("0") == 0u);
  CHECK(parse_unsigned("18446744073709551615") == std::numeric_limits<std::uint64_t>::max());
  CHECK(parse_unsigned<std::uint32_t>("4294967295") == std::numeric_limits<std::uint32_t>::max());
  CHECK_FALSE(parse_unsigned<std::uint32_t>("4294967296").has_value());
  for (const char* text : {"", " -1", "-1", "+5", " 5", "5 ", "0x10", "1e3", "18446744073709551616"}) {
    CAPTURE(std::string(text));
    CHECK_FALSE(parse_unsigned(text).has_value());
  }
}

TEST_CASE("shapes and tensors refuse element counts past 2^48 instead of wrapping") {
  CHECK_THROWS_WITH_AS(shape({two_62_plus_1, 128}), has("shape [4611686018427387905, 128]: more than 2^48 elements"),
                       invalid_argument);
  CHECK_THROWS_WITH_AS(shape({std::int64_t(1) << 32, std::int64_t(1) << 32}), has("more than 2^48 elements"),
                       invalid_argument);
  // A shape filled in directly (as a file reader may) is checked where it allocates.
  shape s;
  s.rank = 2;
  s.dims = {two_62_plus_1, 4, 0, 0};
  CHECK_FALSE(s.checked_numel().has_value());
  CHECK_THROWS_WITH_AS(host_tensor<float>{s}, has("tensor: shape [4611686018427387905, 4] holds more than 2^48"),
                       invalid_argument);
  CHECK(shape({3, 0, std::int64_t(1) << 60}).checked_numel() == 0);
  CHECK(shape({std::numeric_limits<std::int64_t>::max(), 2, 0}).numel() == 0);  // no product before the zero
}

TEST_CASE("llama_config: sizes whose products overflow are refused, naming the fields and the limit") {
  const auto fails = [](nn::llama_config cfg, const std::string& text) {
    CAPTURE(text);
    CHECK_THROWS_WITH_AS(cfg.validate(), has(text), invalid_argument);
  };
  nn::llama_config cfg = nn::presets::tiny();
  cfg.vocab = two_62_plus_1;  // the size that made the LM head's GEMM read past its buffer
  fails(cfg, "llama_config 'tiny': vocab · d_model = 4611686018427387905 · 128 exceeds 2^48 elements");
  cfg = nn::presets::tiny();
  cfg.ffn_hidden = two_62_plus_1;
  fails(cfg, "ffn_hidden · d_model = 4611686018427387905 · 128 exceeds 2^48 elements");
  cfg = nn::presets::tiny();
  cfg.max_seq = int64_max;
  fails(cfg, "max_seq · d_model = 9223372036854775807 · 128 exceeds 2^48 elements");
  cfg = nn::presets::tiny();
  cfg.d_model = std::int64_t(1) << 32;
  cfg.vocab = 1;
  fails(cfg, "d_model · d_model = 4294967296 · 4294967296 exceeds 2^48 elements");
  cfg = nn::presets::tiny();
  cfg.n_layers = std::int64_t(1) << 40;
  fails(cfg, "n_layers · (parameters per layer) = 1099511627776 · ");
  cfg = nn::presets::tiny();
  cfg.vocab = max_elements / cfg.d_model;  // each matrix fits, the model does not
  fails(cfg, "the parameters exceed 2^48 elements");
  CHECK_NOTHROW(nn::presets::llama_2b().validate());
}

TEST_CASE("llama: a model larger than the machine's memory is refused before it is built") {
  nn::llama_config cfg = nn::presets::tiny();
  cfg.n_layers = 100000000;  // fits 2^48 elements; its layer descriptions alone would exhaust the host
  CHECK_THROWS_WITH_AS((nn::llama<exec::host, float>(cfg)),
                       has("llama_config 'tiny' (vocab 256, d_model 128, n_layers 100000000, ffn_hidden 344): the "),
                       invalid_argument);
  CHECK_THROWS_WITH_AS((nn::llama<exec::host, float>(cfg)), has("bytes of host memory"), invalid_argument);
  // A stage is measured by its own layers.
  cfg = nn::presets::tiny();
  cfg.vocab = std::int64_t(1) << 38;  // the embedding alone: 2^45 parameters
  CHECK_THROWS_WITH_AS((nn::llama<exec::host, float>(cfg, exec::host{}, nn::llama_stage{0, 2})),
                       has("parameters of layers [0, 2) with their gradients need"), invalid_argument);
  CHECK_NOTHROW((nn::llama<exec::host, float>(cfg, exec::host{}, nn::llama_stage{1, 3})));
}

TEST_CASE("train::replica: values, gradients and optimizer states must fit before any is allocated") {
  // The model's values and gradients (8 bytes a parameter) fit the host; with AdamW's 8 more they do not.
  const std::uint64_t host = space_memory<host_space>::capacity();
  nn::llama_config cfg = nn::presets::micro();
  cfg.vocab = std::int64_t(host / 12 / std::uint64_t(cfg.d_model) / 2);  // embedding and head: 2 · vocab · d
  nn::llama<exec::host, float> model(cfg);
  CHECK_THROWS_WITH_AS((train::replica(std::move(model), optim::adamw{})),
                       has("train::replica: the training state of "), invalid_argument);
}

TEST_CASE("ssm_config: overflowing sizes and models larger than memory are refused, naming the field") {
  adjoint::ssm_config cfg = adjoint::presets::tiny();
  cfg.vocab = two_62_plus_1;
  CHECK_THROWS_WITH_AS(cfg.validate(), has("ssm_config 'tiny': vocab · d_model exceeds 2^48 elements"),
                       invalid_argument);
  cfg = adjoint::presets::tiny();
  cfg.state = -3;
  CHECK_THROWS_WITH_AS(cfg.validate(), has("state must be positive, got -3"), invalid_argument);
  cfg = adjoint::presets::tiny();
  cfg.layers = 100000000;
  CHECK_THROWS_WITH_AS((adjoint::selective_ssm<exec::host, float>(cfg)),
                       has("ssm_config 'tiny' (vocab 256, d_model 64, state 16, layers 100000000): the "),
                       invalid_argument);
}
