// libFuzzer target: the safetensors header parser and validate() (issue 11), built by
// scripts/ci/fuzz_cpp.sh with clang -fsanitize=fuzzer,address,undefined.
//
// An input that starts with '{', '[' or JSON whitespace is a header's JSON text: it is wrapped into
// a whole file (length prefix, the text, then a data section as long as the largest data_offsets end
// the text names, at most 1 MiB), so that mutations of the JSON reach validate() instead of failing
// the length check.  Any other input is a whole file.  Either way the bytes must give a Header or a
// CheckpointError with a rule; a Header must satisfy what the readers rely on.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "loader/safetensors.h"

using namespace torchpool::loader;

namespace {

void check(const Header& h, size_t file_size) {
  if (h.file_size != file_size || h.data_start != 8 + h.header_len || h.data_start > file_size) std::abort();
  uint64_t total = 0;
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const TensorEntry& e = h.tensors[i];
    if (e.begin > e.end || h.data_start + e.end > file_size) std::abort();
    if (i > 0 && !(h.tensors[i - 1].name < e.name)) std::abort();  // sorted, unique
    if (h.find(e.name) != &e) std::abort();
    uint64_t numel = 1;
    for (uint64_t d : e.shape) numel *= d;
    if (numel != e.numel || numel * dtype_info(e.dtype).bits != (e.end - e.begin) * 8) std::abort();
    total += e.end - e.begin;
  }
  if (total != file_size - h.data_start) std::abort();  // contiguous, no trailing bytes
}

void run(std::string_view file) {
  try {
    Header h = header_from_bytes("fuzz", file);
    check(h, file.size());
  } catch (const CheckpointError& e) {
    if (e.rule().empty() || e.file() != "fuzz") std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  const char c = size ? in[0] : 0;
  if (c == '{' || c == '[' || c == ' ' || c == '\n' || c == '\t' || c == '\r') {
    uint64_t data_len = 0;
    try {
      Header h = parse_header("fuzz", in, size, UINT64_MAX);  // records only: how much data they name
      for (const TensorEntry& e : h.tensors)
        if (e.end > data_len) data_len = e.end;
    } catch (const CheckpointError&) {
    }
    if (data_len > (1u << 20)) data_len = 1u << 20;
    std::string file(8, '\0');
    for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((static_cast<uint64_t>(size) >> (8 * i)) & 0xff);
    file.append(in);
    file.append(data_len, '\0');
    run(file);
  } else {
    run(in);
  }
  return 0;
}
