// UpstreamAdaptor: the base of the upstream adaptors (RMM's resource adaptors: an adaptor wraps another
// upstream and forwards to it).  It forwards every call unchanged; an adaptor overrides only the calls
// its policy is about (LimitingUpstream, TracingUpstream: map, unmap, map_chunk, unmap_chunk) and
// stays an Upstream, so adaptors compose in any order and the pool never knows they are there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "upstream.h"

namespace torchpool {

class UpstreamAdaptor : public Upstream {
 public:
  explicit UpstreamAdaptor(std::shared_ptr<Upstream> upstream)
      : upstream_(std::move(upstream)), granularity_(upstream_->granularity()) {}

  void* map(size_t bytes, uint64_t stream) override { return upstream_->map(bytes, stream); }
  void unmap(void* ptr, size_t bytes, uint64_t stream) override { upstream_->unmap(ptr, bytes, stream); }
  size_t granularity() const override { return granularity_; }
  const char* name() const override { return upstream_->name(); }

  bool can_expand() const override { return upstream_->can_expand(); }
  size_t reservation_bytes() const override { return upstream_->reservation_bytes(); }
  void* reserve(size_t bytes, uint64_t stream) override { return upstream_->reserve(bytes, stream); }
  void unreserve(void* base, size_t bytes, uint64_t stream) override { upstream_->unreserve(base, bytes, stream); }
  bool map_chunk(void* addr, size_t bytes, uint64_t stream) override { return upstream_->map_chunk(addr, bytes, stream); }
  void unmap_chunk(void* addr, size_t bytes, uint64_t stream) override { upstream_->unmap_chunk(addr, bytes, stream); }

  Upstream& upstream() { return *upstream_; }

 protected:
  std::shared_ptr<Upstream> upstream_;
  size_t granularity_;  // fixed for an upstream's life; read on every pool miss
};

}  // namespace torchpool
