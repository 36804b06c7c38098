#include "safetensors.h"

#include <errno.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include <nlohmann/json.hpp>

namespace torchpool::loader {

namespace {

std::string describe(const std::string& file, const std::string& tensor, const std::string& rule,
                     const std::string& detail) {
  std::string m = file;
  if (!tensor.empty()) m += ": tensor '" + tensor + "'";
  m += ": rule " + rule + ": " + detail;
  return m;
}

constexpr DTypeInfo kDTypes[] = {
    {"BOOL", 8, "bool"},
    {"U8", 8, "uint8"},
    {"I8", 8, "int8"},
    {"I16", 16, "int16"},
    {"U16", 16, "uint16"},
    {"F16", 16, "float16"},
    {"BF16", 16, "bfloat16"},
    {"I32", 32, "int32"},
    {"U32", 32, "uint32"},
    {"F32", 32, "float32"},
    {"F64", 64, "float64"},
    {"I64", 64, "int64"},
    {"U64", 64, "uint64"},
    {"C64", 64, "complex64"},
    {"F8_E4M3", 8, "float8_e4m3fn"},
    {"F8_E4M3FNUZ", 8, "float8_e4m3fnuz"},
    {"F8_E5M2", 8, "float8_e5m2"},
    {"F8_E5M2FNUZ", 8, "float8_e5m2fnuz"},
    {"F8_E8M0", 8, "float8_e8m0fnu"},
    {"F4", 4, "float4_e2m1fn_x2"},  // two elements per byte: torch's last dimension is halved
    {"F6_E2M3", 6, nullptr},        // valid in files; torch 2.13 has no 6-bit float
    {"F6_E3M2", 6, nullptr},
};
static_assert(sizeof(kDTypes) / sizeof(kDTypes[0]) == static_cast<size_t>(DType::kCount));

bool valid_utf8(std::string_view s, size_t* bad_at) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    size_t len;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else { *bad_at = i; return false; }
    if (i + len > n) { *bad_at = i; return false; }
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) { *bad_at = i; return false; }
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    const bool overlong = (len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000);
    if (overlong || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) { *bad_at = i; return false; }
    i += len;
  }
  return true;
}

}  // namespace

CheckpointError::CheckpointError(std::string file, std::string tensor, std::string rule, const std::string& detail)
    : std::runtime_error(describe(file, tensor, rule, detail)),
      file_(std::move(file)),
      tensor_(std::move(tensor)),
      rule_(std::move(rule)) {}

const DTypeInfo& dtype_info(DType d) { return kDTypes[static_cast<size_t>(d)]; }

bool dtype_from_name(std::string_view name, DType* out) {
  for (size_t i = 0; i < static_cast<size_t>(DType::kCount); ++i) {
    if (name == kDTypes[i].name) {
      *out = static_cast<DType>(i);
      return true;
    }
  }
  return false;
}

Header parse_header(const std::string& path, std::string_view text, uint64_t header_len, uint64_t file_size) {
  using json = nlohmann::json;
  Header h;
  h.path = path;
  h.file_size = file_size;
  h.header_len = header_len;
  h.data_start = 8 + header_len;

  size_t bad_at = 0;
  if (!valid_utf8(text, &bad_at))
    throw CheckpointError(path, "", kRuleHeaderUtf8, "the header is not UTF-8 (bad byte at header offset " +
                                                          std::to_string(bad_at) + ", file offset " +
                                                          std::to_string(8 + bad_at) + ")");
  // Duplicate keys are legal JSON that nlohmann would silently resolve (last wins); a checkpoint with
  // two tensors of one name is ambiguous, so find them with the parser callback.
  std::string duplicate;
  std::vector<std::unordered_set<std::string>> keys_at_depth;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start) {
      if (static_cast<size_t>(depth) >= keys_at_depth.size()) keys_at_depth.resize(depth + 1);
      keys_at_depth[depth].clear();
    } else if (ev == json::parse_event_t::key && depth >= 1) {
      auto& seen = keys_at_depth[depth - 1];
      const std::string k = parsed.get<std::string>();
      if (!seen.insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text.begin(), text.end(), cb, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const json::exception& e) {
    throw CheckpointError(path, "", kRuleHeaderJson, std::string("the header is not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw CheckpointError(path, "", kRuleHeaderObject, "the header is not a JSON object");
  if (!duplicate.empty())
    throw CheckpointError(path, duplicate, kRuleDuplicateName, "the name appears twice in one JSON object of the header");

  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) throw CheckpointError(path, "__metadata__", kRuleMetadata, "__metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string())
          throw CheckpointError(path, "__metadata__", kRuleMetadata,
                                "value of key '" + m.key() + "' is " + m.value().type_name() + ", not a string");
        h.metadata.emplace_back(m.key(), m.value().get<std::string>());
      }
      continue;
    }
    if (!v.is_object()) throw CheckpointError(path, name, kRuleEntry, std::string("entry is ") + v.type_name() + ", not an object");
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!v.contains(field)) throw CheckpointError(path, name, kRuleEntry, std::string("entry has no '") + field + "'");
    TensorEntry e;
    e.name = name;
    const json& dt = v["dtype"];
    if (!dt.is_string() || !dtype_from_name(dt.get<std::string>(), &e.dtype))
      throw CheckpointError(path, name, kRuleDtype, "dtype " + dt.dump() + " is not a safetensors dtype");
    const json& shape = v["shape"];
    if (!shape.is_array()) throw CheckpointError(path, name, kRuleShape, "shape " + shape.dump() + " is not a list");
    for (const json& d : shape) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        throw CheckpointError(path, name, kRuleShape, "shape " + shape.dump() + " has an entry that is not an integer in [0, 2^63)");
      e.shape.push_back(d.get<uint64_t>());
    }
    const json& off = v["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw CheckpointError(path, name, kRuleOffsets, "data_offsets " + off.dump() + " is not [begin, end] of integers >= 0");
    e.begin = off[0].get<uint64_t>();
    e.end = off[1].get<uint64_t>();
    h.index.emplace(name, h.tensors.size());
    h.tensors.push_back(std::move(e));
  }
  return h;
}

void validate(Header& h) {
  const std::string& path = h.path;
  if (h.header_len > kMaxHeaderBytes)
    throw CheckpointError(path, "", kRuleHeaderTooLarge, "header length " + std::to_string(h.header_len) +
                                                             " exceeds the limit of 100000000 bytes");
  uint64_t data_start = 0;
  if (__builtin_add_overflow(h.header_len, uint64_t{8}, &data_start) || data_start > h.file_size)
    throw CheckpointError(path, "", kRuleHeaderPastEof, "header of " + std::to_string(h.header_len) +
                                                            " bytes ends after the file (" + std::to_string(h.file_size) + " bytes)");
  h.data_start = data_start;
  const uint64_t data_size = h.file_size - data_start;

  for (TensorEntry& e : h.tensors) {
    if (e.begin > e.end)
      throw CheckpointError(path, e.name, kRuleOffsets, "data_offsets [" + std::to_string(e.begin) + ", " +
                                                            std::to_string(e.end) + "] has begin > end");
    uint64_t numel = 1;
    for (uint64_t d : e.shape) {
      if (__builtin_mul_overflow(numel, d, &numel))
        throw CheckpointError(path, e.name, kRuleSizeOverflow, "the element count of the shape overflows 64 bits");
    }
    const uint32_t bits = dtype_info(e.dtype).bits;
    uint64_t nbits = 0;
    if (__builtin_mul_overflow(numel, uint64_t{bits}, &nbits) || numel > static_cast<uint64_t>(INT64_MAX))
      throw CheckpointError(path, e.name, kRuleSizeOverflow, "element count " + std::to_string(numel) + " x " +
                                                                 std::to_string(bits) + " bits overflows 64 bits");
    if (nbits % 8 != 0)
      throw CheckpointError(path, e.name, kRuleSubByte, std::to_string(numel) + " elements of " + dtype_info(e.dtype).name +
                                                            " are not a whole number of bytes");
    if (e.dtype == DType::F4 && !e.shape.empty() && e.shape.back() % 2 != 0)
      throw CheckpointError(path, e.name, kRuleSubByte, "F4 needs an even last dimension (two elements per byte)");
    if (e.dtype == DType::F4 && e.shape.empty())
      throw CheckpointError(path, e.name, kRuleSubByte, "a scalar F4 is half a byte");
    e.numel = numel;
    if (nbits / 8 != e.end - e.begin)
      throw CheckpointError(path, e.name, kRuleSizeMismatch, "data_offsets [" + std::to_string(e.begin) + ", " +
                                                                 std::to_string(e.end) + "] hold " + std::to_string(e.end - e.begin) +
                                                                 " bytes but the shape and dtype need " + std::to_string(nbits / 8));
    if (e.end > data_size)
      throw CheckpointError(path, e.name, kRulePastEof, "data ends at file offset " + std::to_string(data_start + e.end) +
                                                            " but the file has " + std::to_string(h.file_size) + " bytes (truncated?)");
  }
  // Contiguity: sort by (begin, end); the first starts at 0, each begins where the previous ends.
  std::vector<const TensorEntry*> order;
  order.reserve(h.tensors.size());
  for (const auto& e : h.tensors) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const TensorEntry* a, const TensorEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t expect = 0;
  for (const TensorEntry* e : order) {
    if (e->begin > expect) {
      if (expect == 0)
        throw CheckpointError(path, e->name, kRuleOffsetsStart, "the data section starts with a gap: the first tensor begins at " +
                                                                    std::to_string(e->begin) + ", not 0");
      throw CheckpointError(path, e->name, kRuleOffsetsGap, "begins at " + std::to_string(e->begin) +
                                                                " but the previous tensor ends at " + std::to_string(expect));
    }
    if (e->begin < expect)
      throw CheckpointError(path, e->name, kRuleOffsetsOverlap, "begins at " + std::to_string(e->begin) +
                                                                    ", inside the previous tensor, which ends at " + std::to_string(expect));
    expect = e->end;
  }
  if (expect != data_size)
    throw CheckpointError(path, order.empty() ? "" : order.back()->name, kRuleTrailing,
                          "the last tensor ends at data offset " + std::to_string(expect) + " but the data section has " +
                              std::to_string(data_size) + " bytes");
}

namespace {
void pread_all(const std::string& path, int fd, void* dst, size_t n, uint64_t off) {
  auto* p = static_cast<char*>(dst);
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, p + done, n - done, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw CheckpointError(path, "", kRuleIo, std::string("pread at offset ") + std::to_string(off + done) + ": " + std::strerror(errno));
    }
    if (r == 0)
      throw CheckpointError(path, "", kRuleReadShort, "the file ended at offset " + std::to_string(off + done) +
                                                          " while reading the header (it shrank?)");
    done += static_cast<size_t>(r);
  }
}
}  // namespace

Header read_header(const std::string& path, int fd, uint64_t file_size) {
  if (file_size < 8)
    throw CheckpointError(path, "", kRuleFileTooSmall, "the file has " + std::to_string(file_size) +
                                                           " bytes, fewer than the 8-byte header length");
  unsigned char len_bytes[8];
  pread_all(path, fd, len_bytes, 8, 0);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  if (n > kMaxHeaderBytes)
    throw CheckpointError(path, "", kRuleHeaderTooLarge, "header length " + std::to_string(n) + " exceeds the limit of 100000000 bytes");
  if (n > file_size - 8)
    throw CheckpointError(path, "", kRuleHeaderPastEof, "header of " + std::to_string(n) + " bytes ends after the file (" +
                                                            std::to_string(file_size) + " bytes)");
  std::string text(n, '\0');
  pread_all(path, fd, text.data(), n, 8);
  Header h = parse_header(path, text, n, file_size);
  validate(h);
  return h;
}

Header header_from_bytes(const std::string& path, std::string_view file) {
  if (file.size() < 8)
    throw CheckpointError(path, "", kRuleFileTooSmall, "the file has " + std::to_string(file.size()) +
                                                           " bytes, fewer than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file[i]);
  if (n > kMaxHeaderBytes)
    throw CheckpointError(path, "", kRuleHeaderTooLarge, "header length " + std::to_string(n) + " exceeds the limit of 100000000 bytes");
  if (n > file.size() - 8)
    throw CheckpointError(path, "", kRuleHeaderPastEof, "header of " + std::to_string(n) + " bytes ends after the file (" +
                                                            std::to_string(file.size()) + " bytes)");
  Header h = parse_header(path, file.substr(8, n), n, file.size());
  validate(h);
  return h;
}

}  // namespace torchpool::loader
