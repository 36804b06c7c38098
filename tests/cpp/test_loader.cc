// The loader without Python: header rules, slice runs, parallel pread, the staging pipeline and the
// host_pinned upstream. Runs under ASan/UBSan in CI.
#include <doctest/doctest.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "loader/safetensors.h"
#include "loader/shard.h"
#include "loader/staging.h"
#include "upstreams/host_pinned.h"

using namespace torchpool;
using namespace torchpool::loader;

namespace {

std::string file_of(const std::string& header, const std::string& data, uint64_t len_override = UINT64_MAX) {
  const uint64_t n = len_override == UINT64_MAX ? header.size() : len_override;
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string rule_of(const std::string& bytes) {
  try {
    header_from_bytes("mem", bytes);
  } catch (const CheckpointError& e) {
    CHECK(std::string(e.what()).find("rule " + e.rule()) != std::string::npos);
    return e.rule();
  }
  return "";
}

struct TempFile {
  std::string path;
  explicit TempFile(const std::string& bytes) {
    char tmpl[] = "/tmp/torchpool_loader_XXXXXX";
    const int fd = ::mkstemp(tmpl);
    REQUIRE(fd >= 0);
    REQUIRE(::write(fd, bytes.data(), bytes.size()) == static_cast<ssize_t>(bytes.size()));
    ::close(fd);
    path = tmpl;
  }
  ~TempFile() { ::unlink(path.c_str()); }
};

const std::string kE = R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

}  // namespace

TEST_CASE("loader: a valid header") {
  const std::string h = R"(  {"__metadata__":{"a":"b"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[8,20]},)"
                        R"("v":)" + kE + "}  ";
  Header hd = header_from_bytes("mem", file_of(h, std::string(20, 'x')));
  REQUIRE(hd.tensors.size() == 2);
  CHECK(hd.find("w")->numel == 6);
  CHECK(hd.find("w")->nbytes() == 12);
  CHECK(hd.metadata.size() == 1);
  CHECK(hd.data_start == 8 + h.size());
}

TEST_CASE("loader: one rule per malformed header") {
  CHECK(rule_of("abc") == kRuleFileTooSmall);
  CHECK(rule_of(file_of("{}", "", 100'000'001)) == kRuleHeaderTooLarge);
  CHECK(rule_of(file_of("{}", "", 64)) == kRuleHeaderPastEof);
  CHECK(rule_of(file_of("{\"\xc3\x28\":1}", "")) == kRuleHeaderUtf8);
  CHECK(rule_of(file_of("{\"a\":", "")) == kRuleHeaderJson);
  CHECK(rule_of(file_of("[]", "")) == kRuleHeaderObject);
  CHECK(rule_of(file_of("{\"a\":" + kE + ",\"a\":" + kE + "}", std::string(8, 0))) == kRuleDuplicateName);
  CHECK(rule_of(file_of(R"({"__metadata__":{"a":1}})", "")) == kRuleMetadata);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F32","shape":[2]}})", "")) == kRuleEntry);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F99","shape":[2],"data_offsets":[0,8]}})", std::string(8, 0))) == kRuleDtype);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", std::string(8, 0))) == kRuleShape);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", std::string(8, 0))) == kRuleOffsets);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", std::string(8, 0))) ==
        kRuleSizeOverflow);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F64","shape":[2305843009213693952],"data_offsets":[0,8]}})", std::string(8, 0))) ==
        kRuleSizeOverflow);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", std::string(2, 0))) == kRuleSubByte);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, 0))) == kRuleSizeMismatch);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, 0))) == kRuleOffsetsStart);
  CHECK(rule_of(file_of("{\"a\":" + kE + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})", std::string(20, 0))) ==
        kRuleOffsetsGap);
  CHECK(rule_of(file_of("{\"a\":" + kE + R"(,"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, 0))) ==
        kRuleOffsetsOverlap);
  CHECK(rule_of(file_of("{\"a\":" + kE + "}", std::string(7, 0))) == kRulePastEof);
  CHECK(rule_of(file_of("{\"a\":" + kE + "}", std::string(9, 0))) == kRuleTrailing);
  CHECK(rule_of(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,18446744073709551615]}})", "")) ==
        kRuleSizeMismatch);
}

TEST_CASE("loader: random damage never crashes") {
  const std::string good = file_of("{\"a\":" + kE + R"(,"b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]}})", std::string(11, 'z'));
  uint64_t seed = 12345;
  auto rnd = [&] { return (seed = seed * 6364136223846793005ULL + 1442695040888963407ULL) >> 33; };
  for (int i = 0; i < 3000; ++i) {
    std::string b = good;
    const int edits = 1 + rnd() % 4;
    for (int e = 0; e < edits; ++e) b[rnd() % b.size()] = static_cast<char>(rnd() & 0xff);
    if (rnd() % 4 == 0) b.resize(rnd() % b.size());
    try {
      Header h = header_from_bytes("fuzz", b);
      for (const auto& t : h.tensors) CHECK(h.data_start + t.end <= b.size());
    } catch (const CheckpointError&) {
    }
  }
}

TEST_CASE("loader: slice runs") {
  // 4 x 6 of 2-byte elements at base 100
  auto runs = slice_runs({4, 6}, 2, 100, {1, 0}, {3, 6});  // whole rows: one run
  REQUIRE(runs.size() == 1);
  CHECK(runs[0].offset == 100 + 12);
  CHECK(runs[0].len == 24);
  runs = slice_runs({4, 6}, 2, 100, {0, 2}, {4, 5});  // columns: a run per row
  REQUIRE(runs.size() == 4);
  CHECK(runs[1].offset == 100 + 12 + 4);
  CHECK(runs[1].len == 6);
  CHECK(runs[3].dst_offset == 18);
  CHECK(slice_runs({4, 6}, 2, 0, {2, 0}, {2, 6}).empty());
  CHECK(slice_runs({}, 4, 8, {}, {}).size() == 1);
  CHECK_THROWS_AS(slice_runs({4}, 1, 0, {0}, {5}), std::invalid_argument);
}

TEST_CASE("loader: shard file, parallel pread and the staging pipeline") {
  const size_t n = 3u << 20;  // 3 MiB of F32 in two tensors
  std::string data(n, '\0');
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<char>(i * 7 + (i >> 12));
  std::string h = R"({"a":{"dtype":"U8","shape":[1048576],"data_offsets":[0,1048576]},)"
                  R"("b":{"dtype":"U8","shape":[2097152],"data_offsets":[1048576,3145728]}})";
  TempFile f(file_of(h, data));
  ShardFile s(f.path);
  const TensorEntry* b = s.header().find("b");
  REQUIRE(b != nullptr);
  CHECK(std::memcmp(s.map_base() + s.file_offset(*b), data.data() + (1u << 20), b->nbytes()) == 0);

  std::vector<uint8_t> out(n);
  std::vector<ReadOp> ops{{&s, s.header().data_start, n, out.data(), nullptr}};
  parallel_pread(ops, 4, 256u << 10);
  CHECK(std::memcmp(out.data(), data.data(), n) == 0);
  CHECK(s.bytes_read() == n);

  auto up = std::make_shared<HostPinnedUpstream>();
  StagingPool pool(up, 512u << 10, 128u << 10);  // 4 buffers of 128 KiB for 3 MiB
  std::fill(out.begin(), out.end(), 0);
  pool.run(ops, 3, &StagingPool::copy_to_dst);
  CHECK(std::memcmp(out.data(), data.data(), n) == 0);
  StagingStats st = pool.stats();
  CHECK(st.bytes_staged == n);
  CHECK(st.chunks == n / (128u << 10));
  CHECK(st.buffers <= 4);
  CHECK(st.reuses == st.chunks - st.buffers);
  CHECK(up->stats().mapped_bytes == st.buffer_bytes);

  // the CPU copy on the reader threads
  std::fill(out.begin(), out.end(), 0);
  pool.run(ops, 3, &StagingPool::copy_to_dst, /*on_readers=*/true);
  CHECK(std::memcmp(out.data(), data.data(), n) == 0);
  CHECK(pool.stats().bytes_staged == 2 * n);
  CHECK(pool.stats().buffers <= 4);

  // a consumer error stops the run and leaves the pool usable
  std::atomic<int> calls{0};
  CHECK_THROWS_AS(pool.run(ops, 3, [&](const StagedChunk&) {
    if (++calls == 3) throw std::runtime_error("consumer");
  }), std::runtime_error);
  pool.run(ops, 2, &StagingPool::copy_to_dst);
  CHECK(std::memcmp(out.data(), data.data(), n) == 0);
  calls = 0;
  CHECK_THROWS_AS(pool.run(ops, 3, [&](const StagedChunk&) {
    if (++calls == 2) throw std::runtime_error("consumer");
  }, true), std::runtime_error);

  // the file shrinks after it was opened: read-short, no crash, no hang
  REQUIRE(::truncate(f.path.c_str(), static_cast<off_t>(s.header().data_start + n / 2)) == 0);
  try {
    pool.run(ops, 3, &StagingPool::copy_to_dst);
    FAIL("expected read-short");
  } catch (const CheckpointError& e) {
    CHECK(e.rule() == kRuleReadShort);
  }
  CHECK_THROWS_AS(parallel_pread(ops, 4), CheckpointError);
  pool.release_buffers();
  CHECK(up->stats().mapped_bytes == 0);
  CHECK(up->stats().locked_bytes == 0);
}

TEST_CASE("loader: populate_ranges maps pieces and reports a short file") {
  // Note [Cold mapping]
  const size_t n = 3u << 20;
  std::string data(n, '\0');
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<char>(i * 13 + (i >> 10));
  std::string h = R"({"a":{"dtype":"U8","shape":[1048577],"data_offsets":[0,1048577]},)"
                  R"("b":{"dtype":"U8","shape":[2097151],"data_offsets":[1048577,3145728]}})";
  TempFile f(file_of(h, data));
  ShardFile s(f.path);
  const TensorEntry* a = s.header().find("a");
  const TensorEntry* b = s.header().find("b");
  REQUIRE((a != nullptr && b != nullptr));
  std::vector<ReadOp> ops{{&s, s.file_offset(*a), a->nbytes(), nullptr, &a->name},
                          {&s, s.file_offset(*b), b->nbytes(), nullptr, &b->name},
                          {&s, s.file_offset(*b), 0, nullptr, &b->name}};  // an empty op is skipped
  for (bool prefetch : {true, false}) {
    populate_ranges(ops, 3, prefetch, 256u << 10);
    CHECK(s.resident_fraction(s.header().data_start, n) == 1.0);
    CHECK(std::memcmp(s.map_base() + s.header().data_start, data.data(), n) == 0);
  }
  CHECK(s.bytes_read() == 0);  // no pread: the kernel reads into the page cache
  s.populate(s.file_offset(*a), a->nbytes(), 2);

  // the file shrinks after it was opened: read-short naming the tensor, never SIGBUS
  REQUIRE(::truncate(f.path.c_str(), static_cast<off_t>(s.header().data_start + n / 2)) == 0);
#ifdef MADV_POPULATE_READ
  try {
    populate_ranges(ops, 3, true, 256u << 10);
    FAIL("expected read-short");
  } catch (const CheckpointError& e) {
    CHECK(e.rule() == kRuleReadShort);
    CHECK(e.tensor() == "b");
    CHECK(std::string(e.what()).find("offsets") != std::string::npos);
  }
#endif
}

TEST_CASE("loader: host_pinned upstream") {
  HostPinnedUpstream locked;
  void* p = locked.map(1u << 16, 0);
  REQUIRE(p != nullptr);
  CHECK(reinterpret_cast<uintptr_t>(p) % locked.granularity() == 0);
  std::memset(p, 1, 1u << 16);
  HostPinnedStats s = locked.stats();
  CHECK(s.mapped_bytes == (1u << 16));
  CHECK(s.locked_bytes + (s.lock_failures ? (1u << 16) : 0) == (1u << 16));  // locked, or refused and said so
  locked.unmap(p, 1u << 16, 0);
  CHECK(locked.stats().mapped_bytes == 0);

  HostPinnedUpstream unlocked(HostPinnedOptions{false, false});
  p = unlocked.map(8192, 0);
  REQUIRE(p != nullptr);
  CHECK(unlocked.stats().locked_bytes == 0);
  CHECK_FALSE(unlocked.is_locked(p));
  unlocked.unmap(p, 8192, 0);
}

TEST_CASE("loader: issue 11 regressions (deep nesting, many tensors, strides, not-safetensors)") {
  // ~70,000 deep anywhere: a CheckpointError naming the file, never a stack overflow
  const std::string deep = std::string(70000, '[') + std::string(70000, ']');
  for (const std::string& h : {R"({"a":{"dtype":)" + deep + R"(,"shape":[2],"data_offsets":[0,8]}})",
                               R"({"a":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,8]}})",
                               R"({"a":{"dtype":"F32","shape":[2],"data_offsets":)" + deep + "}}",
                               R"({"__metadata__":)" + deep + "}", deep, R"({"a":)" + std::string(70000, '[')}) {
    CHECK(rule_of(file_of(h, std::string(8, 0))) == kRuleHeaderNesting);
  }
  // many tensors, in JSON order unlike name or offset order: sorted by name, found by find()
  const int n = 50000;
  std::string h = "{";
  for (int k = 0; k < n; ++k) {
    const int i = (k * 7919) % n;  // a permutation (7919 is prime, n is not a multiple of it)
    if (k) h += ",";
    h += "\"t" + std::to_string(i) + "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[" + std::to_string(i) + "," +
         std::to_string(i + 1) + "]}";
  }
  h += "}";
  Header hd = header_from_bytes("mem", file_of(h, std::string(n, 'x')));
  REQUIRE(hd.tensors.size() == static_cast<size_t>(n));
  for (size_t i = 1; i < hd.tensors.size(); ++i) CHECK(hd.tensors[i - 1].name < hd.tensors[i].name);
  const TensorEntry* e = hd.find("t12345");
  REQUIRE(e != nullptr);
  CHECK(e->begin == 12345);
  CHECK(hd.find("t50000") == nullptr);
  // an empty tensor whose torch strides overflow int64
  CHECK(rule_of(file_of(R"({"z":{"dtype":"F32","shape":[0,4294967293,4294967295],"data_offsets":[0,0]}})", "")) ==
        kRuleStrideOverflow);
  CHECK(rule_of(file_of(R"({"z":{"dtype":"F32","shape":[4611686018427387904,2,0],"data_offsets":[0,0]}})", "")) == "");
  // a text file
  CHECK(rule_of("hello world, this is text\n") == kRuleNotSafetensors);
  CHECK(rule_of(file_of("{\"a\":" + kE + "}", std::string(8, 0), 100'000'001)) == kRuleHeaderTooLarge);
}

TEST_CASE("loader: tensor_at finds the tensor of a file offset") {
  TempFile f(file_of("{\"a\":" + kE + R"(,"z":{"dtype":"F32","shape":[0],"data_offsets":[8,8]},"b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]}})",
                     std::string(11, 'z')));
  ShardFile s(f.path);
  const uint64_t d = s.header().data_start;
  CHECK(s.tensor_at(0) == nullptr);
  CHECK(s.tensor_at(d)->name == "a");
  CHECK(s.tensor_at(d + 7)->name == "a");
  CHECK(s.tensor_at(d + 8)->name == "b");
  CHECK(s.tensor_at(d + 10)->name == "b");
  CHECK(s.tensor_at(d + 11) == nullptr);
}
