// A portable stand-in for libFuzzer's main, linked with a fuzz target where libFuzzer is not available (any
// compiler; build it with -fsanitize=address,undefined to find memory errors and undefined behaviour).
//
//   fuzz_json CORPUS_DIR... FILE...                 replay: run every file once (what CI does)
//   fuzz_json --seconds 600 [--runs N] [--seed S] CORPUS_DIR...
//                                                    mutate: random mutations of the given inputs
//
// Without instrumentation there is no coverage to steer by: mutants of the seed inputs are drawn at random (bit
// flips, byte changes, inserts, deletes, copies, splices of two inputs, integers replaced by boundary values in
// binary and in decimal), and a mutant the reader accepted whole joins the pool, since its mutants get past the
// same checks. A crash, a sanitizer report, an uncaught exception of another type or an input that runs longer
// than --timeout writes the input to <artifact-prefix>crash-<hash> (or timeout-<hash>) before the process dies,
// so it can be replayed and committed under regressions/.

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <string_view>
#include <typeinfo>
#include <unordered_set>
#include <vector>

#include "fuzz_target.hpp"

extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

// Sanitizer defaults for every run of a driver build: one allocation above 2 GiB is a finding (no input here
// justifies it; a reader that trusts a size from the file asks for it); a report ends in abort(), whose signal
// handler below writes the input out (GCC's UBSan runtime calls no death callback); UBSan prints where it fired.
extern "C" const char* __asan_default_options() {
  return "max_allocation_size_mb=2048:detect_leaks=1:abort_on_error=1";
}
extern "C" const char* __ubsan_default_options() { return "print_stacktrace=1:halt_on_error=1:abort_on_error=1"; }

namespace {

namespace fs = std::filesystem;

// --- The input being run, and writing it out when the process dies ---------------------------------------------

const std::uint8_t* current_data = nullptr;
std::size_t current_size = 0;
const char* current_name = nullptr;  // the file being replayed, if any
char artifact_prefix[4096] = "./";
volatile sig_atomic_t written_out = 0;
struct sigaction previous[32];

void say(const char* s) { (void)!::write(2, s, std::strlen(s)); }

/// Writes the current input to <prefix><kind>-<hash>; async-signal-safe.
void write_current_input(const char* kind) {
  if (written_out || current_data == nullptr) return;
  written_out = 1;
  std::uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (std::size_t i = 0; i < current_size; ++i) hash = (hash ^ current_data[i]) * 1099511628211ull;
  char path[4200];
  std::size_t n = 0;
  for (const char* p = artifact_prefix; *p && n < 4096; ++p) path[n++] = *p;
  for (const char* p = kind; *p; ++p) path[n++] = *p;
  path[n++] = '-';
  for (int shift = 60; shift >= 0; shift -= 4) path[n++] = "0123456789abcdef"[(hash >> shift) & 15];
  path[n] = '\0';
  say("\nfuzz: ");
  say(kind);
  if (current_name) {
    say(" on ");
    say(current_name);
  }
  const int fd = ::open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    std::size_t done = 0;
    while (done < current_size) {
      const ::ssize_t w = ::write(fd, current_data + done, current_size - done);
      if (w <= 0) break;
      done += std::size_t(w);
    }
    ::close(fd);
    say("; the input is in ");
    say(path);
  }
  say("\n");
}

void on_death() { write_current_input("crash"); }

void on_fatal_signal(int sig) {
  write_current_input("crash");
  // Hand the signal to whoever handled it before (a sanitizer's report, or the default action): a fault recurs
  // when this returns; abort() raises again.
  ::sigaction(sig, &previous[sig], nullptr);
  if (sig == SIGABRT) ::raise(sig);
}

void on_timeout(int) {
  write_current_input("timeout");
  say("fuzz: an input ran longer than --timeout\n");
  ::_exit(70);
}

void on_terminate() {
  write_current_input("crash");
  if (const std::exception_ptr e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& x) {
      std::fprintf(stderr, "fuzz: an exception other than subspace::error escaped: %s: %s\n", typeid(x).name(),
                   x.what());
    } catch (...) {
      std::fprintf(stderr, "fuzz: an exception of unknown type escaped\n");
    }
  }
  std::abort();
}

void install_handlers() {
  if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(on_death);
  std::set_terminate(on_terminate);
  for (const int sig : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) {
    struct sigaction a {};
    a.sa_handler = on_fatal_signal;
    sigemptyset(&a.sa_mask);
    a.sa_flags = SA_NODEFER;
    ::sigaction(sig, &a, &previous[sig]);
  }
  struct sigaction a {};
  a.sa_handler = on_timeout;
  sigemptyset(&a.sa_mask);
  ::sigaction(SIGALRM, &a, nullptr);
}

unsigned timeout_s = 20;

void run_one(const std::string& input) {
  current_data = reinterpret_cast<const std::uint8_t*>(input.data());
  current_size = input.size();
  ::alarm(timeout_s);
  LLVMFuzzerTestOneInput(current_data, current_size);
  ::alarm(0);
  current_data = nullptr;
}

// --- Inputs ----------------------------------------------------------------------------------------------------

std::string read_all(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// The files named on the command line: files as given, directories' regular files recursively in name order.
std::vector<fs::path> input_files(const std::vector<std::string>& args) {
  std::vector<fs::path> out;
  for (const auto& a : args) {
    if (fs::is_directory(a)) {
      std::vector<fs::path> found;
      for (const auto& e : fs::recursive_directory_iterator(a))
        if (e.is_regular_file()) found.push_back(e.path());
      std::sort(found.begin(), found.end());
      out.insert(out.end(), found.begin(), found.end());
    } else if (fs::is_regular_file(a)) {
      out.emplace_back(a);
    } else {
      std::fprintf(stderr, "fuzz: %s: no such file or directory\n", a.c_str());
      std::exit(2);
    }
  }
  return out;
}

// --- Mutations -------------------------------------------------------------------------------------------------

constexpr std::uint64_t binary_boundaries[] = {0,
                                               1,
                                               0x7f,
                                               0x80,
                                               0xff,
                                               0x7fff,
                                               0x8000,
                                               0xffff,
                                               0x7fffffff,
                                               0x80000000,
                                               0xffffffff,
                                               0x100000000,
                                               std::uint64_t(1) << 61,
                                               (std::uint64_t(1) << 62) + 1,
                                               0x7fffffffffffffff,
                                               0x8000000000000000,
                                               ~std::uint64_t(0),
                                               ~std::uint64_t(0) - 1};

constexpr const char* decimal_boundaries[] = {
    "0",
    "-1",
    "1",
    "-0",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "-2147483648",
    "4294967295",
    "4294967296",
    "2305843009213693952",   // 2^61
    "4611686018427387905",   // 2^62 + 1
    "9223372036854775807",   // 2^63 - 1
    "9223372036854775808",   // 2^63
    "-9223372036854775808",  // -2^63
    "-9223372036854775809",
    "18446744073709551615",  // 2^64 - 1
    "18446744073709551616",  // 2^64
    "100000000000000000000000000000",
    "1e308",
    "1e309",
    "-1e309",
    "3.4028235e38",  // FLT_MAX
    "3.5e38",
    "1e-320",
    "1e-46",
    "0.0",
    "-0.0",
    "0.5",
    "1.0000000000000002",
    "1E400",
    "nan",
    "inf",
};

constexpr char interesting_bytes[] = {'\0', '\xff', '\x7f', '\x80', '"', '{', '}', '[', ']', ',', ':', '-',
                                      '0',  '1',    '9',    '\\',   'e', '.', ' ', 'u', 'n', 't', 'f', '\n'};

class mutator {
 public:
  explicit mutator(std::uint64_t seed) : rng_(seed) {}

  std::size_t below(std::size_t n) { return n == 0 ? 0 : std::size_t(rng_() % n); }

  /// One to eight mutations of `s`, at most max_len bytes long; `other` is a second input to splice from.
  void mutate(std::string& s, const std::string& other, std::size_t max_len) {
    const std::size_t count = 1 + below(below(8) + 1);
    for (std::size_t k = 0; k < count; ++k) mutate_once(s, other);
    if (s.size() > max_len) s.resize(max_len);
  }

 private:
  void mutate_once(std::string& s, const std::string& other) {
    switch (below(12)) {
      case 0:  // flip a bit
        if (!s.empty()) s[below(s.size())] ^= char(1u << below(8));
        return;
      case 1:  // a random byte
        if (!s.empty()) s[below(s.size())] = char(rng_());
        return;
      case 2:  // an interesting byte
        if (!s.empty()) s[below(s.size())] = interesting_bytes[below(sizeof interesting_bytes)];
        return;
      case 3: {  // insert a few bytes, random or repeated
        const std::size_t n = 1 + below(below(64) + 1);
        const char c = char(rng_());
        std::string bytes(n, c);
        if (below(2))
          for (auto& b : bytes) b = char(rng_());
        s.insert(below(s.size() + 1), bytes);
        return;
      }
      case 4: {  // delete a range
        if (s.empty()) return;
        const std::size_t at = below(s.size());
        s.erase(at, 1 + below(std::min<std::size_t>(s.size() - at, 64)));
        return;
      }
      case 5: {  // copy a range elsewhere (insert or overwrite)
        if (s.empty()) return;
        const std::size_t from = below(s.size());
        const std::string chunk = s.substr(from, 1 + below(std::min<std::size_t>(s.size() - from, 128)));
        const std::size_t to = below(s.size() + 1);
        if (below(2)) s.insert(to, chunk);
        else s.replace(to, chunk.size(), chunk);
        return;
      }
      case 6: {  // splice: a range of the other input
        if (other.empty()) return;
        const std::size_t from = below(other.size());
        const std::string chunk = other.substr(from, 1 + below(std::min<std::size_t>(other.size() - from, 256)));
        const std::size_t to = below(s.size() + 1);
        if (below(2)) s.insert(to, chunk);
        else s.replace(to, chunk.size(), chunk);
        return;
      }
      case 7:
      case 8: {  // a boundary integer in binary, 1, 2, 4 or 8 bytes, little- or big-endian
        if (s.empty()) return;
        const std::size_t width = std::size_t(1) << below(4);
        std::uint64_t v = binary_boundaries[below(std::size(binary_boundaries))];
        if (below(4) == 0) v += std::uint64_t(below(3)) - 1;
        const std::size_t at = below(s.size());
        const bool big = below(4) == 0;
        for (std::size_t i = 0; i < width && at + i < s.size(); ++i)
          s[at + i] = char(v >> (8 * (big ? width - 1 - i : i)));
        return;
      }
      case 9:
      case 10: {  // a decimal number replaced by a boundary value (or one inserted)
        const std::string_view value = decimal_boundaries[below(std::size(decimal_boundaries))];
        std::size_t at = below(s.size() + 1);
        const auto is_number_char = [](char c) { return (c >= '0' && c <= '9') || c == '-' || c == '.'; };
        std::size_t begin = at;
        while (begin < s.size() && !is_number_char(s[begin])) ++begin;
        if (begin == s.size()) {
          s.insert(at, value);
          return;
        }
        std::size_t end = begin;
        while (end < s.size() && (is_number_char(s[end]) || s[end] == 'e' || s[end] == 'E' || s[end] == '+')) ++end;
        s.replace(begin, end - begin, value);
        return;
      }
      default:  // truncate
        if (!s.empty()) s.resize(below(s.size()));
        return;
    }
  }

  std::mt19937_64 rng_;
};

// --- Command line ----------------------------------------------------------------------------------------------

struct options {
  double seconds = 0;  // mutate for this long (0: no limit)
  std::uint64_t runs = 0;
  std::uint64_t seed = 0;
  bool seed_given = false;
  std::size_t max_len = std::size_t(1) << 16;  // or the longest seed
  std::vector<std::string> paths;
};

[[noreturn]] void usage(const char* self, int status) {
  std::fprintf(status ? stderr : stdout,
               "usage: %s [--seconds S] [--runs N] [--seed S] [--max-len BYTES] [--timeout S] "
               "[--artifact-prefix PATH] FILE_OR_DIR...\n"
               "  without --seconds or --runs: replay every input once and exit 0 when none crashed\n"
               "  with them: mutate the inputs for S seconds or N executions, whichever comes first\n",
               self);
  std::exit(status);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    const auto value = [&]() -> const char* {
      if (i + 1 >= argc) usage(argv[0], 2);
      return argv[++i];
    };
    if (a == "--help" || a == "-h") usage(argv[0], 0);
    else if (a == "--seconds") o.seconds = std::strtod(value(), nullptr);
    else if (a == "--runs") o.runs = std::strtoull(value(), nullptr, 10);
    else if (a == "--seed") {
      o.seed = std::strtoull(value(), nullptr, 10);
      o.seed_given = true;
    } else if (a == "--max-len") o.max_len = std::strtoull(value(), nullptr, 10);
    else if (a == "--timeout") timeout_s = unsigned(std::strtoul(value(), nullptr, 10));
    else if (a == "--artifact-prefix") {
      std::snprintf(artifact_prefix, sizeof artifact_prefix, "%s", value());
    } else if (a.size() > 1 && a[0] == '-') {
      std::fprintf(stderr, "fuzz: unknown option %s\n", argv[i]);
      usage(argv[0], 2);
    } else {
      o.paths.emplace_back(a);
    }
  }
  return o;
}

int replay(const options& o) {
  std::size_t n = 0, accepted = 0;
  for (const auto& f : input_files(o.paths)) {
    const std::string name = f.string();
    const std::string input = read_all(f);
    current_name = name.c_str();
    run_one(input);
    current_name = nullptr;
    ++n;
    accepted += subspace::fuzz::accepted ? 1 : 0;
  }
  std::printf("fuzz: replayed %zu inputs (%zu accepted whole, the rest refused), no finding\n", n, accepted);
  return 0;
}

int mutate(options o) {
  if (!o.seed_given) o.seed = std::uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
  std::vector<std::string> pool;
  for (const auto& f : input_files(o.paths)) pool.push_back(read_all(f));
  if (pool.empty()) pool.emplace_back();
  const std::size_t seeds = pool.size();
  const std::size_t pool_limit = seeds + 4096;
  for (const auto& s : pool) o.max_len = std::max(o.max_len, s.size());
  std::unordered_set<std::string> in_pool(pool.begin(), pool.end());
  std::printf("fuzz: %zu seed inputs, seed %llu, up to %zu bytes per input\n", seeds, (unsigned long long)o.seed,
              o.max_len);
  std::fflush(stdout);

  mutator m(o.seed);
  const auto start = std::chrono::steady_clock::now();
  const auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  std::uint64_t runs = 0, accepted = 0;
  double next_report = 10;
  std::string input;
  for (;;) {
    if (o.runs && runs >= o.runs) break;
    if ((runs & 63) == 0) {
      const double t = elapsed();
      if (o.seconds > 0 && t >= o.seconds) break;
      if (t >= next_report) {
        std::printf("fuzz: %llu runs in %.0f s (%.0f/s), pool %zu, accepted %llu\n", (unsigned long long)runs, t,
                    double(runs) / t, pool.size(), (unsigned long long)accepted);
        std::fflush(stdout);
        next_report = t * 2 > t + 60 ? t + 60 : t * 2;
      }
    }
    // Seeds half of the time, so the pool's accepted mutants do not crowd them out.
    const std::size_t base = m.below(2) ? m.below(seeds) : m.below(pool.size());
    input = pool[base];
    m.mutate(input, pool[m.below(pool.size())], o.max_len);
    run_one(input);
    ++runs;
    if (subspace::fuzz::accepted) {
      ++accepted;
      if (!in_pool.count(input)) {
        if (pool.size() < pool_limit) {
          pool.push_back(input);
        } else {
          const std::size_t replaced = seeds + m.below(pool.size() - seeds);
          in_pool.erase(pool[replaced]);
          pool[replaced] = input;
        }
        in_pool.insert(input);
      }
    }
  }
  const double t = elapsed();
  std::printf("fuzz: done: %llu runs in %.1f s (%.0f/s), pool %zu, accepted %llu, no finding\n",
              (unsigned long long)runs, t, t > 0 ? double(runs) / t : 0.0, pool.size(), (unsigned long long)accepted);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const options o = parse(argc, argv);
  install_handlers();
  if (o.seconds > 0 || o.runs > 0) return mutate(o);
  if (o.paths.empty()) usage(argv[0], 2);
  return replay(o);
}
