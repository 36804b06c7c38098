// Size classes: the table in size_class_table.inc is the single source of truth.
//
// The table ends at kSmallRequestLimit (1 MiB), the boundary between small and large requests.
// Requests up to it are "small" and served from small segments (pool.h): by size class up to
// PoolConfig::max_class_bytes (16 KiB by default: Note [Where size classes stop]), best fit above.
// Larger requests are "large" and are served best-fit from their own segments.  class_of() is the
// O(1) closed form of the table's rule; tests/cpp/test_size_classes.cc checks it against a linear
// scan of the table for every size up to kSmallRequestLimit (tcmalloc's size_classes_test does the
// same).
#pragma once

#include <cstddef>
#include <cstdint>

namespace torchpool {

struct SizeClassInfo {
  uint32_t index;
  uint32_t bytes;
  uint32_t worst_waste_bp;  // worst-case waste in basis points (1/100 of a percent)
};

inline constexpr SizeClassInfo kSizeClasses[] = {
#define X(index, bytes, waste) {index, bytes, waste},
#include "size_class_table.inc"
#undef X
};

inline constexpr uint32_t kNumSizeClasses = sizeof(kSizeClasses) / sizeof(kSizeClasses[0]);
// The largest class, and the small/large boundary (not the default class limit: max_class_bytes).
inline constexpr size_t kSmallRequestLimit = kSizeClasses[kNumSizeClasses - 1].bytes;
inline constexpr size_t kClassQuantum = 64;  // every class is a multiple of this

// Index of the smallest class whose size is >= bytes. Requires 1 <= bytes <= kSmallRequestLimit.
inline uint32_t class_of(size_t bytes) {
  if (bytes <= 1024) return static_cast<uint32_t>((bytes + 63) / 64 - 1);
  // 2^p < bytes <= 2^(p+1), eight classes per doubling above 1 KiB.
  const unsigned p = 63u - static_cast<unsigned>(__builtin_clzll(static_cast<unsigned long long>(bytes - 1)));
  const size_t base = size_t{1} << p;
  const size_t step = base / 8;
  const size_t k = (bytes - base + step - 1) / step;  // 1..8
  return static_cast<uint32_t>(16 + (p - 10) * 8 + (k - 1));
}

inline size_t class_bytes(uint32_t index) { return kSizeClasses[index].bytes; }

}  // namespace torchpool
