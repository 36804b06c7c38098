#include "allocator.h"

#include <atomic>
#include <cstdio>
#include <sstream>

namespace torchpool {

std::string format_bytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while ((v >= 1024.0 || v <= -1024.0) && u < 4) {
    v /= 1024.0;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  else std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  return buf;
}

CachingAllocator::CachingAllocator(std::shared_ptr<Upstream> upstream, AllocatorConfig config)
    : upstream_(std::move(upstream)), config_(std::move(config)), budget_(config_.max_bytes) {
  if (config_.arenas == 0) config_.arenas = 1;
  for (unsigned i = 0; i < config_.arenas; ++i) {
    auto a = std::make_unique<Arena>();
    a->pool = std::make_unique<Pool>(*upstream_, config_.pool, &budget_);
    a->pool->set_segment_listener([this](const SegmentEvent& e) {
      if (trace_.enabled())
        trace_.record(e.mapped ? TraceOp::kSegmentMap : TraceOp::kSegmentUnmap, e.base, e.size, 0, e.stream, config_.device);
    });
    arenas_.push_back(std::move(a));
  }
}

CachingAllocator::~CachingAllocator() = default;

uint32_t CachingAllocator::arena_for(size_t bytes) {
  if (arenas_.size() == 1 || bytes > kMaxClassBytes) return 0;
  static std::atomic<uint32_t> next{0};
  thread_local uint32_t mine = next.fetch_add(1, std::memory_order_relaxed);
  return mine % static_cast<uint32_t>(arenas_.size());
}

Block* CachingAllocator::try_allocate(uint32_t arena, size_t bytes, uint64_t stream) {
  Arena& a = *arenas_[arena];
  std::lock_guard<std::mutex> g(a.mu);
  return a.pool->allocate(bytes, stream);
}

void* CachingAllocator::allocate(size_t bytes, uint64_t stream) {
  if (bytes == 0) return nullptr;
  const uint32_t arena = arena_for(bytes);
  Block* b = try_allocate(arena, bytes, stream);
  if (!b) {  // Note [Out of memory]
    {
      Arena& a = *arenas_[arena];
      std::lock_guard<std::mutex> g(a.mu);
      a.pool->count_retry();
    }
    empty_cache();
    b = try_allocate(arena, bytes, stream);
  }
  if (!b) {
    {
      Arena& a = *arenas_[arena];
      std::lock_guard<std::mutex> g(a.mu);
      a.pool->count_oom();
    }
    if (trace_.enabled()) trace_.record(TraceOp::kOom, 0, bytes, bytes, stream, config_.device);
    throw OutOfMemory(describe(bytes), bytes);
  }
  {
    Shard& sh = shard(b->addr);
    std::lock_guard<std::mutex> g(sh.mu);
    sh.map.emplace(b->addr, Owner{b, arena});
  }
  if (trace_.enabled()) trace_.record(TraceOp::kAlloc, b->addr, b->size, bytes, stream, config_.device);
  return reinterpret_cast<void*>(b->addr);
}

bool CachingAllocator::free(void* p) {
  if (!p) return true;
  const auto addr = reinterpret_cast<uintptr_t>(p);
  Owner o;
  {
    Shard& sh = shard(addr);
    std::lock_guard<std::mutex> g(sh.mu);
    auto it = sh.map.find(addr);
    if (it == sh.map.end()) return false;
    o = it->second;
    sh.map.erase(it);
  }
  if (trace_.enabled())
    trace_.record(TraceOp::kFree, addr, o.block->size, o.block->requested, o.block->segment->stream, config_.device);
  Arena& a = *arenas_[o.arena];
  std::lock_guard<std::mutex> g(a.mu);
  a.pool->free(o.block);
  return true;
}

bool CachingAllocator::owns(const void* p) const {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  Shard& sh = shard(addr);
  std::lock_guard<std::mutex> g(sh.mu);
  return sh.map.count(addr) != 0;
}

std::pair<size_t, size_t> CachingAllocator::block_size(const void* p) const {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  Shard& sh = shard(addr);
  std::lock_guard<std::mutex> g(sh.mu);
  auto it = sh.map.find(addr);
  if (it == sh.map.end()) return {0, 0};
  // size and requested do not change while the block is allocated, so reading them here is safe
  return {it->second.block->size, it->second.block->requested};
}

size_t CachingAllocator::empty_cache() {
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
  return total;
}

void CachingAllocator::reset_peaks() {
  for (auto& a : arenas_) {
    std::lock_guard<std::mutex> g(a->mu);
    a->pool->reset_peaks();
  }
}

std::vector<SegmentView> CachingAllocator::snapshot() const {
  std::vector<SegmentView> out;
  for (auto& a : arenas_) {
    std::lock_guard<std::mutex> g(a->mu);
    auto v = a->pool->snapshot();
    out.insert(out.end(), std::make_move_iterator(v.begin()), std::make_move_iterator(v.end()));
  }
  return out;
}

std::string CachingAllocator::check() const {
  for (size_t i = 0; i < arenas_.size(); ++i) {
    std::lock_guard<std::mutex> g(arenas_[i]->mu);
    std::string e = arenas_[i]->pool->check();
    if (!e.empty()) return "arena " + std::to_string(i) + ": " + e;
  }
  size_t live = 0;
  for (auto& sh : shards_) {
    std::lock_guard<std::mutex> g(sh.mu);
    live += sh.map.size();
  }
  const Stats s = stats();
  if (static_cast<int64_t>(live) != s.allocation.current)
    return "owner map holds " + std::to_string(live) + " pointers but the arenas hold " +
           std::to_string(s.allocation.current) + " allocated blocks";
  return {};
}

std::string CachingAllocator::describe(size_t requested) const {
  const Stats s = stats();
  std::ostringstream m;
  m << "torchpool: out of memory on " << config_.device_name << ": tried to allocate " << format_bytes(requested)
    << "; allocated " << format_bytes(s.allocated_bytes.current) << " (requested "
    << format_bytes(s.requested_bytes.current) << "), reserved " << format_bytes(s.reserved_bytes.current)
    << ", cached " << format_bytes(s.reserved_bytes.current - s.allocated_bytes.current) << " (parked in size classes "
    << format_bytes(s.cached_class_bytes.current) << ", largest free block " << format_bytes(s.largest_free_block)
    << ")";
  if (config_.max_bytes) m << ", limit max_bytes=" << format_bytes(static_cast<int64_t>(config_.max_bytes));
  m << ", upstream " << upstream_->name() << ". The allocator is still usable; free tensors, call "
    << "torchpool.empty_cache(), or raise max_bytes.";
  return m.str();
}

}  // namespace torchpool
