// Note [Impossible sizes]: requests near 2^64 on every upstream are out of memory naming the size,
// never a crash, a wrapped rounding or a zero-size block; the allocator keeps working after them.
#include <doctest/doctest.h>

#include <cstdint>
#include <memory>
#include <string>

#include "core/allocator.h"
#include "core/pool.h"
#include "upstreams/fake.h"
#include "upstreams/host_mmap.h"
#include "upstreams/host_pinned.h"
#include "upstreams/host_vmm.h"

using namespace torchpool;

namespace {

std::shared_ptr<Upstream> upstream(const std::string& name) {
  if (name == "fake") return std::make_shared<FakeUpstream>();
  if (name == "fake_expandable") return std::make_shared<FakeUpstream>(SIZE_MAX, 2u << 20, size_t{1} << 40);
  if (name == "host_mmap") return std::make_shared<HostMmapUpstream>();
  if (name == "host_vmm") return std::make_shared<HostVmmUpstream>();
  if (name == "host_vmm_plain") return std::make_shared<HostVmmUpstream>(HostVmmOptions{false});
  if (name == "host_pinned") return std::make_shared<HostPinnedUpstream>(HostPinnedOptions{false, false});
  throw std::runtime_error(name);
}

const size_t kHostile[] = {SIZE_MAX, SIZE_MAX - 4095, SIZE_MAX - 4096, SIZE_MAX - 63, size_t{1} << 63,
                           (size_t{1} << 63) + 1, (size_t{1} << 62) + 1, (size_t{1} << 62)};

}  // namespace

TEST_CASE("hostile sizes: out of memory naming the size on every upstream, then normal service") {
  for (const char* name : {"fake", "fake_expandable", "host_mmap", "host_vmm", "host_vmm_plain", "host_pinned"}) {
    for (unsigned arenas : {1u, 2u}) {
      CAPTURE(name);
      AllocatorConfig c;
      c.arenas = arenas;
      CachingAllocator a(upstream(name), c);
      void* keep = a.allocate(1000);
      REQUIRE(keep != nullptr);
      for (size_t n : kHostile) {
        CAPTURE(n);
        bool threw = false;
        try {
          void* p = a.allocate(n);
          a.free(p);  // only the fake upstream could ever hold 2^62; nothing else may succeed
          CHECK(std::string(name).rfind("fake", 0) == 0);
          CHECK(n <= CachingAllocator::kMaxRequestBytes);
        } catch (const OutOfMemory& e) {
          threw = true;
          const std::string msg = e.what();
          CHECK(msg.find(std::to_string(n) + " bytes") != std::string::npos);
          CHECK(msg.find("-") == std::string::npos);  // sizes are unsigned: no "-8388608.00 TiB"
          CHECK(e.requested() == n);
        }
        if (n > CachingAllocator::kMaxRequestBytes) CHECK(threw);
        CHECK(a.check() == "");
        const Stats s = a.stats();
        CHECK(s.allocated_bytes.current >= 0);
        CHECK(s.reserved_bytes.current >= 0);
      }
      void* p = a.allocate(5u << 20);  // still working
      REQUIRE(p != nullptr);
      CHECK(a.block_size(p).first >= (5u << 20));
      a.free(p);
      a.free(keep);
      CHECK(a.check() == "");
    }
  }
}

TEST_CASE("hostile sizes: the pool's own rounding is checked (no allocator in front)") {
  FakeUpstream up;
  Pool pool(up, PoolConfig{});
  for (size_t n : kHostile) {
    Block* b = pool.allocate(n);
    if (b) {  // the fake upstream's addresses stop at 2^62, so at most that can be served
      CHECK(b->size >= n);
      pool.free(b);
    }
    CHECK(pool.check() == "");
  }
  CHECK(pool.stats().allocated_bytes.current == 0);
}

TEST_CASE("hostile sizes: the fake upstream never reports negative gauges") {
  CachingAllocator a(std::make_shared<FakeUpstream>(), AllocatorConfig{});
  void* p = nullptr;
  try {
    p = a.allocate(size_t{1} << 62);
  } catch (const OutOfMemory&) {
  }
  const Stats s = a.stats();
  CHECK(s.allocated_bytes.current >= 0);
  CHECK(s.reserved_bytes.current >= 0);
  if (p) a.free(p);
}

TEST_CASE("format_bytes is unsigned") {
  CHECK(format_bytes(size_t{1} << 63) == "8.00 EiB");
  CHECK(format_bytes(SIZE_MAX) == "16.00 EiB");
  CHECK(format_bytes(1536) == "1.50 KiB");
  CHECK(format_bytes(10) == "10 B");
}

TEST_CASE("options out of range are refused with the option, the value and the range") {
  FakeUpstream up;
  PoolConfig c;
  c.alignment = size_t{1} << 40;
  try {
    Pool p(up, c);
    FAIL("accepted alignment 2^40");
  } catch (const std::invalid_argument& e) {
    const std::string m = e.what();
    CHECK(m.find("alignment=1099511627776") != std::string::npos);
    CHECK(m.find("64 to 1048576") != std::string::npos);
  }
  c = PoolConfig{};
  c.max_reserved_ratio = 1e300;
  CHECK_THROWS_AS(Pool(up, c), std::invalid_argument);
}
