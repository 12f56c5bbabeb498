#pragma once
// A small JSON value, parser and writer: enough for safetensors headers, Hugging Face config.json files, trainer
// state and metrics lines, with no external dependency.
//
// * Objects keep their members in insertion order (headers and configs come out in the order they were built);
//   duplicate keys are a parse error.
// * Numbers: a literal without fraction or exponent that fits std::int64_t is kept as an integer (so tensor
//   offsets and token counts stay exact); every other number is a double. as_int() accepts an integral double,
//   as_double() accepts an integer.
// * The parser follows RFC 8259 strictly (no comments, no trailing commas, no NaN; \u escapes with surrogate
//   pairs become UTF-8; control characters inside strings are errors). Errors are invalid_argument naming the
//   source (a file name or "json"), the line and column, and what was expected.
// * The writer prints doubles in their shortest round-trip form with a ".0" when integral (as Python does), and
//   non-finite doubles as null (JSON has no NaN or infinity). json(float) keeps the float's own shortest
//   decimal (1e-5f is written 1e-05, not 9.99999974737875e-06).
//
// util/ sits under data/ and io/, which both read and write JSON; the names are subspace::io's (io::json).

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "../core/error.hpp"

namespace subspace::io {

class json {
 public:
  using array_t = std::vector<json>;
  using member = std::pair<std::string, json>;
  using object_t = std::vector<member>;
  enum class kind { null, boolean, integer, number, string, array, object };

  json() = default;
  json(std::nullptr_t) {}                           // NOLINT
  json(bool b) : v_(b) {}                           // NOLINT
  json(double d) : v_(d) {}                         // NOLINT
  json(float f) : v_(shortest_double(f)) {}         // NOLINT
  json(const char* s) : v_(std::string(s)) {}       // NOLINT
  json(std::string s) : v_(std::move(s)) {}         // NOLINT
  json(std::string_view s) : v_(std::string(s)) {}  // NOLINT
  json(array_t a) : v_(std::move(a)) {}             // NOLINT
  json(object_t o) : v_(std::move(o)) {}            // NOLINT
  template <class I>
    requires(std::is_integral_v<I> && !std::is_same_v<I, bool>)
  json(I i) : v_(to_int64(i)) {}  // NOLINT

  static json array(std::initializer_list<json> items = {}) { return json(array_t(items)); }
  static json object(std::initializer_list<member> members = {}) {
    json j{object_t{}};
    for (const auto& m : members) j.set(m.first, m.second);
    return j;
  }

  kind type() const { return kind(v_.index()); }
  bool is_null() const { return type() == kind::null; }
  bool is_bool() const { return type() == kind::boolean; }
  bool is_int() const { return type() == kind::integer; }
  bool is_number() const { return type() == kind::integer || type() == kind::number; }
  bool is_string() const { return type() == kind::string; }
  bool is_array() const { return type() == kind::array; }
  bool is_object() const { return type() == kind::object; }

  static const char* kind_name(kind k) {
    switch (k) {
      case kind::null: return "null";
      case kind::boolean: return "a boolean";
      case kind::integer: return "an integer";
      case kind::number: return "a number";
      case kind::string: return "a string";
      case kind::array: return "an array";
      case kind::object: return "an object";
    }
    return "?";
  }
  const char* kind_name() const { return kind_name(type()); }

  bool as_bool() const {
    expect(is_bool(), "a boolean");
    return std::get<bool>(v_);
  }
  /// The integer value; an integral double in the int64 range is accepted too.
  std::int64_t as_int() const {
    if (is_int()) return std::get<std::int64_t>(v_);
    if (type() == kind::number) {
      const double d = std::get<double>(v_);
      if (std::isfinite(d) && d == std::floor(d) && d >= -9.2233720368547758e18 && d < 9.2233720368547758e18)
        return std::int64_t(d);
    }
    expect(false, "an integer");
    return 0;
  }
  double as_double() const {
    if (is_int()) return double(std::get<std::int64_t>(v_));
    expect(type() == kind::number, "a number");
    return std::get<double>(v_);
  }
  const std::string& as_string() const {
    expect(is_string(), "a string");
    return std::get<std::string>(v_);
  }
  const array_t& as_array() const {
    expect(is_array(), "an array");
    return std::get<array_t>(v_);
  }
  array_t& as_array() {
    expect(is_array(), "an array");
    return std::get<array_t>(v_);
  }
  const object_t& as_object() const {
    expect(is_object(), "an object");
    return std::get<object_t>(v_);
  }
  object_t& as_object() {
    expect(is_object(), "an object");
    return std::get<object_t>(v_);
  }

  /// The member called `key`, or nullptr (also when this is not an object).
  const json* find(std::string_view key) const {
    if (!is_object()) return nullptr;
    for (const auto& m : std::get<object_t>(v_))
      if (m.first == key) return &m.second;
    return nullptr;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  /// The member called `key`; invalid_argument naming the key when absent.
  const json& at(std::string_view key) const {
    const json* j = find(key);
    require(j != nullptr,
            [&] { return "json: missing key \"" + std::string(key) + "\" (expected in " + kind_name() + ")"; });
    return *j;
  }
  const json& at(std::size_t i) const {
    const auto& a = as_array();
    require(i < a.size(),
            [&] { return "json: index " + std::to_string(i) + " outside an array of " + std::to_string(a.size()); });
    return a[i];
  }
  /// Sets member `key` (replacing an existing one, keeping its position); this must be an object (null becomes
  /// an empty object first).
  json& set(std::string key, json value) {
    if (is_null()) v_ = object_t{};
    auto& o = as_object();
    for (auto& m : o)
      if (m.first == key) {
        m.second = std::move(value);
        return m.second;
      }
    o.emplace_back(std::move(key), std::move(value));
    return o.back().second;
  }
  void push_back(json value) {
    if (is_null()) v_ = array_t{};
    as_array().push_back(std::move(value));
  }
  std::size_t size() const {
    if (is_array()) return std::get<array_t>(v_).size();
    if (is_object()) return std::get<object_t>(v_).size();
    return 0;
  }

  /// Structural equality; an integer equals a double of the same value; object member order is ignored.
  friend bool operator==(const json& a, const json& b) {
    if (a.is_number() && b.is_number()) {
      if (a.is_int() && b.is_int()) return a.as_int() == b.as_int();
      return a.as_double() == b.as_double();
    }
    if (a.type() != b.type()) return false;
    if (a.is_object()) {
      if (a.size() != b.size()) return false;
      // Members matched by key through sorted lists (keys are unique), not a lookup each: an object of many keys
      // compares in n log n.
      const auto by_key = [](const object_t& o) {
        std::vector<const member*> sorted;
        sorted.reserve(o.size());
        for (const auto& m : o) sorted.push_back(&m);
        std::sort(sorted.begin(), sorted.end(), [](const member* x, const member* y) { return x->first < y->first; });
        return sorted;
      };
      const auto x = by_key(a.as_object()), y = by_key(b.as_object());
      for (std::size_t i = 0; i < x.size(); ++i)
        if (x[i]->first != y[i]->first || !(x[i]->second == y[i]->second)) return false;
      return true;
    }
    return a.v_ == b.v_;
  }

  /// Compact text (indent < 0) or pretty text with `indent` spaces per level.
  std::string dump(int indent = -1) const {
    std::string out;
    write(out, indent, 0);
    return out;
  }

  /// Parses one JSON text (surrounding whitespace allowed). `source` names it in error messages.
  static json parse(std::string_view text, std::string_view source = "json");

  /// A JSON string literal for s, quotes included.
  static void escape(std::string& out, std::string_view s) {
    static constexpr char hex[] = "0123456789abcdef";
    out += '"';
    for (const char ch : s) {
      const auto c = static_cast<unsigned char>(ch);
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20) {
            out += "\\u00";
            out += hex[c >> 4];
            out += hex[c & 15];
          } else {
            out += ch;
          }
      }
    }
    out += '"';
  }

  /// The shortest decimal that reads back as d, laid out as Python's repr does: fixed notation for decimal
  /// exponents in [-4, 16) with ".0" when integral (500000.0, 0.0003), scientific otherwise (1e-05, 1e+16).
  static std::string format_double(double d) {
    if (!std::isfinite(d)) return "null";
    char buf[64];
    const auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);  // shortest round trip
    const std::string_view sci(buf, std::size_t(r.ptr - buf));
    const std::size_t e = sci.find('e');
    std::string digits;
    bool negative = false;
    for (const char c : sci.substr(0, e)) {
      if (c == '-') negative = true;
      else if (c != '.') digits += c;
    }
    int exp = 0;
    std::from_chars(sci.data() + e + (sci[e + 1] == '+' ? 2 : 1), sci.data() + sci.size(), exp);
    std::string out = negative ? "-" : "";
    if (exp >= -4 && exp < 16) {
      if (exp >= 0) {
        if (digits.size() < std::size_t(exp) + 1) digits.append(std::size_t(exp) + 1 - digits.size(), '0');
        out += digits.substr(0, std::size_t(exp) + 1);
        const std::string frac = digits.substr(std::size_t(exp) + 1);
        out += "." + (frac.empty() ? std::string("0") : frac);
      } else {
        out += "0." + std::string(std::size_t(-exp - 1), '0') + digits;
      }
      return out;
    }
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    const std::string e_digits = std::to_string(exp < 0 ? -exp : exp);
    out += std::string("e") + (exp < 0 ? "-" : "+") + (e_digits.size() < 2 ? "0" : "") + e_digits;
    return out;
  }

 private:
  template <class I>
  static std::int64_t to_int64(I i) {
    if constexpr (std::is_unsigned_v<I> && sizeof(I) >= sizeof(std::int64_t)) {
      require(i <= I(std::numeric_limits<std::int64_t>::max()),
              [&] { return "json: unsigned value " + std::to_string(i) + " does not fit a JSON integer (int64)"; });
    }
    return std::int64_t(i);
  }
  /// The double nearest to f's shortest decimal form (so 1e-5f becomes 1e-05 exactly as written).
  static double shortest_double(float f) {
    if (!std::isfinite(f)) return double(f);
    char buf[32];
    const auto r = std::to_chars(buf, buf + sizeof buf, f);
    double d = 0;
    std::from_chars(buf, r.ptr, d);
    return d;
  }

  void expect(bool ok, const char* what) const {
    require(ok, [&] { return std::string("json: expected ") + what + ", got " + kind_name(); });
  }

  void write(std::string& out, int indent, int level) const {
    const auto newline = [&](int l) {
      if (indent < 0) return;
      out += '\n';
      out.append(std::size_t(indent * l), ' ');
    };
    switch (type()) {
      case kind::null: out += "null"; break;
      case kind::boolean: out += std::get<bool>(v_) ? "true" : "false"; break;
      case kind::integer: out += std::to_string(std::get<std::int64_t>(v_)); break;
      case kind::number: out += format_double(std::get<double>(v_)); break;
      case kind::string: escape(out, std::get<std::string>(v_)); break;
      case kind::array: {
        const auto& a = std::get<array_t>(v_);
        out += '[';
        for (std::size_t i = 0; i < a.size(); ++i) {
          if (i) out += ',';
          newline(level + 1);
          a[i].write(out, indent, level + 1);
        }
        if (!a.empty()) newline(level);
        out += ']';
        break;
      }
      case kind::object: {
        const auto& o = std::get<object_t>(v_);
        out += '{';
        for (std::size_t i = 0; i < o.size(); ++i) {
          if (i) out += ',';
          newline(level + 1);
          escape(out, o[i].first);
          out += indent < 0 ? ":" : ": ";
          o[i].second.write(out, indent, level + 1);
        }
        if (!o.empty()) newline(level);
        out += '}';
        break;
      }
    }
  }

  std::variant<std::nullptr_t, bool, std::int64_t, double, std::string, array_t, object_t> v_{nullptr};
};

namespace detail::json_parse {

class parser {
 public:
  parser(std::string_view text, std::string_view source) : s_(text), source_(source) {}

  json document() {
    skip_ws();
    json v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("unexpected text after the JSON value");
    return v;
  }

 private:
  static constexpr int max_depth = 512;

  [[noreturn]] void fail(const std::string& what) const {
    std::size_t line = 1, col = 1;
    for (std::size_t k = 0; k < i_ && k < s_.size(); ++k) {
      if (s_[k] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    throw invalid_argument(std::string(source_) + ": invalid JSON at line " + std::to_string(line) + ", column " +
                           std::to_string(col) + ": " + what);
  }
  bool at_end() const { return i_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[i_]; }
  void skip_ws() {
    while (!at_end() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  static std::string show(char c) {
    if (c == '\0') return "end of input";
    if (static_cast<unsigned char>(c) < 0x20 || static_cast<unsigned char>(c) >= 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "0x%02x", unsigned(static_cast<unsigned char>(c)));
      return std::string("byte ") + buf;
    }
    return std::string("'") + c + "'";
  }

  json value(int depth) {
    if (depth > max_depth) fail("nesting deeper than " + std::to_string(max_depth) + " levels");
    const char c = peek();
    switch (c) {
      case '{': return object(depth);
      case '[': return array(depth);
      case '"': return json(string());
      case 't': literal("true"); return json(true);
      case 'f': literal("false"); return json(false);
      case 'n': literal("null"); return json(nullptr);
      default:
        if (c == '-' || (c >= '0' && c <= '9')) return number();
        fail("expected a value (object, array, string, number, true, false or null), got " + show(c));
    }
  }

  void literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) fail("expected '" + std::string(word) + "'");
    i_ += word.size();
  }

  json object(int depth) {
    ++i_;  // {
    json::object_t members;
    skip_ws();
    if (peek() == '}') {
      ++i_;
      return json(std::move(members));
    }
    // Keys seen so far: a scan while the object is small, a hash set once it is not (linear in the keys, so a
    // header of many keys cannot make the parse quadratic).
    std::unordered_set<std::string> seen;
    for (;;) {
      skip_ws();
      if (peek() != '"') fail("expected a string key in an object, got " + show(peek()));
      const std::size_t key_at = i_;
      std::string key = string();
      bool duplicate = false;
      if (members.size() < 16) {
        for (const auto& m : members) duplicate = duplicate || m.first == key;
      } else {
        if (seen.empty())
          for (const auto& m : members) seen.insert(m.first);
        duplicate = !seen.insert(key).second;
      }
      if (duplicate) {
        i_ = key_at;
        fail("duplicate key \"" + key + "\"");
      }
      skip_ws();
      if (peek() != ':') fail("expected ':' after the key \"" + key + "\", got " + show(peek()));
      ++i_;
      skip_ws();
      members.emplace_back(std::move(key), value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == '}') {
        ++i_;
        return json(std::move(members));
      }
      fail("expected ',' or '}' after an object member, got " + show(peek()));
    }
  }

  json array(int depth) {
    ++i_;  // [
    json::array_t items;
    skip_ws();
    if (peek() == ']') {
      ++i_;
      return json(std::move(items));
    }
    for (;;) {
      skip_ws();
      items.push_back(value(depth + 1));
      skip_ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      if (peek() == ']') {
        ++i_;
        return json(std::move(items));
      }
      fail("expected ',' or ']' after an array element, got " + show(peek()));
    }
  }

  unsigned hex4() {
    if (s_.size() - i_ < 4) fail("expected 4 hex digits after \\u");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= unsigned(c - '0');
      else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
      else {
        --i_;
        fail("expected a hex digit in a \\u escape, got " + show(c));
      }
    }
    return v;
  }
  static void utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += char(cp);
    } else if (cp < 0x800) {
      out += char(0xc0 | (cp >> 6));
      out += char(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += char(0xe0 | (cp >> 12));
      out += char(0x80 | ((cp >> 6) & 0x3f));
      out += char(0x80 | (cp & 0x3f));
    } else {
      out += char(0xf0 | (cp >> 18));
      out += char(0x80 | ((cp >> 12) & 0x3f));
      out += char(0x80 | ((cp >> 6) & 0x3f));
      out += char(0x80 | (cp & 0x3f));
    }
  }

  std::string string() {
    ++i_;  // "
    std::string out;
    for (;;) {
      if (at_end()) fail("unterminated string (expected a closing '\"')");
      const char c = s_[i_];
      if (c == '"') {
        ++i_;
        return out;
      }
      if (static_cast<unsigned char>(c) < 0x20) fail("control character " + show(c) + " inside a string (escape it)");
      if (c != '\\') {
        out += c;
        ++i_;
        continue;
      }
      ++i_;
      const char e = peek();
      ++i_;
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (s_.substr(i_, 2) != "\\u") fail("a high surrogate \\u escape must be followed by a low surrogate");
            i_ += 2;
            const unsigned lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) fail("expected a low surrogate (\\udc00-\\udfff) after a high surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            fail("a low surrogate \\u escape without a high surrogate before it");
          }
          utf8(out, cp);
          break;
        }
        default:
          --i_;
          fail("invalid escape \\" + std::string(1, e == '\0' ? ' ' : e) +
               " (expected one of \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)");
      }
    }
  }

  json number() {
    const std::size_t start = i_;
    bool integral = true;
    if (peek() == '-') ++i_;
    if (peek() == '0') {
      ++i_;
      if (peek() >= '0' && peek() <= '9') fail("a number may not have leading zeros");
    } else if (peek() >= '1' && peek() <= '9') {
      while (peek() >= '0' && peek() <= '9') ++i_;
    } else {
      fail("expected a digit in a number, got " + show(peek()));
    }
    if (peek() == '.') {
      integral = false;
      ++i_;
      if (!(peek() >= '0' && peek() <= '9')) fail("expected a digit after the decimal point, got " + show(peek()));
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    if (peek() == 'e' || peek() == 'E') {
      integral = false;
      ++i_;
      if (peek() == '+' || peek() == '-') ++i_;
      if (!(peek() >= '0' && peek() <= '9')) fail("expected a digit in the exponent, got " + show(peek()));
      while (peek() >= '0' && peek() <= '9') ++i_;
    }
    const char* b = s_.data() + start;
    const char* e = s_.data() + i_;
    if (integral) {
      std::int64_t v = 0;
      const auto r = std::from_chars(b, e, v);
      if (r.ec == std::errc{} && r.ptr == e) return json(v);
      // out of the int64 range: fall through to double
    }
    double d = 0;
    const auto r = std::from_chars(b, e, d);
    if (r.ec == std::errc::result_out_of_range) {
      // Underflow reads as the nearest subnormal or zero (as Python and JavaScript do); overflow is an error.
      const double u = std::strtod(std::string(b, e).c_str(), nullptr);
      if (std::isinf(u)) {
        i_ = start;
        fail("number " + std::string(b, e) + " is outside the range of a double");
      }
      return json(u);
    }
    if (r.ec != std::errc{} || r.ptr != e) {
      i_ = start;
      fail("malformed number " + std::string(b, e));
    }
    return json(d);
  }

  std::string_view s_;
  std::string_view source_;
  std::size_t i_ = 0;
};

}  // namespace detail::json_parse

inline json json::parse(std::string_view text, std::string_view source) {
  return detail::json_parse::parser(text, source).document();
}

}  // namespace subspace::io
