// OwnerMap (Note [Flat owner map], core/page_map.h): the radix tree over addresses that replaced the
// sharded owner hash map.  Exact answers at the edges of the address space, the overflow table for
// addresses it cannot index, and lock-free readers racing writers of other arenas (TSan job).
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <iterator>
#include <cstdint>
#include <random>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "core/page_map.h"
#include "upstreams/fake.h"

using namespace torchpool;

namespace {
Block* fake_block(uintptr_t tag) { return reinterpret_cast<Block*>(tag * 16); }  // never dereferenced
}  // namespace

TEST_CASE("owner map: insert, find and take at the edges of the address space") {
  OwnerMap m;
  const uintptr_t addrs[] = {64,
                             (uintptr_t{1} << 21) - 64,  // last grain of the first leaf
                             uintptr_t{1} << 21,         // first grain of the second leaf
                             uintptr_t{1} << 40,
                             (uintptr_t{1} << 62) - 64,
                             ~uintptr_t{63}};  // the last grain of a 64-bit address space
  uint32_t arena = 0;
  for (uintptr_t a : addrs) {
    CHECK(m.find(a).block == nullptr);
    REQUIRE(m.insert(a, fake_block(arena + 1), arena));
    ++arena;
  }
  arena = 0;
  for (uintptr_t a : addrs) {
    const auto e = m.find(a);
    CHECK(e.block == fake_block(arena + 1));
    CHECK(e.arena == arena % 256);
    if (std::find(std::begin(addrs), std::end(addrs), a + 64) == std::end(addrs))
      CHECK(m.find(a + 64).block == nullptr);  // a neighbouring grain is not the block
    ++arena;
  }
  // take() of another arena's entry leaves it (a racing double free must not steal it)
  CHECK(m.take(addrs[1], 7).block == nullptr);
  CHECK(m.find(addrs[1]).block == fake_block(2));
  arena = 0;
  for (uintptr_t a : addrs) {
    CHECK(m.take(a, arena).block == fake_block(arena + 1));
    CHECK(m.take(a, arena).block == nullptr);  // a second free of one pointer finds nothing
    CHECK(m.find(a).block == nullptr);
    ++arena;
  }
}

TEST_CASE("owner map: addresses off the 64-byte grain and high Block pointers use the overflow table") {
  OwnerMap m;
  CHECK(m.insert(1000 + 8, fake_block(1), 3));  // not a multiple of 64
  auto* high = reinterpret_cast<Block*>(uintptr_t{1} << 50);  // above 48 bits: cannot be packed
  CHECK(m.insert(1 << 20, high, 300));           // and an arena above 16 bits would not fit either
  CHECK(m.find(1000 + 8).block == fake_block(1));
  CHECK(m.find(1000 + 8).arena == 3);
  CHECK(m.find(1 << 20).block == high);
  CHECK(m.find(1 << 20).arena == 300);
  CHECK(m.find(1000).block == nullptr);
  CHECK(m.take(1 << 20, 300).block == high);
  CHECK(m.take(1000 + 8, 3).block == fake_block(1));
  CHECK(m.find(1000 + 8).block == nullptr);
  CHECK(m.find(1 << 20).block == nullptr);
}

TEST_CASE("owner map: readers race writers of other arenas without locks") {
  OwnerMap m;
  constexpr int kWriters = 3;
  const int rounds = 20000;
  std::atomic<bool> stop{false};
  std::atomic<long> wrong{0};
  // Readers look up addresses that stay live the whole time, while writers insert and take others
  // in the same leaves (and make new leaves and inner nodes).
  const uintptr_t base = uintptr_t{1} << 33;
  for (int i = 0; i < 256; ++i) REQUIRE(m.insert(base + uintptr_t(i) * 4096, fake_block(i + 1), 0));
  std::vector<std::thread> ts;
  for (int w = 0; w < kWriters; ++w)
    ts.emplace_back([&, w] {
      std::mt19937_64 rng(w);
      for (int r = 0; r < rounds; ++r) {
        // 16 MiB in each of 8 regions 64 GiB apart: new leaves and inner nodes are made concurrently
        const uintptr_t a = base + (uintptr_t(r % 8) << 36) + 64 + (rng() % (uintptr_t{1} << 24)) / 4096 * 4096 +
                            uintptr_t(w) * 64 * 8;
        if (!m.insert(a, fake_block(1000 + w), 1 + w)) continue;
        if (m.take(a, 1 + w).block != fake_block(1000 + w)) wrong.fetch_add(1);
      }
    });
  ts.emplace_back([&] {
    while (!stop.load()) {
      for (int i = 0; i < 256; ++i)
        if (m.find(base + uintptr_t(i) * 4096).block != fake_block(i + 1)) wrong.fetch_add(1);
    }
  });
  for (int w = 0; w < kWriters; ++w) ts[w].join();
  stop.store(true);
  ts.back().join();
  CHECK(wrong.load() == 0);
}

TEST_CASE("owner map: the allocator answers owns / block_size for interior and foreign pointers") {
  CachingAllocator a(std::make_shared<FakeUpstream>(), AllocatorConfig{});
  void* p = a.allocate(100);
  void* q = a.allocate(5 << 20);
  CHECK(a.owns(p));
  CHECK(a.owns(q));
  CHECK_FALSE(a.owns(static_cast<char*>(p) + 64));  // inside the block, not its start
  CHECK_FALSE(a.owns(static_cast<char*>(q) + 1));
  CHECK(a.block_size(static_cast<char*>(q) + 4096).first == 0);
  CHECK(a.block_size(p).second == 100);
  CHECK_FALSE(a.free(static_cast<char*>(p) + 64));
  CHECK(a.check().empty());
  CHECK(a.live_blocks() == 2);
  CHECK(a.free(p));
  CHECK_FALSE(a.free(p));  // freed twice: not ours any more
  CHECK(a.free(q));
  CHECK(a.live_blocks() == 0);
  CHECK(a.check().empty());
}

TEST_CASE("owner map: a map made after another was destroyed sees none of its entries") {
  // FakeUpstream hands every instance the same addresses, so the second allocator's map (which may
  // reuse the first one's nodes, page_map_detail) is asked about exactly the addresses the first held.
  for (bool leave_live : {false, true}) {
    std::vector<uintptr_t> held;
    {
      CachingAllocator a(std::make_shared<FakeUpstream>(), AllocatorConfig{});
      std::vector<void*> ps;
      for (size_t n : {size_t{64}, size_t{100}, size_t{4096}, size_t{16384}, size_t{100000}, size_t{3} << 20, size_t{40} << 20})
        ps.push_back(a.allocate(n));
      for (void* p : ps) held.push_back(reinterpret_cast<uintptr_t>(p));
      if (!leave_live)
        for (void* p : ps) CHECK(a.free(p));
    }  // destroyed with every block freed (its leaves can be reused), or with live blocks (they cannot)
    CachingAllocator b(std::make_shared<FakeUpstream>(), AllocatorConfig{});
    for (uintptr_t p : held) {
      CHECK_FALSE(b.owns(reinterpret_cast<void*>(p)));
      CHECK_FALSE(b.free(reinterpret_cast<void*>(p)));
    }
    void* q = b.allocate(100);
    CHECK(b.owns(q));
    CHECK(b.free(q));
    CHECK(b.check().empty());
  }
}
