// Core bookkeeping against fake upstreams (fake addresses, as RMM's tests do), with the is_valid()
// walk after every step. The cases every upstream and adaptor must pass are in test_conformance.cc.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "core/pool.h"
#include "upstreams/fake.h"
#include "upstreams/host_mmap.h"
#include "workload.h"

using namespace torchpool;
using torchpool::testing::random_workload;


TEST_CASE("large blocks are split and coalesced") {
  auto up = std::make_shared<FakeUpstream>();
  CachingAllocator a(up, {});
  void* p1 = a.allocate(8 << 20);
  a.free(p1);  // segment of 8 MiB now free
  void* p2 = a.allocate(3 << 20);
  void* p3 = a.allocate(3 << 20);  // both carved from the cached 8 MiB segment
  CHECK(up->map_calls() == 1);
  CHECK(reinterpret_cast<uintptr_t>(p3) == reinterpret_cast<uintptr_t>(p2) + (3 << 20));
  CHECK(a.stats().inactive_split_bytes.current == (2 << 20));
  a.free(p2);
  a.free(p3);
  CHECK(a.stats().inactive_split_bytes.current == 0);  // merged back into one block
  void* p4 = a.allocate(8 << 20);
  CHECK(p4 == p1);
  a.free(p4);
  CHECK(a.check() == "");
}

TEST_CASE("parked class blocks are reclaimed before a new small segment is mapped") {
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.pool.max_class_bytes = kSmallRequestLimit;  // classes up to 1 MiB (the default stops at 16 KiB)
  CachingAllocator a(up, cfg);
  std::vector<void*> ps;
  for (int i = 0; i < 16; ++i) ps.push_back(a.allocate(128 << 10));  // fills one 2 MiB small segment
  for (void* p : ps) a.free(p);
  CHECK(a.stats().cached_class_bytes.current == (2 << 20));
  const auto maps = up->map_calls();
  void* big = a.allocate(900 << 10);  // another class: parked blocks must be merged, not a new segment
  CHECK(up->map_calls() == maps);
  CHECK(a.stats().num_reclaims == 1);
  a.free(big);
  CHECK(a.check() == "");
}

TEST_CASE("max_bytes: out of memory names the state, then the allocator keeps working") {
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.max_bytes = 16 << 20;
  CachingAllocator a(up, cfg);
  void* p = a.allocate(10 << 20);
  try {
    a.allocate(10 << 20);
    FAIL("expected OutOfMemory");
  } catch (const OutOfMemory& e) {
    const std::string m = e.what();
    CHECK(m.find("tried to allocate 10.00 MiB") != std::string::npos);
    CHECK(m.find("reserved") != std::string::npos);
    CHECK(m.find("max_bytes=16.00 MiB") != std::string::npos);
  }
  CHECK(a.stats().num_ooms == 1);
  CHECK(a.stats().num_alloc_retries == 1);
  a.free(p);
  void* q = a.allocate(12 << 20);  // the cached 10 MiB segment is released on retry
  CHECK(q != nullptr);
  a.free(q);
  CHECK(a.check() == "");
}

TEST_CASE("upstream failure is retried after releasing the cache") {
  auto up = std::make_shared<FakeUpstream>();
  CachingAllocator a(up, {});
  a.free(a.allocate(4 << 20));
  up->fail_next(1);
  void* p = a.allocate(6 << 20);  // first map fails, retry after empty_cache succeeds
  CHECK(p != nullptr);
  CHECK(a.stats().num_alloc_retries == 1);
  CHECK(a.stats().num_ooms == 0);
  a.free(p);
}

TEST_CASE("max_cached_bytes returns free segments beyond the limit") {
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.pool.max_cached_bytes = 8 << 20;
  CachingAllocator a(up, cfg);
  std::vector<void*> ps;
  for (int i = 0; i < 6; ++i) ps.push_back(a.allocate(4 << 20));
  for (void* p : ps) a.free(p);
  const auto s = a.stats();
  CHECK(s.reserved_bytes.current - s.allocated_bytes.current <= (8 << 20));
  CHECK(s.num_upstream_unmaps >= 4);
}

TEST_CASE("threads: concurrent allocation and cross-thread frees keep every invariant") {
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.arenas = 4;
  CachingAllocator a(up, cfg);
  constexpr int kThreads = 4;
  std::vector<std::vector<void*>> handoff(kThreads);
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      std::vector<void*> mine;
      for (int i = 0; i < 20000; ++i) {
        if (mine.size() < 64 || rng() % 2) {
          mine.push_back(a.allocate(1 + rng() % ((rng() % 50) ? 8192 : (4u << 20))));
        } else {
          const size_t k = rng() % mine.size();
          a.free(mine[k]);
          mine[k] = mine.back();
          mine.pop_back();
        }
      }
      handoff[t] = std::move(mine);
    });
  }
  for (auto& t : ts) t.join();
  // free every thread's leftovers from other threads
  std::vector<std::thread> freers;
  for (int t = 0; t < kThreads; ++t)
    freers.emplace_back([&, t] {
      for (void* p : handoff[(t + 1) % kThreads]) a.free(p);
    });
  for (auto& t : freers) t.join();
  CHECK(a.check() == "");
  CHECK(a.stats().allocated_bytes.current == 0);
}

TEST_CASE("size_classes=false serves small requests best-fit") {
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.pool.size_classes = false;
  CachingAllocator a(up, cfg);
  void* p = a.allocate(1000);
  CHECK(a.block_size(p).first == 1024);
  CHECK(a.stats().num_class_hits + a.stats().num_class_misses == 0);
  a.free(p);
  random_workload(a, 3, 1000, true);
}

TEST_CASE("alignment 512: class blocks stay aligned") {
  auto up = std::make_shared<FakeUpstream>();
  AllocatorConfig cfg;
  cfg.pool.alignment = 512;
  CachingAllocator a(up, cfg);
  std::vector<void*> ps;
  for (size_t n : {1ul, 100ul, 513ul, 1100ul, 3000ul, 70000ul}) {
    for (int i = 0; i < 5; ++i) {
      void* p = a.allocate(n);
      CHECK(reinterpret_cast<uintptr_t>(p) % 512 == 0);
      ps.push_back(p);
    }
  }
  for (void* p : ps) a.free(p);
  CHECK(a.check() == "");
}

TEST_CASE("host memory is really usable") {
  CachingAllocator a(std::make_shared<HostMmapUpstream>(), {});
  auto* p = static_cast<unsigned char*>(a.allocate(40 << 20));
  for (size_t i = 0; i < (40u << 20); i += 4096) p[i] = static_cast<unsigned char>(i >> 12);
  CHECK(p[4096 * 7] == 7);
  a.free(p);
}

// ---- Note [Holes in expandable segments], Note [Reserve target] ----------------------------------

namespace {
constexpr size_t MiB = size_t{1} << 20;
std::shared_ptr<FakeUpstream> fake_expandable(size_t capacity = SIZE_MAX) {
  return std::make_shared<FakeUpstream>(capacity, 2 * MiB, size_t{1} << 40);
}
}  // namespace

TEST_CASE("expandable: a free hole in the middle gives its chunks back and is mapped again on reuse") {
  auto up = fake_expandable();
  CachingAllocator a(up, {});
  void* x = a.allocate(4 * MiB);
  void* y = a.allocate(4 * MiB);
  void* z = a.allocate(4 * MiB);
  CHECK(up->mapped() == 12 * MiB);
  a.free(y);
  CHECK(up->mapped() == 12 * MiB);  // cached: nothing asks for it back yet
  a.empty_cache();
  CHECK(up->mapped() == 8 * MiB);   // the interior hole is unmapped, x and z stay
  CHECK(a.stats().reserved_bytes.current == 8 * MiB);
  CHECK(a.check() == "");
  void* y2 = a.allocate(4 * MiB);   // best fit puts it in the hole: its chunks are mapped again
  CHECK(y2 == y);
  CHECK(up->mapped() == 12 * MiB);
  CHECK(a.check() == "");
  for (void* p : {x, y2, z}) a.free(p);
  a.empty_cache();
  CHECK(up->mapped() == 0);
  CHECK(a.stats().segment.current == 0);
}

TEST_CASE("expandable: size-class blocks come from their own expandable segment") {
  auto up = fake_expandable();
  CachingAllocator a(up, {});
  std::vector<void*> small;
  for (int i = 0; i < 64; ++i) small.push_back(a.allocate(100 << 10));  // 6.4 MB of 100 KiB blocks
  const auto snap = a.snapshot();
  size_t small_segments = 0;
  for (const auto& seg : snap) small_segments += seg.small;
  CHECK(small_segments == 1);
  for (const auto& seg : snap) CHECK(seg.expandable);
  for (void* p : small) a.free(p);
  a.empty_cache();
  CHECK(up->mapped() == 0);
  CHECK(a.check() == "");
}

TEST_CASE("expandable: a chunk that cannot be mapped leaves the allocator as it was") {
  auto up = fake_expandable(16 * MiB);
  AllocatorConfig cfg;
  CachingAllocator a(up, cfg);
  void* x = a.allocate(6 * MiB);
  void* y = a.allocate(6 * MiB);
  CHECK_THROWS_AS(a.allocate(6 * MiB), OutOfMemory);  // 18 MiB > 16 MiB of capacity
  CHECK(a.check() == "");
  CHECK(up->mapped() == 12 * MiB);
  a.free(x);
  void* z = a.allocate(6 * MiB);  // fits again
  CHECK(z != nullptr);
  up->fail_next(1);
  a.free(z);
  a.empty_cache();
  void* w = a.allocate(5 * MiB);  // the first chunk map fails, the retry succeeds
  CHECK(w != nullptr);
  CHECK(a.stats().num_alloc_retries >= 1);
  CHECK(a.check() == "");
  a.free(w);
  a.free(y);
}

TEST_CASE("reserve target: free segments are returned before a new mapping would exceed it") {
  for (double ratio : {0.0, 1.1}) {
    CAPTURE(ratio);
    auto up = std::make_shared<FakeUpstream>();
    AllocatorConfig cfg;
    cfg.pool.max_reserved_ratio = ratio;
    CachingAllocator a(up, cfg);
    std::vector<void*> ps;
    for (int i = 0; i < 10; ++i) ps.push_back(a.allocate(4 * MiB));
    for (void* p : ps) a.free(p);
    void* big = a.allocate(44 * MiB);  // fits no cached segment
    CHECK(a.check() == "");
    if (ratio == 0) {
      CHECK(up->mapped() == 84 * MiB);  // 40 cached + 44
      CHECK(a.stats().num_target_releases == 0);
    } else {
      CHECK(up->mapped() <= 44 * MiB + 2 * 2 * MiB);  // target = max(1.1 x 44 MiB, 44 MiB + 2 segments)
      CHECK(a.stats().num_target_releases == 1);
    }
    a.free(big);
  }
}

TEST_CASE("reserve target: a repeated step reaches a steady state with no new mappings") {
  auto up = fake_expandable();
  AllocatorConfig cfg;
  cfg.pool.max_reserved_ratio = 1.05;
  CachingAllocator a(up, cfg);
  std::mt19937_64 rng(7);
  std::vector<size_t> step;
  for (int i = 0; i < 40; ++i) step.push_back((1 + rng() % 3000) << 10);  // 1 KiB .. 3 MiB
  uint64_t maps_after_first = 0;
  for (int it = 0; it < 5; ++it) {
    std::vector<void*> live;
    for (size_t n : step) live.push_back(a.allocate(n));
    for (size_t i = 0; i < live.size(); i += 2) a.free(live[i]);
    for (size_t i = 1; i < live.size(); i += 2) a.free(live[i]);
    REQUIRE(a.check() == "");
    if (it == 0) maps_after_first = up->map_calls();
  }
  CHECK(up->map_calls() == maps_after_first);
  const auto s = a.stats();
  CHECK(static_cast<double>(s.reserved_bytes.peak) <= 1.05 * static_cast<double>(s.allocated_bytes.peak) + 4.0 * MiB);
}

TEST_CASE("reserve target: random workloads on both kinds of segments keep every invariant") {
  for (bool expandable : {false, true}) {
    CAPTURE(expandable);
    std::shared_ptr<Upstream> up = expandable ? std::static_pointer_cast<Upstream>(fake_expandable())
                                              : std::make_shared<FakeUpstream>();
    AllocatorConfig cfg;
    cfg.pool.max_reserved_ratio = 1.02;
    cfg.pool.max_cached_bytes = 16 * MiB;
    CachingAllocator a(up, cfg);
    random_workload(a, 11 + expandable, 3000, true);
  }
}

TEST_CASE("lent class blocks count as cached, are never handed out twice and come back parked") {
  for (size_t reservation : {size_t{0}, size_t{64} << 20}) {  // ordinary and expandable segments
    CAPTURE(reservation);
    FakeUpstream up(SIZE_MAX, 2u << 20, reservation);
    Pool pool(up, {});
    REQUIRE(pool.class_for(1) >= 0);
    CHECK(pool.class_for(kSmallRequestLimit) == -1);  // above max_class_bytes: best fit
    const auto cls = static_cast<uint32_t>(pool.class_for(1000));
    const size_t bytes = class_bytes(cls);
    Block* parked = pool.allocate(1000);  // one block parked on the class list before lending
    REQUIRE(parked != nullptr);
    pool.free(parked);
    REQUIRE(pool.stats().cached_class_bytes.current == static_cast<int64_t>(bytes));
    Block* lent[8];
    REQUIRE(pool.lend(cls, 0, lent, 8) == 8);
    CHECK(lent[0] == parked);  // the class list first
    CHECK(pool.check() == "");
    CHECK(pool.lent_bytes() == 8 * bytes);
    CHECK(pool.stats().allocated_bytes.current == 0);
    CHECK(pool.stats().requested_bytes.current == 0);
    CHECK(pool.stats().active_bytes.current == 0);
    CHECK(pool.stats().cached_class_bytes.current == static_cast<int64_t>(8 * bytes));
    CHECK(pool.stats().classes[cls].cached_blocks == 8);
    // While lent, the pool serves the class from elsewhere and never returns their segment.
    Block* other = pool.allocate(1000);
    REQUIRE(other != nullptr);
    for (Block* b : lent) CHECK(b != other);
    pool.free(other);
    pool.release_cached();
    CHECK(pool.stats().reserved_bytes.current > 0);
    CHECK(pool.check() == "");
    size_t shown_lent = 0;  // the pool shows them as they are; CachingAllocator::snapshot() converts
    for (const SegmentView& s : pool.snapshot())
      for (const BlockView& b : s.blocks)
        if (b.state == Block::kLent) {
          ++shown_lent;
          CHECK(b.requested == 0);
        }
    CHECK(shown_lent == 8);
    pool.take_back(lent, 8);
    CHECK(pool.lent_bytes() == 0);
    CHECK(pool.check() == "");
    CHECK(pool.stats().cached_class_bytes.current == static_cast<int64_t>(8 * bytes));
    pool.release_cached();  // now everything can go back
    CHECK(pool.stats().reserved_bytes.current == 0);
    CHECK(pool.stats().cached_class_bytes.current == 0);
    CHECK(pool.check() == "");
  }
}

TEST_CASE("lend stops short when the upstream refuses memory and leaves the pool valid") {
  FakeUpstream up(2u << 20);  // one small segment at most
  Pool pool(up, {});
  const auto cls = static_cast<uint32_t>(pool.class_for(16u << 10));
  std::vector<Block*> lent(1000);
  const size_t k = pool.lend(cls, 0, lent.data(), lent.size());
  CHECK(k == (2u << 20) / class_bytes(cls));
  CHECK(pool.check() == "");
  CHECK(pool.stats().cached_class_bytes.current == static_cast<int64_t>(k * class_bytes(cls)));
  pool.take_back(lent.data(), k);
  CHECK(pool.check() == "");
}
