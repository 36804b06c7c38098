#include "allocator.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <sstream>

namespace torchpool {

std::string format_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024.0 && u < 6) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

namespace {
uint64_t unsigned_gauge(int64_t v) { return v < 0 ? 0 : static_cast<uint64_t>(v); }
}  // namespace

CachingAllocator::CachingAllocator(std::shared_ptr<Upstream> upstream, AllocatorConfig config,
                                   std::shared_ptr<StreamEvents> events)
    : upstream_(std::move(upstream)), events_(std::move(events)), config_(std::move(config)) {
  if (config_.arenas == 0) config_.arenas = 1;
  // The arenas map through one chain of adaptors (Note [Limiting upstream], Note [Tracing upstream]):
  // the trace records what the pools got, the limit counts every arena's memory together.
  std::shared_ptr<Upstream> up = upstream_;
  if (config_.max_bytes) up = std::make_shared<LimitingUpstream>(std::move(up), config_.max_bytes);
  pool_upstream_ = std::make_shared<TracingUpstream>(std::move(up), trace_, config_.device);
  for (unsigned i = 0; i < config_.arenas; ++i) {
    auto a = std::make_unique<Arena>();
    a->pool = std::make_unique<Pool>(*pool_upstream_, config_.pool);
    arenas_.push_back(std::move(a));
  }
  gen_ = next_gen();
  // Note [Thread caches]: host allocators only (a cache serves stream 0 and knows no events).
  if (config_.thread_cache && !events_ && config_.pool.size_classes && arenas_.size() <= 256) {
    while (tcache_classes_ < kNumSizeClasses && class_bytes(tcache_classes_) <= config_.pool.max_class_bytes)
      ++tcache_classes_;
    tcache_ = tcache_classes_ > 0;
    tcache_max_bytes_ = config_.pool.max_class_bytes;
    // The pool's class_for() is a function of 64-byte steps (every class is a multiple of 64 and
    // blocks are aligned to >= 64), so a table of them serves the hot path.
    if (tcache_) {
      tcache_class_of_.assign(tcache_max_bytes_ / 64 + 1, 0xFF);
      for (size_t k = 1; k < tcache_class_of_.size(); ++k) {
        const int32_t cls = arenas_[0]->pool->class_for(k * 64);
        if (cls >= 0 && static_cast<uint32_t>(cls) < tcache_classes_) tcache_class_of_[k] = static_cast<uint8_t>(cls);
      }
    }
  }
  fork_safety::add_allocator(this);  // Note [Fork]
}

CachingAllocator::~CachingAllocator() {
  fork_safety::remove_allocator(this);
  if (tcache_) {  // no thread can retire a cache now: the registry no longer lists this allocator
    forget_my_cache();
    std::lock_guard<std::mutex> g(caches_mu_);
    for (ThreadCache* c : caches_) {
      c->acquire();
      drain_locked(c, false);
      delete c;
    }
    caches_.clear();
  }
  if (live_blocks() == 0) owners_.set_clean();  // no entry is left: its nodes can serve the next map
  // Deferred blocks go with their segments when the pools are destroyed; only the events remain.
  for (auto& p : pending_)
    for (auto e : p.events) events_->destroy(e);
  arenas_.clear();  // the pools unmap through pool_upstream_, which records into trace_: both still alive
}

uint32_t CachingAllocator::arena_for(size_t bytes) {
  if (arenas_.size() == 1 || bytes > kSmallRequestLimit) return 0;
  static std::atomic<uint32_t> next{0};
  thread_local uint32_t mine = next.fetch_add(1, std::memory_order_relaxed);
  return mine % static_cast<uint32_t>(arenas_.size());
}

Block* CachingAllocator::try_allocate(uint32_t arena, size_t bytes, uint64_t stream, ThreadCache* c) {
  Arena& a = *arenas_[arena];
  std::lock_guard<std::mutex> g(a.mu);
  const uint64_t shortfalls = a.pool->target_shortfalls();
  Block* b = a.pool->allocate(bytes, stream);
  // Note [Thread caches]: the reserve target came back short while caches hold blocks: drain them
  if (tcache_ && a.pool->target_shortfalls() != shortfalls && a.pool->lent_bytes())
    trim_pending_.store(true, std::memory_order_relaxed);
  if (!b) return nullptr;
  // Into the owner map before the arena lock goes: lock_all() never sees it half-way.
  if (!owners_.insert(b->addr, b, arena)) {  // no memory for a node of the map: out of memory
    a.pool->free(b);
    return nullptr;
  }
  a.live.store(a.live.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
  if (tcache_) count_alloc(c, b, bytes, /*lent=*/false);
  return b;
}

void CachingAllocator::refuse(size_t bytes, uint32_t arena, uint64_t stream, const char* why) {
  {
    Arena& a = *arenas_[arena];
    std::lock_guard<std::mutex> g(a.mu);
    a.pool->count_oom();
  }
  if (trace_.enabled()) trace_.record(TraceOp::kOom, 0, bytes, bytes, stream, config_.device);
  std::string msg = describe(bytes);
  if (why) msg += std::string(" ") + why;
  throw OutOfMemory(msg, bytes);
}

void* CachingAllocator::allocate(size_t bytes, uint64_t stream) {
  if (bytes == 0) return nullptr;
  ThreadCache* c = nullptr;
  if (tcache_) {  // Note [Thread caches]
    c = my_cache(/*create=*/true);
    if (c && bytes <= tcache_max_bytes_ && stream == 0)
      if (void* p = cache_allocate(c, bytes)) return p;
  }
  const uint32_t arena = arena_for(bytes);
  if (bytes > kMaxRequestBytes)  // Note [Impossible sizes]: no retry, the cache stays
    refuse(bytes, arena, stream, "The request is larger than any allocation can be (4.00 EiB).");
  if (num_pending_.load(std::memory_order_relaxed)) process_events();
  Block* b = try_allocate(arena, bytes, stream, c);
  if (!b) {  // Note [Out of memory]
    {
      Arena& a = *arenas_[arena];
      std::lock_guard<std::mutex> g(a.mu);
      a.pool->count_retry();
    }
    if (num_pending_.load(std::memory_order_relaxed)) wait_pending();
    empty_cache();
    b = try_allocate(arena, bytes, stream, c);
  }
  if (!b) refuse(bytes, arena, stream, nullptr);
  if (tcache_) maybe_trim();
  if (trace_.enabled()) trace_.record(TraceOp::kAlloc, b->addr, b->size, bytes, stream, config_.device);
  return reinterpret_cast<void*>(b->addr);
}

bool CachingAllocator::take_owner(uintptr_t addr, uint32_t arena, Owner* out) {
  *out = owners_.take(addr, arena);
  if (!out->block) return false;
  Arena& a = *arenas_[arena];
  a.live.store(a.live.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
  return true;
}

// The owner-map entry leaves while the arena's lock is held (and after pending_mu_ for a deferred
// block), so a block is never allocated in an arena and absent from the owner map where lock_all()
// can see it (check(), fork: Note [Fork]).  The arena comes from a first, lock-free lookup (Note
// [Flat owner map]).
bool CachingAllocator::free(void* p) {
  if (!p) return true;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  uint32_t arena = 0;
  if (arenas_.size() > 1 || tcache_) {
    const Owner o = owners_.find(addr);
    if (!o.block) return false;
    if (o.arena & kLentTag) return free_lent(o.block, o.arena);  // Note [Thread caches]
    arena = o.arena;
  }
  Arena& a = *arenas_[arena];
  Owner o;
  if (num_uses_.load(std::memory_order_relaxed) == 0) {  // the common case: no record_stream anywhere
    ThreadCache* c = tcache_ ? my_cache(/*create=*/true) : nullptr;  // before the arena's lock
    std::lock_guard<std::mutex> g(a.mu);
    if (!take_owner(addr, arena, &o)) return false;
    if (trace_.enabled())
      trace_.record(TraceOp::kFree, addr, o.block->size, o.block->requested, o.block->segment->stream, config_.device);
    if (tcache_) count_free(c, o.block, o.block->requested, /*lent=*/false);
    a.pool->free(o.block);
    return true;
  }
  std::vector<uint64_t> streams;
  {
    std::lock_guard<std::mutex> g(uses_mu_);
    auto it = uses_.find(addr);
    if (it != uses_.end()) {
      streams = std::move(it->second);
      uses_.erase(it);
      num_uses_.fetch_sub(1, std::memory_order_relaxed);
    }
  }
  std::vector<StreamEvents::Event> events;
  for (uint64_t st : streams) {  // Note [Stream ordering]
    StreamEvents::Event e = events_->record(st);
    if (e) events.push_back(e);
    else events_->synchronize(st);
  }
  if (events.empty()) {
    std::lock_guard<std::mutex> g(a.mu);
    if (!take_owner(addr, arena, &o)) return false;
    if (trace_.enabled())
      trace_.record(TraceOp::kFree, addr, o.block->size, o.block->requested, o.block->segment->stream, config_.device);
    a.pool->free(o.block);
    return true;
  }
  std::lock_guard<std::mutex> pg(pending_mu_);
  {
    std::lock_guard<std::mutex> g(a.mu);
    if (!take_owner(addr, arena, &o)) {
      for (auto e : events) events_->destroy(e);
      return false;
    }
    if (trace_.enabled())
      trace_.record(TraceOp::kFree, addr, o.block->size, o.block->requested, o.block->segment->stream, config_.device);
    a.pool->defer(o.block);
  }
  pending_.push_back(Pending{o.block, o.arena, std::move(events)});
  num_pending_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool CachingAllocator::record_stream(void* p, uint64_t stream) {
  if (!events_) return false;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  const Owner o = owners_.find(addr);
  if (!o.block) return false;
  const uint64_t own = o.block->segment->stream;  // fixed while the block is allocated
  if (own == stream) return true;  // work on one stream runs in order: nothing to wait for
  std::lock_guard<std::mutex> g(uses_mu_);
  auto [it, inserted] = uses_.try_emplace(addr);
  if (inserted) num_uses_.fetch_add(1, std::memory_order_relaxed);
  if (std::find(it->second.begin(), it->second.end(), stream) == it->second.end()) it->second.push_back(stream);
  return true;
}

void CachingAllocator::release_pending_locked() {
  size_t kept = 0;
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    auto& ev = p.events;
    for (size_t j = 0; j < ev.size();) {
      if (events_->done(ev[j])) {
        events_->destroy(ev[j]);
        ev[j] = ev.back();
        ev.pop_back();
      } else {
        ++j;
      }
    }
    if (ev.empty()) {
      Arena& a = *arenas_[p.arena];
      std::lock_guard<std::mutex> g(a.mu);
      a.pool->free(p.block);
    } else {
      if (kept != i) pending_[kept] = std::move(p);
      ++kept;
    }
  }
  pending_.resize(kept);
  num_pending_.store(kept, std::memory_order_relaxed);
}

void CachingAllocator::wait_pending() {
  std::lock_guard<std::mutex> g(pending_mu_);
  for (Pending& p : pending_)
    for (StreamEvents::Event e : p.events) events_->wait(e);
  release_pending_locked();
}

size_t CachingAllocator::process_events() {
  std::lock_guard<std::mutex> g(pending_mu_);
  if (!pending_.empty()) release_pending_locked();
  return pending_.size();
}

bool CachingAllocator::owns(const void* p) const {
  const Owner o = owners_.find(reinterpret_cast<uintptr_t>(p));
  if (o.block && (o.arena & kLentTag))  // a lent block is live only while a cache has handed it out
    return __atomic_load_n(&o.block->requested, __ATOMIC_RELAXED) != 0;
  return o.block != nullptr;
}

std::pair<size_t, size_t> CachingAllocator::block_size(const void* p) const {
  const Owner o = owners_.find(reinterpret_cast<uintptr_t>(p));
  if (!o.block) return {0, 0};
  // size and requested do not change while the block is allocated, and p is live for the caller
  // (Note [Flat owner map]), so reading them without a lock is safe; a lent block's requested is
  // written by thread caches (atomically), 0 while it is idle in one (not live)
  const size_t requested = __atomic_load_n(&o.block->requested, __ATOMIC_RELAXED);
  if ((o.arena & kLentTag) && requested == 0) return {0, 0};
  return {o.block->size, requested};
}

size_t CachingAllocator::empty_cache() {
  process_events();  // only what no stream can still use is released
  drain_thread_caches();  // Note [Thread caches]
  size_t released = 0;
  for (auto& a : arenas_) {
    std::lock_guard<std::mutex> g(a->mu);
    released += a->pool->release_cached();
  }
  return released;
}

Stats CachingAllocator::stats() const {
  Stats total;
  for (auto& a : arenas_) {
    std::lock_guard<std::mutex> g(a->mu);
    total.merge(a->pool->stats_with_derived());
  }
  if (tcache_) {  // Note [Thread caches]: allocation gauges from the threads' counters
    CounterSums s;
    {
      std::lock_guard<std::mutex> g(caches_mu_);
      std::lock_guard<std::mutex> og(orphan_mu_);
      s = sum_counters();
    }
    auto set = [](Stat& st, const CounterSums::G& g) {
      st.current = g.adds - g.subs;
      st.peak = std::max(g.peak, st.current);
      st.allocated = g.adds;
      st.freed = g.subs;
    };
    set(total.allocated_bytes, s.bytes);
    set(total.active_bytes, s.bytes);  // host allocators defer nothing: active == allocated
    set(total.requested_bytes, s.requested);
    set(total.allocation, s.count);
    set(total.active, s.count);
    total.cached_class_bytes.current -= s.lent_out_bytes;  // handed out by a cache: not cached
    total.inactive_split_bytes.current -= s.lent_out_split_bytes;  // nor inactive
    total.inactive_split.current -= s.lent_out_split;
    total.num_class_hits += s.hits;
    for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
      ClassStat& c = total.classes[i];
      c.allocated_blocks = s.cls[i].blocks;
      c.peak_allocated_blocks = std::max(s.cls[i].peak, s.cls[i].blocks);
      c.requested_bytes = s.cls[i].requested;
      c.cached_blocks -= s.cls[i].lent_out;
      c.hits += s.cls[i].hits;
    }
  }
  return total;
}

void CachingAllocator::reset_peaks() {
  for (auto& a : arenas_) {
    std::lock_guard<std::mutex> g(a->mu);
    a->pool->reset_peaks();
  }
  if (!tcache_) return;
  // Another thread may be raising its own peak meanwhile: either store leaves a valid peak.
  auto reset = [](ThreadCounters& k) {
    for (ThreadGauge* g : {&k.bytes, &k.requested, &k.count})
      g->peak.store(std::max<int64_t>(0, g->current()), std::memory_order_relaxed);
    for (auto& c : k.cls)
      c.peak.store(std::max<int64_t>(0, c.blocks.load(std::memory_order_relaxed)), std::memory_order_relaxed);
  };
  std::lock_guard<std::mutex> g(caches_mu_);
  for (ThreadCache* c : caches_) reset(c->counters);
  reset(retired_);
  std::lock_guard<std::mutex> og(orphan_mu_);
  reset(orphan_);
}

std::vector<SegmentView> CachingAllocator::snapshot() const {
  std::vector<SegmentView> out;
  for (auto& a : arenas_) {
    std::lock_guard<std::mutex> g(a->mu);
    auto v = a->pool->snapshot();
    for (SegmentView& sv : v)
      for (BlockView& bv : sv.blocks)  // Note [Thread caches]: handed out (requested != 0) or idle
        if (bv.state == Block::kLent) bv.state = bv.requested ? Block::kAllocated : Block::kCached;
    out.insert(out.end(), std::make_move_iterator(v.begin()), std::make_move_iterator(v.end()));
  }
  return out;
}

void CachingAllocator::lock_all() const {
  caches_mu_.lock();
  for (ThreadCache* c : caches_) c->acquire();
  pending_mu_.lock();
  for (auto& a : arenas_) a->mu.lock();
  owners_.lock();
  const_cast<std::mutex&>(uses_mu_).lock();
  trace_.lock();
  orphan_mu_.lock();
}

void CachingAllocator::unlock_all() const {
  orphan_mu_.unlock();
  trace_.unlock();
  const_cast<std::mutex&>(uses_mu_).unlock();
  owners_.unlock();
  for (auto it = arenas_.rbegin(); it != arenas_.rend(); ++it) (*it)->mu.unlock();
  pending_mu_.unlock();
  for (auto it = caches_.rbegin(); it != caches_.rend(); ++it) (*it)->release();
  caches_mu_.unlock();
}

size_t CachingAllocator::live_blocks() const {
  if (tcache_) {  // Note [Thread caches]: the threads' counters include the caches' handed-out blocks
    std::lock_guard<std::mutex> g(caches_mu_);
    std::lock_guard<std::mutex> og(orphan_mu_);
    const CounterSums s = sum_counters();
    const int64_t n = s.count.adds - s.count.subs;
    return n < 0 ? 0 : static_cast<size_t>(n);
  }
  size_t n = 0;
  for (auto& a : arenas_) n += a->live.load(std::memory_order_relaxed);
  return n;
}

std::string CachingAllocator::check() const {
  // One consistent view: with every lock held no block moves between the arenas, the owner map
  // and the pending list while they are compared (issue: false violations under concurrent use).
  lock_all();
  struct Unlock {
    const CachingAllocator* a;
    ~Unlock() { a->unlock_all(); }
  } unlock{this};
  Stats s;
  size_t live = 0;
  for (size_t i = 0; i < arenas_.size(); ++i) {
    std::string e = arenas_[i]->pool->check();
    if (!e.empty()) return "arena " + std::to_string(i) + ": " + e;
    const Stats& as = arenas_[i]->pool->stats();
    s.merge(as);
    const size_t n = arenas_[i]->live.load(std::memory_order_relaxed);
    if (static_cast<int64_t>(n) != as.allocation.current)
      return "arena " + std::to_string(i) + " has " + std::to_string(n) + " pointers in the owner map but " +
             std::to_string(as.allocation.current) + " allocated blocks";
    // Every allocated block is in the owner map under its own arena (with the counts equal, the map
    // holds nothing else).
    for (const SegmentView& sv : arenas_[i]->pool->snapshot())
      for (const BlockView& bv : sv.blocks) {
        if (bv.state != Block::kAllocated || bv.deferred) continue;
        const Owner o = owners_.find(bv.addr);
        if (!o.block || o.block->addr != bv.addr || o.arena != i)
          return "arena " + std::to_string(i) + ": allocated block at " + std::to_string(bv.addr) +
                 " is missing from the owner map";
      }
    live += n;
  }
  if (static_cast<int64_t>(live) != s.allocation.current)
    return "owner map holds " + std::to_string(live) + " pointers but the arenas hold " +
           std::to_string(s.allocation.current) + " allocated blocks";
  const size_t pending = pending_.size();
  if (static_cast<int64_t>(pending) != s.active.current - s.allocation.current)
    return std::to_string(pending) + " deferred frees are pending but the arenas hold " +
           std::to_string(s.active.current - s.allocation.current) + " deferred blocks";
  return check_caches();
}

std::string CachingAllocator::describe(size_t requested) const {
  const Stats s = stats();
  std::ostringstream m;
  m << "torchpool: out of memory on " << config_.device_name << ": tried to allocate " << format_bytes(requested)
    << " (" << requested << " bytes)"
    << "; allocated " << format_bytes(unsigned_gauge(s.allocated_bytes.current)) << " (requested "
    << format_bytes(unsigned_gauge(s.requested_bytes.current)) << "), reserved "
    << format_bytes(unsigned_gauge(s.reserved_bytes.current)) << ", cached "
    << format_bytes(unsigned_gauge(s.reserved_bytes.current - s.allocated_bytes.current)) << " (parked in size classes "
    << format_bytes(unsigned_gauge(s.cached_class_bytes.current)) << ", largest free block "
    << format_bytes(unsigned_gauge(s.largest_free_block)) << ")";
  if (config_.max_bytes) m << ", limit max_bytes=" << format_bytes(config_.max_bytes);
  m << ", upstream " << upstream_->name() << ". The allocator is still usable; free tensors, call "
    << "torchpool.empty_cache(), or raise max_bytes.";
  return m.str();
}

}  // namespace torchpool
