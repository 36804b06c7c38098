#include "cuda_pinned.h"

#include "cuda_driver.h"

namespace torchpool {

std::shared_ptr<CudaPinnedUpstream> CudaPinnedUpstream::create(std::string* error, int device) {
  CudaDriver* d = CudaDriver::get(error);
  if (!d) return nullptr;
  return std::make_shared<CudaPinnedUpstream>(*d, device);
}

void* CudaPinnedUpstream::map(size_t bytes, uint64_t /*stream*/) {
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return nullptr;
  void* p = nullptr;
  if (drv_.check("cuMemHostAlloc", drv_.cuMemHostAlloc(&p, bytes, cu::CU_MEMHOSTALLOC_PORTABLE)) != cu::CUDA_SUCCESS)
    return nullptr;
  mapped_.fetch_add(bytes, std::memory_order_relaxed);
  return p;
}

void CudaPinnedUpstream::unmap(void* ptr, size_t bytes, uint64_t /*stream*/) {
  DriverScope scope(drv_, device_);
  drv_.check("cuMemFreeHost", drv_.cuMemFreeHost(ptr));
  mapped_.fetch_sub(bytes, std::memory_order_relaxed);
}

}  // namespace torchpool
