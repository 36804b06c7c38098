// The upstream interface: where the core gets raw memory from.
//
// The core (pool.h) never touches the memory it manages: it only does arithmetic on addresses, so
// the same core serves host memory, pinned memory and device memory. An upstream maps and unmaps
// whole segments; everything finer is the pool's business.
#pragma once

#include <cstddef>
#include <cstdint>

namespace torchpool {

class Upstream {
 public:
  virtual ~Upstream() = default;

  // Maps `bytes` (a multiple of granularity()). Returns nullptr when the memory cannot be had;
  // never throws for lack of memory, so the pool can free its cache and retry.
  virtual void* map(size_t bytes, uint64_t stream) = 0;
  // Returns a segment obtained from map() with the same size.
  virtual void unmap(void* ptr, size_t bytes, uint64_t stream) = 0;
  // Segment sizes are rounded up to a multiple of this (a power of two).
  virtual size_t granularity() const = 0;
  virtual const char* name() const = 0;
};

}  // namespace torchpool
