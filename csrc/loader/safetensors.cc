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

const TensorEntry* Header::find(std::string_view name) const {
  auto it = std::lower_bound(tensors.begin(), tensors.end(), name,
                             [](const TensorEntry& e, std::string_view n) { return std::string_view(e.name) < n; });
  return it != tensors.end() && it->name == name ? &*it : nullptr;
}

bool dtype_from_name(std::string_view name, DType* out) {
  for (size_t i = 0; i < static_cast<size_t>(DType::kCount); ++i) {
    if (name == kDTypes[i].name) {
      *out = static_cast<DType>(i);
      return true;
    }
  }
  return false;
}

namespace {

// Note [Streaming header parse] in safetensors.h.
class HeaderSax {
 public:
  using json = nlohmann::json;
  HeaderSax(const std::string& path, Header& h) : path_(path), h_(h) {}

  bool null() { return scalar("null", "null"); }
  bool boolean(bool v) { return scalar("boolean", v ? "true" : "false"); }
  bool number_integer(json::number_integer_t v) { return scalar("number", std::to_string(v)); }
  bool number_unsigned(json::number_unsigned_t v) {
    if (ctx() == kShape || ctx() == kOffsets) {
      Frame& f = stack_.back();
      if (!f.bad && (f.kind == kShape ? v > static_cast<uint64_t>(INT64_MAX) : f.count >= 2)) mark_bad(f);
      if (f.bad) note_scalar(std::to_string(v));  // the message's text, built only once it is needed
      else if (f.kind == kShape) cur_.shape.push_back(v);
      else offsets_[f.count] = v;
      ++f.count;
      return true;
    }
    return scalar("number", std::to_string(v));
  }
  bool number_float(json::number_float_t, const std::string& s) { return scalar("number", s); }
  bool string(std::string& v) {
    if (ctx() == kEntry && field_ == kFieldDtype) {
            if (!dtype_from_name(v, &cur_.dtype)) dtype_err_ = "dtype " + quote(v) + " is not a safetensors dtype";
      return true;
    }
    if (ctx() == kMeta) {
      if (ok()) h_.metadata.emplace_back(std::move(meta_key_), std::move(v));
      return true;
    }
    return scalar("string", quote(v));
  }
  bool binary(json::binary_t&) { return scalar("binary", "binary"); }

  bool start_object(std::size_t) { return start(true); }
  bool start_array(std::size_t) { return start(false); }
  bool end_object() { return end(); }
  bool end_array() { return end(); }

  bool key(std::string& k) {
    const Kind c = ctx();
    if (c == kTop) {
      top_key_ = std::move(k);
      return true;
    }
    if (c == kMeta) {
      meta_key_ = std::move(k);
      return true;
    }
    if (c == kEntry) {
      int bit = 0;
      if (k == "dtype") field_ = kFieldDtype, bit = kSeenDtype;
      else if (k == "shape") field_ = kFieldShape, bit = kSeenShape;
      else if (k == "data_offsets") field_ = kFieldOffsets, bit = kSeenOffsets;
      else {
        field_ = kFieldOther;
        if (!extra_keys_.insert(k).second) fail(kRuleDuplicateName, top_key_, "key '" + k + "' appears twice in the entry");
        return true;
      }
      if (keys_ & bit) fail(kRuleDuplicateName, top_key_, "key '" + k + "' appears twice in the entry");
      keys_ |= bit;
    }
    return true;  // keys of skipped values are not kept
  }

  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception& e) {
    json_error_ = std::string("the header is not valid JSON: ") + e.what();
    return false;
  }

  // After sax_parse: throws the first broken rule, in the order of the note.
  void finish(bool parsed) {
    if (!json_error_.empty()) throw CheckpointError(path_, "", kRuleHeaderJson, json_error_);
    if (!depth_error_.empty()) throw CheckpointError(path_, "", kRuleHeaderNesting, depth_error_);
    if (!parsed) throw CheckpointError(path_, "", kRuleHeaderJson, "the header is not valid JSON");
    if (!not_object_.empty()) throw CheckpointError(path_, "", kRuleHeaderObject, not_object_);
    // Names in the order std::map gave them before (byte order): the order tensors are listed in.
    std::sort(h_.tensors.begin(), h_.tensors.end(), [](const TensorEntry& a, const TensorEntry& b) { return a.name < b.name; });
    for (size_t i = 1; i < h_.tensors.size(); ++i)
      if (h_.tensors[i].name == h_.tensors[i - 1].name)
        throw CheckpointError(path_, h_.tensors[i].name, kRuleDuplicateName, "the name appears twice in one JSON object of the header");
    if (meta_count_ > 1) throw CheckpointError(path_, "__metadata__", kRuleDuplicateName, "the name appears twice in one JSON object of the header");
    if (!h_.metadata.empty()) {
      std::vector<const std::string*> keys;
      keys.reserve(h_.metadata.size());
      for (const auto& kv : h_.metadata) keys.push_back(&kv.first);
      std::sort(keys.begin(), keys.end(), [](const std::string* a, const std::string* b) { return *a < *b; });
      for (size_t i = 1; i < keys.size(); ++i)
        if (*keys[i] == *keys[i - 1])
          throw CheckpointError(path_, "__metadata__", kRuleDuplicateName, "metadata key '" + *keys[i] + "' appears twice");
    }
    if (!err_rule_.empty()) throw CheckpointError(path_, err_tensor_, err_rule_, err_detail_);
  }

 private:
  enum Kind : uint8_t { kRoot, kTop, kMeta, kEntry, kShape, kOffsets, kSkip };
  enum Field : uint8_t { kFieldNone, kFieldDtype, kFieldShape, kFieldOffsets, kFieldOther };
  static constexpr int kSeenDtype = 1, kSeenShape = 2, kSeenOffsets = 4;
  struct Frame {
    Kind kind;
    bool object;
    bool bad = false;    // shape/offsets: an element that is not an unsigned integer
    uint64_t count = 0;  // shape/offsets: elements seen
  };

  Kind ctx() const { return stack_.empty() ? kRoot : stack_.back().kind; }
  bool ok() const { return err_rule_.empty(); }
  bool entry_ok() const { return ok() && dtype_err_.empty() && shape_err_.empty() && offsets_err_.empty(); }

  void fail(const char* rule, const std::string& tensor, std::string detail) {
    if (!ok()) return;
    err_rule_ = rule;
    err_tensor_ = tensor;
    err_detail_ = std::move(detail);
  }

  static std::string quote(const std::string& s) {
    std::string q = "\"";
    q.append(s, 0, std::min<size_t>(s.size(), 64));
    if (s.size() > 64) q += "...";
    return q + "\"";
  }
  // A shape or offsets list turned out bad: its text so far, from the values kept (all were numbers).
  void mark_bad(Frame& f) {
    f.bad = true;
    list_text_ = "[";
    for (uint64_t i = 0; i < f.count; ++i) note_scalar(std::to_string(f.kind == kShape ? cur_.shape[i] : offsets_[i]));
  }
  // The flat text of a shape or offsets list for messages: bounded, never a re-serialised tree.
  void note_scalar(const std::string& text) {
    if (list_text_.size() > 120) {
      if (list_text_.back() != '.') list_text_ += ",...";
      return;
    }
    if (list_text_.size() > 1) list_text_ += ",";
    list_text_ += text;
  }

  // A scalar value (not a dtype string, a shape/offset integer or a metadata string).
  bool scalar(const char* type, const std::string& text) {
    switch (ctx()) {
      case kRoot: not_object_ = "the header is not a JSON object"; break;
      case kTop:
        if (top_key_ == "__metadata__") ++meta_count_, fail(kRuleMetadata, "__metadata__", "__metadata__ is not an object");
        else fail(kRuleEntry, top_key_, std::string("entry is ") + type + ", not an object");
        break;
      case kMeta: fail(kRuleMetadata, "__metadata__", "value of key '" + meta_key_ + "' is " + type + ", not a string"); break;
      case kEntry:
        if (field_ == kFieldDtype) dtype_err_ = "dtype " + text + " is not a safetensors dtype";
        else if (field_ == kFieldShape) shape_err_ = "shape " + text + " is not a list";
        else if (field_ == kFieldOffsets)
          offsets_err_ = "data_offsets " + text + " is not [begin, end] of integers >= 0";
        break;
      case kShape:
      case kOffsets:
        if (!stack_.back().bad) mark_bad(stack_.back());
        note_scalar(text);
        ++stack_.back().count;
        break;
      case kSkip: break;
    }
    return true;
  }

  bool start(bool object) {
    if (stack_.size() >= kMaxHeaderDepth) {
      depth_error_ = "arrays and objects nest more than " + std::to_string(kMaxHeaderDepth) +
                     " deep (a safetensors header needs 3)";
      return false;  // stops the parse here
    }
    Kind k = kSkip;
    switch (ctx()) {
      case kRoot:
        if (object) k = kTop;
        else not_object_ = "the header is not a JSON object";
        break;
      case kTop:
        if (top_key_ == "__metadata__") {
          ++meta_count_;
          if (object) k = kMeta;
          else fail(kRuleMetadata, "__metadata__", "__metadata__ is not an object");
        } else if (object) {
          k = kEntry;
          cur_ = TensorEntry{};
          cur_.name = top_key_;
          keys_ = 0;
          field_ = kFieldNone;
          dtype_err_.clear(), shape_err_.clear(), offsets_err_.clear();
          if (!extra_keys_.empty()) std::unordered_set<std::string>().swap(extra_keys_);  // clear() walks every bucket
        } else {
          fail(kRuleEntry, top_key_, "entry is array, not an object");
        }
        break;
      case kMeta: fail(kRuleMetadata, "__metadata__", "value of key '" + meta_key_ + "' is " + (object ? "object" : "array") + ", not a string"); break;
      case kEntry: {
          if (field_ == kFieldDtype) {
                    dtype_err_ = std::string("dtype is ") + (object ? "an object" : "a list") + ", not a string";
        } else if (field_ == kFieldShape) {
          if (object) shape_err_ = "shape is an object, not a list";
          else k = kShape, cur_.shape.clear();
        } else if (field_ == kFieldOffsets) {
          if (object) offsets_err_ = "data_offsets is an object, not [begin, end] of integers >= 0";
          else k = kOffsets;
        }
        break;
      }
      case kShape:
      case kOffsets:
        if (!stack_.back().bad) mark_bad(stack_.back());
        note_scalar(object ? "{...}" : "[...]");
        ++stack_.back().count;
        break;
      case kSkip: break;
    }
    stack_.push_back({k, object});
    return true;
  }

  bool end() {
    const Frame f = stack_.back();
    stack_.pop_back();
    switch (f.kind) {
      case kShape:
        list_text_ += "]";
        if (f.bad) shape_err_ = "shape " + list_text_ + " has an entry that is not an integer in [0, 2^63)";
        break;
      case kOffsets:
        list_text_ += "]";
        if (f.bad || f.count != 2) offsets_err_ = "data_offsets " + list_text_ + " is not [begin, end] of integers >= 0";
        else cur_.begin = offsets_[0], cur_.end = offsets_[1];
        break;
      case kEntry: {
        for (auto [bit, name] : {std::pair{kSeenDtype, "dtype"}, std::pair{kSeenShape, "shape"}, std::pair{kSeenOffsets, "data_offsets"}})
          if (!(keys_ & bit)) fail(kRuleEntry, cur_.name, std::string("entry has no '") + name + "'");
        if (!dtype_err_.empty()) fail(kRuleDtype, cur_.name, dtype_err_);
        if (!shape_err_.empty()) fail(kRuleShape, cur_.name, shape_err_);
        if (!offsets_err_.empty()) fail(kRuleOffsets, cur_.name, offsets_err_);
        if (ok()) h_.tensors.push_back(std::move(cur_));
        break;
      }
      default: break;
    }
    return true;
  }

  const std::string& path_;
  Header& h_;
  std::vector<Frame> stack_;
  std::string top_key_, meta_key_;
  TensorEntry cur_;
  int keys_ = 0;
  Field field_ = kFieldNone;
  std::string dtype_err_, shape_err_, offsets_err_, list_text_;
  uint64_t offsets_[2] = {0, 0};
  std::unordered_set<std::string> extra_keys_;
  int meta_count_ = 0;
  std::string json_error_, depth_error_, not_object_;
  std::string err_rule_, err_tensor_, err_detail_;
};

}  // namespace

Header parse_header(const std::string& path, std::string_view text, uint64_t header_len, uint64_t file_size) {
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
  // Note [Streaming header parse]
  HeaderSax sax(path, h);
  const bool parsed = nlohmann::json::sax_parse(text.begin(), text.end(), &sax, nlohmann::json::input_format_t::json,
                                                /*strict=*/true, /*ignore_comments=*/false);
  sax.finish(parsed);
  return h;
}

namespace {
// torch computes contiguous strides in int64, stride[i] = stride[i+1] * max(size[i+1], 1), and refuses
// ("Stride calculation overflowed") when that overflows; numel > 0 bounds every product by the file
// size, so only an empty tensor with huge other dimensions reaches it.  The sizes are torch's (F4:
// the last dimension halved).
void check_torch_strides(const std::string& path, const TensorEntry& e) {
  int64_t stride = 1;
  for (size_t i = e.shape.size(); i-- > 1;) {
    uint64_t d = e.shape[i];
    if (i + 1 == e.shape.size() && e.dtype == DType::F4) d /= 2;
    if (__builtin_mul_overflow(stride, static_cast<int64_t>(std::max<uint64_t>(d, 1)), &stride))
      throw CheckpointError(path, e.name, kRuleStrideOverflow,
                            "the dimensions after the first (zeros counted as 1) multiply past 2^63 - 1: torch cannot "
                            "compute the strides of this empty tensor");
  }
}
}  // namespace

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
    if (numel == 0) check_torch_strides(path, e);
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

namespace {
// The 8-byte length prefix against the file size.  A length the file cannot hold whose next byte is
// not the '{' (or JSON whitespace) that starts every header is a file of another kind (text, a .pt
// zip, ...): say so rather than quoting 8 bytes of text as a number.  `next` is byte 8, or -1.
uint64_t check_prefix(const std::string& path, const unsigned char* len_bytes, int next, uint64_t file_size) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | len_bytes[i];
  const bool fits = n <= kMaxHeaderBytes && n <= file_size - 8;
  if (!fits && next != '{' && next != ' ' && next != '\t' && next != '\n' && next != '\r') {
    std::string shown;
    for (int i = 0; i < 8; ++i) {
      const unsigned char c = len_bytes[i];
      if (c >= 0x20 && c < 0x7f && c != '\\' && c != '"') {
        shown += static_cast<char>(c);
      } else {
        static const char* hex = "0123456789abcdef";
        shown += "\\x";
        shown += hex[c >> 4];
        shown += hex[c & 15];
      }
    }
    throw CheckpointError(path, "", kRuleNotSafetensors,
                          "not a safetensors file: it starts with \"" + shown + "\", which as a header length is " +
                              std::to_string(n) + (n > kMaxHeaderBytes ? " (over the 100000000-byte limit)" : " (past the end of the file)") +
                              ", and byte 8 is not the '{' that begins a safetensors header");
  }
  if (n > kMaxHeaderBytes)
    throw CheckpointError(path, "", kRuleHeaderTooLarge, "header length " + std::to_string(n) + " exceeds the limit of 100000000 bytes");
  if (n > file_size - 8)
    throw CheckpointError(path, "", kRuleHeaderPastEof, "header of " + std::to_string(n) + " bytes ends after the file (" +
                                                            std::to_string(file_size) + " bytes)");
  return n;
}
}  // namespace

Header read_header(const std::string& path, int fd, uint64_t file_size) {
  if (file_size < 8)
    throw CheckpointError(path, "", kRuleFileTooSmall, "the file has " + std::to_string(file_size) +
                                                           " bytes, fewer than the 8-byte header length");
  unsigned char prefix[9] = {};
  pread_all(path, fd, prefix, file_size > 8 ? 9 : 8, 0);
  const uint64_t n = check_prefix(path, prefix, file_size > 8 ? prefix[8] : -1, file_size);
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
  const auto* p = reinterpret_cast<const unsigned char*>(file.data());
  const uint64_t n = check_prefix(path, p, file.size() > 8 ? p[8] : -1, file.size());
  Header h = parse_header(path, file.substr(8, n), n, file.size());
  validate(h);
  return h;
}

}  // namespace torchpool::loader
