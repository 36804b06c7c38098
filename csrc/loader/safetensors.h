// The safetensors format: header parsing and validation. No torch, no Python.
//
// A file is: 8 bytes little-endian N (the header length), N bytes of UTF-8 JSON, then the data
// section. The JSON is an object: "__metadata__" -> {string: string} (optional), and for every tensor
// name -> {"dtype": "F32", "shape": [d0, ...], "data_offsets": [begin, end]} with offsets relative to
// the data section.
//
// Note [One validate()]
// ---------------------
// Rationale: a checkpoint is untrusted input; every number in it ends up as a pointer offset or a
// length, so every rule must hold before anything is mapped, read or handed to torch.  Approach:
// parse_header() only turns the JSON into Header/TensorEntry records (rejecting what is not even the
// right JSON shape); validate() then checks every arithmetic rule in one place with checked
// arithmetic (__builtin_mul_overflow / add_overflow), and each broken rule throws its own
// CheckpointError whose message names the file, the tensor and the rule id (kRule* below), e.g.
//   "/x/model.safetensors: tensor 'w': rule offsets-gap: begins at 96 but the previous tensor ends at 64".
// Nothing downstream re-checks: a Header that exists is valid.  Limitation: the file may still change
// after it was validated (another process truncates it); reads then fail with rule read-short instead
// of returning garbage, and touching a mapped view kills the process with SIGBUS, as with every mmap
// reader (Note [SIGBUS message] in shard.h says which file first; open_checkpoint(copy=True) hands
// out owned memory only).
//
// Note [Streaming header parse]
// -----------------------------
// Rationale: the header is untrusted and may be 100 MB.  Building a DOM first (nlohmann::json) had
// three failures (issue 11): with a parser callback, nlohmann scans the parent object after every
// child object ends (to erase discarded values), so 40k tensors took 12-19 s and 100k 106 s; every
// DOM node costs ~100 bytes, so a header of nested objects took 69x its size in RSS; and a value
// nested 70,000 deep was printed recursively into the error message (dump()) until the stack overflowed.
// Approach: one SAX pass (nlohmann::json::sax_parse, whose parser keeps its own state stack and
// never recurses) writes TensorEntry records directly: O(n) events plus one O(n log n) sort by name
// (which also finds duplicate names), nothing of a value outside the known fields is kept, nesting
// deeper than kMaxHeaderDepth stops the parse at once (rule header-nesting; a valid header nests 3
// deep, serde_json, which the safetensors package uses, stops at 128), and error messages describe
// a value by its type or by its flat scalars, never by re-serialising a tree.  What a header can
// make this process allocate is therefore bounded by its length: per tensor one TensorEntry (its
// name, 8 bytes per dimension), per metadata pair its two strings, each at most the text it came
// from plus a constant; kMaxHeaderBytes bounds the text.  The first rule broken (in file order)
// is remembered and the parse goes on, so a JSON syntax error still wins, as with the DOM parser:
// header-json > header-nesting (stops at once) > header-not-object > duplicate-name > the first
// bad entry.  Keys inside ignored fields (extra fields of an entry, which the reference ignores)
// are not checked for duplicates.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace torchpool::loader {

class CheckpointError : public std::runtime_error {
 public:
  CheckpointError(std::string file, std::string tensor, std::string rule, const std::string& detail);
  const std::string& file() const { return file_; }
  const std::string& tensor() const { return tensor_; }
  const std::string& rule() const { return rule_; }

 private:
  std::string file_, tensor_, rule_;
};

// Rule ids (stable: tests and users match on them).
inline constexpr const char* kRuleFileTooSmall = "file-too-small";       // fewer than 8 bytes
inline constexpr const char* kRuleNotSafetensors = "not-safetensors";    // implausible length and no '{' at byte 8
inline constexpr const char* kRuleHeaderTooLarge = "header-too-large";   // N > 100,000,000
inline constexpr const char* kRuleHeaderPastEof = "header-past-eof";     // 8 + N > file size
inline constexpr const char* kRuleHeaderUtf8 = "header-utf8";            // header is not UTF-8
inline constexpr const char* kRuleHeaderJson = "header-json";            // not JSON
inline constexpr const char* kRuleHeaderNesting = "header-nesting";     // arrays/objects nested > kMaxHeaderDepth
inline constexpr const char* kRuleHeaderObject = "header-not-object";    // top level not an object
inline constexpr const char* kRuleDuplicateName = "duplicate-name";      // a key twice
inline constexpr const char* kRuleMetadata = "metadata-not-strings";     // __metadata__ not {str: str}
inline constexpr const char* kRuleEntry = "entry-fields";                // entry not {dtype, shape, data_offsets}
inline constexpr const char* kRuleDtype = "dtype-unknown";
inline constexpr const char* kRuleShape = "shape-invalid";               // not a list of integers >= 0
inline constexpr const char* kRuleOffsets = "offsets-invalid";           // not [begin, end], begin <= end
inline constexpr const char* kRuleSizeOverflow = "size-overflow";        // numel * width overflows
inline constexpr const char* kRuleSubByte = "size-not-whole-bytes";      // sub-byte dtype, partial byte
inline constexpr const char* kRuleStrideOverflow = "stride-overflow";   // torch's int64 strides overflow (zero-size tensors)
inline constexpr const char* kRuleSizeMismatch = "size-mismatch";        // end - begin != numel * width
inline constexpr const char* kRuleOffsetsStart = "offsets-start";        // first tensor does not start at 0
inline constexpr const char* kRuleOffsetsGap = "offsets-gap";
inline constexpr const char* kRuleOffsetsOverlap = "offsets-overlap";
inline constexpr const char* kRulePastEof = "data-past-eof";             // a tensor ends after the file: truncated
inline constexpr const char* kRuleTrailing = "data-trailing-bytes";      // the last tensor ends before the file
inline constexpr const char* kRuleReadShort = "read-short";              // the file shrank under us
inline constexpr const char* kRuleIo = "io-error";

inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Deepest nesting of arrays and objects a header may have (a valid one needs 3; serde_json stops at 128).
inline constexpr size_t kMaxHeaderDepth = 64;

enum class DType : uint8_t {
  BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, C64,
  F8_E4M3, F8_E4M3FNUZ, F8_E5M2, F8_E5M2FNUZ, F8_E8M0, F4, F6_E2M3, F6_E3M2,
  kCount
};

struct DTypeInfo {
  const char* name;        // as in the file
  uint32_t bits;           // per element
  const char* torch_name;  // torch.<name>, or nullptr when torch 2.13 has no such dtype
};
const DTypeInfo& dtype_info(DType d);
bool dtype_from_name(std::string_view name, DType* out);

struct TensorEntry {
  std::string name;
  DType dtype = DType::U8;
  std::vector<uint64_t> shape;
  uint64_t begin = 0;  // relative to the data section
  uint64_t end = 0;
  uint64_t numel = 0;  // filled by validate()
  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::string path;
  uint64_t file_size = 0;
  uint64_t header_len = 0;
  uint64_t data_start = 0;  // 8 + header_len
  std::vector<TensorEntry> tensors;  // sorted by name (byte order), names unique
  std::vector<std::pair<std::string, std::string>> metadata;  // in the order of the JSON

  // Binary search over the sorted tensors.
  const TensorEntry* find(std::string_view name) const;
};

// Parses the JSON text of a header (already cut out of the file) into records; throws on the JSON
// shape rules. Does not call validate().
Header parse_header(const std::string& path, std::string_view json, uint64_t header_len, uint64_t file_size);
// Every arithmetic rule (Note [One validate()]). Fills numel.
void validate(Header& h);
// Reads the length prefix and the header from an open file and returns a validated Header.
Header read_header(const std::string& path, int fd, uint64_t file_size);
// Same from bytes in memory (tests, fuzzing): `file` is the whole file's content.
Header header_from_bytes(const std::string& path, std::string_view file);

}  // namespace torchpool::loader
