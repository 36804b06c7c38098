// LimitingUpstream: an upstream adaptor that refuses memory past a byte limit (RMM's
// limiting_resource_adaptor, composed the same way: it wraps another upstream and forwards to it).
//
// Note [Limiting upstream]
// ------------------------
// Rationale: a byte limit is a policy about the upstream, not about how the pool carves blocks, so it
// lives in one adaptor instead of in the pool (and in each upstream that wanted one).  Approach: every
// byte that gets memory behind it (map, map_chunk) is taken from a ByteLimit first and given back when
// it is returned (unmap, unmap_chunk); reserve / unreserve are address space and pass through.  Past the
// limit map() returns nullptr and map_chunk() false, exactly as an upstream out of memory does, so the
// pool's out-of-memory path (release the cache, retry, then OutOfMemory: Note [Out of memory],
// allocator.h) is the same for both.  One ByteLimit may be shared by several adaptors: the arenas of
// one allocator all map through one LimitingUpstream, so max_bytes is a limit on the allocator, not per arena.  The counter is one
// relaxed compare-and-swap per mapping; mappings are rare next to allocations.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "upstream_adaptor.h"

namespace torchpool {

// A byte counter with a ceiling, safe to share between threads.
class ByteLimit {
 public:
  explicit ByteLimit(size_t max_bytes = 0) : max_bytes_(max_bytes) {}  // 0: no limit
  // Takes n bytes; false (and nothing taken) past the limit or where the count would overflow.
  bool try_take(size_t n) {
    size_t cur = taken_.load(std::memory_order_relaxed);
    do {
      if (n > SIZE_MAX - cur) return false;
      if (max_bytes_ && cur + n > max_bytes_) return false;
    } while (!taken_.compare_exchange_weak(cur, cur + n, std::memory_order_relaxed));
    return true;
  }
  void give_back(size_t n) { taken_.fetch_sub(n, std::memory_order_relaxed); }
  size_t max_bytes() const { return max_bytes_; }
  size_t taken() const { return taken_.load(std::memory_order_relaxed); }

 private:
  size_t max_bytes_;
  alignas(64) std::atomic<size_t> taken_{0};
};

class LimitingUpstream final : public UpstreamAdaptor {
 public:
  LimitingUpstream(std::shared_ptr<Upstream> upstream, size_t max_bytes)
      : LimitingUpstream(std::move(upstream), std::make_shared<ByteLimit>(max_bytes)) {}
  LimitingUpstream(std::shared_ptr<Upstream> upstream, std::shared_ptr<ByteLimit> limit)
      : UpstreamAdaptor(std::move(upstream)), limit_(std::move(limit)) {}

  void* map(size_t bytes, uint64_t stream) override {
    if (!limit_->try_take(bytes)) return nullptr;
    void* p = upstream_->map(bytes, stream);
    if (!p) limit_->give_back(bytes);
    return p;
  }
  void unmap(void* ptr, size_t bytes, uint64_t stream) override {
    upstream_->unmap(ptr, bytes, stream);
    limit_->give_back(bytes);
  }
  bool map_chunk(void* addr, size_t bytes, uint64_t stream) override {
    if (!limit_->try_take(bytes)) return false;
    if (upstream_->map_chunk(addr, bytes, stream)) return true;
    limit_->give_back(bytes);
    return false;
  }
  void unmap_chunk(void* addr, size_t bytes, uint64_t stream) override {
    upstream_->unmap_chunk(addr, bytes, stream);
    limit_->give_back(bytes);
  }

  const ByteLimit& limit() const { return *limit_; }

 private:
  std::shared_ptr<ByteLimit> limit_;
};

}  // namespace torchpool
