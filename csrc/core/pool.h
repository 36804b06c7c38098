// Pool: one arena of the caching allocator. Single-threaded; CachingAllocator (allocator.h) locks it.
//
// Map of the data structures
// --------------------------
//   Pool (the code: pool.cc blocks, class lists and the request path; pool_expandable.cc the chunk map
//    │     of expandable segments; release_policy.cc when memory goes back; pool_check.cc check(),
//    │     snapshots.  Byte limits and traces are upstream adaptors, not the pool's business)
//    ├── segments_: intrusive list of Segment, each a range [base, base + size) from the upstream
//    │     └── blocks: a doubly linked list in address order (Block::prev / Block::next)
//    └── streams_: one FreeLists per stream id (device memory is reused on the stream that freed it)
//          ├── class_head[c]: blocks of exactly class_bytes(c), parked unmerged ("cached")
//          ├── small_free: free blocks inside small segments, ordered by (size, addr) for best fit
//          ├── large_free: free blocks inside large segments, ordered by (size, addr)
//          └── expandable, small_expandable: the stream's expandable segments for large and for
//                          small blocks, or null (Note [Expandable segments],
//                          upstream.h): a reservation of `reserved` bytes whose first `size` bytes
//                          are covered by blocks; chunk_mapped[i] says whether chunk i has memory
//
// Block states and invariants (checked by Pool::check(), the is_valid() walk)
// ----------------------------------------------------------------------------
//   kAllocated  handed out.  requested <= size.  Not on any free structure.
//   kCached     freed, parked on class_head[cls] of its segment's stream.  size == class_bytes(cls).
//               Never merged with neighbours until a reclaim (Note [Parked class blocks]).
//   kFree       in exactly one of small_free / large_free of its segment's stream.
//               No two kFree blocks are adjacent (they are merged on free).
//   kDeferred   freed by the caller but still in use by another stream (Note [Stream ordering],
//               upstream.h).  Counted in active_bytes, not in allocated_bytes.  Not on any free
//               structure, so its segment is never returned.  Pool::free() makes it kFree/kCached.
//   kLent       a class block lent to a thread cache (Note [Lent class blocks]).  Counted as
//               cached like kCached (cached_class_bytes; inactive_split as lent_split says, its
//               is_split() when it was lent), but on no class list; size == class_bytes(cls);
//               requested is the cache's (0 while idle there).  Pool::take_back() parks it (kCached).
//   For every segment:  first->addr == base,  b->next->addr == b->addr + b->size,
//                       sum(block sizes) == size.
//   Expandable segments: size <= reserved, base / size / reserved multiples of the upstream
//                       granularity, at most one large and one small per stream, and they are that
//                       stream's FreeLists::expandable / small_expandable; never an empty one (a fully
//                       released one is unreserved).
//                       chunk_mapped has size / granularity entries (nothing past `size` is mapped);
//                       mapped == granularity × #{i : chunk_mapped[i]}; every chunk that overlaps a
//                       block that is not kFree is mapped (a free
//                       block may span holes: Note [Holes in expandable segments]).
//   Other segments:     mapped == size.
//   Gauges:  allocated_bytes == Σ size of kAllocated,  requested_bytes == Σ requested,
//            active_bytes == allocated_bytes + Σ size of kDeferred (active == allocation + #kDeferred),
//            reserved_bytes == Σ segment mapped,  cached_class_bytes == Σ size of kCached/kLent,
//            inactive_split_bytes == Σ size of kFree/kCached blocks whose segment has > 1 block
//                                    + Σ size of kLent blocks with lent_split,
//            lent_bytes() == Σ size of kLent.
//
// Note [Lent class blocks]
// ------------------------
// Rationale: a per-thread cache (issue 12) hands out class blocks without the arena's lock, so the
// blocks it holds must be neither allocated (memory_stats would count them as in use) nor on a class
// list (the pool would hand them out twice).  Approach: Pool::lend() moves up to n blocks of one
// class, from the class list first and carved best fit after, into the state kLent, which every gauge
// counts as cached (the walk checks it); Pool::take_back() parks them again in one batch.  While a
// block is lent the pool never merges, reclaims or returns it, so the segment that holds it stays
// mapped: whoever holds lent blocks must give them back before empty_cache() can return their memory
// (the thread cache's drain) and before the pool is destroyed.  The thread cache that uses them:
// Note [Thread caches] (thread_cache.h); it hands a lent block out by writing its `requested`, which
// the pool only reads (check(), snapshot()).
//
// Note [Parked class blocks]
// --------------------------
// Rationale: most tensors are small and their sizes repeat every step; an exact-size free list per
// class makes reuse O(1) with no search and no split.  Approach: a small request is rounded up to its
// class; a freed class block is parked on its class list instead of being merged.  A miss carves
// one block of the class size best-fit from the small segments.  Limitation: parked blocks cannot
// serve other sizes, which is external fragmentation.  Bound: before a miss maps a new small segment
// it reclaims (merges every parked block of that stream back into free blocks) whenever the parked
// bytes are at least one small segment; empty_cache() and the out-of-memory retry reclaim too.
//
// Note [Where size classes stop]
// -------------------------------
// Size classes make reuse O(1), but a parked block serves only its own class and rounds its request up
// (≤ 11.1 % above 1 KiB).  For mid-size blocks (16 KiB up to kSmallRequestLimit, 1 MiB) the rounding
// and the parking strand memory between live blocks, as on the replayed kv_decode trace (KV caches
// re-allocated as they grow), while best fit there costs nothing measurable in the allocator benches
// (the measurements: docs/measurements/2026-11-24-allocators.md, "Measurements behind the defaults").  So classes stop at
// 16 KiB by default (max_class_bytes); best fit serves the rest of the small segments.
//
// Note [Release policy]
// ---------------------
// Segments stay mapped while cached: reusing mapped, already faulted pages is where the speed over
// glibc comes from (glibc unmaps large chunks and the kernel zeroes the pages again).  A segment is
// returned to the upstream only when it is entirely free and (a) empty_cache() runs, (b) the cached
// bytes (reserved - allocated) exceed PoolConfig::max_cached_bytes, or (c) the upstream refuses a
// mapping (out of memory, or past AllocatorConfig::max_bytes: Note [Limiting upstream]) and the
// allocator's retry releases the cache, or (d) a new mapping would exceed the reserve target (Note
// [Reserve target]).  All of it is in release_policy.cc.
//
// Note [Reserve target]
// ---------------------
// Rationale: a cache that never gives memory back holds, at the peak, every segment it ever mapped
// for sizes the program no longer asks for: on replayed traces of variable-shape training and
// inference its utilization (peak allocated / peak reserved) fell below PyTorch's policy
// (docs/measurements/2026-11-24-allocators.md, "Measurements behind the defaults").  A fixed max_cached_bytes does not
// scale with the program.  Approach: with max_reserved_ratio = r > 0, before the pool maps new
// memory it checks reserved + new <= target,
// target = max(r × H, H + one 2 MiB segment per stream), H = max(high-water of allocated bytes,
// allocated + the request) (the floor spares small programs pointless returns); when the check fails it first returns
// free memory (parked class blocks merged, entirely free segments largest first, free chunks of
// expandable segments) until the check passes or nothing free is left, then maps.  The target is
// relative to the high-water, not to what is allocated now, so a program that repeats its peak every
// step reaches a steady state with no mapping churn; memory is only returned when the shape of the
// demand changes.  Limitations: blocks in partially used segments cannot be returned (only
// expandable segments, whose holes can be unmapped chunk by chunk, avoid that); a program whose peak
// moves every step pays one unmap + map per change (counted in num_upstream_maps / unmaps).
//
// Note [Holes in expandable segments]
// -----------------------------------
// An expandable segment (Note [Expandable segments], upstream.h) is an address range whose chunks
// are mapped independently.  Its blocks cover [base, base + size) as in any segment, but a free block
// may contain chunks with no memory behind them: growing the segment only extends the free tail block
// (address space), and memory is put behind a block when it is allocated (map_range), for the chunks
// it overlaps that are not mapped yet.  Free memory is returned chunk by chunk: every chunk wholly
// inside a free block can be unmapped (release_free_chunks), wherever the block lies, and a free tail
// is cut back to the last chunk in use.  So neighbouring free blocks always coalesce, and the memory
// held is the chunks that live blocks touch plus whatever cache the release policy keeps.  Cost: a
// block may need one map call per run of missing chunks when it is allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "size_classes.h"
#include "stats.h"
#include "upstream.h"

namespace torchpool {

struct Segment;

struct Block {
  enum State : uint8_t { kFree, kCached, kAllocated, kDeferred, kLent };

  uintptr_t addr = 0;
  size_t size = 0;
  size_t requested = 0;        // only while kAllocated
  Segment* segment = nullptr;
  Block* prev = nullptr;       // address-order neighbours in the segment
  Block* next = nullptr;
  Block* list_prev = nullptr;  // class list links while kCached
  Block* list_next = nullptr;
  int32_t cls = -1;            // size class, or -1 for a best-fit block
  State state = kFree;
  bool lent_split = false;     // kLent: is_split() when it was lent, what its accounting used
  bool lent_carved = false;    // kLent: carved for the lending (a class miss), not handed out since

  bool is_split() const { return prev != nullptr || next != nullptr; }
};

struct Segment {
  uintptr_t base = 0;
  size_t size = 0;
  uint64_t stream = 0;
  bool small = false;     // holds size-class blocks
  bool expandable = false;  // Note [Expandable segments]: grows in place up to `reserved`
  size_t reserved = 0;      // expandable only: bytes of address space reserved at base
  size_t mapped = 0;        // bytes with memory behind them (== size unless expandable)
  std::vector<bool> chunk_mapped;  // expandable only: one per chunk of [base, base + size)
  Block* first = nullptr;
  Segment* prev = nullptr;
  Segment* next = nullptr;
  uint64_t id = 0;
};

// Bounds of the options: the option schema (options.h) states and checks them.
constexpr size_t kMaxAlignment = size_t{1} << 20;
constexpr size_t kMaxRoundingBytes = size_t{1} << 30;  // large_rounding, small_segment_bytes

struct PoolConfig {
  size_t alignment = 64;                    // every block size is a multiple (power of two >= 64)
  bool size_classes = true;                 // false: small requests are best-fit too (for comparison)
  size_t max_class_bytes = 16u << 10;       // size classes up to this; best fit above it up to
                                            // kSmallRequestLimit (1 MiB): Note [Where size classes stop]
  size_t small_segment_bytes = 2u << 20;    // segments that hold size-class blocks
  size_t large_rounding = 4096;             // large block sizes are rounded to this
  size_t min_split_bytes = 4096;            // a large block is split only if the rest is at least this
  size_t max_split_bytes = SIZE_MAX;        // free blocks above this are never split (PyTorch's max_split_size)
  size_t max_cached_bytes = SIZE_MAX;       // Note [Release policy]
  double max_reserved_ratio = 1.05;         // Note [Reserve target]: 0 = no target; valid values: options.h
};

struct BlockView {  // one row of a snapshot
  uintptr_t addr;
  size_t size;
  size_t requested;
  int32_t cls;
  Block::State state;  // a kDeferred block shows as kAllocated with deferred = true
  bool deferred;
  size_t mapped;       // bytes of the block with memory behind them (< size: a free block over holes)
};

struct SegmentView {
  uintptr_t base;
  size_t size;      // bytes mapped
  size_t extent;    // bytes the blocks cover (== size unless an expandable segment has holes)
  uint64_t stream;
  bool small;
  bool expandable;
  size_t reserved;
  std::vector<BlockView> blocks;
};

class Pool {
 public:
  // The pool maps through `upstream` only; a byte limit or a trace is an adaptor around it
  // (limiting_upstream.h, tracing_upstream.h).
  Pool(Upstream& upstream, PoolConfig config);
  ~Pool();  // returns every segment to the upstream; live blocks become invalid
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  // Returns nullptr when the upstream refuses a new segment. bytes >= 1.
  Block* allocate(size_t bytes, uint64_t stream = 0);
  // Takes a kAllocated or kDeferred block back.
  void free(Block* block);
  // kAllocated -> kDeferred: the caller freed it, another stream may still use it (Note [Stream
  // ordering]).  It stays out of every free structure until free() is called on it.
  void defer(Block* block);

  // Note [Lent class blocks].  The class that serves a request of `bytes`, or -1 when such a request
  // is not served by size classes (too large, size_classes off).  bytes >= 1.
  int32_t class_for(size_t bytes) const;
  // Lends up to n blocks of class `cls` (a value of class_for) on `stream` into out[0..k): kLent,
  // counted as cached.  Returns k (< n only when the upstream refuses memory).
  size_t lend(uint32_t cls, uint64_t stream, Block** out, size_t n);
  // Takes kLent blocks back: each is parked on its class list (kCached).
  void take_back(Block* const* blocks, size_t n);
  size_t lent_bytes() const { return lent_bytes_; }
  // Times the reserve target could not return what it wanted (Note [Reserve target]); the thread
  // caches' owner drains them when this moves while blocks are lent.
  uint64_t target_shortfalls() const { return target_shortfalls_; }

  // Merge parked class blocks, then return entirely free segments and the free chunks of expandable
  // segments to the upstream (largest first, until target_bytes).
  // Returns the bytes returned.
  size_t release_cached(size_t target_bytes = SIZE_MAX);

  const Stats& stats() const { return stats_; }
  Stats stats_with_derived() const;  // fills largest_free_block
  void reset_peaks() { stats_.reset_peaks(); }
  void count_retry() { stats_.num_alloc_retries++; }
  void count_oom() { stats_.num_ooms++; }
  std::vector<SegmentView> snapshot() const;

  // The is_valid() walk: every invariant of the header comment. Returns "" when valid, else the
  // first violation found.
  std::string check() const;

  const PoolConfig& config() const { return config_; }
  Upstream& upstream() { return upstream_; }

 private:
  struct BySize {
    bool operator()(const Block* a, const Block* b) const {
      return a->size != b->size ? a->size < b->size : a->addr < b->addr;
    }
  };
  using FreeSet = std::set<Block*, BySize>;
  struct FreeLists {
    Block* class_head[kNumSizeClasses] = {};
    size_t parked_bytes = 0;
    FreeSet small_free;
    FreeSet large_free;
    Segment* expandable = nullptr;        // for large blocks
    Segment* small_expandable = nullptr;  // for size-class / small blocks
  };

  // ---- blocks, class lists, free structures, ordinary segments, the request path (pool.cc)
  FreeLists& lists(uint64_t stream);
  FreeSet& free_set(Block* b);
  Block* allocate_class(uint32_t cls, size_t bytes, uint64_t stream);
  Block* allocate_best_fit(size_t rounded, size_t bytes, uint64_t stream, bool small);
  Block* find_free(FreeSet& set, size_t rounded) const;
  Segment* map_segment(size_t bytes, uint64_t stream, bool small);
  void unmap_segment(Segment* s);
  Segment* link_segment(uintptr_t base, size_t bytes, uint64_t stream, bool small, size_t reserved);  // reserved: expandable
  static Block* last_block(const Segment* s);
  Block* split(Block* b, size_t size);  // b is not on a free structure; returns b (now `size` long)
  Block* insert_free(Block* b);         // merges with kFree neighbours, inserts; returns the survivor
  void erase_free(Block* b);
  void park(Block* b);
  void unpark(Block* b);
  void reclaim(FreeLists& fl);
  bool segment_is_free(const Segment* s) const;
  Block* new_block();
  void delete_block(Block* b);

  // ---- expandable segments: growth and the chunk map (pool_expandable.cc)
  Block* grow_expandable(FreeLists& fl, uint64_t stream, size_t rounded, bool small);  // a kFree block >= rounded, or null
  bool map_range(Block* b);  // expandable: maps the chunks b overlaps that have no memory; false on failure
  std::pair<size_t, size_t> inner_chunks(const Block* b) const;  // [first, last) chunk index wholly inside b
  size_t release_free_chunks(Block* b);  // expandable, b kFree: unmaps the chunks inside b; may free the segment
  void unmap_chunks(Segment* s, size_t first, size_t count);
  size_t mapped_in(const Block* b) const;  // bytes of b with memory behind them

  // ---- the release policy (release_policy.cc): the only readers of max_cached_bytes / max_reserved_ratio
  void maybe_release(Block* freed);  // after a free: Note [Release policy] (b)
  size_t make_room(size_t need, size_t incoming);  // Note [Reserve target]; returns bytes released
  size_t release_free(size_t target_bytes);       // free segments largest first, then expandable holes

  // Accounting: the only functions that change gauges.
  void account_alloc(Block* b, size_t requested);
  void account_free(Block* b);        // kAllocated -> not allocated (allocated, requested gauges)
  void account_inactive_active(Block* b);  // leaves the active gauges
  void account_inactive(Block* b, int sign);  // a non-allocated block appears (+1) / disappears (-1)

  Upstream& upstream_;
  PoolConfig config_;
  Stats stats_;
  Segment* segments_ = nullptr;
  int64_t allocated_high_water_ = 0;  // never reset: Note [Reserve target]
  uint64_t frees_ = 0;                  // Pool::free() calls, so make_room() can skip fruitless searches
  uint64_t fruitless_at_ = ~uint64_t{0};
  uint64_t next_segment_id_ = 0;
  size_t lent_bytes_ = 0;  // Σ size of kLent blocks: Note [Lent class blocks]
  uint64_t target_shortfalls_ = 0;
  std::unordered_map<uint64_t, FreeLists> streams_;
  uint64_t last_stream_ = ~uint64_t{0};
  FreeLists* last_lists_ = nullptr;
  std::vector<Block*> spare_blocks_;
  uint32_t aligned_class_[kNumSizeClasses];  // smallest class >= c whose size is a multiple of alignment
};

}  // namespace torchpool
