// CachingAllocator: the thread-safe front of the core.
//
//   CachingAllocator
//    ├── arenas_[k]: a Pool behind its own mutex. Small requests use the calling thread's
//    │               arena; large requests all use arena 0 (Note [Arenas]).
//    ├── owners_:    address -> (arena, Block*) for live allocations, a radix tree over addresses
//    │               read without locks (Note [Flat owner map], page_map.h).
//    ├── pool_upstream_: what every arena maps through: upstream_ wrapped in a LimitingUpstream
//    │               (max_bytes, one limit for all arenas) when there is a limit, then in a
//    │               TracingUpstream writing segment events to trace_ (limiting_upstream.h,
//    │               tracing_upstream.h).
//    ├── caches_:    the per-thread caches of size-class blocks (Note [Thread caches],
//    │               thread_cache.h), when config.thread_cache is on; each thread finds its own
//    │               through a thread_local slot keyed by gen_.
//    ├── uses_:      address -> extra streams a live block was used on (record_stream); empty
//    │               unless record_stream() was called, checked with one relaxed load on free.
//    ├── pending_:   deferred blocks and the events they wait for (Note [Stream ordering],
//    │               upstream.h); polled by allocate() and empty_cache().
//    └── trace_:     the event ring (trace.h), written only while recording.
//
// Lock order: caches_mu_, then thread caches' busy flags (Note [Thread caches]), then pending_mu_
// before an arena's mutex, an arena's before the owner map's mutexes (new nodes, overflow)
// and the trace ring's (a block enters and leaves the owner map under its arena's lock); the owner
// map's or uses_mu_ is never held while taking another lock.  lock_all() (fork, check()) takes every
// lock in the order of Note [Fork] (fork.h): caches_mu_, busy flags, pending_mu_, arenas, owner map,
// uses_mu_, trace ring, orphan_mu_.
//
// Note [Impossible sizes]
// -----------------------
// Every size is checked where it enters: a request above kMaxRequestBytes (2^62) is out of memory at
// once (OutOfMemory naming the size, no cache flush), and every rounding in the pool and the
// upstreams is checked arithmetic, so a size near 2^64 can never wrap to a small block.
//
// Note [Arenas]
// -------------
// Rationale: torch runs intra-op work on an OpenMP pool (a thread per core); one global lock would
// serialise any allocation those threads make.  Approach: each thread is assigned an arena
// round-robin on first use and takes only that arena's lock for small requests (up to
// kSmallRequestLimit, 1 MiB: size classes and the best-fit small blocks above them); a free locks the
// arena that owns the block (found in owners_ without a lock).  Large requests share arena 0, so large cached
// blocks are not duplicated per thread (they are costly and rarely made off the main thread).
// Limitation: statistics are kept per arena and summed; the summed peak is the sum of the arena
// peaks, an upper bound of the true peak when several arenas are busy (exact with arenas=1).
//
// Note [Out of memory]
// --------------------
// A request that neither the cache nor the upstream (or the byte limit) can satisfy triggers one
// retry: the allocator waits for the events of deferred frees (Note [Stream ordering]), every
// arena releases its cached segments (num_alloc_retries), then the request runs again.
// If it still fails, OutOfMemory is thrown with the allocator's state in the message
// (num_ooms).  Nothing is left half-done, so the allocator keeps working afterwards.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "fork.h"
#include "limiting_upstream.h"
#include "page_map.h"
#include "pool.h"
#include "thread_cache.h"
#include "trace.h"
#include "tracing_upstream.h"

namespace torchpool {

struct AllocatorConfig {
  PoolConfig pool;
  size_t max_bytes = 0;        // 0: no limit
  unsigned arenas = 1;
  int32_t device = -1;         // -1: host; >= 0: device ordinal (messages and traces)
  bool thread_cache = false;   // Note [Thread caches] (thread_cache.h): host allocators only
  std::string device_name = "cpu";
};

class OutOfMemory : public std::runtime_error {
 public:
  OutOfMemory(const std::string& msg, size_t requested) : std::runtime_error(msg), requested_(requested) {}
  size_t requested() const { return requested_; }

 private:
  size_t requested_;
};

class CachingAllocator final : public ForkParticipant {
 public:
  // Larger requests are refused at once (Note [Impossible sizes]): no address space holds them, and
  // every byte gauge (int64) stays exact.
  static constexpr size_t kMaxRequestBytes = size_t{1} << 62;

  // events: orders reuse across streams (Note [Stream ordering]); null for host memory, where
  // record_stream() is refused.
  CachingAllocator(std::shared_ptr<Upstream> upstream, AllocatorConfig config,
                   std::shared_ptr<StreamEvents> events = nullptr);
  ~CachingAllocator() override;
  CachingAllocator(const CachingAllocator&) = delete;
  CachingAllocator& operator=(const CachingAllocator&) = delete;

  // bytes == 0 returns nullptr. Throws OutOfMemory.
  void* allocate(size_t bytes, uint64_t stream = 0);
  // Returns false (and does nothing) when p was not allocated here.
  bool free(void* p);
  // The live block at p is also used on `stream`: when it is freed, its memory is reused only
  // after the work queued on `stream` by then has completed.  False when p is not allocated here
  // or the allocator has no StreamEvents.
  bool record_stream(void* p, uint64_t stream);
  // Releases deferred blocks whose events have completed; returns how many are still pending.
  size_t process_events();
  bool owns(const void* p) const;
  // Size of the block and of the request behind a live pointer; {0, 0} if not owned.
  std::pair<size_t, size_t> block_size(const void* p) const;

  size_t empty_cache();
  Stats stats() const;
  void reset_peaks();
  std::vector<SegmentView> snapshot() const;
  // "" when every arena is valid and the owner map agrees with them.  Takes every lock at once
  // (lock_all), so the view is consistent while other threads allocate.
  std::string check() const;
  // Live (allocated, not yet freed) blocks: a relaxed sum of the arenas' counts without locks, exact
  // when no thread is allocating or freeing here.
  size_t live_blocks() const;
  std::string describe(size_t requested) const;  // the state line used in OOM messages

  // Note [Thread caches]: whether they are on, and every cache's blocks back to the arenas.
  bool thread_cache() const { return tcache_; }
  void drain_thread_caches();
  // Bytes of the blocks idle in thread caches now (takes each cache's flag in turn).
  size_t thread_cache_bytes() const;
  // Process-unique id of this allocator (never reused, unlike its address).
  uint64_t gen() const { return gen_; }
  // Internal (a thread_local destructor calls it with the fork registry's mutex held): the thread
  // that owns c is exiting.
  void retire_cache_of_exiting_thread(ThreadCache* c);

  TraceRing& trace() { return trace_; }
  const AllocatorConfig& config() const { return config_; }
  Upstream& upstream() { return *upstream_; }

  // Note [Fork]: every lock of this allocator, in the fixed order.
  void lock_all() const;
  void unlock_all() const;
  void fork_prepare() override { lock_all(); }
  void fork_parent() override { unlock_all(); }
  void fork_child() override;  // also drains the caches of threads the child does not have

 private:
  struct alignas(64) Arena {
    std::mutex mu;
    std::unique_ptr<Pool> pool;
    std::atomic<size_t> live{0};  // entries of this arena in owners_; written under mu
  };
  using Owner = OwnerMap::Entry;
  struct Pending {
    Block* block;
    uint32_t arena;
    std::vector<StreamEvents::Event> events;
  };
  uint32_t arena_for(size_t bytes);
  // Also enters the owner map; counts into c (Note [Thread caches]) when thread caches are on.
  Block* try_allocate(uint32_t arena, size_t bytes, uint64_t stream, ThreadCache* c);
  // Removes addr from the owner map if `arena` (whose lock is held) owns it; false if not.
  bool take_owner(uintptr_t addr, uint32_t arena, Owner* out);

  // ---- thread caches (allocator_tcache.cc): Note [Thread caches]
  static constexpr uint32_t kLentTag = 0x8000;  // in the owner map's arena field: a lent block
  ThreadCache* my_cache(bool create);
  ThreadCache* make_cache();
  void* cache_allocate(ThreadCache* c, size_t bytes);  // null: let the arenas serve it
  bool free_lent(Block* b, uint32_t tagged);
  size_t refill(ThreadCache* c, uint32_t cls);  // c's flag held
  // Gives back blocks (idle lent blocks) to their arenas; `locked`: the caller holds every arena.
  void give_back(Block* const* blocks, size_t n, bool locked);
  void drain_locked(ThreadCache* c, bool arenas_locked);  // c's flag held: every bin
  void forget_my_cache();  // the calling thread's thread_local entries for this allocator
  static uint64_t next_gen();
  static void fold(ThreadCounters& into, const ThreadCounters& from);
  // Count into c's counters (c's thread is the caller), or orphan_ when c is null.
  void count_alloc(ThreadCache* c, const Block* b, size_t bytes, bool lent);
  void count_free(ThreadCache* c, const Block* b, size_t requested, bool lent);
  struct CounterSums {
    struct G {
      int64_t adds = 0, subs = 0, peak = 0;
    };
    G bytes, requested, count;
    int64_t lent_out_bytes = 0, lent_out_split_bytes = 0, lent_out_split = 0, hits = 0;
    struct C {
      int64_t blocks = 0, peak = 0, requested = 0, lent_out = 0, hits = 0;
    };
    C cls[kNumSizeClasses];
  };
  CounterSums sum_counters() const;  // caches_mu_ and orphan_mu_ held
  void maybe_trim();
  std::string check_caches() const;  // under lock_all

  void release_pending_locked();  // pending_mu_ held
  void wait_pending();            // waits for every pending event, then releases the blocks

  std::shared_ptr<Upstream> upstream_;
  std::shared_ptr<StreamEvents> events_;
  AllocatorConfig config_;
  std::shared_ptr<Upstream> pool_upstream_;  // declared before arenas_: the pools unmap through it
  std::vector<std::unique_ptr<Arena>> arenas_;
  OwnerMap owners_;
  TraceRing trace_;
  std::mutex uses_mu_;
  std::unordered_map<uintptr_t, std::vector<uint64_t>> uses_;
  std::atomic<size_t> num_uses_{0};
  [[noreturn]] void refuse(size_t bytes, uint32_t arena, uint64_t stream, const char* why);
  mutable std::mutex pending_mu_;
  std::vector<Pending> pending_;
  std::atomic<size_t> num_pending_{0};

  bool tcache_ = false;
  uint64_t gen_ = 0;
  uint32_t tcache_classes_ = 0;  // classes [0, tcache_classes_) are cached
  size_t tcache_max_bytes_ = 0;  // requests up to this may be served by a cache
  std::vector<uint8_t> tcache_class_of_;  // (bytes + 63) / 64 -> the pool's class_for(bytes)
  mutable std::mutex caches_mu_;  // guards caches_ and retired_
  std::vector<ThreadCache*> caches_;
  ThreadCounters retired_;  // folded counters of exited threads (and of caches that left at fork)
  // Counters of operations by a thread that has no cache (its cache could not be made, or its
  // thread_local state is being destroyed): a leaf lock, taken with an arena's held.
  mutable std::mutex orphan_mu_;
  ThreadCounters orphan_;
  std::atomic<bool> trim_pending_{false};
};

// "1.50 GiB"; sizes are unsigned (a request of 2^63 bytes reads "8.00 EiB").
std::string format_bytes(uint64_t bytes);

}  // namespace torchpool
