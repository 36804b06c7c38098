// TracingUpstream: an upstream adaptor that records every mapping it forwards in a TraceRing (trace.h)
// as kSegmentMap / kSegmentUnmap events (RMM's logging_resource_adaptor, composed the same way).
//
// Note [Tracing upstream]
// -----------------------
// Rationale: which memory the allocator took from its upstream and gave back is a fact about the
// upstream calls, so it is recorded where they happen instead of by hooks in the pool.  Approach: a
// successful map() or map_chunk() records kSegmentMap with the range, an unmap() or unmap_chunk()
// records kSegmentUnmap before it is forwarded; reserve / unreserve (address space, no memory) are not
// recorded, so the events of an expandable segment are its chunks.  A refused mapping records nothing
// (the kOom event is the allocator's).  Recording costs one relaxed load while the ring is disabled.
// The ring must outlive every pool mapping through the adaptor: CachingAllocator destroys its arenas
// before its ring.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "trace.h"
#include "upstream_adaptor.h"

namespace torchpool {

class TracingUpstream final : public UpstreamAdaptor {
 public:
  // device: written into each event (-1 host, else the device ordinal).
  TracingUpstream(std::shared_ptr<Upstream> upstream, TraceRing& ring, int32_t device)
      : UpstreamAdaptor(std::move(upstream)), ring_(ring), device_(device) {}

  void* map(size_t bytes, uint64_t stream) override {
    void* p = upstream_->map(bytes, stream);
    if (p) record(TraceOp::kSegmentMap, p, bytes, stream);
    return p;
  }
  void unmap(void* ptr, size_t bytes, uint64_t stream) override {
    record(TraceOp::kSegmentUnmap, ptr, bytes, stream);
    upstream_->unmap(ptr, bytes, stream);
  }
  bool map_chunk(void* addr, size_t bytes, uint64_t stream) override {
    if (!upstream_->map_chunk(addr, bytes, stream)) return false;
    record(TraceOp::kSegmentMap, addr, bytes, stream);
    return true;
  }
  void unmap_chunk(void* addr, size_t bytes, uint64_t stream) override {
    record(TraceOp::kSegmentUnmap, addr, bytes, stream);
    upstream_->unmap_chunk(addr, bytes, stream);
  }


 private:
  void record(TraceOp op, const void* addr, size_t bytes, uint64_t stream) {
    if (ring_.enabled()) ring_.record(op, reinterpret_cast<uintptr_t>(addr), bytes, 0, stream, device_);
  }

  TraceRing& ring_;
  int32_t device_;
};

}  // namespace torchpool
