// Statistics, defined once in lists and exported from them (as mimalloc-stats.h does).
//
// A Stat is a gauge with history: current, peak, and the running totals of what was added
// (allocated) and removed (freed). Invariant: current == allocated - freed, peak >= current.
// The names and meanings follow torch.cuda.memory_stats() so users read them the way they know.
//
// All updates happen in pool.cc's accounting functions (account_*), never in the branches that
// decide policy, so a counter cannot drift from the state it describes; Pool::check() recomputes
// every gauge from the segment/block walk and compares.
#pragma once

#include <algorithm>
#include <cstdint>

#include "size_classes.h"

namespace torchpool {

// X(name, help)
#define TORCHPOOL_GAUGES(X)                                                                      \
  X(allocated_bytes, "bytes in blocks handed out, after rounding")                               \
  X(requested_bytes, "bytes the callers asked for")                                              \
  X(active_bytes, "bytes in blocks not reusable yet: allocated, or freed but awaiting a stream")  \
  X(reserved_bytes, "bytes in segments obtained from the upstream")                              \
  X(inactive_split_bytes, "free bytes in blocks that share a segment with other blocks")         \
  X(cached_class_bytes, "free bytes parked on size-class free lists")                            \
  X(allocation, "number of allocated blocks")                                                    \
  X(active, "number of active blocks")                                                           \
  X(segment, "number of segments")                                                               \
  X(inactive_split, "number of free blocks that share a segment with other blocks")

// X(name, help)
#define TORCHPOOL_COUNTERS(X)                                                             \
  X(num_alloc_retries, "allocations that freed the cache and tried again")               \
  X(num_ooms, "allocations that failed for lack of memory")                              \
  X(num_upstream_maps, "segments mapped from the upstream")                              \
  X(num_upstream_unmaps, "segments returned to the upstream")                            \
  X(num_class_hits, "size-class allocations served from a class free list")             \
  X(num_class_misses, "size-class allocations that carved a new block")                 \
  X(num_large_allocs, "allocations above the largest size class")                        \
  X(num_reclaims, "times parked class blocks were merged back into free blocks")         \
  X(num_splits, "blocks split in two")                                                   \
  X(num_merges, "free neighbours merged")                                                \
  X(num_chunk_maps, "runs of chunks mapped into expandable segments")                    \
  X(num_chunk_unmaps, "runs of chunks of expandable segments unmapped")                   \
  X(num_target_releases, "new mappings that first returned free memory (reserve target)") \
  X(num_deferred_frees, "frees deferred until other streams' events complete")

struct Stat {
  int64_t current = 0;
  int64_t peak = 0;
  int64_t allocated = 0;
  int64_t freed = 0;

  void add(int64_t n) {
    current += n;
    allocated += n;
    peak = std::max(peak, current);
  }
  void sub(int64_t n) {
    current -= n;
    freed += n;
  }
  void reset_peak() { peak = current; }
  void merge(const Stat& o) {  // sum of independent arenas; peak is the sum of peaks (an upper bound)
    current += o.current;
    peak += o.peak;
    allocated += o.allocated;
    freed += o.freed;
  }
};

// X(name, help): the counters of one size class (Stats::classes), exported as the size_classes rows.
#define TORCHPOOL_CLASS_STATS(X)                                          \
  X(allocated_blocks, "blocks of this class handed out now")             \
  X(peak_allocated_blocks, "most blocks of this class handed out at once") \
  X(cached_blocks, "blocks parked on the class free list")               \
  X(requested_bytes, "bytes the callers asked for, of the allocated blocks") \
  X(hits, "allocations served from the class free list")                 \
  X(misses, "allocations that carved a new block")

struct ClassStat {
#define TORCHPOOL_DECLARE_CLASS_STAT(name, help) int64_t name = 0;
  TORCHPOOL_CLASS_STATS(TORCHPOOL_DECLARE_CLASS_STAT)
#undef TORCHPOOL_DECLARE_CLASS_STAT
  bool used() const { return hits || misses || cached_blocks || allocated_blocks; }
};

struct Stats {
#define TORCHPOOL_DECLARE_GAUGE(name, help) Stat name;
  TORCHPOOL_GAUGES(TORCHPOOL_DECLARE_GAUGE)
#undef TORCHPOOL_DECLARE_GAUGE
#define TORCHPOOL_DECLARE_COUNTER(name, help) int64_t name = 0;
  TORCHPOOL_COUNTERS(TORCHPOOL_DECLARE_COUNTER)
#undef TORCHPOOL_DECLARE_COUNTER
  ClassStat classes[kNumSizeClasses];
  // Derived at snapshot time (not kept as it goes): the largest free block and the total free.
  int64_t largest_free_block = 0;

  void reset_peaks() {
#define TORCHPOOL_RESET(name, help) name.reset_peak();
    TORCHPOOL_GAUGES(TORCHPOOL_RESET)
#undef TORCHPOOL_RESET
    for (auto& c : classes) c.peak_allocated_blocks = c.allocated_blocks;
  }

  void merge(const Stats& o) {
#define TORCHPOOL_MERGE_GAUGE(name, help) name.merge(o.name);
    TORCHPOOL_GAUGES(TORCHPOOL_MERGE_GAUGE)
#undef TORCHPOOL_MERGE_GAUGE
#define TORCHPOOL_MERGE_COUNTER(name, help) name += o.name;
    TORCHPOOL_COUNTERS(TORCHPOOL_MERGE_COUNTER)
#undef TORCHPOOL_MERGE_COUNTER
    for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
#define TORCHPOOL_MERGE_CLASS_STAT(name, help) classes[i].name += o.classes[i].name;
      TORCHPOOL_CLASS_STATS(TORCHPOOL_MERGE_CLASS_STAT)
#undef TORCHPOOL_MERGE_CLASS_STAT
    }
    largest_free_block = std::max(largest_free_block, o.largest_free_block);
  }
};

}  // namespace torchpool
