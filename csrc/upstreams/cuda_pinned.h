// Page-locked host memory from the CUDA driver (cuMemHostAlloc), for the loader's staging pool:
// copies from it to the device are true asynchronous DMA.  Same Upstream interface as host_pinned
// (mlock), which is the fallback where no driver exists: CudaPinnedUpstream::create() returns null
// with a reason then.  Segments are mapped whole (no expandable mode); cuMemHostAlloc memory is
// portable (usable from every context) and is returned with cuMemFreeHost.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "../core/upstream.h"

namespace torchpool {

struct CudaDriver;

class CudaPinnedUpstream final : public Upstream {
 public:
  // nullptr with *error set when no CUDA driver can be loaded.
  static std::shared_ptr<CudaPinnedUpstream> create(std::string* error, int device = 0);
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return 2u << 20; }
  const char* name() const override { return "cuda_pinned"; }
  size_t mapped_bytes() const { return mapped_.load(std::memory_order_relaxed); }

  CudaPinnedUpstream(CudaDriver& driver, int device) : drv_(driver), device_(device) {}

 private:
  CudaDriver& drv_;
  int device_;
  std::atomic<size_t> mapped_{0};
};

}  // namespace torchpool
