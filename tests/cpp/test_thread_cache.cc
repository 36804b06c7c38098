// Thread caches (Note [Thread caches], csrc/core/thread_cache.h): exact statistics, where a cache's
// blocks go back (empty_cache, thread exit, out of memory, the reserve target, the allocator's end),
// cross-thread frees and refused double frees.  The multi-thread stress with caches on is in
// test_stress.cc (also run under TSan), the allocator contract in test_conformance.cc.
#include <doctest/doctest.h>

#include <condition_variable>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "upstreams/fake.h"

using namespace torchpool;

namespace {

std::unique_ptr<CachingAllocator> make(bool tcache, unsigned arenas = 1, size_t max_bytes = 0,
                                       std::shared_ptr<FakeUpstream>* up_out = nullptr,
                                       size_t reservation = size_t{1} << 32) {  // 0: no expandable segments
  auto up = std::make_shared<FakeUpstream>(SIZE_MAX, 2u << 20, reservation);
  if (up_out) *up_out = up;
  AllocatorConfig c;
  c.thread_cache = tcache;
  c.arenas = arenas;
  c.max_bytes = max_bytes;
  return std::make_unique<CachingAllocator>(up, c);
}

// One thread's random mix of small and large requests; returns what is still live.
std::vector<void*> workload(CachingAllocator& a, uint64_t seed, int steps, bool free_all) {
  std::mt19937_64 rng(seed);
  std::vector<void*> live;
  for (int i = 0; i < steps; ++i) {
    if (live.empty() || rng() % 5 < 3) {
      const int k = rng() % 10;
      const size_t n = k < 7 ? 1 + rng() % 16384 : k < 9 ? 16385 + rng() % 200000 : (1u << 20) + rng() % (3u << 20);
      live.push_back(a.allocate(n));
    } else {
      const size_t j = rng() % live.size();
      REQUIRE(a.free(live[j]));
      live[j] = live.back();
      live.pop_back();
    }
  }
  if (free_all) {
    for (void* p : live) REQUIRE(a.free(p));
    live.clear();
  }
  return live;
}

// A handshake between the test and a thread it parks: phase(n) announces n, wait(n) waits for it.
struct Phases {
  std::mutex mu;
  std::condition_variable cv;
  int now = 0;
  void phase(int n) {
    {
      std::lock_guard<std::mutex> g(mu);
      now = n;
    }
    cv.notify_all();
  }
  void wait(int n) {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return now == n; });
  }
};

}  // namespace

TEST_CASE("thread cache: one thread's statistics are exactly those without the cache, peaks included") {
  for (unsigned arenas : {1u, 3u}) {
    CAPTURE(arenas);
    auto off = make(false, arenas);
    auto on = make(true, arenas);
    REQUIRE(on->thread_cache());
    REQUIRE_FALSE(off->thread_cache());
    auto live_off = workload(*off, 7, 20000, false);
    auto live_on = workload(*on, 7, 20000, false);
    CHECK(on->thread_cache_bytes() > 0);
    CHECK(on->check() == "");
    const Stats a = off->stats(), b = on->stats();
    for (auto [x, y] : {std::pair{&a.allocated_bytes, &b.allocated_bytes}, {&a.requested_bytes, &b.requested_bytes},
                        {&a.allocation, &b.allocation}, {&a.active_bytes, &b.active_bytes}}) {
      CHECK(x->current == y->current);
      CHECK(x->allocated == y->allocated);
      CHECK(x->freed == y->freed);
      if (arenas == 1) CHECK(x->peak == y->peak);  // several arenas: the sum of their peaks (Note [Arenas])
    }
    for (uint32_t c = 0; c < kNumSizeClasses; ++c) {
      CAPTURE(c);
      CHECK(a.classes[c].allocated_blocks == b.classes[c].allocated_blocks);
      CHECK(a.classes[c].requested_bytes == b.classes[c].requested_bytes);
      CHECK(a.classes[c].peak_allocated_blocks == b.classes[c].peak_allocated_blocks);
      CHECK(b.classes[c].cached_blocks >= 0);
    }
    // The cache's idle blocks are cached: allocated + cached class bytes + free covers reserved.
    CHECK(b.cached_class_bytes.current >= static_cast<int64_t>(on->thread_cache_bytes()));
    CHECK(on->live_blocks() == live_on.size());
    CHECK(b.num_class_hits > 0);
    for (void* p : live_off) off->free(p);
    for (void* p : live_on) on->free(p);
    CHECK(on->stats().allocated_bytes.current == 0);
    CHECK(on->stats().requested_bytes.current == 0);
    CHECK(on->check() == "");
    on->empty_cache();
    CHECK(on->thread_cache_bytes() == 0);
    CHECK(on->stats().reserved_bytes.current == 0);  // nothing stays behind in a cache
    CHECK(on->stats().cached_class_bytes.current == 0);
    CHECK(on->check() == "");
  }
}

TEST_CASE("thread cache: a pointer idle in a cache is not live: second free, owns and block_size refuse it") {
  auto a = make(true);
  void* p = a->allocate(100);
  CHECK(a->owns(p));
  CHECK(a->block_size(p) == std::pair<size_t, size_t>{128, 100});
  bool in_cache = false;
  for (const SegmentView& s : a->snapshot())
    for (const BlockView& b : s.blocks)
      if (b.addr == reinterpret_cast<uintptr_t>(p)) {
        in_cache = true;
        CHECK(b.state == Block::kAllocated);  // handed out by the cache: shown allocated
        CHECK(b.requested == 100);
      }
  CHECK(in_cache);
  CHECK(a->free(p));
  CHECK_FALSE(a->free(p));  // idle in the cache now
  CHECK_FALSE(a->owns(p));
  CHECK(a->block_size(p) == std::pair<size_t, size_t>{0, 0});
  CHECK(a->stats().allocation.current == 0);
  CHECK(a->check() == "");
  void* q = a->allocate(100);  // LIFO: the same block comes back
  CHECK(q == p);
  CHECK(a->free(q));
}

TEST_CASE("thread cache: frees from another thread land in that thread's cache; statistics stay exact") {
  auto a = make(true, 2);
  std::vector<void*> ptrs;
  for (int i = 0; i < 500; ++i) ptrs.push_back(a->allocate(64 + i % 2000));
  const Stats before = a->stats();
  CHECK(before.allocation.current == 500);
  std::thread t([&] {
    for (void* p : ptrs) CHECK(a->free(p));
    CHECK(a->check() == "");
    CHECK(a->stats().allocation.current == 0);  // this thread's counters went negative, the sum is exact
    CHECK(a->stats().allocated_bytes.current == 0);
    CHECK(a->stats().requested_bytes.current == 0);
  });
  t.join();  // its exit returns its cache to the arenas
  CHECK(a->thread_cache_bytes() <= 256u << 10);  // only this thread's own cache is left
  CHECK(a->stats().allocation.current == 0);
  CHECK(a->stats().allocation.allocated == 500);
  CHECK(a->stats().allocation.freed == 500);
  CHECK(a->check() == "");
}

TEST_CASE("thread cache: a thread's exit gives its cached blocks back; empty_cache drains a sleeping thread's") {
  auto a = make(true);
  Phases ph;
  std::thread t([&] {
    std::vector<void*> ps;
    for (int i = 0; i < 300; ++i) ps.push_back(a->allocate(512 + (i % 7) * 512));
    for (void* p : ps) a->free(p);
    ph.phase(1);
    ph.wait(2);  // idle, with a full cache, while the main thread drains it
    for (int i = 0; i < 100; ++i) a->free(a->allocate(1000));  // the cache works after the drain
  });
  ph.wait(1);
  CHECK(a->thread_cache_bytes() > 0);
  CHECK(a->check() == "");
  a->empty_cache();
  CHECK(a->thread_cache_bytes() == 0);
  CHECK(a->stats().reserved_bytes.current == 0);
  ph.phase(2);
  t.join();
  CHECK(a->thread_cache_bytes() == 0);  // the thread's exit drained what it cached after
  CHECK(a->check() == "");
  a->empty_cache();
  CHECK(a->stats().reserved_bytes.current == 0);
}

TEST_CASE("thread cache: out of memory drains every cache before it gives up") {
  std::shared_ptr<FakeUpstream> up;
  auto a = make(true, 1, 4u << 20, &up);  // max_bytes: two 2 MiB segments
  Phases ph;
  std::thread t([&] {
    std::vector<void*> ps;
    for (int i = 0; i < 64; ++i) ps.push_back(a->allocate(1024));
    for (void* p : ps) a->free(p);  // some stay in this thread's cache, keeping a small segment
    ph.phase(1);
    ph.wait(2);
  });
  ph.wait(1);
  CHECK(a->thread_cache_bytes() > 0);
  void* big = a->allocate(4u << 20);  // only fits if the other thread's cache gives its segment back
  CHECK(big != nullptr);
  CHECK(a->stats().num_alloc_retries == 1);
  CHECK(a->thread_cache_bytes() == 0);
  a->free(big);
  ph.phase(2);
  t.join();
  CHECK(a->check() == "");
}

TEST_CASE("thread cache: the reserve target drains idle caches when it cannot return what it wants without them") {
  auto a = make(true, 1, 0, nullptr, 0);  // ordinary segments: a larger block needs a new one
  Phases ph;
  std::thread t([&] {
    std::vector<void*> ps;
    for (int i = 0; i < 64; ++i) ps.push_back(a->allocate(4096));
    for (void* p : ps) a->free(p);
    ph.phase(1);
    ph.wait(2);
  });
  ph.wait(1);
  REQUIRE(a->thread_cache_bytes() > 0);
  // Demand that changes shape: each size is freed before a larger one is asked for, so the target
  // (Note [Reserve target]) returns free memory before mapping more.
  for (size_t mb = 8; mb <= 64 && a->stats().num_target_releases == 0; mb += 8) a->free(a->allocate(mb << 20));
  CHECK(a->stats().num_target_releases > 0);
  CHECK(a->thread_cache_bytes() == 0);  // the other thread's idle blocks went back with it
  ph.phase(2);
  t.join();
  CHECK(a->check() == "");
}

TEST_CASE("thread cache: an allocator may die before the threads that cached its blocks, and ids are not reused") {
  Phases ph;
  auto a = make(true);
  std::thread t([&] {
    for (int i = 0; i < 50; ++i) a->free(a->allocate(256));  // a cache of `a` in this thread
    ph.phase(1);
    ph.wait(2);
    for (int i = 0; i < 50; ++i) a->free(a->allocate(256));  // `a` is a new allocator now
  });
  ph.wait(1);
  const uint64_t old_gen = a->gen();
  a.reset();  // the thread still has an entry for it
  a = make(true);  // possibly at the same address
  CHECK(a->gen() != old_gen);
  ph.phase(2);
  t.join();  // its exit must skip the dead allocator and retire the live one's cache (ASan: no use after free)
  CHECK(a->thread_cache_bytes() == 0);
  CHECK(a->stats().allocation.current == 0);
  CHECK(a->stats().allocation.allocated == 50);
  CHECK(a->check() == "");
}

TEST_CASE("thread cache: a long-lived thread that sees many allocators keeps working (the replay's pattern)") {
  for (int i = 0; i < 50; ++i) {
    auto a = make(true);
    workload(*a, i, 300, true);
    CHECK(a->check() == "");
  }
}
