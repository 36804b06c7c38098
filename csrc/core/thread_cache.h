// ThreadCache: one thread's cache of size-class blocks for one CachingAllocator (issue 12).
//
// Note [Thread caches]
// --------------------
// Rationale: on the replayed traces and the small-tensor microbenchmark more than half of an
// operation was the arena's lock and the pool's class lists (docs/measurements/2026-12-02-front-end.md);
// tcmalloc and mimalloc serve small requests from a per-thread (or per-CPU) cache with no lock.
// Approach: with AllocatorConfig::thread_cache on (host allocators only: no StreamEvents, stream 0),
// each thread that allocates gets a ThreadCache per allocator: one bin (a bounded stack) per size
// class.  Its blocks are lent by the pool (Pool::lend, state kLent: Note [Lent class blocks]) in
// batches that start at one block and double with each refill up to half a bin (tcmalloc's slow
// start: a class a thread uses a few times costs no carving of blocks it never uses), and stay in the owner map for as long as they are lent, tagged with
// kLentTag in the arena field, so a free finds them without any lock.  A lent block is handed out
// by setting its `requested` (an atomic store; 0 means "idle in a cache", so a second free of it is
// refused as for any pointer that is not live); a free pushes it onto the freeing thread's bin for
// its class (cross-thread frees land in the freeing thread's cache), and a full bin gives half back
// to the arenas the blocks came from (Pool::take_back, one lock per arena).
// Who may touch a bin: the owning thread, while it holds `busy` (an exchange, then a release store:
// one locked instruction per operation).  Anyone else (empty_cache(), the reserve target's trim,
// lock_all() for check() and fork, the allocator's destructor) takes the same flag, spinning; the
// owner never waits for it: when the flag is taken it serves the request from its arena as if it
// had no cache.  Lock order: caches_mu_ -> every busy flag (creation order) -> pending_mu_ -> arenas
// -> owner map -> ...; an owner holding its own flag takes only arena locks.
// Statistics: with thread caches on, every allocation and free through the allocator (cache or
// arena) is counted in the calling thread's ThreadCounters, written only by that thread (relaxed
// atomics, no lock) and summed by stats() under caches_mu_; counters of exited threads are folded
// into the allocator's retired_ counters.  So allocated/requested bytes and counts are exact whenever
// no thread is between its update and its return, and their peaks are the sum of the per-thread
// peaks: exact for a program whose allocations and frees come from one thread, an upper bound
// otherwise (as for several arenas, Note [Arenas]).  Blocks idle in a cache count as cached.
// Where a cache's blocks go back: a full bin (half of it), empty_cache() and the out-of-memory retry
// (every cache of the allocator, foreign ones included), the reserve target (when it could not return
// as much as it wanted while blocks were lent, every cache is drained, so that the next search can
// merge their blocks: Note [Reserve target]; draining at every release thrashed the caches of a
// replayed CNN inference for nothing), the thread's
// exit (a thread_local destructor, which finds the allocator alive by its generation under the fork
// registry's mutex), fork() (the child drains the caches of the threads it does not have), and the
// allocator's destructor.  Bound: a bin holds at most max(4, min(64, 32 KiB / class bytes)) blocks
// (ThreadCache::capacity): 1167 blocks, 1.49 MiB per thread and allocator at the default 16 KiB classes.
#pragma once

#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

#include "size_classes.h"

namespace torchpool {

struct Block;
static_assert(kNumSizeClasses < 0xFF, "the thread cache keeps class indices in a byte (0xFF: none)");

// A gauge of one thread: written by its thread only, read by anyone (relaxed atomics).
struct ThreadGauge {
  std::atomic<int64_t> adds{0};
  std::atomic<int64_t> subs{0};
  std::atomic<int64_t> peak{0};  // of adds - subs, as this thread saw it
  static void bump(std::atomic<int64_t>& a, int64_t d) {
    a.store(a.load(std::memory_order_relaxed) + d, std::memory_order_relaxed);
  }
  void add(int64_t n) {
    bump(adds, n);
    const int64_t cur = adds.load(std::memory_order_relaxed) - subs.load(std::memory_order_relaxed);
    if (cur > peak.load(std::memory_order_relaxed)) peak.store(cur, std::memory_order_relaxed);
  }
  void sub(int64_t n) { bump(subs, n); }
  int64_t current() const { return adds.load(std::memory_order_relaxed) - subs.load(std::memory_order_relaxed); }
};

struct ThreadCounters {
  ThreadGauge bytes;      // allocated_bytes (and active_bytes: host allocators defer nothing)
  ThreadGauge requested;  // requested_bytes
  ThreadGauge count;      // allocation (and active)
  std::atomic<int64_t> lent_out_bytes{0};  // lent blocks handed out now (net): not cached for the user
  std::atomic<int64_t> lent_out_split_bytes{0};  // of them, those the pool counts in inactive_split
  std::atomic<int64_t> lent_out_split{0};
  std::atomic<int64_t> hits{0};            // served from a bin
  struct Class {
    std::atomic<int64_t> blocks{0};     // net blocks of this class handed out (cache or arena)
    std::atomic<int64_t> peak{0};
    std::atomic<int64_t> requested{0};  // net requested bytes
    std::atomic<int64_t> lent_out{0};   // net lent blocks handed out
    std::atomic<int64_t> hits{0};
  };
  Class cls[kNumSizeClasses];
};

struct ThreadCache {
  struct Bin {
    uint32_t n = 0;
    uint32_t cap = 0;
    uint32_t batch = 1;  // blocks the next refill asks for: doubles up to cap / 2 (slow start)
    Block** items = nullptr;
  };
  static uint32_t capacity(size_t class_bytes) {
    const size_t c = (size_t{32} << 10) / class_bytes;
    return static_cast<uint32_t>(c < 4 ? 4 : c > 64 ? 64 : c);
  }

  explicit ThreadCache(uint32_t classes) : owner(pthread_self()) {
    size_t total = 0;
    for (uint32_t c = 0; c < classes; ++c) total += capacity(class_bytes(c));
    storage.resize(total);
    size_t at = 0;
    for (uint32_t c = 0; c < classes; ++c) {
      bins[c].cap = capacity(class_bytes(c));
      bins[c].items = storage.data() + at;
      at += bins[c].cap;
    }
  }
  bool try_acquire() { return !busy.exchange(true, std::memory_order_acquire); }
  void acquire() {
    while (busy.exchange(true, std::memory_order_acquire))
      while (busy.load(std::memory_order_relaxed)) std::this_thread::yield();
  }
  void release() { busy.store(false, std::memory_order_release); }

  std::atomic<bool> busy{false};
  const pthread_t owner;
  ThreadCounters counters;
  Bin bins[kNumSizeClasses];
  std::vector<Block*> storage;
};

}  // namespace torchpool
