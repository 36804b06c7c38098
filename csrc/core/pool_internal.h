// Helpers shared by the files of the pool (pool.cc, pool_expandable.cc, release_policy.cc,
// pool_check.cc); private to csrc/core.
#pragma once

#include <cstddef>
#include <vector>

namespace torchpool::pool_detail {

constexpr size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }  // n, m known small
// Note [Impossible sizes] (allocator.h): false when n rounded up to a multiple of m overflows.
inline bool checked_round_up(size_t n, size_t m, size_t* out) {
  size_t t;
  if (__builtin_add_overflow(n, m - 1, &t)) return false;
  *out = t / m * m;
  return true;
}

inline bool is_pow2(size_t x) { return x && !(x & (x - 1)); }

// Calls f(first, count) for each maximal run of chunks in [lo, hi) whose mapped flag equals `value`.
template <class F>
void for_each_run(const std::vector<bool>& mapped, size_t lo, size_t hi, bool value, F&& f) {
  size_t i = lo;
  while (i < hi) {
    if (mapped[i] != value) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < hi && mapped[j] == value) ++j;
    f(i, j - i);
    i = j;
  }
}

}  // namespace torchpool::pool_detail
