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
//                 Adjoint identities are checked when compress::is_linear_v<C>; the vector-Jacobian products
//                 against central differences in double whenever C accepts double views.
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
  if (op == comm::reduce_op::max)
    CHECK(err == 0.0);
  else
    CHECK(err <= 1e-6);
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

/// Host-space parameters of a compressor, copied out: name -> (value, grad).
template <class C>
std::map<std::string, std::pair<std::vector<float>, std::vector<float>>> snapshot_parameters(C& c) {
  std::map<std::string, std::pair<std::vector<float>, std::vector<float>>> out;
  c.visit_parameters([&]<class Space>(const compress::parameter<Space>& p) {
    if constexpr (std::is_same_v<Space, host_space>) {
      std::vector<float> value(std::size_t(p.value.numel())), grad(std::size_t(p.grad.numel()));
      using out_view = view<float, host_space>;
      copy(exec::host{}, view<const float, host_space>(p.value), out_view(value.data(), p.value.shape()));
      copy(exec::host{}, view<const float, host_space>(p.grad), out_view(grad.data(), p.grad.shape()));
      out[std::string(p.name)] = {std::move(value), std::move(grad)};
    }
  });
  return out;
}

}  // namespace subspace::testing::conformance

TEST_CASE_TEMPLATE_DEFINE("Compressor conformance", F, compressor_conformance) {
  using namespace subspace;
  using namespace subspace::testing::conformance;
  using C = typename F::compressor;
  static_assert(Compressor<C>);
  const exec::host ex{};

  const auto seed = testing::fresh_seed();
  CAPTURE(seed);
  C c = F::make(seed);
  const C& cc = c;

  for (const shape& xs : F::shapes()) {
    CAPTURE(to_string(xs));
    const shape ps = cc.payload_shape(xs);
    CAPTURE(to_string(ps));

    SUBCASE("payload_shape is a function of the input shape; wire_bytes is elements x width + a fixed side channel") {
      CHECK(cc.payload_shape(xs) == ps);
      const std::size_t n = std::size_t(ps.numel());
      const std::size_t side = cc.wire_bytes(xs, 1) - n;
      CHECK(cc.wire_bytes(xs, 1) >= n);
      CHECK(cc.wire_bytes(xs, 2) == 2 * n + side);
      CHECK(cc.wire_bytes(xs, 4) == 4 * n + side);
      CHECK(cc.wire_bytes(xs, 4) == cc.wire_bytes(xs, 4));
    }

    const auto x = testing::random_tensor<float>(xs, seed + 1);
    const auto q = testing::random_tensor<float>(ps, seed + 2);  // a payload-shaped direction
    const auto g = testing::random_tensor<float>(xs, seed + 3);  // an input-shaped direction
    auto encoded = [&](const host_tensor<float>& in) {
      host_tensor<float> p = filled<float>(ps, NAN);
      c.encode(ex, in.v(), p.v());
      return p;
    };
    auto decoded = [&](const host_tensor<float>& p) {
      host_tensor<float> out = filled<float>(xs, NAN);
      c.decode(ex, p.v(), out.v());
      return out;
    };

    SUBCASE("encode and decode are deterministic and write finite outputs") {
      const auto p1 = encoded(x), p2 = encoded(x);
      CHECK(same_bits<float>(p1.v(), p2.v()));
      CHECK(testing::rel_error(p1, p1) == 0.0);  // finite (NaN and inf give +inf)
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
        c.decode_backward(ex, q.v(), g.v(), grad_payload.v());
        const double lhs1 = dot<float, float>(decoded(q).v(), g.v());
        const double rhs1 = dot<float, float>(q.v(), grad_payload.v());
        CHECK(std::abs(lhs1 - rhs1) <= 1e-5 * norm<float>(q.v()) * norm<float>(g.v()));
        // <encode(x), q> == <x, encode_backward(q)>
        host_tensor<float> grad_x = filled<float>(xs, NAN);
        c.encode_backward(ex, x.v(), q.v(), grad_x.v());
        const double lhs2 = dot<float, float>(encoded(x).v(), q.v());
        const double rhs2 = dot<float, float>(x.v(), grad_x.v());
        CHECK(std::abs(lhs2 - rhs2) <= 1e-5 * norm<float>(x.v()) * norm<float>(q.v()));
      }
    }

    using dview = view<double, host_space>;
    using dcview = view<const double, host_space>;
    if constexpr (requires(dcview in, dview out) {
                    c.encode(ex, in, out);
                    c.decode(ex, in, out);
                    c.encode_backward(ex, in, in, out);
                    c.decode_backward(ex, in, in, out);
                  }) {
      SUBCASE("float64: the backward functions are vector-Jacobian products (central differences)") {
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
        // d/dt <encode(x + t dx), q> at t = 0  vs  <dx, encode_backward(x, q)>
        host_tensor<double> ep(ps), em(ps), grad_x(xs);
        const auto x_plus = shifted(xd, dx, h), x_minus = shifted(xd, dx, -h);
        c.encode(ex, x_plus.v(), ep.v());
        c.encode(ex, x_minus.v(), em.v());
        const double fd1 = (dot<double, double>(ep.v(), qd.v()) - dot<double, double>(em.v(), qd.v())) / (2 * h);
        c.encode_backward(ex, xd.v(), qd.v(), grad_x.v());
        const double an1 = dot<double, double>(dx.v(), grad_x.v());
        CHECK(std::abs(fd1 - an1) <= 1e-7 * norm<double>(dx.v()) * norm<double>(grad_x.v()) + 1e-9);
        // d/dt <decode(q + t dq), g> at t = 0  vs  <dq, decode_backward(q, g)>
        host_tensor<double> dp(xs), dm(xs), grad_p(ps);
        const auto q_plus = shifted(qd, dq, h), q_minus = shifted(qd, dq, -h);
        c.decode(ex, q_plus.v(), dp.v());
        c.decode(ex, q_minus.v(), dm.v());
        const double fd2 = (dot<double, double>(dp.v(), gd.v()) - dot<double, double>(dm.v(), gd.v())) / (2 * h);
        c.decode_backward(ex, qd.v(), gd.v(), grad_p.v());
        const double an2 = dot<double, double>(dq.v(), grad_p.v());
        CHECK(std::abs(fd2 - an2) <= 1e-7 * norm<double>(dq.v()) * norm<double>(grad_p.v()) + 1e-9);
        CHECK(norm<double>(grad_x.v()) > 0.0);
        CHECK(norm<double>(grad_p.v()) > 0.0);
      }
    }

    SUBCASE("shape mismatches raise invalid_argument") {
      shape wrong_p = ps, wrong_x = xs;
      REQUIRE(ps.rank >= 1);
      REQUIRE(xs.rank >= 1);
      wrong_p.dims[0] += 1;
      wrong_x.dims[0] += 1;
      host_tensor<float> bad_p = filled<float>(wrong_p, 0.0f), bad_x = filled<float>(wrong_x, 0.0f);
      CHECK_THROWS_AS(c.encode(ex, x.v(), bad_p.v()), invalid_argument);
      CHECK_THROWS_AS(c.decode(ex, q.v(), bad_x.v()), invalid_argument);
      CHECK_THROWS_AS(c.decode_backward(ex, q.v(), g.v(), bad_p.v()), invalid_argument);
      CHECK_THROWS_AS(c.encode_backward(ex, x.v(), q.v(), bad_x.v()), invalid_argument);
    }

    SUBCASE("parameters: named uniquely, value and grad alike, and the backward accumulates into grad") {
      std::set<std::string> names;
      int count = 0;
      c.visit_parameters([&]<class Space>(const compress::parameter<Space>& p) {
        ++count;
        CHECK(!p.name.empty());
        CHECK(names.insert(std::string(p.name)).second);
        CHECK(p.value.shape() == p.grad.shape());
      });
      CHECK(int(names.size()) == count);
      // Two identical backward passes add the same increment twice.
      const auto before = snapshot_parameters(c);
      host_tensor<float> gp(ps), gx(xs);
      auto backward = [&] {
        c.decode_backward(ex, q.v(), g.v(), gp.v());
        c.encode_backward(ex, x.v(), q.v(), gx.v());
      };
      backward();
      const auto once = snapshot_parameters(c);
      backward();
      const auto twice = snapshot_parameters(c);
      for (const auto& [name, vg] : before) {
        CAPTURE(name);
        const auto& g0 = vg.second;
        const auto& g1 = once.at(name).second;
        const auto& g2 = twice.at(name).second;
        host_tensor<double> step1({std::int64_t(g0.size())}), step2({std::int64_t(g0.size())});
        for (std::size_t i = 0; i < g0.size(); ++i) {
          step1.data()[i] = double(g1[i]) - g0[i];
          step2.data()[i] = double(g2[i]) - g1[i];
        }
        CHECK(testing::rel_error(step2, step1) <= 1e-5);
        CHECK(vg.first == once.at(name).first);  // the backward leaves the values alone
      }
    }
  }
}

// === Scheduler ==================================================================================================

namespace subspace::testing::conformance {

template <class P>
concept action_plan = std::ranges::forward_range<const P> &&
                      std::same_as<std::ranges::range_value_t<const P>, schedule::action>;

/// Checks the compute plans of one step across all ranks: on every rank a micro-batch is backwarded at most once
/// and only after its forward, optimizer_step comes at most once and last; every send has its recv on the peer
/// (same kind, same micro-batch) and vice versa.
template <class Plan>
void check_action_plans(const std::vector<Plan>& plans) {
  using schedule::action_kind;
  const int n = int(plans.size());
  // (kind of the send, micro-batch, from, to), counted up for sends and down for recvs
  std::map<std::tuple<int, int, int, int>, int> messages;
  for (int r = 0; r < n; ++r) {
    CAPTURE(r);
    std::set<int> forwarded, backwarded;
    bool stepped = false;
    for (const schedule::action& a : plans[std::size_t(r)]) {
      CAPTURE(schedule::to_string(a));
      CHECK_MESSAGE(!stepped, "optimizer_step must be the last action");
      switch (a.kind) {
        case action_kind::forward:
          CHECK(a.microbatch >= 0);
          forwarded.insert(a.microbatch);
          break;
        case action_kind::backward:
          CHECK(forwarded.count(a.microbatch) == 1);
          CHECK(backwarded.insert(a.microbatch).second);
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
        case action_kind::optimizer_step:
          stepped = true;
          break;
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
        if (bf16_grads)
          o.step(ex, w.v(), view<const bf16, host_space>(grads16[std::size_t(t)].v()), st, info, ctx, wv);
        else
          o.step(ex, w.v(), view<const float, host_space>(grads[std::size_t(t)].v()), st, info, ctx, wv);
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
      CHECK_THROWS_AS(
          o.step(ex, w.v(), view<const float, host_space>(w0.v()), st, info, ctx, bad16.v()), invalid_argument);
    }
  }
}
