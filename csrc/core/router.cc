#include "router.h"

#include <algorithm>
#include <stdexcept>
#include <thread>

namespace torchpool {
namespace {

uint32_t reader_slot() {
  static std::atomic<uint32_t> next{0};
  thread_local uint32_t mine = next.fetch_add(1, std::memory_order_relaxed) % Router::kReaderSlots;
  return mine;
}

// Adds an allocator's statistics into a running total that outlives it: sums, and the larger peak.
void absorb(Stats& into, const Stats& s) {
#define TP_ABSORB_GAUGE(name, help)                          \
  into.name.current += s.name.current;                       \
  into.name.allocated += s.name.allocated;                   \
  into.name.freed += s.name.freed;                           \
  into.name.peak = std::max(into.name.peak, s.name.peak);
  TORCHPOOL_GAUGES(TP_ABSORB_GAUGE)
#undef TP_ABSORB_GAUGE
#define TP_ABSORB_COUNTER(name, help) into.name += s.name;
  TORCHPOOL_COUNTERS(TP_ABSORB_COUNTER)
#undef TP_ABSORB_COUNTER
  for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
    ClassStat& c = into.classes[i];
    const ClassStat& o = s.classes[i];
    const int64_t peak = std::max(c.peak_allocated_blocks, o.peak_allocated_blocks);
#define TP_ABSORB_CLASS(name, help) c.name += o.name;
    TORCHPOOL_CLASS_STATS(TP_ABSORB_CLASS)
#undef TP_ABSORB_CLASS
    c.peak_allocated_blocks = peak;  // a peak, not a sum
  }
  into.largest_free_block = std::max(into.largest_free_block, s.largest_free_block);
}

// The inverse of absorb for the sums (peaks stay: a peak was reached).
void unabsorb(Stats& from, const Stats& s) {
#define TP_UNABSORB_GAUGE(name, help)  \
  from.name.current -= s.name.current; \
  from.name.allocated -= s.name.allocated; \
  from.name.freed -= s.name.freed;
  TORCHPOOL_GAUGES(TP_UNABSORB_GAUGE)
#undef TP_UNABSORB_GAUGE
#define TP_UNABSORB_COUNTER(name, help) from.name -= s.name;
  TORCHPOOL_COUNTERS(TP_UNABSORB_COUNTER)
#undef TP_UNABSORB_COUNTER
  for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
    const int64_t peak = from.classes[i].peak_allocated_blocks;
#define TP_UNABSORB_CLASS(name, help) from.classes[i].name -= s.classes[i].name;
    TORCHPOOL_CLASS_STATS(TP_UNABSORB_CLASS)
#undef TP_UNABSORB_CLASS
    from.classes[i].peak_allocated_blocks = peak;  // peaks stay
  }
}

}  // namespace

Router::Section::Section(const Router& r) : r_(r), slot_(reader_slot()) {
  parity_ = r_.epoch_.load(std::memory_order_seq_cst) & 1;
  r_.readers_[parity_][slot_].n.fetch_add(1, std::memory_order_seq_cst);
}

Router::Section::~Section() { r_.readers_[parity_][slot_].n.fetch_sub(1, std::memory_order_release); }

Router::Router() { fork_safety::add_outer(this, 1); }

Router::~Router() { fork_safety::remove_outer(this); }

void Router::synchronize() const {
  // Both parities, one after the other (as SRCU does): a reader that read the epoch long ago may count
  // itself in either, and only one of them is drained by a single flip.  Each flip sends new readers to
  // the parity not being waited for, so a steady stream of frees cannot starve the writer.
  for (int phase = 0; phase < 2; ++phase) {
    const uint32_t old = epoch_.fetch_add(1, std::memory_order_seq_cst) & 1;
    for (;;) {
      int64_t busy = 0;
      for (const Counter& c : readers_[old]) busy += c.n.load(std::memory_order_seq_cst);
      if (busy == 0) break;
      std::this_thread::yield();
    }
  }
}

void Router::retire_active_locked() {
  CachingAllocator* prev = active_.load(std::memory_order_relaxed);
  if (!prev) return;
  active_.store(nullptr, std::memory_order_seq_cst);
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i].get() == prev) retired_[i].store(true, std::memory_order_relaxed);
}

void Router::install(std::shared_ptr<CachingAllocator> a) {
  if (!a) throw std::invalid_argument("torchpool: Router::install of a null allocator");
  std::vector<std::shared_ptr<CachingAllocator>> dead;
  {
    std::lock_guard<std::mutex> g(mu_);
    const size_t used = used_.load(std::memory_order_relaxed);
    size_t slot = kSlots;
    for (size_t i = 0; i < used && slot == kSlots; ++i)
      if (owners_[i] == a) slot = i;  // installed before and still held: it serves again
    if (slot == kSlots) {
      for (int attempt = 0; attempt < 2 && slot == kSlots; ++attempt) {
        if (attempt == 1) sweep_locked(dead);
        for (size_t i = 0; i < kSlots && slot == kSlots; ++i)
          if (!owners_[i]) slot = i;
      }
      if (slot == kSlots)
        throw std::runtime_error("torchpool: " + std::to_string(kSlots) +
                                 " torchpool allocators still own live tensors; free tensors of earlier "
                                 "install() calls before installing another");
      for (auto it = departed_parts_.begin(); it != departed_parts_.end(); ++it) {
        if (it->first.lock() == a) {  // freed before, installed again: its counters are held again
          unabsorb(departed_, it->second);
          departed_parts_.erase(it);
          break;
        }
      }
      owners_[slot] = a;
      slots_[slot].store(a.get(), std::memory_order_seq_cst);
      if (slot >= used) used_.store(slot + 1, std::memory_order_seq_cst);
    }
    if (active_.load(std::memory_order_relaxed) != a.get()) retire_active_locked();
    retired_[slot].store(false, std::memory_order_relaxed);
    active_.store(a.get(), std::memory_order_seq_cst);
    synchronize();  // allocations that began on the retired allocator have finished
    sweep_locked(dead);
  }
}

void Router::uninstall() {
  std::vector<std::shared_ptr<CachingAllocator>> dead;
  std::lock_guard<std::mutex> g(mu_);
  retire_active_locked();
  synchronize();
  sweep_locked(dead);
}

size_t Router::sweep() {
  std::vector<std::shared_ptr<CachingAllocator>> dead;
  std::lock_guard<std::mutex> g(mu_);
  return sweep_locked(dead);
}

size_t Router::sweep_locked(std::vector<std::shared_ptr<CachingAllocator>>& dead) {
  // Retired allocators get no new blocks (the synchronize() after retiring saw every allocation
  // that began on them finish), so "owns no block" stays true once seen.
  std::vector<size_t> cleared;
  const size_t used = used_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < used; ++i) {
    if (!owners_[i] || !retired_[i].load(std::memory_order_relaxed)) continue;
    if (owners_[i]->stats().active.current != 0) continue;
    slots_[i].store(nullptr, std::memory_order_seq_cst);
    cleared.push_back(i);
  }
  if (cleared.empty()) return 0;
  synchronize();  // no free path still looks at the cleared allocators
  for (size_t i : cleared) {
    owners_[i]->empty_cache();
    const Stats last = owners_[i]->stats();
    absorb(departed_, last);
    if (owners_[i].use_count() > 1) departed_parts_.emplace_back(owners_[i], last);
    dead.push_back(std::move(owners_[i]));  // the caller drops the last reference (if it is the last)
    retired_[i].store(false, std::memory_order_relaxed);
  }
  departed_parts_.erase(std::remove_if(departed_parts_.begin(), departed_parts_.end(),
                                       [](const auto& e) { return e.first.expired(); }),
                        departed_parts_.end());
  size_t n = used;
  while (n > 0 && !owners_[n - 1]) --n;
  used_.store(n, std::memory_order_seq_cst);
  freed_ += cleared.size();
  return cleared.size();
}

std::shared_ptr<CachingAllocator> Router::active() const {
  std::lock_guard<std::mutex> g(mu_);
  CachingAllocator* a = active_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i].get() == a && a) return owners_[i];
  return nullptr;
}

CachingAllocator* Router::free(void* p, size_t* requested) {
  CachingAllocator* act = active_.load(std::memory_order_seq_cst);
  if (act) {
    if (requested) *requested = act->block_size(p).second;
    if (act->free(p)) return act;
  }
  const size_t used = used_.load(std::memory_order_seq_cst);
  for (size_t i = 0; i < used; ++i) {
    CachingAllocator* a = slots_[i].load(std::memory_order_seq_cst);
    if (!a || a == act) continue;
    if (requested) *requested = a->block_size(p).second;
    if (!a->free(p)) continue;
    // Note [Retired allocators]: the last block of a retired allocator gives its memory back now.
    if (retired_[i].load(std::memory_order_relaxed) && a->live_blocks() == 0) a->empty_cache();
    return a;
  }
  return nullptr;
}

std::vector<std::shared_ptr<CachingAllocator>> Router::allocators() const {
  std::lock_guard<std::mutex> g(mu_);
  std::vector<std::shared_ptr<CachingAllocator>> out;
  CachingAllocator* a = active_.load(std::memory_order_relaxed);
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i] && owners_[i].get() == a) out.push_back(owners_[i]);
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i] && owners_[i].get() != a) out.push_back(owners_[i]);
  return out;
}

size_t Router::live_blocks() const {
  std::lock_guard<std::mutex> g(mu_);
  size_t n = 0;
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i]) n += static_cast<size_t>(owners_[i]->stats().active.current);
  return n;
}

Stats Router::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  Stats held;
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i]) held.merge(owners_[i]->stats());
  absorb(held, departed_);
  return held;
}

void Router::reset_peaks() {
  std::lock_guard<std::mutex> g(mu_);
  for (size_t i = 0; i < used_.load(std::memory_order_relaxed); ++i)
    if (owners_[i]) owners_[i]->reset_peaks();
  departed_.reset_peaks();
}

size_t Router::retired_freed() const {
  std::lock_guard<std::mutex> g(mu_);
  return freed_;
}

void Router::fork_prepare() { mu_.lock(); }
void Router::fork_parent() { mu_.unlock(); }
void Router::fork_child() {
  for (auto& parity : readers_)
    for (Counter& c : parity) c.n.store(0, std::memory_order_relaxed);
  mu_.unlock();
}

}  // namespace torchpool
