#pragma once
// safetensors (https://github.com/huggingface/safetensors) reader and writer, host side.
//
// Layout: an 8-byte little-endian unsigned header length N; N bytes of UTF-8 JSON, starting with '{' and padded
// with spaces so that N is a multiple of 8; then the byte buffer. The header maps each tensor name to
// {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]} (offsets relative to the start of the byte
// buffer, little-endian, row-major), plus an optional "__metadata__" object of string values. The tensors tile
// the buffer exactly: no holes, no overlaps.
//
// The writer emits compact JSON: "__metadata__" first (when there is any), then the tensors in the order they
// were added, stably sorted by element size (largest first) so that every tensor starts at a multiple of its
// own element size (the buffer itself starts 8-aligned). Data are streamed to the file at write() time from
// the views given to add(); the file is written atomically (util/file.hpp).
//
// The reader validates what the reference implementation validates (header start and length, known dtypes,
// offsets that match the shape and tile the buffer) and converts on load: floating-point tensors (F64, F32,
// BF16, F16) load into float, double, bf16 or fp16 with round-to-nearest-even; integer tensors load into any
// integer type whose range holds every value. Errors name the file, the tensor and the expected value.

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/checked.hpp"
#include "../core/dtype.hpp"
#include "../core/error.hpp"
#include "../core/tensor.hpp"
#include "../util/file.hpp"
#include "../util/json.hpp"

namespace subspace::io {

static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

/// Element types of safetensors files (the names are the file format's).
enum class st_dtype { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2 };

inline constexpr std::pair<st_dtype, const char*> st_dtype_names[] = {
    {st_dtype::BOOL, "BOOL"}, {st_dtype::U8, "U8"},           {st_dtype::I8, "I8"},          {st_dtype::I16, "I16"},
    {st_dtype::U16, "U16"},   {st_dtype::F16, "F16"},         {st_dtype::BF16, "BF16"},      {st_dtype::I32, "I32"},
    {st_dtype::U32, "U32"},   {st_dtype::F32, "F32"},         {st_dtype::F64, "F64"},        {st_dtype::I64, "I64"},
    {st_dtype::U64, "U64"},   {st_dtype::F8_E4M3, "F8_E4M3"}, {st_dtype::F8_E5M2, "F8_E5M2"}};

inline const char* name_of(st_dtype d) {
  for (const auto& [k, n] : st_dtype_names)
    if (k == d) return n;
  return "?";
}
inline std::optional<st_dtype> st_dtype_from_name(std::string_view name) {
  for (const auto& [k, n] : st_dtype_names)
    if (name == n) return k;
  return std::nullopt;
}
inline std::size_t element_size(st_dtype d) {
  switch (d) {
    case st_dtype::BOOL:
    case st_dtype::U8:
    case st_dtype::I8:
    case st_dtype::F8_E4M3:
    case st_dtype::F8_E5M2: return 1;
    case st_dtype::I16:
    case st_dtype::U16:
    case st_dtype::F16:
    case st_dtype::BF16: return 2;
    case st_dtype::I32:
    case st_dtype::U32:
    case st_dtype::F32: return 4;
    case st_dtype::F64:
    case st_dtype::I64:
    case st_dtype::U64: return 8;
  }
  return 0;
}
inline bool is_floating(st_dtype d) {
  return d == st_dtype::F16 || d == st_dtype::BF16 || d == st_dtype::F32 || d == st_dtype::F64;
}
inline bool is_integer(st_dtype d) {
  return d == st_dtype::U8 || d == st_dtype::I8 || d == st_dtype::I16 || d == st_dtype::U16 || d == st_dtype::I32 ||
         d == st_dtype::U32 || d == st_dtype::I64 || d == st_dtype::U64 || d == st_dtype::BOOL;
}

/// The safetensors dtype of a C++ element type.
template <class T>
constexpr st_dtype st_dtype_of() {
  using U = std::remove_const_t<T>;
  if constexpr (std::is_same_v<U, float>) return st_dtype::F32;
  else if constexpr (std::is_same_v<U, double>) return st_dtype::F64;
  else if constexpr (std::is_same_v<U, bf16>) return st_dtype::BF16;
  else if constexpr (std::is_same_v<U, fp16>) return st_dtype::F16;
  else if constexpr (std::is_same_v<U, bool>) return st_dtype::BOOL;
  else if constexpr (std::is_same_v<U, std::int8_t>) return st_dtype::I8;
  else if constexpr (std::is_same_v<U, std::uint8_t>) return st_dtype::U8;
  else if constexpr (std::is_same_v<U, std::int16_t>) return st_dtype::I16;
  else if constexpr (std::is_same_v<U, std::uint16_t>) return st_dtype::U16;
  else if constexpr (std::is_same_v<U, std::int32_t>) return st_dtype::I32;
  else if constexpr (std::is_same_v<U, std::uint32_t>) return st_dtype::U32;
  else if constexpr (std::is_same_v<U, std::int64_t>) return st_dtype::I64;
  else if constexpr (std::is_same_v<U, std::uint64_t>) return st_dtype::U64;
  else static_assert(dependent_false<T>, "st_dtype_of<T>: T has no safetensors dtype");
}

/// "[2, 3]" for a safetensors shape.
inline std::string to_string(const std::vector<std::int64_t>& dims) {
  std::string s = "[";
  for (std::size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}
inline std::vector<std::int64_t> dims_of(const shape& s) {
  return std::vector<std::int64_t>(s.dims.begin(), s.dims.begin() + s.rank);
}
inline std::int64_t numel_of(const std::vector<std::int64_t>& dims) {
  for (const auto d : dims)
    if (d == 0) return 0;  // before any product: [2^32, 2^32, 0] is empty, not an overflow
  std::int64_t n = 1;
  for (const auto d : dims) n *= d;
  return n;
}

/// One entry of a safetensors header.
struct st_tensor {
  std::string name;
  st_dtype dtype = st_dtype::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  // byte offsets in the data buffer

  std::int64_t numel() const { return numel_of(shape); }
  std::uint64_t bytes() const { return end - begin; }
  /// The shape as a subspace::shape (rank <= 4, else invalid_argument).
  subspace::shape to_shape() const {
    require(shape.size() <= std::size_t(max_rank), [&] {
      return "tensor '" + name + "' has rank " + std::to_string(shape.size()) + " (at most 4 supported)";
    });
    subspace::shape s;
    s.rank = int(shape.size());
    for (std::size_t i = 0; i < shape.size(); ++i) s.dims[i] = shape[i];
    return s;
  }
};

namespace detail::st {

inline constexpr std::size_t chunk_elements = std::size_t(1) << 20;
inline constexpr std::uint64_t max_header_bytes = 100'000'000;  // the reference implementation's limit

/// Reads `n` elements of `src` dtype from raw little-endian bytes and stores them converted to To.
template <class To>
void convert_elements(const std::byte* raw, st_dtype src, std::size_t n, To* out, const std::string& who) {
  const auto load = [&](auto tag) {
    using From = decltype(tag);
    for (std::size_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<From, bool>) {
        // A byte other than 0 or 1 is no bool: copied into one, it would be undefined behaviour to read.
        const auto byte = std::to_integer<unsigned>(raw[i]);
        require(byte <= 1, [&] {
          return who + ": BOOL value " + std::to_string(byte) + " at element " + std::to_string(i) +
                 " is neither 0 nor 1";
        });
        out[i] = To(byte);
      } else {
        From v;
        std::memcpy(&v, raw + i * sizeof(From), sizeof(From));
        if constexpr (std::is_floating_point_v<From> || std::is_same_v<From, bf16> || std::is_same_v<From, fp16>) {
          out[i] = convert<To>(v);
        } else {
          if constexpr (std::is_same_v<To, bool>) {
            out[i] = To(v);
          } else {
            require(std::in_range<To>(v), [&] {
              return who + ": value " + std::to_string(v) + " at element " + std::to_string(i) + " does not fit " +
                     name_of(st_dtype_of<To>());
            });
            out[i] = To(v);
          }
        }
      }
    }
  };
  constexpr bool to_float = std::is_floating_point_v<To> || std::is_same_v<To, bf16> || std::is_same_v<To, fp16>;
  if constexpr (to_float) {
    switch (src) {
      case st_dtype::F32: return load(float{});
      case st_dtype::F64: return load(double{});
      case st_dtype::BF16: return load(bf16{});
      case st_dtype::F16: return load(fp16{});
      default: break;
    }
    require(false, [&] {
      return who + ": dtype " + name_of(src) + " cannot load as floating point (expected F32, BF16, F16 or F64)";
    });
  } else {
    switch (src) {
      case st_dtype::BOOL: return load(bool{});
      case st_dtype::U8: return load(std::uint8_t{});
      case st_dtype::I8: return load(std::int8_t{});
      case st_dtype::I16: return load(std::int16_t{});
      case st_dtype::U16: return load(std::uint16_t{});
      case st_dtype::I32: return load(std::int32_t{});
      case st_dtype::U32: return load(std::uint32_t{});
      case st_dtype::I64: return load(std::int64_t{});
      case st_dtype::U64: return load(std::uint64_t{});
      default: break;
    }
    require(false,
            [&] { return who + ": dtype " + name_of(src) + " cannot load as an integer (expected an integer dtype)"; });
  }
}

/// Writes the elements of a host view in row-major order, converted to To, in bounded chunks.
template <class To, class From>
void write_view(file_sink& out, view<const From, host_space> v) {
  if constexpr (std::is_same_v<To, From>) {
    if (v.is_contiguous()) {
      out.write(v.data(), v.bytes());
      return;
    }
  }
  std::vector<To> buf;
  buf.reserve(std::min<std::size_t>(chunk_elements, std::size_t(v.numel())));
  const auto flush = [&] {
    out.write(buf.data(), buf.size() * sizeof(To));
    buf.clear();
  };
  for_each_offset(v.shape(), v.strides(), v.strides(), [&](std::int64_t a, std::int64_t) {
    buf.push_back(convert<To>(v.data()[a]));
    if (buf.size() == chunk_elements) flush();
  });
  if (!buf.empty()) flush();
}

}  // namespace detail::st

/// Builds a safetensors file from borrowed views and byte producers; see the top of this file.
class safetensors_writer {
 public:
  /// Sets __metadata__[key] = value (string values, as the format requires).
  void metadata(std::string key, std::string value) { meta_.set(std::move(key), json(std::move(value))); }

  /// Adds tensor `name` with v's elements in v's own dtype. The view is read at write() time: keep it alive.
  template <class T>
  void add(std::string name, view<T, host_space> v) {
    using U = std::remove_const_t<T>;
    add_as<U>(std::move(name), v);
  }
  /// Adds tensor `name` stored as To (e.g. fp32 master weights saved as BF16), converted while writing.
  template <class To, class T>
  void add_as(std::string name, view<T, host_space> v) {
    using From = std::remove_const_t<T>;
    static_assert(std::is_same_v<To, From> || (is_element_v<To> && is_element_v<From>),
                  "safetensors_writer::add_as: converts between floating-point types only (fp32, fp64, bf16, fp16)");
    const view<const From, host_space> cv = v;
    add_bytes(std::move(name), st_dtype_of<To>(), dims_of(v.shape()),
              [cv](file_sink& out) { detail::st::write_view<To, From>(out, cv); });
  }
  /// Adds tensor `name` whose numel(shape) * element_size(dtype) bytes `produce` writes at write() time.
  void add_bytes(std::string name, st_dtype dtype, std::vector<std::int64_t> shape,
                 std::function<void(file_sink&)> produce) {
    require(!name.empty() && name != "__metadata__",
            [&] { return "safetensors_writer: tensor name '" + name + "' is reserved or empty"; });
    for (const auto d : shape)
      require(d >= 0, [&] { return "safetensors_writer: tensor '" + name + "' has a negative extent"; });
    for (const auto& e : entries_)
      require(e.info.name != name, [&] { return "safetensors_writer: tensor '" + name + "' added twice"; });
    st_tensor info{std::move(name), dtype, std::move(shape), 0, 0};
    entries_.push_back({std::move(info), std::move(produce)});
  }

  std::size_t size() const { return entries_.size(); }

  /// The tensors in file order, with their data offsets.
  std::vector<st_tensor> layout() const {
    std::vector<st_tensor> out;
    for (const std::size_t i : order()) out.push_back(entries_[i].info);
    std::uint64_t at = 0;
    for (auto& t : out) {
      t.begin = at;
      at += std::uint64_t(t.numel()) * element_size(t.dtype);
      t.end = at;
    }
    return out;
  }

  /// The header bytes: the JSON text padded with spaces to a multiple of 8 (without the 8-byte length).
  std::string header() const {
    json h = json::object();
    if (meta_.size() > 0) h.set("__metadata__", meta_);
    for (const auto& t : layout()) {
      json::array_t shape;
      for (const auto d : t.shape) shape.emplace_back(d);
      h.set(t.name, json::object({{"dtype", json(name_of(t.dtype))},
                                  {"shape", json(std::move(shape))},
                                  {"data_offsets", json::array({json(t.begin), json(t.end)})}}));
    }
    std::string text = h.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    return text;
  }

  /// Writes the file atomically. Every producer must write exactly its tensor's bytes.
  void write(const std::filesystem::path& path) const {
    const std::string head = header();
    const auto tensors = layout();
    const auto idx = order();
    atomic_write(path, [&](file_sink& out) {
      const std::uint64_t n = head.size();
      unsigned char len[8];
      for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(n >> (8 * i));
      out.write(len, 8);
      out.write(head);
      const std::uint64_t base = out.written();
      for (std::size_t k = 0; k < idx.size(); ++k) {
        const auto& t = tensors[k];
        entries_[idx[k]].produce(out);
        require(out.written() - base == t.end, [&] {
          return "safetensors_writer: tensor '" + t.name + "' (" + name_of(t.dtype) + " " + to_string(t.shape) +
                 ") should have written " + std::to_string(t.bytes()) + " bytes, wrote " +
                 std::to_string(out.written() - base - t.begin);
        });
      }
    });
  }

 private:
  struct entry {
    st_tensor info;
    std::function<void(file_sink&)> produce;
  };
  std::vector<std::size_t> order() const {
    std::vector<std::size_t> idx(entries_.size());
    for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
    std::stable_sort(idx.begin(), idx.end(), [&](std::size_t a, std::size_t b) {
      return element_size(entries_[a].info.dtype) > element_size(entries_[b].info.dtype);
    });
    return idx;
  }

  json meta_ = json::object();
  std::vector<entry> entries_;
};

/// An open safetensors file: the validated header, and reads of single tensors with dtype conversion.
class safetensors_file {
 public:
  explicit safetensors_file(std::filesystem::path path) : file_(std::move(path), "safetensors file") {
    const std::string where = "safetensors file " + detail::quoted(file_.path());
    require(file_.size() >= 8, [&] {
      return where + ": " + std::to_string(file_.size()) +
             " bytes is too short (expected an 8-byte header length first)";
    });
    unsigned char len[8];
    file_.read(0, len, 8);
    std::uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | len[i];
    require(n <= detail::st::max_header_bytes, [&] {
      return where + ": header length " + std::to_string(n) + " exceeds the format's limit of 100000000 bytes";
    });
    require(n <= file_.size() - 8, [&] {
      return where + ": header length " + std::to_string(n) + " exceeds the file (" + std::to_string(file_.size()) +
             " bytes): truncated or not safetensors";
    });
    std::string text(std::size_t(n), '\0');
    file_.read(8, text.data(), text.size());
    require(!text.empty() && text[0] == '{', [&] { return where + ": the header must start with '{'"; });
    data_start_ = 8 + n;
    const std::uint64_t buffer = file_.size() - data_start_;

    const json h = json::parse(text, where + " header");
    require(h.is_object(), [&] { return where + ": the header must be a JSON object"; });
    for (const auto& [name, entry] : h.as_object()) {
      if (name == "__metadata__") {
        require(entry.is_object(), [&] { return where + ": __metadata__ must be an object of strings"; });
        for (const auto& [k, v] : entry.as_object()) {
          require(v.is_string(), [&, &key = k, &value = v] {
            return where + ": __metadata__[\"" + key + "\"] must be a string, got " + value.kind_name();
          });
          metadata_.emplace_back(k, v.as_string());
        }
        continue;
      }
      tensors_.push_back(parse_entry(where, name, entry));
    }
    // The tensors must tile the buffer: sorted by offset, each starts where the previous ended.
    std::vector<const st_tensor*> by_offset;
    for (const auto& t : tensors_) by_offset.push_back(&t);
    std::sort(by_offset.begin(), by_offset.end(), [](const st_tensor* a, const st_tensor* b) {
      return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
    });
    std::uint64_t at = 0;
    for (const st_tensor* t : by_offset) {
      require(t->begin == at, [&] {
        return where + ": tensor '" + t->name + "' starts at byte " + std::to_string(t->begin) +
               " of the data buffer, expected " + std::to_string(at) +
               " (tensors must tile the buffer without holes or overlaps)";
      });
      at = t->end;
    }
    require(at == buffer, [&] {
      return where + ": the tensors cover " + std::to_string(at) + " bytes, the data buffer has " +
             std::to_string(buffer) + " (truncated file or bad offsets)";
    });
  }

  const std::filesystem::path& path() const { return file_.path(); }
  /// The tensors in header order.
  const std::vector<st_tensor>& tensors() const { return tensors_; }
  const std::vector<std::pair<std::string, std::string>>& metadata() const { return metadata_; }
  std::optional<std::string> metadata(std::string_view key) const {
    for (const auto& [k, v] : metadata_)
      if (k == key) return v;
    return std::nullopt;
  }
  const st_tensor* find(std::string_view name) const {
    for (const auto& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  const st_tensor& at(std::string_view name) const {
    const st_tensor* t = find(name);
    require(t != nullptr, [&] {
      return "safetensors file " + detail::quoted(path()) + " has no tensor '" + std::string(name) + "' (it has " +
             std::to_string(tensors_.size()) + " tensors)";
    });
    return *t;
  }

  /// The raw little-endian bytes of `t` (t.bytes() of them) into dst.
  void read_bytes(const st_tensor& t, void* dst) const {
    file_.read(data_start_ + t.begin, dst, std::size_t(t.bytes()));
  }

  /// Loads tensor `name` into dst, converting the dtype; dst must have the tensor's shape.
  template <class T>
  void read(std::string_view name, view<T, host_space> dst) const {
    read(at(name), dst);
  }
  template <class T>
  void read(const st_tensor& t, view<T, host_space> dst) const {
    static_assert(!std::is_const_v<T>, "safetensors_file::read: the destination view must be writable");
    const std::string who = "tensor '" + t.name + "' in " + detail::quoted(path());
    require(t.shape == dims_of(dst.shape()), [&] {
      return who + ": shape mismatch: the file has " + to_string(t.shape) + ", expected " +
             subspace::to_string(dst.shape());
    });
    if (!dst.is_contiguous()) {
      host_tensor<T> tmp(dst.shape());
      read(t, tmp.v());
      copy(exec::host{}, tmp.v(), dst);
      return;
    }
    const std::size_t esize = element_size(t.dtype);
    if (t.dtype == st_dtype_of<T>() && !std::is_same_v<T, bool>) {  // bools are checked byte by byte
      read_bytes(t, dst.data());
      return;
    }
    std::vector<std::byte> raw(std::min<std::size_t>(detail::st::chunk_elements, std::size_t(t.numel())) * esize);
    for (std::size_t done = 0; done < std::size_t(t.numel());) {
      const std::size_t n = std::min(detail::st::chunk_elements, std::size_t(t.numel()) - done);
      file_.read(data_start_ + t.begin + done * esize, raw.data(), n * esize);
      detail::st::convert_elements(raw.data(), t.dtype, n, dst.data() + done, who);
      done += n;
    }
  }
  /// Loads tensor `name` into a new host tensor of element type T (rank <= 4).
  template <class T>
  host_tensor<T> read(std::string_view name) const {
    const st_tensor& t = at(name);
    host_tensor<T> out(t.to_shape());
    read(t, out.v());
    return out;
  }

 private:
  static st_tensor parse_entry(const std::string& where, const std::string& name, const json& e) {
    const std::string who = where + ": tensor '" + name + "'";
    require(e.is_object(), [&] { return who + ": expected an object with dtype, shape and data_offsets"; });
    const json* dt = e.find("dtype");
    const json* sh = e.find("shape");
    const json* off = e.find("data_offsets");
    require(dt && dt->is_string(), [&] { return who + ": missing string field \"dtype\""; });
    require(sh && sh->is_array(), [&] { return who + ": missing array field \"shape\""; });
    require(off && off->is_array() && off->size() == 2,
            [&] { return who + ": \"data_offsets\" must be an array [begin, end]"; });
    const auto dtype = st_dtype_from_name(dt->as_string());
    require(dtype.has_value(), [&] {
      return who + ": unknown dtype \"" + dt->as_string() +
             "\" (expected one of BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, "
             "U64, F8_E4M3, F8_E5M2)";
    });
    st_tensor t;
    t.name = name;
    t.dtype = *dtype;
    for (const auto& d : sh->as_array()) {
      require(d.is_int() && d.as_int() >= 0, [&] { return who + ": shape entries must be non-negative integers"; });
      t.shape.push_back(d.as_int());
    }
    // The element and byte counts must fit in 63 bits before anything multiplies them (a shape of [2^32, 2^32],
    // or [2^61] of F64, would wrap and then match small data_offsets).
    constexpr std::int64_t limit = std::numeric_limits<std::int64_t>::max();
    const std::optional<std::int64_t> elements = checked_product(t.shape, limit);
    require(elements && checked_mul(*elements, std::int64_t(element_size(*dtype)), limit), [&] {
      return who + ": shape " + to_string(t.shape) + " of " + name_of(*dtype) +
             " holds more bytes than a 64-bit size can count";
    });
    const json& b = off->at(0);
    const json& en = off->at(1);
    require(b.is_int() && en.is_int() && b.as_int() >= 0 && b.as_int() <= en.as_int(),
            [&] { return who + ": data_offsets must be integers with 0 <= begin <= end"; });
    t.begin = std::uint64_t(b.as_int());
    t.end = std::uint64_t(en.as_int());
    const std::uint64_t expected = std::uint64_t(t.numel()) * element_size(t.dtype);
    require(t.bytes() == expected, [&] {
      return who + ": data_offsets span " + std::to_string(t.bytes()) + " bytes, expected " + std::to_string(expected) +
             " for " + name_of(t.dtype) + " " + to_string(t.shape);
    });
    return t;
  }

  read_file file_;
  std::uint64_t data_start_ = 0;
  std::vector<st_tensor> tensors_;
  std::vector<std::pair<std::string, std::string>> metadata_;
};

}  // namespace subspace::io
