// The option schema: every option of torchpool, written once.
//
// Note [One option schema]
// ------------------------
// Rationale: an option used to be spelled in four places (the README table, _config.py, pool.h, the
// CUDA library's set_option), each with its own copy of the valid range, and it crossed two untyped
// boundaries (keyword arguments to _C.Allocator, a "key=value" string to libtorchpool_cuda.so).
// Approach: TORCHPOOL_OPTIONS below is the only list.  From it come OptionValues (one typed field per
// option), default_options(device), the range check (in_range) and its text (rule_text), the text
// parser of the CUDA library (apply_conf), the bindings' keyword parser and _C.options() (bindings/
// core.cc), which drives torchpool._config, torchpool.options() and the README table
// (tools/gen_options_table.py; tests/test_options.py checks the README against it).
// allocator_config() turns values into the core's AllocatorConfig; the upstream-level options are
// read by whoever builds the upstream (bindings/cuda.cc, cuda/torchpool_cuda.cc, replay/replay.cc).
// Adding an option: one row here, then read its field where it takes effect.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "allocator.h"

namespace torchpool {

enum class Device : uint8_t { kCpu, kCuda };
enum class OptionType : uint8_t { kBytes, kCount, kRatio, kBool };
// kPool: read by the core (AllocatorConfig), for every upstream.  kUpstream: read by the code that
// builds an upstream, only where it applies.  kInstall: read by torchpool.install() (Python).
enum class OptionScope : uint8_t { kPool, kUpstream, kInstall };
enum OptionDevices : uint8_t { kOnCpu = 1, kOnCuda = 2, kOnBoth = 3 };

// The valid values of an option: lo..hi, a power of two if pow2, and 0 besides when zero_too.
struct OptionRange {
  uint64_t lo;
  uint64_t hi;
  bool pow2;
  bool zero_too;
};
constexpr OptionRange kRange(uint64_t lo, uint64_t hi) { return {lo, hi, false, false}; }
constexpr OptionRange kPow2(uint64_t lo, uint64_t hi) { return {lo, hi, true, false}; }
constexpr OptionRange kZeroOr(uint64_t lo, uint64_t hi) { return {lo, hi, false, true}; }
constexpr OptionRange kAnyBool{0, 1, false, false};

constexpr uint64_t kUnlimited = UINT64_MAX;

// The CPU default of `arenas`: one per core, at most 4 (Note [Arenas]).
inline uint64_t default_arenas() {
  const unsigned n = std::thread::hardware_concurrency();
  return n == 0 ? 1 : (n < 4 ? n : 4);
}

// X(name, type, scope, devices, cpu default, cuda default, default as the docs state it ("": the
//   value), valid range, help)
// Sizes are bytes (the Python layer also takes _kb/_mb/_gb in place of _bytes).
#define TORCHPOOL_OPTIONS(X)                                                                                      \
  X(max_bytes, kBytes, kPool, kOnBoth, 0, 0, "0 (no limit)", kRange(0, CachingAllocator::kMaxRequestBytes),     \
    "limit on reserved bytes; beyond it allocation raises torch.OutOfMemoryError naming allocated, reserved "    \
    "and cached bytes, after one retry that frees the cache (the allocator keeps working)")                     \
  X(max_cached_bytes, kBytes, kPool, kOnBoth, kUnlimited, kUnlimited, "unlimited", kRange(0, kUnlimited),       \
    "cached (reserved - allocated) bytes kept; beyond it entirely free segments are returned "                   \
    "(Note [Release policy])")                                                                                   \
  X(max_reserved_ratio, kRatio, kPool, kOnBoth, 1.05, 1.05, "", kZeroOr(1, 1000000),                             \
    "the reserve target: before mapping more, free memory is returned so that reserved <= max(ratio x "          \
    "high-water of allocated, high-water + one 2 MiB segment per stream) (Note [Reserve target]); 0 keeps "      \
    "every segment")                                                                                             \
  X(arenas, kCount, kPool, kOnBoth, default_arenas(), 1, "min(4, cores) on CPU, 1 on CUDA", kRange(1, 256),      \
    "independent arenas for size-class requests; threads pick one round-robin (Note [Arenas])")                 \
  X(thread_cache, kBool, kPool, kOnCpu, true, false, "", kAnyBool,                                              \
    "per-thread caches of size-class blocks: small allocations and frees take no lock (Note [Thread caches])")   \
  X(size_classes, kBool, kPool, kOnBoth, true, true, "", kAnyBool,                                               \
    "serve small requests from per-class free lists (false: best fit, for comparison)")                          \
  X(max_class_bytes, kBytes, kPool, kOnBoth, PoolConfig{}.max_class_bytes, PoolConfig{}.max_class_bytes, "",     \
    kRange(0, kSmallRequestLimit),                                                                                   \
    "requests up to this use size classes; larger ones up to 1 MiB are best fit in small segments (Note "        \
    "[Where size classes stop])")                                                                                \
  X(small_segment_bytes, kBytes, kPool, kOnBoth, PoolConfig{}.small_segment_bytes,                               \
    PoolConfig{}.small_segment_bytes, "", kRange(0, kMaxRoundingBytes),                                          \
    "size of the segments that hold size-class blocks")                                                          \
  X(large_rounding, kBytes, kPool, kOnBoth, PoolConfig{}.large_rounding, PoolConfig{}.large_rounding, "",        \
    kRange(0, kMaxRoundingBytes), "large blocks are rounded up to a multiple of this")                           \
  X(min_split_bytes, kBytes, kPool, kOnBoth, PoolConfig{}.min_split_bytes, PoolConfig{}.min_split_bytes, "",     \
    kRange(0, CachingAllocator::kMaxRequestBytes), "a large free block is split only if the rest is at least this") \
  X(max_split_bytes, kBytes, kPool, kOnBoth, PoolConfig{}.max_split_bytes, PoolConfig{}.max_split_bytes,         \
    "unlimited", kRange(0, kUnlimited), "free blocks larger than this are never split (PyTorch's max_split_size)") \
  X(alignment, kBytes, kPool, kOnBoth, PoolConfig{}.alignment, 512, "", kPow2(64, kMaxAlignment),                \
    "alignment and size quantum of every block; 512 on CUDA as PyTorch (Note [512-byte alignment])")            \
  X(expandable_segments, kBool, kUpstream, kOnBoth, true, false, "", kAnyBool,                                   \
    "one reserved address range per stream (and one for small blocks), memory mapped in chunks behind "          \
    "allocated blocks and unmapped from free ones anywhere (Note [Holes in expandable segments]); CPU: "         \
    "host_vmm (private anonymous chunks of chunk_bytes, copy-on-write across fork), CUDA: VMM (2 MiB "           \
    "chunks); false: one mapping per segment")                                                                   \
  X(chunk_bytes, kBytes, kUpstream, kOnCpu, 512u << 10, 512u << 10, "", kPow2(4096, kMaxRoundingBytes),          \
    "CPU expandable segments: the unit memory is mapped and returned in (Note [Host VMM])")                     \
  X(reserve_bytes, kBytes, kUpstream, kOnBoth, 0, 0, "0 (RAM size on CPU, device memory + 1/8 on CUDA)",         \
    kRange(0, CachingAllocator::kMaxRequestBytes), "address space reserved per expandable segment")             \
  X(huge_pages, kBool, kUpstream, kOnCpu, false, false, "", kAnyBool,                                            \
    "madvise(MADV_HUGEPAGE) on 2 MiB-aligned segments and chunks (Note [Huge pages])")                         \
  X(populate, kBool, kUpstream, kOnCpu, false, false, "", kAnyBool, "fault a segment's pages in when it is mapped") \
  X(publish, kBool, kInstall, kOnCpu, true, false, "", kAnyBool,                                                 \
    "publish counters for `torchpool top` in a shared-memory page (torchpool/cli/top.py)")

template <OptionType T>
struct OptionStorage {
  using type = uint64_t;
};
template <>
struct OptionStorage<OptionType::kRatio> {
  using type = double;
};
template <>
struct OptionStorage<OptionType::kBool> {
  using type = bool;
};

// One typed field per option.
struct OptionValues {
#define TORCHPOOL_OPTION_FIELD(name, kind, ...) typename OptionStorage<OptionType::kind>::type name{};
  TORCHPOOL_OPTIONS(TORCHPOOL_OPTION_FIELD)
#undef TORCHPOOL_OPTION_FIELD
  bool operator==(const OptionValues&) const = default;
};

enum class OptionId : uint16_t {
#define TORCHPOOL_OPTION_ID(name, ...) name,
  TORCHPOOL_OPTIONS(TORCHPOOL_OPTION_ID)
#undef TORCHPOOL_OPTION_ID
};

struct OptionInfo {
  OptionId id;
  const char* name;
  OptionType type;
  OptionScope scope;
  uint8_t devices;  // OptionDevices
  const char* default_text;
  OptionRange range;
  const char* help;
  bool on(Device d) const { return devices & (d == Device::kCpu ? kOnCpu : kOnCuda); }
};

// A value crossing a boundary: integers and booleans in u, ratios in d.
struct OptionValue {
  uint64_t u = 0;
  double d = 0;
};

const std::vector<OptionInfo>& option_table();
const OptionInfo* find_option(std::string_view name);
const char* type_name(OptionType t);  // "bytes", "int", "float", "bool"

OptionValues default_options(Device device);
OptionValue get_option(const OptionValues& v, const OptionInfo& info);
void set_option(OptionValues& v, const OptionInfo& info, const OptionValue& value);  // no check: in_range first

// The one range check, and the one text that states it ("a power of two from 64 to 1048576 (1 MiB)").
bool in_range(const OptionInfo& info, const OptionValue& value);
std::string rule_text(const OptionInfo& info);

// Parses one value as text ("4096", "1.05", "true"/"1"); false when it is not of the option's type.
bool parse_option(const OptionInfo& info, std::string_view text, OptionValue* out);

// The text boundary (libtorchpool_cuda.so's configure): "key=value,key=value" onto `values`, every
// key known, applying to `device`, parsed and in range; on failure returns false with the message
// in *error and leaves `values` unchanged.
bool apply_conf(OptionValues& values, std::string_view conf, Device device, std::string* error);

// The core's part of the options (kPool scope): pool policy, byte limit, arenas.
AllocatorConfig allocator_config(const OptionValues& v, Device device);

// "" when every field of a PoolConfig built by hand (tests, tools) is valid by the schema's rules,
// else the first violation, named as the option and its rule.  For Pool's constructor, so that it
// states no rule of its own.
std::string pool_config_error(const PoolConfig& c);

}  // namespace torchpool
