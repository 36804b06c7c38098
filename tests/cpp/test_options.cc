// The option schema (Note [One option schema], core/options.h) and the serializer
// (Note [One serializer], core/serialize.h).
#include <doctest/doctest.h>

#include <cmath>
#include <string>

#include "core/allocator.h"
#include "core/options.h"
#include "core/serialize.h"
#include "upstreams/fake.h"

using namespace torchpool;

TEST_CASE("defaults per device come from the table and build the core's config") {
  const OptionValues cpu = default_options(Device::kCpu), cuda = default_options(Device::kCuda);
  CHECK(cpu.alignment == PoolConfig{}.alignment);
  CHECK(cuda.alignment == 512);
  CHECK(cpu.expandable_segments);
  CHECK(!cuda.expandable_segments);
  CHECK(cuda.arenas == 1);
  CHECK(cpu.arenas >= 1);
  CHECK(cpu.arenas <= 4);
  const AllocatorConfig c = allocator_config(cuda, Device::kCuda);
  CHECK(c.pool.alignment == 512);
  CHECK(c.pool.max_reserved_ratio == 1.05);
  CHECK(c.arenas == 1);
  CHECK(c.max_bytes == 0);
}

TEST_CASE("one range check and its text") {
  const OptionInfo& ratio = *find_option("max_reserved_ratio");
  CHECK(rule_text(ratio) == "0 (off) or a number from 1 to 1000000");
  for (double ok : {0.0, 1.0, 1.05, 1e6}) CHECK(in_range(ratio, OptionValue{0, ok}));
  for (double bad : {0.5, -1.0, 1e6 + 1, std::nan("")}) CHECK(!in_range(ratio, OptionValue{0, bad}));
  const OptionInfo& align = *find_option("alignment");
  CHECK(rule_text(align) == "a power of two from 64 to 1048576 (1 MiB)");
  CHECK(in_range(align, OptionValue{4096, 0}));
  CHECK(!in_range(align, OptionValue{96, 0}));
  CHECK(!in_range(align, OptionValue{32, 0}));
  CHECK(rule_text(*find_option("max_cached_bytes")) == "an integer from 0 to 2**64-1");
  CHECK(find_option("no_such") == nullptr);
}

TEST_CASE("the text boundary applies known options for the device, or changes nothing") {
  OptionValues v = default_options(Device::kCuda);
  std::string err;
  CHECK(apply_conf(v, "max_bytes=1048576,max_reserved_ratio=0,expandable_segments=1,,", Device::kCuda, &err));
  CHECK(v.max_bytes == 1048576);
  CHECK(v.max_reserved_ratio == 0);
  CHECK(v.expandable_segments);
  const OptionValues before = v;
  CHECK(!apply_conf(v, "max_bytes=5,alignment=100", Device::kCuda, &err));
  CHECK(err == "torchpool: option alignment=100 is out of range; valid: a power of two from 64 to 1048576 (1 MiB)");
  CHECK(v == before);
  CHECK(!apply_conf(v, "chunk_bytes=4096", Device::kCuda, &err));
  CHECK(err == "torchpool: option 'chunk_bytes' does not apply to CUDA");
  CHECK(apply_conf(v, "chunk_bytes=4096", Device::kCpu, &err));
  CHECK(!apply_conf(v, "max_bytes=99999999999999999999999", Device::kCpu, &err));  // above 2**64: out of range
  CHECK(!apply_conf(v, "max_bytes=-1", Device::kCpu, &err));
  CHECK(!apply_conf(v, "max_bytes=12x", Device::kCpu, &err));
  CHECK(!apply_conf(v, "publish=1", Device::kCpu, &err));  // read by install(), not by an allocator
}

TEST_CASE("the JSON emitter writes what the serializer walks") {
  auto up = std::make_shared<FakeUpstream>();
  CachingAllocator a(up, allocator_config(default_options(Device::kCuda), Device::kCuda));
  void* p = a.allocate(1000);
  const std::string stats = stats_json(a.stats());
  CHECK(stats.front() == '{');
  CHECK(stats.find("\"allocated_bytes.all.current\":1024,") != std::string::npos);
  CHECK(stats.find("\"size_classes\":[{\"index\":") != std::string::npos);
  const std::string snap = snapshot_json(a.snapshot());
  CHECK(snap.find("\"state\":\"allocated\"") != std::string::npos);
  CHECK(snap.find("\"mapped_size\":1024") != std::string::npos);
  CHECK(snap.back() == ']');
  a.free(p);
  CHECK(snapshot_json({}) == "[]");
}

TEST_CASE("a hand-built PoolConfig is checked by the same rules") {
  CHECK(pool_config_error(PoolConfig{}) == "");
  PoolConfig c;
  c.max_reserved_ratio = 0.5;
  CHECK(pool_config_error(c).find("max_reserved_ratio=0.5") != std::string::npos);
  CHECK(pool_config_error(c).find("valid: 0 (off) or a number from 1 to 1000000") != std::string::npos);
  c = PoolConfig{};
  c.alignment = 96;
  CHECK(pool_config_error(c).find("alignment=96 is out of range") != std::string::npos);
}
