#pragma once
// A small command-line parser for the example programs: every flag is declared once with its help text and
// default, --help prints them all, and a bad value fails with the flag, the value and what was expected.

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace examples {

/// A bad flag or combination of flags: "program: message", exit 2.
class cli_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tool's own failure that is not a bad flag (a file it cannot read, a corpus it cannot install): "program:
/// error: message", exit 1. The library's errors print the same way but keep their "file:line: " prefix, which
/// says where in the library to look; a tool's messages say what to do instead.
class tool_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class cli {
 public:
  cli(std::string program, std::string summary) : program_(std::move(program)), summary_(std::move(summary)) {}

  /// Declares --name VALUE bound to `target`; the value `target` holds now is the default shown in --help.
  template <class T>
  cli& flag(const std::string& name, T& target, const std::string& help, std::vector<std::string> choices = {}) {
    flags_.push_back({name, help, show(target), std::move(choices),
                      [&target, name](std::string_view v) { target = parse<T>(name, v); }, false});
    return *this;
  }

  /// Declares a switch --name that takes no value and sets `target` to true (e.g. --no-reference).
  cli& toggle(const std::string& name, bool& target, const std::string& help) {
    flags_.push_back({name, help, "off", {}, [&target](std::string_view) { target = true; }, true});
    return *this;
  }

  /// Parses argv. Returns false after printing --help (the caller exits 0); throws cli_error on bad input.
  bool parse(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
      std::string_view arg = argv[i];
      if (arg == "--help" || arg == "-h") {
        print_help();
        return false;
      }
      if (arg.substr(0, 2) != "--") throw cli_error("unexpected argument '" + std::string(arg) + "' (see --help)");
      std::string name(arg.substr(2));
      std::string value;
      const auto eq = name.find('=');
      if (eq != std::string::npos) {
        value = name.substr(eq + 1);
        name = name.substr(0, eq);
      }
      flag_info* f = find(name);
      if (!f) throw cli_error("unknown flag --" + name + " (see --help)");
      if (f->toggle) {
        if (eq != std::string::npos) throw cli_error("--" + name + " is a switch and takes no value");
        f->set({});
        continue;
      }
      if (eq == std::string::npos) {
        if (i + 1 >= argc) throw cli_error("--" + name + " needs a value (see --help)");
        value = argv[++i];
      }
      if (!f->choices.empty() && std::find(f->choices.begin(), f->choices.end(), value) == f->choices.end()) {
        std::string list;
        for (const auto& c : f->choices) list += (list.empty() ? "" : "|") + c;
        throw cli_error("--" + name + ": got '" + value + "', expected one of " + list);
      }
      f->set(value);
    }
    return true;
  }

  void print_help() const {
    std::printf("usage: %s [flags]\n\n%s\n\nflags:\n", program_.c_str(), summary_.c_str());
    for (const auto& f : flags_) {
      std::string choices;
      for (const auto& c : f.choices) choices += (choices.empty() ? " {" : "|") + c;
      if (!choices.empty()) choices += "}";
      if (f.toggle) std::printf("  --%-18s %s (a switch, no value)\n", f.name.c_str(), f.help.c_str());
      else
        std::printf("  --%-18s %s%s (default: %s)\n", f.name.c_str(), f.help.c_str(), choices.c_str(),
                    f.default_value.empty() ? "none" : f.default_value.c_str());
    }
    std::printf("  --%-18s print this help and exit\n", "help");
  }

 private:
  struct flag_info {
    std::string name, help, default_value;
    std::vector<std::string> choices;
    std::function<void(std::string_view)> set;
    bool toggle = false;  // takes no value
  };

  flag_info* find(const std::string& name) {
    for (auto& f : flags_)
      if (f.name == name) return &f;
    return nullptr;
  }

  template <class T>
  static std::string show(const T& v) {
    if constexpr (std::is_same_v<T, std::string>) return v;
    else if constexpr (std::is_same_v<T, bool>) return v ? "true" : "false";
    else if constexpr (std::is_floating_point_v<T>) {
      char buf[32];  // the shortest form that reads back as v: 989.4, 3e-05
      const auto r = std::to_chars(buf, buf + sizeof buf, v);
      return std::string(buf, r.ptr);
    } else return std::to_string(v);
  }

  template <class T>
  static T parse(const std::string& name, std::string_view v) {
    if constexpr (std::is_same_v<T, std::string>) {
      return std::string(v);
    } else if constexpr (std::is_same_v<T, bool>) {
      if (v == "true" || v == "1" || v == "on") return true;
      if (v == "false" || v == "0" || v == "off") return false;
      throw cli_error("--" + name + ": got '" + std::string(v) + "', expected true or false");
    } else {
      const auto bad = [&](const std::string& expected) {
        return cli_error("--" + name + ": got '" + std::string(v) + "', expected " + expected);
      };
      // from_chars refuses a sign for unsigned types; say why rather than "not an integer".
      if (std::is_unsigned_v<T> && !v.empty() && v[0] == '-') throw bad("a non-negative integer");
      T out{};
      const auto [end, ec] = std::from_chars(v.data(), v.data() + v.size(), out);
      if (ec == std::errc::result_out_of_range && end == v.data() + v.size()) {
        if constexpr (std::is_integral_v<T>)
          throw bad("an integer in [" + std::to_string(std::numeric_limits<T>::min()) + ", " +
                    std::to_string(std::numeric_limits<T>::max()) + "]");
        else throw bad("a number within ±" + show(std::numeric_limits<T>::max()));
      }
      if (ec != std::errc{} || end != v.data() + v.size()) throw bad(std::is_integral_v<T> ? "an integer" : "a number");
      return out;
    }
  }

  std::string program_, summary_;
  std::vector<flag_info> flags_;
};

}  // namespace examples
