// One conformance suite for every upstream and every upstream adaptor (upstream.h's contract, then a
// CachingAllocator over each), instantiated for: fake, fake expandable, host_mmap (with and without
// huge pages), host_vmm (expandable and plain), host_pinned, the fake CUDA driver (device memory,
// VMM, pinned host memory), LimitingUpstream and TracingUpstream (over fake and real upstreams).
// Every subject must refuse a request it cannot serve without throwing, and keep working after it.
// An upstream that cannot run here is skipped with its reason in the output.
#include <doctest/doctest.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "workload.h"
#include "core/limiting_upstream.h"
#include "core/tracing_upstream.h"
#include "upstreams/cuda_driver.h"
#include "upstreams/cuda_pinned.h"
#include "upstreams/fake.h"
#include "upstreams/host_mmap.h"
#include "upstreams/host_pinned.h"
#include "upstreams/host_vmm.h"

using namespace torchpool;
using torchpool::testing::random_workload;
using torchpool::testing::touch;

namespace {
constexpr size_t MiB = size_t{1} << 20;
constexpr size_t GiB = size_t{1} << 30;
// Larger than any x86-64 or aarch64 user address space (128 TiB / 256 TiB): no host upstream can map it.
constexpr size_t kBeyondAddressSpace = size_t{1} << 50;

struct Subject {
  std::string name;
  std::function<std::shared_ptr<Upstream>()> make;
  size_t too_large;        // a mapping this subject must refuse (nullptr / false, never a throw)
  bool real_memory;        // its addresses can be written
  std::string skip;        // non-empty: why this subject cannot run here
};

// An adaptor together with what it needs to live (aliasing shared_ptr: the adaptor is the pointee).
template <class Holder>
std::shared_ptr<Upstream> hold(std::shared_ptr<Holder> h, Upstream* adaptor) {
  return std::shared_ptr<Upstream>(std::move(h), adaptor);
}

std::shared_ptr<Upstream> traced(std::shared_ptr<Upstream> inner) {
  struct Holder {
    TraceRing ring;
    std::unique_ptr<TracingUpstream> up;
  };
  auto h = std::make_shared<Holder>();
  h->ring.start(1 << 16);  // recording, so every call goes through the recording path
  h->up = std::make_unique<TracingUpstream>(std::move(inner), h->ring, 0);
  Upstream* a = h->up.get();
  return hold(std::move(h), a);
}

#ifdef TORCHPOOL_FAKE_CUDA_PATH
// The fake driver reached the real way (TORCHPOOL_CUDA_DRIVER + dlopen), reset to a clean state, as
// test_cuda_fake.cc does: other cases inject failures and change capacities.
CudaDriver* fake_cuda(std::string* why) {
  ::setenv("TORCHPOOL_CUDA_DRIVER", TORCHPOOL_FAKE_CUDA_PATH, 1);
  CudaDriver* d = CudaDriver::get(why);
  if (!d) return nullptr;
  void* h = ::dlopen(TORCHPOOL_FAKE_CUDA_PATH, RTLD_NOW | RTLD_NOLOAD);
  if (!h) {
    *why = "the fake CUDA driver is not loaded";
    return nullptr;
  }
  auto call = [&](const char* sym, auto arg) {
    using F = void (*)(decltype(arg));
    if (auto f = reinterpret_cast<F>(::dlsym(h, sym))) f(arg);
  };
  auto call0 = [&](const char* sym) {
    if (auto f = reinterpret_cast<void (*)()>(::dlsym(h, sym))) f();
  };
  call("fake_cuda_set_capacity", size_t{8} << 30);
  call("fake_cuda_fail_next", 0);
  call("fake_cuda_set_sticky", 0);
  call0("fake_cuda_complete_all");
  call0("fake_cuda_clear_hazards");
  call0("fake_cuda_clear_context");
  CudaDriver::clear_error();
  return d;
}
#endif

// host_pinned maps populated memory and tries mlock; where even the mapping is refused (a sandbox
// without MAP_POPULATE, say) it cannot be tested here.
std::string host_pinned_skip() {
  HostPinnedUpstream up;
  void* p = up.map(up.granularity(), 0);
  if (!p) return "host_pinned cannot map one page here (mmap with MAP_POPULATE refused)";
  up.unmap(p, up.granularity(), 0);
  return "";
}

std::vector<Subject> subjects() {
  std::vector<Subject> out;
  out.push_back({"fake", [] { return std::make_shared<FakeUpstream>(4 * GiB); }, 8 * GiB, false, ""});
  out.push_back({"fake_expandable", [] { return std::make_shared<FakeUpstream>(4 * GiB, 2 * MiB, 64 * GiB); }, 8 * GiB,
                 false, ""});
  out.push_back({"host_mmap", [] { return std::make_shared<HostMmapUpstream>(); }, kBeyondAddressSpace, true, ""});
  out.push_back({"host_mmap_huge_pages", [] { return std::make_shared<HostMmapUpstream>(HostMmapOptions{true}); },
                 kBeyondAddressSpace, true, ""});
  out.push_back({"host_vmm", [] {
                   HostVmmOptions o;
                   o.reservation_bytes = 4 * GiB;
                   return std::make_shared<HostVmmUpstream>(o);
                 }, kBeyondAddressSpace, true, ""});
  out.push_back({"host_vmm_plain", [] {
                   HostVmmOptions o;
                   o.expandable = false;
                   return std::make_shared<HostVmmUpstream>(o);
                 }, kBeyondAddressSpace, true, ""});
  out.push_back({"host_pinned", [] { return std::make_shared<HostPinnedUpstream>(); }, kBeyondAddressSpace, true,
                 host_pinned_skip()});
  // Adaptors, over a fake (counts exact) and over real memory.
  out.push_back({"limiting(fake)", [] { return std::make_shared<LimitingUpstream>(std::make_shared<FakeUpstream>(), 2 * GiB); },
                 4 * GiB, false, ""});
  out.push_back({"limiting(fake_expandable)", [] {
                   return std::make_shared<LimitingUpstream>(std::make_shared<FakeUpstream>(SIZE_MAX, 2 * MiB, 64 * GiB), 2 * GiB);
                 }, 4 * GiB, false, ""});
  out.push_back({"limiting(host_vmm)", [] {
                   HostVmmOptions o;
                   o.reservation_bytes = 4 * GiB;
                   return std::make_shared<LimitingUpstream>(std::make_shared<HostVmmUpstream>(o), 1 * GiB);
                 }, 2 * GiB, true, ""});
  out.push_back({"tracing(fake)", [] { return traced(std::make_shared<FakeUpstream>(4 * GiB)); }, 8 * GiB, false, ""});
  out.push_back({"tracing(fake_expandable)", [] { return traced(std::make_shared<FakeUpstream>(4 * GiB, 2 * MiB, 64 * GiB)); },
                 8 * GiB, false, ""});
  out.push_back({"tracing(limiting(host_mmap))", [] {
                   return traced(std::make_shared<LimitingUpstream>(std::make_shared<HostMmapUpstream>(), 1 * GiB));
                 }, 2 * GiB, true, ""});
#ifdef TORCHPOOL_FAKE_CUDA_PATH
  // Fake device memory is host memory behind the fake driver, so it can be written; capacity 8 GiB.
  out.push_back({"cuda (fake driver)", [] {
                   std::string why;
                   CudaDriver* d = fake_cuda(&why);
                   REQUIRE_MESSAGE(d != nullptr, why);
                   return std::make_shared<CudaDeviceUpstream>(*d, 0);
                 }, 16 * GiB, true, ""});
  out.push_back({"cuda_vmm (fake driver)", [] {
                   std::string why;
                   CudaDriver* d = fake_cuda(&why);
                   REQUIRE_MESSAGE(d != nullptr, why);
                   return std::make_shared<CudaVmmUpstream>(*d, 0, 1 * GiB);
                 }, 16 * GiB, true, ""});
  out.push_back({"cuda_pinned (fake driver)", [] {
                   std::string why;
                   CudaDriver* d = fake_cuda(&why);
                   REQUIRE_MESSAGE(d != nullptr, why);
                   return std::make_shared<CudaPinnedUpstream>(*d, 0);
                 }, kBeyondAddressSpace, true, ""});
#else
  for (const char* n : {"cuda (fake driver)", "cuda_vmm (fake driver)", "cuda_pinned (fake driver)"})
    out.push_back({n, nullptr, 0, false, "built without the fake CUDA driver (TORCHPOOL_FAKE_CUDA_PATH)"});
#endif
  return out;
}


bool runnable(const Subject& s) {
  if (s.skip.empty()) return true;
  std::printf("conformance: %s SKIPPED: %s\n", s.name.c_str(), s.skip.c_str());
  return false;
}

}  // namespace

TEST_CASE("conformance: the upstream contract, for every upstream and adaptor") {
  for (const Subject& s : subjects()) {
    if (!runnable(s)) continue;
    CAPTURE(s.name);
    auto up = s.make();
    const size_t g = up->granularity();
    REQUIRE(g > 0);
    CHECK((g & (g - 1)) == 0);
    CHECK(up->name() != nullptr);

    // map / unmap, twice over, with the memory written where it is real
    for (int round = 0; round < 2; ++round) {
      void* p = up->map(2 * g, 0);
      REQUIRE(p != nullptr);
      if (s.real_memory) touch(p, 2 * g);
      up->unmap(p, 2 * g, 0);
    }

    // a request that must be refused: nullptr, no exception, and the upstream keeps working
    void* big = nullptr;
    CHECK_NOTHROW(big = up->map(s.too_large, 0));
    CHECK(big == nullptr);
    void* p = up->map(g, 0);
    REQUIRE(p != nullptr);
    if (s.real_memory) touch(p, g);
    up->unmap(p, g, 0);

    if (!up->can_expand()) continue;
    // expandable: reserve address space, put memory behind chunks, take it away, map again
    CHECK(up->reservation_bytes() % g == 0);
    void* base = up->reserve(8 * g, 0);
    REQUIRE(base != nullptr);
    CHECK(reinterpret_cast<uintptr_t>(base) % g == 0);
    auto* at = static_cast<char*>(base);
    REQUIRE(up->map_chunk(at, 2 * g, 0));
    REQUIRE(up->map_chunk(at + 4 * g, g, 0));
    if (s.real_memory) {
      touch(at, 2 * g);
      touch(at + 4 * g, g);
    }
    up->unmap_chunk(at + g, g, 0);  // part of a mapped range
    REQUIRE(up->map_chunk(at + g, g, 0));
    if (s.real_memory) touch(at + g, g);
    up->unmap_chunk(at, 2 * g, 0);
    up->unmap_chunk(at + 4 * g, g, 0);
    up->unreserve(base, 8 * g, 0);
  }
}

TEST_CASE("conformance: a caching allocator over every upstream and adaptor") {
  for (const Subject& s : subjects())
  for (bool tcache : {false, true}) {  // Note [Thread caches]: the same contract with them on
    if (!runnable(s)) continue;
    CAPTURE(s.name);
    CAPTURE(tcache);
    AllocatorConfig cfg;
    cfg.thread_cache = tcache;
    auto a = std::make_unique<CachingAllocator>(s.make(), cfg);

    SUBCASE("zero bytes is nullptr and freeing nullptr is a no-op") {
      CHECK(a->allocate(0) == nullptr);
      CHECK(a->free(nullptr));
    }
    SUBCASE("blocks do not overlap and sizes are kept") {
      std::vector<std::pair<uintptr_t, size_t>> blocks;
      for (size_t n : {1ul, 63ul, 64ul, 65ul, 1000ul, 4096ul, 100000ul, (1ul << 20) + 1, 5ul << 20, 33ul << 20}) {
        void* p = a->allocate(n);
        auto [size, requested] = a->block_size(p);
        CHECK(size >= n);
        CHECK(requested == n);
        if (s.real_memory) touch(p, n);
        blocks.push_back({reinterpret_cast<uintptr_t>(p), size});
      }
      std::sort(blocks.begin(), blocks.end());
      for (size_t i = 1; i < blocks.size(); ++i) CHECK(blocks[i - 1].first + blocks[i - 1].second <= blocks[i].first);
      for (auto& [p, sz] : blocks) CHECK(a->free(reinterpret_cast<void*>(p)));
      CHECK(a->check() == "");
      CHECK(a->stats().allocated_bytes.current == 0);
    }
    SUBCASE("a freed block is reused for the same size without a new segment") {
      void* p = a->allocate(3000);
      const auto maps = a->stats().num_upstream_maps;
      a->free(p);
      void* q = a->allocate(3000);
      CHECK(q == p);
      CHECK(a->stats().num_upstream_maps == maps);
      a->free(q);
    }
    SUBCASE("foreign pointers are refused") {
      int x;
      CHECK_FALSE(a->free(&x));
      CHECK_FALSE(a->owns(&x));
    }
    SUBCASE("requests that must throw: OutOfMemory, and the allocator keeps working") {
      void* keep = a->allocate(5000);  // live across the failures
      const auto reserved = a->stats().reserved_bytes.current;
      // beyond any allocation: refused at once, the cache is not touched
      CHECK_THROWS_AS(a->allocate(CachingAllocator::kMaxRequestBytes + 1), OutOfMemory);
      CHECK(a->stats().num_ooms == 1);
      CHECK(a->stats().num_alloc_retries == 0);
      CHECK(a->stats().reserved_bytes.current == reserved);
      // more than the upstream can give: refused after the retry
      try {
        a->allocate(s.too_large);
        FAIL("allocate(" << s.too_large << ") did not throw");
      } catch (const OutOfMemory& e) {
        CHECK(e.requested() == s.too_large);
        CHECK(std::string(e.what()).find("out of memory") != std::string::npos);
      }
      CHECK(a->stats().num_ooms == 2);
      CHECK(a->stats().num_alloc_retries == 1);
      CHECK(a->check() == "");
      // still usable, small and large
      CHECK(a->block_size(keep).second == 5000);
      void* p = a->allocate(1000);
      void* q = a->allocate(3 * MiB);
      REQUIRE(p != nullptr);
      REQUIRE(q != nullptr);
      if (s.real_memory) {
        touch(keep, 5000);
        touch(p, 1000);
        touch(q, 3 * MiB);
      }
      CHECK(a->free(p));
      CHECK(a->free(q));
      CHECK(a->free(keep));
      a->empty_cache();
      CHECK(a->stats().reserved_bytes.current == 0);
      CHECK(a->check() == "");
    }
    SUBCASE("empty_cache returns every free segment") {
      random_workload(*a, 7, 500, false, s.real_memory);
      CHECK(a->stats().reserved_bytes.current > 0);
      a->empty_cache();
      CHECK(a->stats().reserved_bytes.current == 0);
      CHECK(a->check() == "");
    }
    SUBCASE("random workload keeps every invariant") { random_workload(*a, 1, 2000, true, s.real_memory); }
  }
}

// ---- the adaptors' own behaviour ------------------------------------------------------------

TEST_CASE("limiting upstream: the limit is exact, refusals take nothing, and unmapping gives bytes back") {
  auto fake = std::make_shared<FakeUpstream>(SIZE_MAX, 2 * MiB, 64 * MiB);
  LimitingUpstream up(fake, 8 * MiB);
  std::vector<void*> got;
  for (int i = 0; i < 4; ++i) got.push_back(up.map(2 * MiB, 0));
  for (void* p : got) REQUIRE(p != nullptr);
  CHECK(up.limit().taken() == 8 * MiB);
  const auto calls = fake->map_calls();
  CHECK(up.map(2 * MiB, 0) == nullptr);  // past the limit: the upstream is not even asked
  CHECK(fake->map_calls() == calls);
  up.unmap(got.back(), 2 * MiB, 0);
  got.pop_back();
  CHECK(up.limit().taken() == 6 * MiB);
  // the upstream itself refuses: the bytes taken for the attempt are given back
  fake->fail_next(1);
  CHECK(up.map(2 * MiB, 0) == nullptr);
  CHECK(up.limit().taken() == 6 * MiB);
  // chunks count against the same limit; reservations (address space) do not
  void* base = up.reserve(16 * MiB, 0);
  REQUIRE(base != nullptr);
  CHECK(up.limit().taken() == 6 * MiB);
  CHECK(up.map_chunk(base, 2 * MiB, 0));
  CHECK(up.limit().taken() == 8 * MiB);
  CHECK_FALSE(up.map_chunk(static_cast<char*>(base) + 2 * MiB, 2 * MiB, 0));
  up.unmap_chunk(base, 2 * MiB, 0);
  CHECK(up.limit().taken() == 6 * MiB);
  fake->fail_next(1);
  CHECK_FALSE(up.map_chunk(base, 2 * MiB, 0));
  CHECK(up.limit().taken() == 6 * MiB);
  up.unreserve(base, 16 * MiB, 0);
  for (void* p : got) up.unmap(p, 2 * MiB, 0);
  CHECK(up.limit().taken() == 0);
  CHECK(fake->mapped() == 0);
  // a size whose count would overflow is refused, not wrapped
  ByteLimit unlimited;
  CHECK(unlimited.try_take(SIZE_MAX - 1));
  CHECK_FALSE(unlimited.try_take(2));
  CHECK(unlimited.taken() == SIZE_MAX - 1);
}

TEST_CASE("limiting upstream: one limit shared by two adaptors, and by every arena of an allocator") {
  auto limit = std::make_shared<ByteLimit>(6 * MiB);
  auto fake = std::make_shared<FakeUpstream>();
  LimitingUpstream a(fake, limit), b(fake, limit);
  void* p = a.map(4 * MiB, 0);
  REQUIRE(p != nullptr);
  CHECK(b.map(4 * MiB, 0) == nullptr);
  void* q = b.map(2 * MiB, 0);
  REQUIRE(q != nullptr);
  CHECK(limit->taken() == 6 * MiB);
  a.unmap(p, 4 * MiB, 0);
  b.unmap(q, 2 * MiB, 0);
  CHECK(limit->taken() == 0);

  // max_bytes is one limit for the whole allocator, whichever arenas the requests land in
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.arenas = 4;
  cfg.max_bytes = 8 * MiB;
  CachingAllocator alloc(up, cfg);
  std::vector<void*> blocks;
  std::vector<std::thread> threads;
  std::mutex mu;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      void* x = alloc.allocate(1000);  // a small segment in this thread's arena
      std::lock_guard<std::mutex> g(mu);
      blocks.push_back(x);
    });
  for (auto& t : threads) t.join();
  CHECK(up->mapped() <= 8 * MiB);
  for (;;) {  // 2 MiB blocks until the limit refuses
    void* x = nullptr;
    try {
      x = alloc.allocate(2 * MiB);
    } catch (const OutOfMemory& e) {
      CHECK(std::string(e.what()).find("limit max_bytes=8.00 MiB") != std::string::npos);
      break;
    }
    blocks.push_back(x);
    REQUIRE(up->mapped() <= 8 * MiB);
  }
  CHECK(up->mapped() <= 8 * MiB);
  CHECK(up->mapped() > 6 * MiB);  // refused only because the next 2 MiB would pass the limit
  for (void* x : blocks) CHECK(alloc.free(x));
  void* big = alloc.allocate(8 * MiB);  // the retry releases every arena's free segments
  CHECK(big != nullptr);
  CHECK(up->mapped() == 8 * MiB);
  CHECK(alloc.free(big));
  CHECK(alloc.check() == "");
}

TEST_CASE("tracing upstream: every mapping it forwards is an event, refusals and reservations are not") {
  auto fake = std::make_shared<FakeUpstream>(8 * MiB, 2 * MiB, 64 * MiB);
  TraceRing ring;
  TracingUpstream up(fake, ring, 3);
  void* quiet = up.map(2 * MiB, 5);  // not recording: nothing
  REQUIRE(quiet != nullptr);
  ring.start(64);
  void* p = up.map(2 * MiB, 5);
  REQUIRE(p != nullptr);
  CHECK(up.map(64 * MiB, 5) == nullptr);  // refused: no event
  void* base = up.reserve(16 * MiB, 5);
  REQUIRE(base != nullptr);
  REQUIRE(up.map_chunk(base, 2 * MiB, 5));
  fake->fail_next(1);
  CHECK_FALSE(up.map_chunk(static_cast<char*>(base) + 2 * MiB, 2 * MiB, 5));
  up.unmap_chunk(base, 2 * MiB, 5);
  up.unreserve(base, 16 * MiB, 5);
  up.unmap(p, 2 * MiB, 5);
  const auto events = ring.stop();
  up.unmap(quiet, 2 * MiB, 5);
  REQUIRE(events.size() == 4);
  const auto addr = [](const void* x) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(x)); };
  const TraceOp ops[] = {TraceOp::kSegmentMap, TraceOp::kSegmentMap, TraceOp::kSegmentUnmap, TraceOp::kSegmentUnmap};
  const uint64_t addrs[] = {addr(p), addr(base), addr(base), addr(p)};
  for (size_t i = 0; i < 4; ++i) {
    CAPTURE(i);
    CHECK(events[i].op == ops[i]);
    CHECK(events[i].addr == addrs[i]);
    CHECK(events[i].size == 2 * MiB);
    CHECK(events[i].requested == 0);
    CHECK(events[i].stream == 5);
    CHECK(events[i].device == 3);
  }
  CHECK(fake->mapped() == 0);
}

TEST_CASE("tracing upstream: an allocator's trace shows each segment mapped before the block it serves") {
  for (bool expandable : {false, true}) {
    CAPTURE(expandable);
    auto up = expandable ? std::make_shared<FakeUpstream>(SIZE_MAX, 2 * MiB, GiB) : std::make_shared<FakeUpstream>();
    AllocatorConfig cfg;
    cfg.device = 2;
    CachingAllocator a(up, cfg);
    a.trace().start(1024);
    void* p = a.allocate(5 * MiB);
    a.free(p);
    a.empty_cache();
    const auto ev = a.trace().stop();
    uint64_t mapped = 0, unmapped = 0;
    size_t first_map = ev.size(), alloc_at = ev.size();
    for (size_t i = 0; i < ev.size(); ++i) {
      CHECK(ev[i].device == 2);
      if (ev[i].op == TraceOp::kSegmentMap) {
        mapped += ev[i].size;
        first_map = std::min(first_map, i);
      }
      if (ev[i].op == TraceOp::kSegmentUnmap) unmapped += ev[i].size;
      if (ev[i].op == TraceOp::kAlloc) alloc_at = i;
    }
    CHECK(first_map < alloc_at);
    CHECK(alloc_at < ev.size());
    CHECK(mapped >= 5 * MiB);
    CHECK(mapped == unmapped);  // empty_cache gave back everything the trace saw mapped
    CHECK(up->mapped() == 0);
  }
}
