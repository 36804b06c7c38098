// Test helpers shared by the C++ suites: a random workload run with the invariant walk.
#pragma once

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "core/allocator.h"

namespace torchpool::testing {

// Writes the first and the last byte and reads them back (the memory is there and writable).
inline void touch(void* p, size_t bytes) {
  auto* c = static_cast<unsigned char*>(p);
  c[bytes - 1] = 0xa5;
  c[0] = 0x5a;
  CHECK(c[0] == 0x5a);
  if (bytes > 1) CHECK(c[bytes - 1] == 0xa5);
}

// Random allocations (small, medium, large) and frees, the invariant walk after each step when
// check_each; write: the memory is real and each block is touched.
inline void random_workload(CachingAllocator& a, uint64_t seed, int steps, bool check_each, bool write = false) {
  std::mt19937_64 rng(seed);
  std::vector<std::pair<void*, size_t>> live;
  for (int i = 0; i < steps; ++i) {
    if (live.empty() || rng() % 100 < 55) {
      const int kind = rng() % 10;
      size_t n = kind < 7 ? 1 + rng() % 4096 : kind < 9 ? 1 + rng() % (1u << 20) : (1u << 20) + rng() % (24u << 20);
      void* p = a.allocate(n);
      REQUIRE(p != nullptr);
      REQUIRE(reinterpret_cast<uintptr_t>(p) % 64 == 0);
      if (write) touch(p, n);
      live.push_back({p, n});
    } else {
      const size_t k = rng() % live.size();
      REQUIRE(a.free(live[k].first));
      live[k] = live.back();
      live.pop_back();
    }
    if (check_each) REQUIRE(a.check() == "");
  }
  for (auto& [p, n] : live) REQUIRE(a.free(p));
  REQUIRE(a.check() == "");
}

}  // namespace torchpool::testing
