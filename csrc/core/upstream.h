// The upstream interface: where the core gets raw memory from, and how it orders reuse across streams.
//
// The core (pool.h) never touches the memory it manages: it only does arithmetic on addresses, so
// the same core serves host memory, pinned memory and device memory. An upstream maps and unmaps
// whole segments; everything finer is the pool's business.
//
// Note [Expandable segments]
// --------------------------
// Rationale: with one mapping per segment, two free blocks in different segments never coalesce, so
// a workload whose sizes drift (LoRA + recompute + ZeRO-3 in the GMLake paper: 64 % utilization)
// strands free memory in holes no request fits.  PyTorch's expandable_segments (Note [Expandable
// Segments] in CUDACachingAllocator.cpp) and GMLake map physical memory into one reserved virtual
// range instead.  Approach: an upstream whose can_expand() is true also offers reserve / map_chunk /
// unmap_chunk / unreserve.  The pool then keeps, per stream, two expandable segments (one for large
// blocks, one for size-class blocks): reservations whose blocks cover the first `size` bytes.  When
// no free block fits, the segment grows in place at its end (address space only), so the new range
// merges with a free tail block; memory is mapped chunk by chunk behind the blocks that are
// allocated, and every chunk wholly inside a free block can be unmapped again, in the middle of the
// segment as at its end (Note [Holes in expandable segments], pool.h): empty_cache, max_cached_bytes,
// the out-of-memory retry and the reserve target (Note [Reserve target]) do so.  Limitations: a
// segment cannot grow past its reservation (the pool then falls back to ordinary map() segments);
// a chunk shared by a live block and free bytes stays mapped.
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
  // Segment sizes are rounded up to a multiple of this (a power of two). In expandable mode it is
  // also the chunk size: reservations, chunk addresses and chunk sizes are multiples of it.
  virtual size_t granularity() const = 0;
  virtual const char* name() const = 0;

  // ---- expandable segments (Note [Expandable segments]); optional ----
  virtual bool can_expand() const { return false; }
  // Bytes of address space to reserve per expandable segment (a multiple of granularity()).
  virtual size_t reservation_bytes() const { return 0; }
  // Reserves address space with no memory behind it; nullptr when it cannot.
  virtual void* reserve(size_t /*bytes*/, uint64_t /*stream*/) { return nullptr; }
  virtual void unreserve(void* /*base*/, size_t /*bytes*/, uint64_t /*stream*/) {}
  // Puts memory behind [addr, addr + bytes) of a reservation; false (and nothing mapped) when the
  // memory cannot be had.
  virtual bool map_chunk(void* /*addr*/, size_t /*bytes*/, uint64_t /*stream*/) { return false; }
  // Returns the memory behind a range previously mapped with map_chunk (any chunk-aligned part).
  virtual void unmap_chunk(void* /*addr*/, size_t /*bytes*/, uint64_t /*stream*/) {}
};

// Note [Stream ordering]
// ----------------------
// Rationale: device memory freed by the caller may still be read or written by kernels queued on
// other streams (torch's record_stream).  Reusing it at once on the stream that freed it is safe
// (work on one stream runs in order); reusing it before the other streams have passed the free
// is not.  Approach (as PyTorch's caching allocator): the allocator remembers the extra streams a
// block was used on; when such a block is freed it records one event per extra stream and parks
// the block as "deferred" (active, not allocated, not reusable); allocate() and empty_cache()
// poll the events and release a deferred block to its stream's free lists once all are done.
// Blocks are only ever reused on the stream of their segment.  empty_cache() polls: it releases
// only what no stream can still use.  The out-of-memory retry waits for every pending event first
// (as PyTorch's allocator synchronizes its events before giving up), so memory that is merely
// waiting for a stream never causes an out-of-memory.
class StreamEvents {
 public:
  virtual ~StreamEvents() = default;
  using Event = uint64_t;  // 0: none
  // Records an event on `stream` after the work queued there so far; 0 when it cannot, and the
  // caller then synchronize()s the stream instead.
  virtual Event record(uint64_t stream) = 0;
  // True once the work before the event has completed.
  virtual bool done(Event e) = 0;
  // Blocks until the work before the event has completed.
  virtual void wait(Event e) = 0;
  virtual void destroy(Event e) = 0;
  virtual void synchronize(uint64_t stream) = 0;
};

}  // namespace torchpool
