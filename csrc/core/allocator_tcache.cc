// The thread caches of CachingAllocator: Note [Thread caches] (thread_cache.h).
#include <algorithm>

#include "allocator.h"

namespace torchpool {

namespace {

struct TlsEntry {
  CachingAllocator* alloc;
  uint64_t gen;
  ThreadCache* cache;
};

// The hot path's slot: the cache of the allocator this thread used last (trivially destructible,
// so reading it costs no guard).  dead: the thread's TlsList is destroyed (thread exit); from then
// on this thread counts into orphan_ and caches nothing.
struct TlsSlot {
  uint64_t gen;
  ThreadCache* cache;
  bool dead;
};
thread_local TlsSlot t_slot{0, nullptr, false};

// Runs fn(allocator) with the fork registry's mutex held if e's allocator is still alive: not
// destroyed, and not another allocator at the same address (the generation decides).  Returns whether
// it was.
template <class F>
bool with_entry_allocator(const TlsEntry& e, F&& fn) {
  struct Arg {
    uint64_t gen;
    F* fn;
    bool live;
  } arg{e.gen, &fn, false};
  fork_safety::with_live_allocator(
      e.alloc,
      [](ForkParticipant* p, void* a) {
        auto* r = static_cast<Arg*>(a);
        auto* alloc = static_cast<CachingAllocator*>(p);
        if (alloc->gen() != r->gen) return;
        r->live = true;
        (*r->fn)(alloc);
      },
      &arg);
  return arg.live;
}

struct TlsList {
  std::vector<TlsEntry> entries;
  ~TlsList() {
    t_slot = {0, nullptr, true};
    for (const TlsEntry& e : entries)
      with_entry_allocator(e, [&e](CachingAllocator* a) { a->retire_cache_of_exiting_thread(e.cache); });
  }
};
thread_local TlsList t_list;

std::atomic<uint64_t> g_next_gen{1};

}  // namespace

uint64_t CachingAllocator::next_gen() { return g_next_gen.fetch_add(1, std::memory_order_relaxed); }

ThreadCache* CachingAllocator::my_cache(bool create) {
  if (t_slot.gen == gen_) return t_slot.cache;
  if (t_slot.dead) return nullptr;
  for (const TlsEntry& e : t_list.entries)
    if (e.gen == gen_) {
      t_slot = {gen_, e.cache, false};
      return e.cache;
    }
  return create ? make_cache() : nullptr;
}

ThreadCache* CachingAllocator::make_cache() {
  auto* c = new (std::nothrow) ThreadCache(tcache_classes_);
  if (!c) return nullptr;
  {
    std::lock_guard<std::mutex> g(caches_mu_);
    caches_.push_back(c);
  }
  // Entries of allocators that are gone stay until the thread exits; drop them here now and then so
  // a long-lived thread that sees many short-lived allocators (the replay) keeps a short list.
  auto& v = t_list.entries;
  if (v.size() >= 8) {
    std::vector<TlsEntry> keep;
    for (const TlsEntry& e : v)
      if (with_entry_allocator(e, [](CachingAllocator*) {})) keep.push_back(e);
    v = std::move(keep);
  }
  v.push_back({this, gen_, c});
  t_slot = {gen_, c, false};
  return c;
}

void CachingAllocator::forget_my_cache() {
  if (t_slot.dead) return;
  if (t_slot.gen == gen_) t_slot = {0, nullptr, false};
  auto& v = t_list.entries;
  v.erase(std::remove_if(v.begin(), v.end(), [this](const TlsEntry& e) { return e.gen == gen_; }), v.end());
}

// ---- counting -------------------------------------------------------------------------------

namespace {
void bump(std::atomic<int64_t>& a, int64_t d) { ThreadGauge::bump(a, d); }
void count_alloc_into(ThreadCounters& k, const Block* b, size_t bytes, bool lent) {
  const auto size = static_cast<int64_t>(b->size);
  k.bytes.add(size);
  k.requested.add(static_cast<int64_t>(bytes));
  k.count.add(1);
  if (b->cls >= 0) {
    ThreadCounters::Class& c = k.cls[b->cls];
    bump(c.blocks, 1);
    const int64_t n = c.blocks.load(std::memory_order_relaxed);
    if (n > c.peak.load(std::memory_order_relaxed)) c.peak.store(n, std::memory_order_relaxed);
    bump(c.requested, static_cast<int64_t>(bytes));
    if (lent) {
      bump(c.lent_out, 1);
      bump(k.lent_out_bytes, size);
      if (!b->lent_carved) {  // a carved block's miss was counted when it was lent
        bump(c.hits, 1);
        bump(k.hits, 1);
      }
      if (b->lent_split) {
        bump(k.lent_out_split_bytes, size);
        bump(k.lent_out_split, 1);
      }
    }
  }
}
void count_free_into(ThreadCounters& k, const Block* b, size_t requested, bool lent) {
  const auto size = static_cast<int64_t>(b->size);
  k.bytes.sub(size);
  k.requested.sub(static_cast<int64_t>(requested));
  k.count.sub(1);
  if (b->cls >= 0) {
    ThreadCounters::Class& c = k.cls[b->cls];
    bump(c.blocks, -1);
    bump(c.requested, -static_cast<int64_t>(requested));
    if (lent) {
      bump(c.lent_out, -1);
      bump(k.lent_out_bytes, -size);
      if (b->lent_split) {
        bump(k.lent_out_split_bytes, -size);
        bump(k.lent_out_split, -1);
      }
    }
  }
}
void fold_gauge(ThreadGauge& into, const ThreadGauge& from) {
  bump(into.adds, from.adds.load(std::memory_order_relaxed));
  bump(into.subs, from.subs.load(std::memory_order_relaxed));
  bump(into.peak, from.peak.load(std::memory_order_relaxed));
}
}  // namespace

void CachingAllocator::count_alloc(ThreadCache* c, const Block* b, size_t bytes, bool lent) {
  if (c) return count_alloc_into(c->counters, b, bytes, lent);
  std::lock_guard<std::mutex> g(orphan_mu_);
  count_alloc_into(orphan_, b, bytes, lent);
}

void CachingAllocator::count_free(ThreadCache* c, const Block* b, size_t requested, bool lent) {
  if (c) return count_free_into(c->counters, b, requested, lent);
  std::lock_guard<std::mutex> g(orphan_mu_);
  count_free_into(orphan_, b, requested, lent);
}

void CachingAllocator::fold(ThreadCounters& into, const ThreadCounters& from) {
  fold_gauge(into.bytes, from.bytes);
  fold_gauge(into.requested, from.requested);
  fold_gauge(into.count, from.count);
  bump(into.lent_out_bytes, from.lent_out_bytes.load(std::memory_order_relaxed));
  bump(into.lent_out_split_bytes, from.lent_out_split_bytes.load(std::memory_order_relaxed));
  bump(into.lent_out_split, from.lent_out_split.load(std::memory_order_relaxed));
  bump(into.hits, from.hits.load(std::memory_order_relaxed));
  for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
    bump(into.cls[i].blocks, from.cls[i].blocks.load(std::memory_order_relaxed));
    bump(into.cls[i].peak, from.cls[i].peak.load(std::memory_order_relaxed));
    bump(into.cls[i].requested, from.cls[i].requested.load(std::memory_order_relaxed));
    bump(into.cls[i].lent_out, from.cls[i].lent_out.load(std::memory_order_relaxed));
    bump(into.cls[i].hits, from.cls[i].hits.load(std::memory_order_relaxed));
  }
}

CachingAllocator::CounterSums CachingAllocator::sum_counters() const {
  CounterSums s;
  auto add = [&s](const ThreadCounters& k) {
    auto g = [](CounterSums::G& into, const ThreadGauge& from) {
      into.adds += from.adds.load(std::memory_order_relaxed);
      into.subs += from.subs.load(std::memory_order_relaxed);
      into.peak += from.peak.load(std::memory_order_relaxed);
    };
    g(s.bytes, k.bytes);
    g(s.requested, k.requested);
    g(s.count, k.count);
    s.lent_out_bytes += k.lent_out_bytes.load(std::memory_order_relaxed);
    s.lent_out_split_bytes += k.lent_out_split_bytes.load(std::memory_order_relaxed);
    s.lent_out_split += k.lent_out_split.load(std::memory_order_relaxed);
    s.hits += k.hits.load(std::memory_order_relaxed);
    for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
      s.cls[i].blocks += k.cls[i].blocks.load(std::memory_order_relaxed);
      s.cls[i].peak += k.cls[i].peak.load(std::memory_order_relaxed);
      s.cls[i].requested += k.cls[i].requested.load(std::memory_order_relaxed);
      s.cls[i].lent_out += k.cls[i].lent_out.load(std::memory_order_relaxed);
      s.cls[i].hits += k.cls[i].hits.load(std::memory_order_relaxed);
    }
  };
  for (const ThreadCache* c : caches_) add(c->counters);
  add(retired_);
  add(orphan_);
  return s;
}

// ---- the cache's paths -----------------------------------------------------------------------

size_t CachingAllocator::refill(ThreadCache* c, uint32_t cls) {
  ThreadCache::Bin& bin = c->bins[cls];
  const uint32_t arena = arena_for(class_bytes(cls));
  Arena& a = *arenas_[arena];
  const size_t want = bin.batch;
  bin.batch = std::min(bin.batch * 2, std::max<uint32_t>(1, bin.cap / 2));
  std::lock_guard<std::mutex> g(a.mu);
  const uint64_t shortfalls = a.pool->target_shortfalls();
  Block** out = bin.items + bin.n;
  size_t k = a.pool->lend(cls, 0, out, want);
  for (size_t i = 0; i < k; ++i)
    if (!owners_.insert(out[i]->addr, out[i], arena | kLentTag)) {  // no memory for a node of the map
      a.pool->take_back(out + i, k - i);
      k = i;
      break;
    }
  if (a.pool->target_shortfalls() != shortfalls) trim_pending_.store(true, std::memory_order_relaxed);
  bin.n += static_cast<uint32_t>(k);
  return k;
}

void* CachingAllocator::cache_allocate(ThreadCache* c, size_t bytes) {
  const uint8_t cls = tcache_class_of_[(bytes + 63) / 64];  // bytes <= tcache_max_bytes_
  if (cls == 0xFF) return nullptr;
  if (!c->try_acquire()) return nullptr;  // a drain holds this cache: the arena serves the request
  ThreadCache::Bin& bin = c->bins[cls];
  bool refilled = false;
  if (bin.n == 0) {
    if (refill(c, static_cast<uint32_t>(cls)) == 0) {
      c->release();
      return nullptr;  // out of memory: the arena path retries after freeing every cache
    }
    refilled = true;
  }
  Block* b = bin.items[--bin.n];
  __atomic_store_n(&b->requested, bytes, __ATOMIC_RELAXED);
  count_alloc(c, b, bytes, /*lent=*/true);
  b->lent_carved = false;  // the owner's: a lent block is in one cache at a time
  c->release();
  if (refilled) maybe_trim();
  if (trace_.enabled()) trace_.record(TraceOp::kAlloc, b->addr, b->size, bytes, 0, config_.device);
  return reinterpret_cast<void*>(b->addr);
}

bool CachingAllocator::free_lent(Block* b, uint32_t tagged) {
  ThreadCache* c = my_cache(/*create=*/true);
  const size_t requested = __atomic_load_n(&b->requested, __ATOMIC_RELAXED);
  if (requested == 0) return false;  // idle in a cache: not a live pointer
  if (trace_.enabled()) trace_.record(TraceOp::kFree, b->addr, b->size, requested, 0, config_.device);
  if (c && c->try_acquire()) {
    __atomic_store_n(&b->requested, size_t{0}, __ATOMIC_RELAXED);
    count_free(c, b, requested, /*lent=*/true);
    ThreadCache::Bin& bin = c->bins[b->cls];
    if (bin.n == bin.cap) {  // full: the older half goes back to the arenas
      const uint32_t half = bin.cap / 2;
      give_back(bin.items, half, /*locked=*/false);
      std::copy(bin.items + half, bin.items + bin.n, bin.items);
      bin.n -= half;
    }
    bin.items[bin.n++] = b;
    c->release();
    return true;
  }
  // No cache to take it (a drain holds it, or there is none): straight back to its arena.
  const uint32_t arena = tagged & ~kLentTag;
  Arena& a = *arenas_[arena];
  std::lock_guard<std::mutex> g(a.mu);
  __atomic_store_n(&b->requested, size_t{0}, __ATOMIC_RELAXED);
  count_free(c, b, requested, /*lent=*/true);
  owners_.take(b->addr, tagged);
  a.pool->take_back(&b, 1);
  return true;
}

void CachingAllocator::give_back(Block* const* blocks, size_t n, bool locked) {
  // Each block's arena first, while every block is still lent to the caller: once one arena has
  // taken its blocks back, they may be merged and their Block objects reused by other threads.
  uint32_t small_tags[64];
  std::vector<uint32_t> big_tags(n > 64 ? n : 0);
  uint32_t* tags = n > 64 ? big_tags.data() : small_tags;
  for (size_t j = 0; j < n; ++j) tags[j] = owners_.find(blocks[j]->addr).arena;
  constexpr size_t kBatch = 64;
  Block* batch[kBatch];
  for (uint32_t i = 0; i < arenas_.size(); ++i) {
    Arena& a = *arenas_[i];
    std::unique_lock<std::mutex> lk(a.mu, std::defer_lock);
    size_t k = 0;
    auto flush = [&] {
      if (!locked && !lk.owns_lock()) lk.lock();
      for (size_t j = 0; j < k; ++j) owners_.take(batch[j]->addr, i | kLentTag);
      a.pool->take_back(batch, k);
      k = 0;
    };
    for (size_t j = 0; j < n; ++j) {
      if (tags[j] != (i | kLentTag)) continue;
      batch[k++] = blocks[j];
      if (k == kBatch) flush();
    }
    if (k) flush();
  }
}

void CachingAllocator::drain_locked(ThreadCache* c, bool arenas_locked) {
  std::vector<Block*> all;
  for (uint32_t cls = 0; cls < tcache_classes_; ++cls) {
    ThreadCache::Bin& bin = c->bins[cls];
    all.insert(all.end(), bin.items, bin.items + bin.n);
    bin.n = 0;
  }
  if (!all.empty()) give_back(all.data(), all.size(), arenas_locked);
}

void CachingAllocator::drain_thread_caches() {
  if (!tcache_) return;
  std::lock_guard<std::mutex> g(caches_mu_);
  for (ThreadCache* c : caches_) {
    c->acquire();
    drain_locked(c, false);
    c->release();
  }
}

size_t CachingAllocator::thread_cache_bytes() const {
  if (!tcache_) return 0;
  std::lock_guard<std::mutex> g(caches_mu_);
  size_t bytes = 0;
  for (ThreadCache* c : caches_) {
    c->acquire();
    for (uint32_t cls = 0; cls < tcache_classes_; ++cls) bytes += c->bins[cls].n * class_bytes(cls);
    c->release();
  }
  return bytes;
}

void CachingAllocator::maybe_trim() {
  if (trim_pending_.load(std::memory_order_relaxed) && trim_pending_.exchange(false, std::memory_order_relaxed))
    drain_thread_caches();
}

void CachingAllocator::retire_cache_of_exiting_thread(ThreadCache* c) {
  std::lock_guard<std::mutex> g(caches_mu_);
  auto it = std::find(caches_.begin(), caches_.end(), c);
  if (it == caches_.end()) return;
  c->acquire();
  drain_locked(c, false);
  fold(retired_, c->counters);
  caches_.erase(it);
  delete c;
}

void CachingAllocator::fork_child() {
  // Every lock is held (fork_prepare), every cache's flag too.  The caches of threads that do not
  // exist here would keep their idle blocks forever: give them back, keep their counters.
  std::vector<ThreadCache*> keep;
  for (ThreadCache* c : caches_) {
    if (pthread_equal(c->owner, pthread_self())) {
      keep.push_back(c);
      continue;
    }
    drain_locked(c, /*arenas_locked=*/true);
    fold(retired_, c->counters);
    delete c;
  }
  caches_ = std::move(keep);
  unlock_all();
}

std::string CachingAllocator::check_caches() const {
  // lock_all() is held: no bin, counter or lent block moves.
  int64_t lent_blocks = 0, lent_requested = 0;
  for (size_t i = 0; i < arenas_.size(); ++i)
    for (const SegmentView& sv : arenas_[i]->pool->snapshot())
      for (const BlockView& bv : sv.blocks) {
        if (bv.state != Block::kLent) continue;
        ++lent_blocks;
        lent_requested += static_cast<int64_t>(bv.requested);
        const Owner o = owners_.find(bv.addr);
        if (!o.block || o.block->addr != bv.addr || o.arena != (i | kLentTag))
          return "arena " + std::to_string(i) + ": lent block at " + std::to_string(bv.addr) +
                 " is missing from the owner map";
      }
  if (!tcache_) return lent_blocks ? "blocks are lent but thread caches are off" : "";
  int64_t idle = 0;
  for (const ThreadCache* c : caches_)
    for (uint32_t cls = 0; cls < tcache_classes_; ++cls)
      for (uint32_t j = 0; j < c->bins[cls].n; ++j) {
        const Block* b = c->bins[cls].items[j];
        if (b->state != Block::kLent || b->cls != static_cast<int32_t>(cls) || b->requested != 0)
          return "thread cache holds a block at " + std::to_string(b->addr) + " that is not an idle lent block of class " +
                 std::to_string(cls);
        ++idle;
      }
  const CounterSums s = sum_counters();
  int64_t lent_out = 0, pool_blocks = 0, pool_bytes = 0, pool_requested = 0;
  for (const auto& cs : s.cls) lent_out += cs.lent_out;
  for (const auto& a : arenas_) {
    pool_blocks += a->pool->stats().allocation.current;
    pool_bytes += a->pool->stats().allocated_bytes.current;
    pool_requested += a->pool->stats().requested_bytes.current;
  }
  if (idle + lent_out != lent_blocks)
    return std::to_string(lent_blocks) + " blocks are lent but the caches hold " + std::to_string(idle) +
           " and have handed out " + std::to_string(lent_out);
  if (s.count.adds - s.count.subs != pool_blocks + lent_out)
    return "thread counters hold " + std::to_string(s.count.adds - s.count.subs) + " allocations but the arenas hold " +
           std::to_string(pool_blocks) + " and the caches have handed out " + std::to_string(lent_out);
  if (s.bytes.adds - s.bytes.subs != pool_bytes + s.lent_out_bytes)
    return "thread counters hold " + std::to_string(s.bytes.adds - s.bytes.subs) + " allocated bytes, the arenas " +
           std::to_string(pool_bytes) + " and the caches' handed-out blocks " + std::to_string(s.lent_out_bytes);
  if (s.requested.adds - s.requested.subs != pool_requested + lent_requested)
    return "thread counters hold " + std::to_string(s.requested.adds - s.requested.subs) +
           " requested bytes, the arenas " + std::to_string(pool_requested) + " and the caches' handed-out blocks " +
           std::to_string(lent_requested);
  return {};
}

}  // namespace torchpool
