// The option schema's functions (Note [One option schema], options.h).
#include "options.h"

#include <charconv>
#include <cmath>
#include <cstdlib>

namespace torchpool {

const std::vector<OptionInfo>& option_table() {
  static const std::vector<OptionInfo> table = {
#define TORCHPOOL_OPTION_INFO(name, type, scope, devices, cpu, cuda, default_text, range, help) \
  {OptionId::name, #name, OptionType::type, OptionScope::scope, devices, default_text, range, help},
      TORCHPOOL_OPTIONS(TORCHPOOL_OPTION_INFO)
#undef TORCHPOOL_OPTION_INFO
  };
  return table;
}

const OptionInfo* find_option(std::string_view name) {
  for (const OptionInfo& o : option_table())
    if (name == o.name) return &o;
  return nullptr;
}

const char* type_name(OptionType t) {
  switch (t) {
    case OptionType::kBytes: return "bytes";
    case OptionType::kCount: return "int";
    case OptionType::kRatio: return "float";
    case OptionType::kBool: return "bool";
  }
  return "?";
}

OptionValues default_options(Device device) {
  OptionValues v;
#define TORCHPOOL_OPTION_DEFAULT(name, type, scope, devices, cpu, cuda, ...) \
  v.name = device == Device::kCpu ? decltype(v.name)(cpu) : decltype(v.name)(cuda);
  TORCHPOOL_OPTIONS(TORCHPOOL_OPTION_DEFAULT)
#undef TORCHPOOL_OPTION_DEFAULT
  return v;
}

OptionValue get_option(const OptionValues& v, const OptionInfo& info) {
  OptionValue out;
  switch (info.id) {
#define TORCHPOOL_OPTION_GET(name, type, ...)                                        \
  case OptionId::name:                                                               \
    if constexpr (OptionType::type == OptionType::kRatio) out.d = double(v.name);    \
    else out.u = uint64_t(v.name);                                                   \
    break;
    TORCHPOOL_OPTIONS(TORCHPOOL_OPTION_GET)
#undef TORCHPOOL_OPTION_GET
  }
  return out;
}

void set_option(OptionValues& v, const OptionInfo& info, const OptionValue& value) {
  switch (info.id) {
#define TORCHPOOL_OPTION_SET(name, type, ...)                                                                 \
  case OptionId::name:                                                                                        \
    if constexpr (OptionType::type == OptionType::kRatio) v.name = value.d;                                  \
    else if constexpr (OptionType::type == OptionType::kBool) v.name = value.u != 0;                         \
    else v.name = value.u;                                                                                    \
    break;
    TORCHPOOL_OPTIONS(TORCHPOOL_OPTION_SET)
#undef TORCHPOOL_OPTION_SET
  }
}

bool in_range(const OptionInfo& info, const OptionValue& value) {
  const OptionRange& r = info.range;
  if (info.type == OptionType::kRatio) {
    const double x = value.d;  // nan fails every comparison
    if (r.zero_too && x == 0) return true;
    return x >= static_cast<double>(r.lo) && x <= static_cast<double>(r.hi);
  }
  const uint64_t x = value.u;
  if (r.zero_too && x == 0) return true;
  if (x < r.lo || x > r.hi) return false;
  return !r.pow2 || (x != 0 && (x & (x - 1)) == 0);
}

namespace {

std::string number(uint64_t x) {
  if (x == UINT64_MAX) return "2**64-1";
  if (x >= (uint64_t{1} << 32) && (x & (x - 1)) == 0) return "2**" + std::to_string(__builtin_ctzll(x));
  std::string s = std::to_string(x);
  static const char* units[] = {"KiB", "MiB", "GiB"};
  if (x >= 1024 && (x & (x - 1)) == 0) {
    int u = -1;
    uint64_t y = x;
    while (y >= 1024 && u < 2) y >>= 10, ++u;
    s += " (" + std::to_string(y) + " " + units[u] + ")";
  }
  return s;
}

}  // namespace

std::string rule_text(const OptionInfo& info) {
  if (info.type == OptionType::kBool) return "a boolean (1/0, true/false)";
  const OptionRange& r = info.range;
  std::string s = r.zero_too ? "0 (off) or " : "";
  if (r.pow2) s += "a power of two ";
  else if (info.type == OptionType::kRatio) s += "a number ";
  else s += "an integer ";
  return s + "from " + number(r.lo) + " to " + number(r.hi);
}

bool parse_option(const OptionInfo& info, std::string_view text, OptionValue* out) {
  if (text.empty()) return false;
  if (info.type == OptionType::kBool) {
    if (text == "1" || text == "true" || text == "True") out->u = 1;
    else if (text == "0" || text == "false" || text == "False") out->u = 0;
    else return false;
    return true;
  }
  if (info.type == OptionType::kRatio) {
    const std::string s(text);
    char* end = nullptr;
    out->d = std::strtod(s.c_str(), &end);
    return end == s.c_str() + s.size();
  }
  const auto [p, ec] = std::from_chars(text.data(), text.data() + text.size(), out->u, 10);
  if (ec == std::errc::result_out_of_range && p == text.data() + text.size()) {
    out->u = UINT64_MAX;  // a number, too large: in_range says so with the rule
    return text.front() != '-';
  }
  return ec == std::errc() && p == text.data() + text.size();
}

bool apply_conf(OptionValues& values, std::string_view conf, Device device, std::string* error) {
  OptionValues v = values;
  const char* dev = device == Device::kCpu ? "CPU" : "CUDA";
  while (!conf.empty()) {
    const size_t comma = conf.find(',');
    const std::string_view item = conf.substr(0, comma);
    conf = comma == std::string_view::npos ? std::string_view() : conf.substr(comma + 1);
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    const std::string_view key = item.substr(0, eq);
    const std::string_view text = eq == std::string_view::npos ? std::string_view() : item.substr(eq + 1);
    const OptionInfo* info = find_option(key);
    if (!info || info->scope == OptionScope::kInstall) {
      *error = "torchpool: unknown " + std::string(dev) + " allocator option '" + std::string(key) + "'";
      return false;
    }
    if (!info->on(device)) {
      *error = "torchpool: option '" + std::string(key) + "' does not apply to " + dev;
      return false;
    }
    OptionValue x;
    if (!parse_option(*info, text, &x) || !in_range(*info, x)) {
      *error = "torchpool: option " + std::string(item) + " is out of range; valid: " + rule_text(*info);
      return false;
    }
    set_option(v, *info, x);
  }
  values = v;
  return true;
}

AllocatorConfig allocator_config(const OptionValues& v, Device device) {
  AllocatorConfig c;
  c.pool.alignment = v.alignment;
  c.pool.size_classes = v.size_classes;
  c.pool.max_class_bytes = v.max_class_bytes;
  c.pool.small_segment_bytes = v.small_segment_bytes;
  c.pool.large_rounding = v.large_rounding;
  c.pool.min_split_bytes = v.min_split_bytes;
  c.pool.max_split_bytes = v.max_split_bytes;
  c.pool.max_cached_bytes = v.max_cached_bytes;
  c.pool.max_reserved_ratio = v.max_reserved_ratio;
  c.max_bytes = v.max_bytes;
  c.arenas = static_cast<unsigned>(v.arenas);
  c.thread_cache = v.thread_cache;
  c.device = -1;
  c.device_name = device == Device::kCpu ? "cpu" : "cuda";
  return c;
}

std::string pool_config_error(const PoolConfig& c) {
  OptionValues v;
  v.alignment = c.alignment;
  v.size_classes = c.size_classes;
  v.max_class_bytes = c.max_class_bytes;
  v.small_segment_bytes = c.small_segment_bytes;
  v.large_rounding = c.large_rounding;
  v.min_split_bytes = c.min_split_bytes;
  v.max_split_bytes = c.max_split_bytes;
  v.max_cached_bytes = c.max_cached_bytes;
  v.max_reserved_ratio = c.max_reserved_ratio;
  for (const OptionInfo& info : option_table()) {
    if (info.scope != OptionScope::kPool || info.id == OptionId::max_bytes || info.id == OptionId::arenas ||
        info.id == OptionId::thread_cache)
      continue;
    const OptionValue x = get_option(v, info);
    if (!in_range(info, x))
      return "torchpool: option " + std::string(info.name) + "=" +
             (info.type == OptionType::kRatio ? std::to_string(x.d) : std::to_string(x.u)) +
             " is out of range; valid: " + rule_text(info);
  }
  return "";
}

}  // namespace torchpool
