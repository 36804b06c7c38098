#include "cuda_driver.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>

namespace torchpool {

using namespace cu;

CudaDriver* CudaDriver::get(std::string* error) {
  static std::mutex mu;
  static CudaDriver* loaded = nullptr;
  static std::string load_error;
  std::lock_guard<std::mutex> g(mu);
  if (loaded || !load_error.empty()) {
    if (!loaded && error) *error = load_error;
    return loaded;
  }
  const char* env = std::getenv("TORCHPOOL_CUDA_DRIVER");
  const std::string path = env && *env ? env : "libcuda.so.1";
  void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    const char* e = ::dlerror();
    load_error = "torchpool: cannot load the CUDA driver " + path + ": " + (e ? e : "unknown error") +
                 " (is an NVIDIA driver installed? TORCHPOOL_CUDA_DRIVER names another library)";
  } else {
    auto* d = new CudaDriver();  // never freed: the driver stays loaded for the process
    d->path = path;
    std::string missing;
#define TORCHPOOL_RESOLVE(name, symbol, params)                                   \
  d->name = reinterpret_cast<decltype(d->name)>(::dlsym(h, symbol));              \
  if (!d->name) missing += (missing.empty() ? "" : ", ") + std::string(symbol);
    TORCHPOOL_CUDA_DRIVER_FUNCTIONS(TORCHPOOL_RESOLVE)
#undef TORCHPOOL_RESOLVE
    if (!missing.empty()) {
      load_error = "torchpool: the CUDA driver " + path + " lacks " + missing + " (driver too old?)";
      delete d;
    } else if (CUresult r = d->cuInit(0); r != CUDA_SUCCESS) {
      load_error = "torchpool: cuInit failed in " + path + ": " + d->error_string(r);
      delete d;
    } else {
      loaded = d;
    }
  }
  if (!loaded && error) *error = load_error;
  return loaded;
}

std::string CudaDriver::error_string(CUresult r) const {
  const char* s = nullptr;
  if (cuGetErrorString && cuGetErrorString(r, &s) == CUDA_SUCCESS && s) return std::string(s) + " (" + std::to_string(r) + ")";
  return "CUDA error " + std::to_string(r);
}

bool CudaDriver::ensure_context(int device) {
  CUcontext cur = nullptr;
  if (cuCtxGetCurrent(&cur) == CUDA_SUCCESS && cur) return true;
  CUdevice dev;
  if (cuDeviceGet(&dev, device) != CUDA_SUCCESS) return false;
  CUcontext ctx = nullptr;
  if (cuDevicePrimaryCtxRetain(&ctx, dev) != CUDA_SUCCESS) return false;
  return cuCtxSetCurrent(ctx) == CUDA_SUCCESS;
}

// ---- plain device memory ----------------------------------------------------------------------

void* CudaDeviceUpstream::map(size_t bytes, uint64_t /*stream*/) {
  if (!drv_.ensure_context(device_)) return nullptr;
  CUdeviceptr p = 0;
  if (drv_.cuMemAlloc(&p, bytes) != CUDA_SUCCESS) return nullptr;
  return reinterpret_cast<void*>(p);
}

void CudaDeviceUpstream::unmap(void* ptr, size_t /*bytes*/, uint64_t /*stream*/) {
  drv_.ensure_context(device_);
  drv_.cuMemFree(reinterpret_cast<CUdeviceptr>(ptr));
}

// ---- expandable segments ----------------------------------------------------------------------

CudaVmmUpstream::CudaVmmUpstream(CudaDriver& driver, int device, size_t reservation_bytes)
    : drv_(driver), device_(device) {
  drv_.ensure_context(device_);
  const CUmemAllocationProp p = prop();
  size_t g = 0;
  if (drv_.cuMemGetAllocationGranularity(&g, &p, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) == CUDA_SUCCESS && g)
    granularity_ = std::max(granularity_, g);
  size_t free_b = 0, total = 0;
  if (reservation_bytes == 0 && drv_.cuMemGetInfo(&free_b, &total) == CUDA_SUCCESS) reservation_bytes = total + total / 8;
  if (reservation_bytes == 0) reservation_bytes = size_t{1} << 36;
  reservation_ = (reservation_bytes + granularity_ - 1) / granularity_ * granularity_;
}

CudaVmmUpstream::~CudaVmmUpstream() {
  for (auto& [addr, h] : handles_) {
    drv_.cuMemUnmap(addr, granularity_);
    drv_.cuMemRelease(h);
  }
}

CUmemAllocationProp CudaVmmUpstream::prop() const {
  CUmemAllocationProp p{};
  p.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  p.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  p.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  p.location.id = device_;
  return p;
}

void* CudaVmmUpstream::map(size_t bytes, uint64_t /*stream*/) {
  if (!drv_.ensure_context(device_)) return nullptr;
  CUdeviceptr p = 0;
  if (drv_.cuMemAlloc(&p, bytes) != CUDA_SUCCESS) return nullptr;
  return reinterpret_cast<void*>(p);
}

void CudaVmmUpstream::unmap(void* ptr, size_t /*bytes*/, uint64_t /*stream*/) {
  drv_.ensure_context(device_);
  drv_.cuMemFree(reinterpret_cast<CUdeviceptr>(ptr));
}

void* CudaVmmUpstream::reserve(size_t bytes, uint64_t /*stream*/) {
  if (!drv_.ensure_context(device_)) return nullptr;
  CUdeviceptr p = 0;
  if (drv_.cuMemAddressReserve(&p, bytes, granularity_, 0, 0) != CUDA_SUCCESS) return nullptr;
  return reinterpret_cast<void*>(p);
}

void CudaVmmUpstream::unreserve(void* base, size_t bytes, uint64_t /*stream*/) {
  drv_.cuMemAddressFree(reinterpret_cast<CUdeviceptr>(base), bytes);
}

bool CudaVmmUpstream::map_chunk(void* addr, size_t bytes, uint64_t stream) {
  if (!drv_.ensure_context(device_)) return false;
  const CUmemAllocationProp p = prop();
  CUmemAccessDesc access{};
  access.location = p.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  const auto base = reinterpret_cast<CUdeviceptr>(addr);
  for (size_t off = 0; off < bytes; off += granularity_) {
    CUmemGenericAllocationHandle h = 0;
    bool ok = drv_.cuMemCreate(&h, granularity_, &p, 0) == CUDA_SUCCESS;
    if (ok && drv_.cuMemMap(base + off, granularity_, 0, h, 0) != CUDA_SUCCESS) {
      drv_.cuMemRelease(h);
      ok = false;
    }
    if (ok && drv_.cuMemSetAccess(base + off, granularity_, &access, 1) != CUDA_SUCCESS) {
      drv_.cuMemUnmap(base + off, granularity_);
      drv_.cuMemRelease(h);
      ok = false;
    }
    if (!ok) {  // nothing stays mapped on failure
      if (off) unmap_chunk(addr, off, stream);
      return false;
    }
    std::lock_guard<std::mutex> g(mu_);
    handles_[base + off] = h;
  }
  return true;
}

void CudaVmmUpstream::unmap_chunk(void* addr, size_t bytes, uint64_t /*stream*/) {
  drv_.ensure_context(device_);
  const auto base = reinterpret_cast<CUdeviceptr>(addr);
  for (size_t off = 0; off < bytes; off += granularity_) {
    CUmemGenericAllocationHandle h;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = handles_.find(base + off);
      if (it == handles_.end()) continue;
      h = it->second;
      handles_.erase(it);
    }
    drv_.cuMemUnmap(base + off, granularity_);
    drv_.cuMemRelease(h);
  }
}

// ---- events -----------------------------------------------------------------------------------

StreamEvents::Event CudaStreamEvents::record(uint64_t stream) {
  if (!drv_.ensure_context(device_)) return 0;
  CUevent e = nullptr;
  if (drv_.cuEventCreate(&e, CU_EVENT_DISABLE_TIMING) != CUDA_SUCCESS) return 0;
  if (drv_.cuEventRecord(e, reinterpret_cast<CUstream>(stream)) != CUDA_SUCCESS) {
    drv_.cuEventDestroy(e);
    return 0;
  }
  return reinterpret_cast<Event>(e);
}

bool CudaStreamEvents::done(Event e) {
  // NOT_READY: still pending.  Any other error: the event will never complete, so waiting would
  // leak the block; treat it as done (the error resurfaces on the stream's next synchronize).
  return drv_.cuEventQuery(reinterpret_cast<CUevent>(e)) != CUDA_ERROR_NOT_READY;
}

void CudaStreamEvents::wait(Event e) { drv_.cuEventSynchronize(reinterpret_cast<CUevent>(e)); }

void CudaStreamEvents::destroy(Event e) { drv_.cuEventDestroy(reinterpret_cast<CUevent>(e)); }

void CudaStreamEvents::synchronize(uint64_t stream) {
  drv_.ensure_context(device_);
  drv_.cuStreamSynchronize(reinterpret_cast<CUstream>(stream));
}

}  // namespace torchpool
