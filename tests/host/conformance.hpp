#pragma once
// Conformance suites: one per policy concept, written once, applied to every policy.
//
// Each suite is a doctest template test parametrised by a *fixture*, a small struct that says how to build the
// policy under test and which inputs suit it. A test file applies a suite to its fixtures with
//
//   TYPE_TO_STRING(my_fixture);
//   TEST_CASE_TEMPLATE_APPLY(communicator_conformance, std::tuple<my_fixture>);
//
// Fixtures:
//
//   Communicator  using communicator = C;
//                 static std::vector<int> world_sizes();               world sizes to test
//                 static std::vector<C> make(int n);                   the n ranks of one world, [r].rank() == r
//                 Each rank runs on its own thread (operations may block until their peers arrive), through
//                 comm::local::run_ranks.
//   Compressor    using compressor = C;
//                 static C make(std::uint64_t seed);
//                 static std::vector<shape> shapes();                  input extents the compressor accepts
//                 static constexpr bool lossless;                      decode(encode(x)) == x bit for bit
//                 static constexpr std::int32_t vocab;                 token ids are drawn from [0, vocab)
//                 The compressor's tensors live in a host store of its own, at their initial values plus noise.
//                 Adjoint identities are checked when compress::is_linear_v<C>; the vector-Jacobian products (in
//                 x, the payload and the parameters) against central differences in double whenever C accepts
//                 double views and a double store.
//   Scheduler     using scheduler = S;
//                 static std::vector<S> make();                        configurations to test
//                 Plans that are ranges of schedule::action are also checked for consistency across ranks.
//   Optimizer     using optimizer = O;
//                 static O make();
//                 static std::vector<optim::param_info> params();      parameters to test (shape, decay)

#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <numeric>
#include <ranges>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <subspace/comm/concepts.hpp>
#include <subspace/comm/local.hpp>  // comm::local::run_ranks
#include <subspace/compress/concepts.hpp>
#include <subspace/core/dtype.hpp>
#include <subspace/core/error.hpp>
#include <subspace/core/executor.hpp>
#include <subspace/core/tensor.hpp>
#include <subspace/nn/parameters.hpp>
#include <subspace/optim/concepts.hpp>
#include <subspace/schedule/concepts.hpp>

#include "support/numeric.hpp"

namespace subspace::testing::conformance {

// --- shared helpers ---------------------------------------------------------------------------------------------

/// <a, b> over all elements, in double.
template <class A, class B>
double dot(view<const A, host_space> a, view<const B, host_space> b) {
  require(a.shape() == b.shape(), "dot: shapes differ");
  double s = 0;
  for_each_offset(a.shape(), a.strides(), b.strides(),
                  [&](std::int64_t ia, std::int64_t ib) { s += double(a.data()[ia]) * double(b.data()[ib]); });
  return s;
}
template <class A>
double norm(view<const A, host_space> a) {
  return std::sqrt(dot(a, a));
}

/// True when the two views hold the same bits, element by element.
template <class T>
bool same_bits(view<const T, host_space> a, view<const T, host_space> b) {
  if (!(a.shape() == b.shape())) return false;
  bool same = true;
  for_each_offset(a.shape(), a.strides(), b.strides(), [&](std::int64_t ia, std::int64_t ib) {
    same = same && std::memcmp(&a.data()[ia], &b.data()[ib], sizeof(T)) == 0;
  });
  return same;
}

template <class T>
host_tensor<T> filled(const shape& s, T value) {
  host_tensor<T> t(s);
  std::fill(t.data(), t.data() + t.numel(), value);
  return t;
}

/// Rank r's test data for one collective: normal draws from a per-rank stream.
inline host_tensor<float> rank_data(std::uint64_t seed, int rank, const shape& s) {
  return random_tensor<float>(s, seed + 0x9E3779B97F4A7C15ull * std::uint64_t(rank + 1));
}

/// The float64 reference of one reduced element: x(0), ..., x(n - 1) reduced by op (avg: the sum over n).
template <class X>
double reduced(comm::reduce_op op, int n, X x) {
  double acc = op == comm::reduce_op::max ? -INFINITY : 0.0;
  for (int q = 0; q < n; ++q) {
    const double v = x(q);
    acc = op == comm::reduce_op::max ? std::max(acc, v) : acc + v;
  }
  return op == comm::reduce_op::avg ? acc / n : acc;
}

/// Checks a rank's reduced buffer against its float64 reference: max exactly, sum and avg to 1e-6 relative.
inline void check_reduced(const host_tensor<float>& got, const host_tensor<double>& expected, comm::reduce_op op) {
  const double err = testing::rel_error(got, expected);
  if (op == comm::reduce_op::max) CHECK(err == 0.0);
  else CHECK(err <= 1e-6);
}

}  // namespace subspace::testing::conformance

// === Communicator ===============================================================================================

TEST_CASE_TEMPLATE_DEFINE("Communicator conformance", F, communicator_conformance) {
  using namespace subspace;
  using namespace subspace::testing::conformance;
  using C = typename F::communicator;
  static_assert(Communicator<C>);
  using cview = view<const float, host_space>;

  for (const int n : F::world_sizes()) {
    CAPTURE(n);
    const auto seed = testing::fresh_seed();
    CAPTURE(seed);
    const auto nz = std::size_t(n);

    SUBCASE("rank and size") {
      auto comms = F::make(n);
      REQUIRE(int(comms.size()) == n);
      std::vector<int> ranks(nz, -1), sizes(nz, -1);
      comm::local::run_ranks(comms, [&](C& c) {
        const int r = c.rank();
        ranks[std::size_t(r)] = c.rank();
        sizes[std::size_t(r)] = c.size();
      });
      for (int r = 0; r < n; ++r) {
        CHECK(ranks[std::size_t(r)] == r);
        CHECK(sizes[std::size_t(r)] == n);
      }
    }

    SUBCASE("all_reduce: sum, avg and max over every rank's data") {
      const shape s{37};
      for (const auto op : {comm::reduce_op::sum, comm::reduce_op::avg, comm::reduce_op::max}) {
        CAPTURE(comm::to_string(op));
        auto comms = F::make(n);
        std::vector<host_tensor<float>> bufs;
        for (int r = 0; r < n; ++r) bufs.push_back(rank_data(seed, r, s));
        // float64 reference
        host_tensor<double> expected(s);
        for (std::int64_t i = 0; i < s.numel(); ++i)
          expected.data()[i] = reduced(op, n, [&](int r) { return double(bufs[std::size_t(r)].data()[i]); });
        comm::local::run_ranks(comms, [&](C& c) {
          const int r = c.rank();
          auto req = c.all_reduce(bufs[std::size_t(r)].v(), op);
          req.wait();
          CHECK_MESSAGE(req.test(), "a request is complete after wait()");
          req.wait();  // waiting again returns at once
        });
        for (int r = 0; r < n; ++r) {
          CAPTURE(r);
          check_reduced(bufs[std::size_t(r)], expected, op);
        }
      }
    }

    SUBCASE("all_gather: block r holds rank r's input") {
      const shape s{13};
      auto comms = F::make(n);
      std::vector<host_tensor<float>> in, out;
      for (int r = 0; r < n; ++r) {
        in.push_back(rank_data(seed, r, s));
        out.push_back(filled<float>({n, 13}, NAN));
      }
      comm::local::run_ranks(comms, [&](C& c) {
        const int r = c.rank();
        c.all_gather(cview(in[std::size_t(r)].v()), out[std::size_t(r)].v()).wait();
      });
      for (int r = 0; r < n; ++r)
        for (int q = 0; q < n; ++q) {
          CAPTURE(r);
          CAPTURE(q);
          CHECK(same_bits<float>(out[std::size_t(r)].v()[q], in[std::size_t(q)].v()));
        }
    }

    SUBCASE("reduce_scatter: rank r receives the reduction of every rank's block r") {
      for (const auto op : {comm::reduce_op::sum, comm::reduce_op::avg, comm::reduce_op::max}) {
        CAPTURE(comm::to_string(op));
        auto comms = F::make(n);
        std::vector<host_tensor<float>> in, out;
        for (int r = 0; r < n; ++r) {
          in.push_back(rank_data(seed, r, {n, 11}));
          out.push_back(filled<float>({11}, NAN));
        }
        comm::local::run_ranks(comms, [&](C& c) {
          const int r = c.rank();
          c.reduce_scatter(cview(in[std::size_t(r)].v()), out[std::size_t(r)].v(), op).wait();
        });
        for (int r = 0; r < n; ++r) {
          CAPTURE(r);
          host_tensor<double> expected({11});
          for (int i = 0; i < 11; ++i)
            expected(i) = reduced(op, n, [&](int q) { return double(in[std::size_t(q)](r, i)); });
          check_reduced(out[std::size_t(r)], expected, op);
        }
      }
    }

    SUBCASE("broadcast from every root") {
      for (int root = 0; root < n; ++root) {
        CAPTURE(root);
        auto comms = F::make(n);
        std::vector<host_tensor<float>> bufs;
        for (int r = 0; r < n; ++r) bufs.push_back(rank_data(seed + std::uint64_t(root), r, {4, 5}));
        const auto expected = rank_data(seed + std::uint64_t(root), root, {4, 5});
        comm::local::run_ranks(comms, [&](C& c) { c.broadcast(bufs[std::size_t(c.rank())].v(), root).wait(); });
        for (int r = 0; r < n; ++r) {
          CAPTURE(r);
          CHECK(same_bits<float>(bufs[std::size_t(r)].v(), expected.v()));
        }
      }
    }

    SUBCASE("send/recv in a group: a ring exchange, two messages per pair, matched in order") {
      auto comms = F::make(n);
      std::vector<host_tensor<float>> first, second, got_first, got_second;
      for (int r = 0; r < n; ++r) {
        first.push_back(rank_data(seed, r, {6}));
        second.push_back(rank_data(seed + 1, r, {3, 3}));
        got_first.push_back(filled<float>({6}, NAN));
        got_second.push_back(filled<float>({3, 3}, NAN));
      }
      comm::local::run_ranks(comms, [&](C& c) {
        const int r = c.rank();
        const auto ru = std::size_t(r);
        const int next = (r + 1) % n, prev = (r + n - 1) % n;
        c.group_start();
        auto s1 = c.send(cview(first[ru].v()), next);
        auto s2 = c.send(cview(second[ru].v()), next);
        auto r1 = c.recv(got_first[ru].v(), prev);
        auto r2 = c.recv(got_second[ru].v(), prev);
        c.group_end();
        s1.wait();
        s2.wait();
        r1.wait();
        r2.wait();
        CHECK((s1.test() && s2.test() && r1.test() && r2.test()));
      });
      for (int r = 0; r < n; ++r) {
        CAPTURE(r);
        const auto prev = std::size_t((r + n - 1) % n);
        CHECK(same_bits<float>(got_first[std::size_t(r)].v(), first[prev].v()));
        CHECK(same_bits<float>(got_second[std::size_t(r)].v(), second[prev].v()));
      }
    }

    SUBCASE("barrier completes on every rank") {
      auto comms = F::make(n);
      std::vector<int> done(nz, 0);
      comm::local::run_ranks(comms, [&](C& c) {
        const int r = c.rank();
        auto req = c.barrier();
        req.wait();
        done[std::size_t(r)] = req.test() ? 1 : 0;
      });
      CHECK(std::accumulate(done.begin(), done.end(), 0) == n);
    }

    SUBCASE("operations issued together complete in any order; test() polls to completion") {
      auto comms = F::make(n);
      std::vector<host_tensor<float>> sums, mine, gathered, bcast;
      for (int r = 0; r < n; ++r) {
        sums.push_back(filled<float>({1001}, float(r + 1)));  // an odd size
        mine.push_back(filled<float>({3}, float(r)));
        gathered.push_back(filled<float>({n, 3}, NAN));
        bcast.push_back(filled<float>({7}, float(r)));
      }
      comm::local::run_ranks(comms, [&](C& c) {
        const int r = c.rank();
        const auto ru = std::size_t(r);
        auto q1 = c.all_reduce(sums[ru].v(), comm::reduce_op::sum);
        auto q2 = c.all_gather(cview(mine[ru].v()), gathered[ru].v());
        auto q3 = c.broadcast(bcast[ru].v(), n - 1);
        auto q4 = c.barrier();
        const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
        bool polled = false;
        while (!(polled = q4.test()) && std::chrono::steady_clock::now() < deadline) std::this_thread::yield();
        CHECK_MESSAGE(polled, "test() never reported the barrier complete");
        q3.wait();
        q2.wait();
        q1.wait();
        CHECK((q1.test() && q2.test() && q3.test()));
      });
      for (int r = 0; r < n; ++r) {
        CAPTURE(r);
        const auto ru = std::size_t(r);
        bool ok = true;
        for (std::int64_t i = 0; i < 1001; ++i) ok = ok && sums[ru](i) == float(n * (n + 1) / 2);
        for (int q = 0; q < n; ++q)
          for (int j = 0; j < 3; ++j) ok = ok && gathered[ru](q, j) == float(q);
        for (int i = 0; i < 7; ++i) ok = ok && bcast[ru](i) == float(n - 1);
        CHECK(ok);
      }
    }

    SUBCASE("split: ranks of one color form a group ordered by key, and reduce within it") {
      auto comms = F::make(n);
      std::vector<int> sub_rank(nz, -1), sub_size(nz, -1);
      std::vector<float> sums(nz, NAN);
      comm::local::run_ranks(comms, [&](C& c) {
        const int r = c.rank();
        const int color = r % 2;
        C sub = c.split(color, n - r);  // reversed keys: the highest old rank comes first
        sub_rank[std::size_t(r)] = sub.rank();
        sub_size[std::size_t(r)] = sub.size();
        host_tensor<float> x = filled<float>({1}, float(r + 1));
        sub.all_reduce(x.v(), comm::reduce_op::sum).wait();
        sums[std::size_t(r)] = x(0);
      });
      for (int r = 0; r < n; ++r) {
        CAPTURE(r);
        const int color = r % 2;
        int size = 0, rank = 0;
        float sum = 0;
        for (int q = 0; q < n; ++q)
          if (q % 2 == color) {
            ++size;
            sum += float(q + 1);
            if (q > r) ++rank;
          }
        CHECK(sub_size[std::size_t(r)] == size);
        CHECK(sub_rank[std::size_t(r)] == rank);
        CHECK(sums[std::size_t(r)] == sum);
      }
    }

    SUBCASE("arguments a rank can check alone raise invalid_argument") {
      auto comms = F::make(n);
      comm::local::run_ranks(comms, [&](C& c) {
        host_tensor<float> x = filled<float>({4}, 1.0f);
        host_tensor<float> wrong = filled<float>({n * 4 + 1}, 0.0f);
        CHECK_THROWS_AS(c.broadcast(x.v(), n), invalid_argument);
        CHECK_THROWS_AS(c.broadcast(x.v(), -1), invalid_argument);
        CHECK_THROWS_AS(c.send(cview(x.v()), n), invalid_argument);
        CHECK_THROWS_AS(c.recv(x.v(), -1), invalid_argument);
        CHECK_THROWS_AS(c.all_gather(cview(x.v()), wrong.v()), invalid_argument);
        CHECK_THROWS_AS(c.reduce_scatter(cview(wrong.v()), x.v(), comm::reduce_op::sum), invalid_argument);
      });
    }
  }
}

// === Compressor =================================================================================================

namespace subspace::testing::conformance {

/// The parameter store a compressor under test declares its tensors in: host, values and gradients in T.
template <class T>
using compressor_store = nn::parameter_store<T, T, host_space>;

/// Copies of every tensor's value and gradient in `store`, by name.
template <class T>
std::map<std::string, std::pair<std::vector<T>, std::vector<T>>> snapshot_parameters(compressor_store<T>& store) {
  std::map<std::string, std::pair<std::vector<T>, std::vector<T>>> out;
  store.for_each(
      [&](const std::string& name, view<T, host_space> value, view<T, host_space> grad, const parameter_info&) {
        out[name] = {std::vector<T>(value.data(), value.data() + value.numel()),
                     std::vector<T>(grad.data(), grad.data() + grad.numel())};
      });
  return out;
}

/// Has `c` declare its tensors in `store`, allocates them and sets them to their initial values plus
/// N(0, 0.1²) noise, so gradient checks do not sit at a special point (a unit gain).
template <class T, class C>
void prepare_parameters(C& c, compressor_store<T>& store, std::uint64_t seed) {
  const compress::parameter_range r = compress::declare(c, store);
  REQUIRE(r.first == 0);
  REQUIRE(r.last == store.size());
  if (store.size() == 0) return;
  const exec::host ex{};
  store.allocate(ex);
  store.init(ex, seed, 0, store.size());
  for (std::size_t i = 0; i < store.size(); ++i) {
    const host_tensor<double> noise = random_tensor<double>(store.info(i).shape, seed + 100 + i, 0.0f, 0.1f);
    const view<T, host_space> v = store.value(i);
    for (std::int64_t k = 0; k < v.numel(); ++k) v.data()[k] += T(noise.data()[k]);
  }
}

/// Sets every gradient of `store` to zero (nothing to do while it holds no tensor: then it has no storage).
template <class T>
void zero_grads(compressor_store<T>& store) {
  if (store.size() > 0) store.zero_grad(exec::host{});
}

/// Token ids in [0, vocab) for the rows of a tensor of extents x.
inline host_tensor<std::int32_t> random_tokens(const shape& x, std::int32_t vocab, std::uint64_t seed) {
  host_tensor<std::int32_t> t(shape{compress::rows(x)});
  std::uint64_t z = seed;
  for (std::int64_t i = 0; i < t.numel(); ++i) {  // splitmix64
    z += 0x9E3779B97F4A7C15ull;
    std::uint64_t y = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    y = (y ^ (y >> 27)) * 0x94D049BB133111EBull;
    t.data()[i] = std::int32_t((y ^ (y >> 31)) % std::uint64_t(vocab));
  }
  return t;
}

}  // namespace subspace::testing::conformance

TEST_CASE_TEMPLATE_DEFINE("Compressor conformance", F, compressor_conformance) {
  using namespace subspace;
  using namespace subspace::testing::conformance;
  using C = typename F::compressor;
  static_assert(Compressor<C>);
  constexpr bool sends_tokens = compress::sends_tokens_v<C>;
  const exec::host ex{};

  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  C c = F::make(seed);
  const C& cc = c;
  compressor_store<float> store;
  prepare_parameters(c, store, seed);

  for (const shape& xs : F::shapes()) {
    CAPTURE(to_string(xs));
    const shape ps = cc.payload_shape(xs);
    CAPTURE(to_string(ps));
    const std::int64_t rows = compress::rows(xs);

    SUBCASE("payload_shape is a function of the input shape; wire_bytes is elements x width + a fixed side channel") {
      CHECK(cc.payload_shape(xs) == ps);
      const std::size_t n = std::size_t(ps.numel());
      const std::size_t side = cc.wire_bytes(xs, 1) - n;
      CHECK(cc.wire_bytes(xs, 1) >= n);
      CHECK(cc.wire_bytes(xs, 2) == 2 * n + side);
      CHECK(cc.wire_bytes(xs, 4) == 4 * n + side);
      CHECK(cc.wire_bytes(xs, 4) == cc.wire_bytes(xs, 4));
      if constexpr (sends_tokens) CHECK(side >= sizeof(std::uint16_t) * std::size_t(rows));  // ids: 2 or 4 bytes
    }

    const auto x = testing::random_tensor<float>(xs, seed + 1);
    const auto q = testing::random_tensor<float>(ps, seed + 2);  // a payload-shaped direction
    const auto g = testing::random_tensor<float>(xs, seed + 3);  // an input-shaped direction
    const auto tokens = random_tokens(xs, F::vocab, seed + 6);
    // What the compressor puts on the wire besides the values: the token ids, when it sends them.
    host_tensor<std::int32_t> wire_tokens = filled<std::int32_t>({rows}, -1);
    using tokens_out = view<std::int32_t, host_space>;
    using tokens_in = view<const std::int32_t, host_space>;
    const tokens_out wire = sends_tokens ? tokens_out(wire_tokens.v()) : tokens_out{};
    const tokens_in received = sends_tokens ? tokens_in(tokens.v()) : tokens_in{};  // as encode would send them
    auto given = [&](const host_tensor<float>& t) {
      return compress::boundary<const float, host_space>{t.v(), tokens.v()};
    };
    auto sent = [&](const host_tensor<float>& p) {
      return compress::payload<const float, host_space>{p.v(), received};
    };
    auto encoded = [&](const host_tensor<float>& in) {
      host_tensor<float> p = filled<float>(ps, NAN);
      c.encode(ex, given(in), compress::payload<float, host_space>{p.v(), wire}, store);
      return p;
    };
    auto decoded = [&](const host_tensor<float>& p) {
      host_tensor<float> out = filled<float>(xs, NAN);
      c.decode(ex, sent(p), out.v(), store);
      return out;
    };

    SUBCASE("encode and decode are deterministic and write finite outputs; the payload carries the token ids") {
      const auto p1 = encoded(x), p2 = encoded(x);
      CHECK(same_bits<float>(p1.v(), p2.v()));
      CHECK(testing::rel_error(p1, p1) == 0.0);  // finite (NaN and inf give +inf)
      if constexpr (sends_tokens) CHECK(same_bits<std::int32_t>(wire_tokens.v(), tokens.v()));
      const auto x1 = decoded(p1), x2 = decoded(p1);
      CHECK(same_bits<float>(x1.v(), x2.v()));
      CHECK(testing::rel_error(x1, x1) == 0.0);
      CHECK(norm<float>(p1.v()) > 0.0);
      if constexpr (F::lossless) CHECK(same_bits<float>(x1.v(), x.v()));
    }

    if constexpr (compress::is_linear_v<C>) {
      SUBCASE("linear: the backward functions are the adjoints of decode and encode") {
        // <decode(q), g> == <q, decode_backward(g)>
        host_tensor<float> grad_payload = filled<float>(ps, NAN);
        c.decode_backward(ex, sent(q), g.v(), grad_payload.v(), store);
        const double lhs1 = dot<float, float>(decoded(q).v(), g.v());
        const double rhs1 = dot<float, float>(q.v(), grad_payload.v());
        CHECK(std::abs(lhs1 - rhs1) <= 1e-5 * norm<float>(q.v()) * norm<float>(g.v()));
        // <encode(x), q> == <x, encode_backward(q)>
        host_tensor<float> grad_x = filled<float>(xs, NAN);
        c.encode_backward(ex, given(x), q.v(), grad_x.v(), store);
        const double lhs2 = dot<float, float>(encoded(x).v(), q.v());
        const double rhs2 = dot<float, float>(x.v(), grad_x.v());
        CHECK(std::abs(lhs2 - rhs2) <= 1e-5 * norm<float>(x.v()) * norm<float>(q.v()));
      }
    }

    using dview = view<double, host_space>;
    using dcview = view<const double, host_space>;
    using dboundary = compress::boundary<const double, host_space>;
    using dpayload_in = compress::payload<const double, host_space>;
    using dpayload_out = compress::payload<double, host_space>;
    if constexpr (requires(dboundary b, dpayload_out po, dpayload_in pi, dcview in, dview out,
                           compressor_store<double>& ds) {
                    c.encode(ex, b, po, ds);
                    c.decode(ex, pi, out, ds);
                    c.encode_backward(ex, b, in, out, ds);
                    c.decode_backward(ex, pi, in, out, ds);
                  }) {
      SUBCASE("float64: the backward functions are vector-Jacobian products in x, the payload and the parameters") {
        C cd = F::make(seed);
        compressor_store<double> ds;
        prepare_parameters(cd, ds, seed);
        const auto xd = testing::random_tensor<double>(xs, seed + 1);
        const auto dx = testing::random_tensor<double>(xs, seed + 4);
        const auto qd = testing::random_tensor<double>(ps, seed + 2);
        const auto dq = testing::random_tensor<double>(ps, seed + 5);
        const auto gd = testing::random_tensor<double>(xs, seed + 3);
        const double h = 1e-5;
        auto shifted = [&](const host_tensor<double>& a, const host_tensor<double>& d, double t) {
          host_tensor<double> out(a.shape());
          for (std::int64_t i = 0; i < a.numel(); ++i) out.data()[i] = a.data()[i] + t * d.data()[i];
          return out;
        };
        auto enc = [&](const host_tensor<double>& in) {
          host_tensor<double> p(ps);
          cd.encode(ex, dboundary{in.v(), tokens.v()}, dpayload_out{p.v(), wire}, ds);
          return p;
        };
        auto dec = [&](const host_tensor<double>& p) {
          host_tensor<double> out(xs);
          cd.decode(ex, dpayload_in{p.v(), received}, out.v(), ds);
          return out;
        };
        auto dot_d = [](const host_tensor<double>& a, const host_tensor<double>& b) {
          return dot<double, double>(a.v(), b.v());
        };
        // d/dt <encode(x + t dx), q> at t = 0  vs  <dx, encode_backward(x, q)>
        host_tensor<double> grad_x(xs);
        const double fd1 = (dot_d(enc(shifted(xd, dx, h)), qd) - dot_d(enc(shifted(xd, dx, -h)), qd)) / (2 * h);
        zero_grads(ds);
        cd.encode_backward(ex, dboundary{xd.v(), tokens.v()}, qd.v(), grad_x.v(), ds);
        const auto encode_grads = snapshot_parameters(ds);
        const double an1 = dot_d(dx, grad_x);
        CHECK(std::abs(fd1 - an1) <= 1e-7 * norm<double>(dx.v()) * norm<double>(grad_x.v()) + 1e-9);
        // d/dt <decode(q + t dq), g> at t = 0  vs  <dq, decode_backward(q, g)>
        host_tensor<double> grad_p(ps);
        const double fd2 = (dot_d(dec(shifted(qd, dq, h)), gd) - dot_d(dec(shifted(qd, dq, -h)), gd)) / (2 * h);
        zero_grads(ds);
        cd.decode_backward(ex, dpayload_in{qd.v(), received}, gd.v(), grad_p.v(), ds);
        const auto decode_grads = snapshot_parameters(ds);
        const double an2 = dot_d(dq, grad_p);
        CHECK(std::abs(fd2 - an2) <= 1e-7 * norm<double>(dq.v()) * norm<double>(grad_p.v()) + 1e-9);
        CHECK(norm<double>(grad_x.v()) > 0.0);
        CHECK(norm<double>(grad_p.v()) > 0.0);

        // The parameters: d/dt <encode(x; θ + t dθ), q> vs <dθ, what encode_backward accumulated>, and the same
        // for decode.
        for (std::size_t i = 0; i < ds.size(); ++i) {
          const std::string& name = ds.info(i).name;
          CAPTURE(name);
          const host_tensor<double> dtheta = testing::random_tensor<double>(ds.info(i).shape, seed + 200 + i);
          const view<double, host_space> value = ds.value(i);
          std::vector<double> saved(value.data(), value.data() + value.numel());
          auto at = [&](double t, auto&& f) {
            for (std::int64_t k = 0; k < value.numel(); ++k)
              value.data()[k] = saved[std::size_t(k)] + t * dtheta.data()[k];
            const double y = f();
            std::copy(saved.begin(), saved.end(), value.data());
            return y;
          };
          auto along = [&](const std::vector<double>& grad) {
            double s = 0, n = 0;
            for (std::size_t k = 0; k < grad.size(); ++k) {
              s += dtheta.data()[k] * grad[k];
              n += grad[k] * grad[k];
            }
            return std::pair{s, std::sqrt(n)};
          };
          const auto encoded_along_q = [&] { return dot_d(enc(xd), qd); };
          const auto decoded_along_g = [&] { return dot_d(dec(qd), gd); };
          const double fd3 = (at(h, encoded_along_q) - at(-h, encoded_along_q)) / (2 * h);
          const auto [an3, n3] = along(encode_grads.at(name).second);
          CHECK(std::abs(fd3 - an3) <= 1e-7 * norm<double>(dtheta.v()) * n3 + 1e-9);
          const double fd4 = (at(h, decoded_along_g) - at(-h, decoded_along_g)) / (2 * h);
          const auto [an4, n4] = along(decode_grads.at(name).second);
          CHECK(std::abs(fd4 - an4) <= 1e-7 * norm<double>(dtheta.v()) * n4 + 1e-9);
        }
      }
    }

    SUBCASE("shape mismatches raise invalid_argument") {
      shape wrong_p = ps, wrong_x = xs;
      REQUIRE(ps.rank >= 1);
      REQUIRE(xs.rank >= 1);
      wrong_p.dims[0] += 1;
      wrong_x.dims[0] += 1;
      host_tensor<float> bad_p = filled<float>(wrong_p, 0.0f), bad_x = filled<float>(wrong_x, 0.0f);
      using payload_out = compress::payload<float, host_space>;
      CHECK_THROWS_AS(c.encode(ex, given(x), payload_out{bad_p.v(), wire}, store), invalid_argument);
      CHECK_THROWS_AS(c.decode(ex, sent(q), bad_x.v(), store), invalid_argument);
      CHECK_THROWS_AS(c.decode_backward(ex, sent(q), g.v(), bad_p.v(), store), invalid_argument);
      CHECK_THROWS_AS(c.encode_backward(ex, given(x), q.v(), bad_x.v(), store), invalid_argument);
      if constexpr (sends_tokens) {
        host_tensor<float> p = filled<float>(ps, 0.0f), out = filled<float>(xs, 0.0f);
        host_tensor<std::int32_t> more = filled<std::int32_t>({rows + 1}, 0);
        CHECK_THROWS_AS(c.encode(ex, given(x), payload_out{p.v(), more.v()}, store), invalid_argument);
        CHECK_THROWS_AS(c.decode(ex, compress::payload<const float, host_space>{q.v(), more.v()}, out.v(), store),
                        invalid_argument);
      }
    }

    SUBCASE("parameters: declared alike by every instance; the backward accumulates into their gradients") {
      C other = F::make(seed + 7);
      compressor_store<float> other_store;
      compress::declare(other, other_store);
      REQUIRE(other_store.size() == store.size());
      for (std::size_t i = 0; i < store.size(); ++i) {
        CAPTURE(store.info(i).name);
        CHECK(other_store.info(i).name == store.info(i).name);
        CHECK(other_store.info(i).shape == store.info(i).shape);
      }
      // The forward leaves the gradients alone; two identical backward passes add the same increment twice and
      // leave the values alone.
      zero_grads(store);
      (void)decoded(encoded(x));
      const auto before = snapshot_parameters(store);
      host_tensor<float> gp(ps), gx(xs);
      auto backward = [&] {
        c.decode_backward(ex, sent(q), g.v(), gp.v(), store);
        c.encode_backward(ex, given(x), q.v(), gx.v(), store);
      };
      backward();
      const auto once = snapshot_parameters(store);
      backward();
      const auto twice = snapshot_parameters(store);
      for (const auto& [name, vg] : before) {
        CAPTURE(name);
        const auto& g0 = vg.second;
        const auto& g1 = once.at(name).second;
        const auto& g2 = twice.at(name).second;
        CHECK(std::all_of(g0.begin(), g0.end(), [](float v) { return v == 0.0f; }));
        host_tensor<double> step1({std::int64_t(g0.size())}), step2({std::int64_t(g0.size())});
        for (std::size_t i = 0; i < g0.size(); ++i) {
          step1.data()[i] = double(g1[i]) - g0[i];
          step2.data()[i] = double(g2[i]) - g1[i];
        }
        CHECK(testing::rel_error(step2, step1) <= 1e-5);
        CHECK(vg.first == once.at(name).first);  // the backward leaves the values alone
        CHECK(vg.first == twice.at(name).first);
      }
    }
  }
}

// === Scheduler ==================================================================================================

namespace subspace::testing::conformance {

template <class P>
concept action_plan =
    std::ranges::forward_range<const P> && std::same_as<std::ranges::range_value_t<const P>, schedule::action>;

/// Checks the compute plans of one step across all ranks: on every rank a (micro-batch, chunk) is backwarded at
/// most once and only after its forward, either whole (backward) or in halves (backward_input, then
/// backward_weight); optimizer_step comes at most once and last; every send has its recv on the peer (same kind,
/// same micro-batch) and vice versa.
template <class Plan>
void check_action_plans(const std::vector<Plan>& plans) {
  using schedule::action_kind;
  const int n = int(plans.size());
  // (kind of the send, micro-batch, from, to), counted up for sends and down for recvs
  std::map<std::tuple<int, int, int, int>, int> messages;
  for (int r = 0; r < n; ++r) {
    CAPTURE(r);
    std::set<std::pair<int, int>> forwarded, inputs, weights;  // (micro-batch, chunk)
    bool stepped = false;
    for (const schedule::action& a : plans[std::size_t(r)]) {
      CAPTURE(schedule::to_string(a));
      CHECK_MESSAGE(!stepped, "optimizer_step must be the last action");
      const std::pair<int, int> pass{a.microbatch, a.chunk};
      switch (a.kind) {
        case action_kind::forward:
          CHECK(a.microbatch >= 0);
          CHECK(a.chunk >= 0);
          forwarded.insert(pass);
          break;
        case action_kind::backward:
          CHECK(forwarded.count(pass) == 1);
          CHECK(inputs.insert(pass).second);
          CHECK(weights.insert(pass).second);
          break;
        case action_kind::backward_input:
          CHECK(forwarded.count(pass) == 1);
          CHECK(inputs.insert(pass).second);
          break;
        case action_kind::backward_weight:
          CHECK(inputs.count(pass) == 1);
          CHECK(weights.insert(pass).second);
          break;
        case action_kind::send_activation:
        case action_kind::send_gradient:
          CHECK((0 <= a.peer && a.peer < n));
          ++messages[{int(a.kind), a.microbatch, r, a.peer}];
          break;
        case action_kind::recv_activation:
          CHECK((0 <= a.peer && a.peer < n));
          --messages[{int(action_kind::send_activation), a.microbatch, a.peer, r}];
          break;
        case action_kind::recv_gradient:
          CHECK((0 <= a.peer && a.peer < n));
          --messages[{int(action_kind::send_gradient), a.microbatch, a.peer, r}];
          break;
        case action_kind::optimizer_step: stepped = true; break;
      }
    }
  }
  for (const auto& [key, balance] : messages) {
    CAPTURE(std::get<1>(key));
    CAPTURE(std::get<2>(key));
    CAPTURE(std::get<3>(key));
    CHECK_MESSAGE(balance == 0, "every send needs exactly one matching recv on its peer");
  }
}

}  // namespace subspace::testing::conformance

TEST_CASE_TEMPLATE_DEFINE("Scheduler conformance", F, scheduler_conformance) {
  using namespace subspace;
  using namespace subspace::testing::conformance;
  using S = typename F::scheduler;
  static_assert(Scheduler<S>);
  using plan_t = typename S::plan_type;
  constexpr std::int64_t steps = 9;

  for (const S& s : F::make()) {
    const int n = s.world_size();
    CAPTURE(n);
    REQUIRE(n >= 1);

    SUBCASE("plans are pure values: deterministic, equal for copies, regular") {
      const S copy_of_s = s;
      for (std::int64_t t = 0; t < steps; ++t)
        for (int r = 0; r < n; ++r) {
          CAPTURE(t);
          CAPTURE(r);
          const plan_t p = s.plan(t, r);
          CHECK(p == s.plan(t, r));
          CHECK(p == copy_of_s.plan(t, r));
          plan_t assigned;
          assigned = p;
          CHECK(assigned == p);
          const plan_t copied(p);
          CHECK(copied == p);
        }
      CHECK(plan_t{} == plan_t{});
    }

    SUBCASE("a negative step or a rank outside the world raise invalid_argument") {
      CHECK_THROWS_AS((void)s.plan(-1, 0), invalid_argument);
      CHECK_THROWS_AS((void)s.plan(0, -1), invalid_argument);
      CHECK_THROWS_AS((void)s.plan(0, n), invalid_argument);
    }

    if constexpr (action_plan<plan_t>) {
      SUBCASE("compute plans are consistent on every rank and across ranks") {
        for (std::int64_t t = 0; t < steps; ++t) {
          CAPTURE(t);
          std::vector<plan_t> plans;
          for (int r = 0; r < n; ++r) plans.push_back(s.plan(t, r));
          check_action_plans(plans);
        }
      }
    }
  }
}

// === Optimizer ==================================================================================================

TEST_CASE_TEMPLATE_DEFINE("Optimizer conformance", F, optimizer_conformance) {
  using namespace subspace;
  using namespace subspace::testing::conformance;
  using O = typename F::optimizer;
  static_assert(Optimizer<O>);
  const exec::host ex{};

  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  O o = F::make();

  for (const optim::param_info& info : F::params()) {
    CAPTURE(info.name);
    CAPTURE(to_string(info.shape));
    const auto w0 = testing::random_tensor<float>(info.shape, seed + 1);
    // Gradients of 3 steps, rounded to bf16 so the fp32 and bf16 paths see the same values.
    std::vector<host_tensor<float>> grads;
    std::vector<host_tensor<bf16>> grads16;
    for (int t = 0; t < 3; ++t) {
      grads16.push_back(testing::random_tensor<bf16>(info.shape, seed + 10 + std::uint64_t(t)));
      host_tensor<float> g(info.shape);
      for (std::int64_t i = 0; i < g.numel(); ++i) g.data()[i] = float(grads16.back().data()[i]);
      grads.push_back(std::move(g));
    }
    auto copy_of = [](const host_tensor<float>& a) {
      host_tensor<float> b(a.shape());
      copy(exec::host{}, a.v(), b.v());
      return b;
    };
    // Runs the 3 steps from w0 with fresh state; returns the master weights.
    auto run = [&](bool bf16_grads, float lr, host_tensor<bf16>* working) {
      auto w = copy_of(w0);
      auto st = o.init(ex, info);
      for (int t = 0; t < 3; ++t) {
        const optim::step_context ctx{lr, t + 1};
        const view<bf16, host_space> wv = working ? working->v() : view<bf16, host_space>{};
        if (bf16_grads) o.step(ex, w.v(), view<const bf16, host_space>(grads16[std::size_t(t)].v()), st, info, ctx, wv);
        else o.step(ex, w.v(), view<const float, host_space>(grads[std::size_t(t)].v()), st, info, ctx, wv);
      }
      return w;
    };

    SUBCASE("state: init is repeatable and its size is reported consistently") {
      auto s1 = o.init(ex, info);
      auto s2 = o.init(ex, info);
      CHECK(std::size_t(o.state_bytes(s1)) == std::size_t(o.state_bytes(s2)));
    }

    SUBCASE("steps are deterministic, and fp32 and bf16 gradients of equal values give equal weights") {
      const auto a = run(false, 1e-2f, nullptr);
      const auto b = run(false, 1e-2f, nullptr);
      const auto c = run(true, 1e-2f, nullptr);
      CHECK(same_bits<float>(a.v(), b.v()));
      CHECK(same_bits<float>(a.v(), c.v()));
      CHECK(!same_bits<float>(a.v(), w0.v()));
      CHECK(testing::rel_error(a, a) == 0.0);  // finite
    }

    SUBCASE("the working copy is bf16(master), and asking for it does not change master") {
      host_tensor<bf16> working = filled<bf16>(info.shape, bf16(NAN));
      const auto with = run(false, 1e-2f, &working);
      const auto without = run(false, 1e-2f, nullptr);
      CHECK(same_bits<float>(with.v(), without.v()));
      host_tensor<bf16> expected(info.shape);
      for (std::int64_t i = 0; i < expected.numel(); ++i) expected.data()[i] = bf16(with.data()[i]);
      CHECK(same_bits<bf16>(working.v(), expected.v()));
    }

    SUBCASE("lr = 0 leaves the master weights unchanged") {
      const auto w = run(false, 0.0f, nullptr);
      CHECK(same_bits<float>(w.v(), w0.v()));
    }

    SUBCASE("a small step on f(p) = |p|^2 / 2 (gradient p) decreases f") {
      auto w = copy_of(w0);
      auto st = o.init(ex, info);
      const auto g = copy_of(w0);
      o.step(ex, w.v(), view<const float, host_space>(g.v()), st, info, optim::step_context{1e-3f, 1});
      CHECK(norm<float>(w.v()) < norm<float>(w0.v()));
    }

    SUBCASE("shape mismatches raise invalid_argument") {
      shape wrong = info.shape;
      REQUIRE(wrong.rank >= 1);
      wrong.dims[0] += 1;
      auto w = copy_of(w0);
      auto st = o.init(ex, info);
      host_tensor<float> bad = filled<float>(wrong, 0.0f);
      host_tensor<bf16> bad16 = filled<bf16>(wrong, bf16(0.0f));
      const optim::step_context ctx{1e-3f, 1};
      CHECK_THROWS_AS(o.step(ex, w.v(), view<const float, host_space>(bad.v()), st, info, ctx), invalid_argument);
      CHECK_THROWS_AS(o.step(ex, bad.v(), view<const float, host_space>(w0.v()), st, info, ctx), invalid_argument);
      CHECK_THROWS_AS(o.step(ex, w.v(), view<const float, host_space>(w0.v()), st, info, ctx, bad16.v()),
                      invalid_argument);
    }
  }
}
