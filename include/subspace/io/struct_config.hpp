#pragma once
// io::config_io for any configuration struct described once with Boost.Hana:
//
//   struct toy_config {
//     BOOST_HANA_DEFINE_STRUCT(toy_config, (std::int64_t, vocab), (std::int64_t, d_model), (float, init_std));
//   };
//
// gets a checkpoint's config.json (every member a field of the same name, plus "torch_dtype"), reads it back with
// an error naming the file, the field and the expected kind, and names the fields in which two configurations
// differ — with no per-struct code. Members may be integers, floating point, bool or std::string. Host code only
// (Hana stays out of device code).

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <boost/hana/accessors.hpp>
#include <boost/hana/concept/struct.hpp>
#include <boost/hana/core/to.hpp>
#include <boost/hana/first.hpp>
#include <boost/hana/for_each.hpp>
#include <boost/hana/second.hpp>
#include <boost/hana/string.hpp>

#include "../core/error.hpp"
#include "../util/json.hpp"
#include "config_io.hpp"

namespace subspace::io {

template <class Config>
  requires boost::hana::Struct<Config>::value
struct config_io<Config> {
  static json to_json(const Config& cfg, const hf_config_options& o) {
    json j = json::object();
    boost::hana::for_each(boost::hana::accessors<Config>(),
                          [&](auto member) { j.set(name_of(member), json(boost::hana::second(member)(cfg))); });
    j.set("torch_dtype", json(o.torch_dtype));
    return j;
  }

  static Config from_json(const json& j, std::string_view source) {
    require(j.is_object(), [&] { return std::string(source) + ": expected a JSON object"; });
    Config cfg{};
    boost::hana::for_each(boost::hana::accessors<Config>(), [&](auto member) {
      const std::string name = name_of(member);
      auto& field = boost::hana::second(member)(cfg);
      using F = std::remove_cvref_t<decltype(field)>;
      const json* v = j.find(name);
      require(v != nullptr, [&] { return std::string(source) + ": missing field \"" + name + "\""; });
      if constexpr (std::is_same_v<F, bool>) {
        require(v->is_bool(), [&] { return std::string(source) + ": \"" + name + "\" must be true or false"; });
        field = v->as_bool();
      } else if constexpr (std::is_integral_v<F>) {
        require(v->is_int(), [&] { return std::string(source) + ": \"" + name + "\" must be an integer"; });
        const std::int64_t x = v->as_int();
        require(std::in_range<F>(x), [&] {
          return std::string(source) + ": \"" + name + "\" = " + std::to_string(x) + " is out of range [" +
                 std::to_string(std::numeric_limits<F>::min()) + ", " + std::to_string(std::numeric_limits<F>::max()) +
                 "]";
        });
        field = F(x);
      } else if constexpr (std::is_floating_point_v<F>) {
        require(v->is_number(), [&] { return std::string(source) + ": \"" + name + "\" must be a number"; });
        const double x = v->as_double();
        require(std::isfinite(x) && std::abs(x) <= double(std::numeric_limits<F>::max()),
                [&] { return std::string(source) + ": \"" + name + "\" must be a finite number within range"; });
        field = F(x);
      } else {
        static_assert(std::is_same_v<F, std::string>,
                      "io::config_io: a Hana-described configuration's members must be integers, floating point, "
                      "bool or std::string");
        require(v->is_string(), [&] { return std::string(source) + ": \"" + name + "\" must be a string"; });
        field = v->as_string();
      }
    });
    return cfg;
  }

  static std::string difference(const Config& saved, const Config& current) {
    std::string out;
    boost::hana::for_each(boost::hana::accessors<Config>(), [&](auto member) {
      const auto& a = boost::hana::second(member)(saved);
      const auto& b = boost::hana::second(member)(current);
      if (a == b) return;
      if (!out.empty()) out += ", ";
      out += name_of(member) + " " + json(a).dump() + " vs " + json(b).dump();
    });
    return out;
  }

 private:
  template <class Member>
  static std::string name_of(const Member& member) {
    return boost::hana::to<const char*>(boost::hana::first(member));
  }
};

}  // namespace subspace::io
