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
    } else {
      loaded = d;
    }
  }
  if (!loaded && error) *error = load_error;
  return loaded;
}

namespace {
thread_local std::string t_error;  // Note [Driver calls]
}  // namespace

std::string CudaDriver::error_string(CUresult r) const {
  const char* name = nullptr;
  const char* text = nullptr;
  if (!(cuGetErrorName && cuGetErrorName(r, &name) == CUDA_SUCCESS && name)) name = nullptr;
  if (!(cuGetErrorString && cuGetErrorString(r, &text) == CUDA_SUCCESS && text)) text = nullptr;
  std::string out = name ? name : "CUDA error";
  out += " (" + std::to_string(r) + ")";
  if (text) out += std::string(": ") + text;
  return out;
}

bool CudaDriver::init() {
  std::lock_guard<std::mutex> g(mu_);
  if (!initialised_) {
    init_result_ = cuInit(0);
    initialised_ = true;
  }
  if (init_result_ != CUDA_SUCCESS) {
    check("cuInit", init_result_);
    return false;
  }
  return true;
}

CUcontext CudaDriver::primary_context(int device) {
  {
    std::lock_guard<std::mutex> g(mu_);
    auto it = primary_.find(device);
    if (it != primary_.end()) return it->second;
  }
  CUdevice dev;
  if (check("cuDeviceGet", cuDeviceGet(&dev, device)) != CUDA_SUCCESS) return nullptr;
  CUcontext ctx = nullptr;
  if (check("cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain(&ctx, dev)) != CUDA_SUCCESS) return nullptr;
  std::lock_guard<std::mutex> g(mu_);
  auto [it, inserted] = primary_.emplace(device, ctx);  // retained once per device, for the process
  return it->second;
}

CUresult CudaDriver::check(const char* call, CUresult r) {
  if (r != CUDA_SUCCESS && r != CUDA_ERROR_OUT_OF_MEMORY && r != CUDA_ERROR_NOT_READY && t_error.empty()) {
    try {
      t_error = std::string(call) + ": " + error_string(r);
    } catch (...) {  // no memory for the message: the error itself is still returned
    }
  }
  return r;
}

void CudaDriver::clear_error() { t_error.clear(); }
std::string CudaDriver::last_error() { return t_error; }

bool CudaDriver::capturing(uint64_t stream, bool* failed) {
  int status = CU_STREAM_CAPTURE_STATUS_NONE;
  const CUresult r = check("cuStreamIsCapturing", cuStreamIsCapturing(reinterpret_cast<CUstream>(stream), &status));
  if (failed) *failed = r != CUDA_SUCCESS;
  return r == CUDA_SUCCESS && status != CU_STREAM_CAPTURE_STATUS_NONE;
}

DriverScope::DriverScope(CudaDriver& driver, int device) : drv_(driver) {
  if (!drv_.init()) return;
  CUcontext ctx = drv_.primary_context(device);
  if (!ctx) return;
  if (drv_.check("cuCtxGetCurrent", drv_.cuCtxGetCurrent(&prev_)) != CUDA_SUCCESS) return;
  if (prev_ != ctx) {
    if (drv_.check("cuCtxSetCurrent", drv_.cuCtxSetCurrent(ctx)) != CUDA_SUCCESS) return;
    switched_ = true;
  }
  int mode = CU_STREAM_CAPTURE_MODE_RELAXED;
  if (drv_.check("cuThreadExchangeStreamCaptureMode", drv_.cuThreadExchangeStreamCaptureMode(&mode)) != CUDA_SUCCESS) return;
  prev_mode_ = mode;
  mode_set_ = true;
  ok_ = true;
}

DriverScope::~DriverScope() {
  if (mode_set_) {
    int mode = prev_mode_;
    drv_.check("cuThreadExchangeStreamCaptureMode", drv_.cuThreadExchangeStreamCaptureMode(&mode));
  }
  if (switched_) drv_.check("cuCtxSetCurrent", drv_.cuCtxSetCurrent(prev_));
}

// ---- plain device memory ----------------------------------------------------------------------

void* CudaDeviceUpstream::map(size_t bytes, uint64_t /*stream*/) {
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return nullptr;
  release_parked();
  CUdeviceptr p = 0;
  if (drv_.check("cuMemAlloc", drv_.cuMemAlloc(&p, bytes)) != CUDA_SUCCESS) return nullptr;
  return reinterpret_cast<void*>(p);
}

// Note [Unmap after the stream]: cuMemFree synchronizes the device itself; during a capture of the
// segment's stream it is parked instead.
void CudaDeviceUpstream::unmap(void* ptr, size_t bytes, uint64_t stream) {
  DriverScope scope(drv_, device_);
  const auto p = reinterpret_cast<CUdeviceptr>(ptr);
  if (scope.ok() && drv_.capturing(stream)) {
    std::lock_guard<std::mutex> g(mu_);
    parked_.push_back({p, bytes, stream, 0});
    return;
  }
  release_parked();
  drv_.check("cuMemFree", drv_.cuMemFree(p));
}

namespace {
// Removes and returns the parked releases whose stream is no longer being captured (they may be
// given back now); the others stay parked until their capture ends.
std::vector<ParkedRelease> take_uncaptured(CudaDriver& drv, std::mutex& mu, std::vector<ParkedRelease>& parked) {
  std::vector<ParkedRelease> go;
  std::lock_guard<std::mutex> g(mu);
  for (size_t i = 0; i < parked.size();) {
    if (!drv.capturing(parked[i].stream)) {
      go.push_back(parked[i]);
      parked[i] = parked.back();
      parked.pop_back();
    } else {
      ++i;
    }
  }
  return go;
}
}  // namespace

void CudaDeviceUpstream::release_parked() {
  std::vector<ParkedRelease> go = take_uncaptured(drv_, mu_, parked_);
  if (go.empty()) return;
  for (const ParkedRelease& r : go) drv_.check("cuMemFree", drv_.cuMemFree(r.addr));
}

// ---- expandable segments ----------------------------------------------------------------------

CudaVmmUpstream::CudaVmmUpstream(CudaDriver& driver, int device, size_t reservation_bytes)
    : drv_(driver), device_(device) {
  DriverScope scope(drv_, device_);
  const CUmemAllocationProp p = prop();
  size_t g = 0;
  if (drv_.cuMemGetAllocationGranularity(&g, &p, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED) == CUDA_SUCCESS && g)
    granularity_ = std::max(granularity_, g);
  size_t free_b = 0, total = 0;
  if (reservation_bytes == 0 && drv_.cuMemGetInfo(&free_b, &total) == CUDA_SUCCESS) reservation_bytes = total + total / 8;
  if (reservation_bytes == 0) reservation_bytes = size_t{1} << 36;
  reservation_ = (reservation_bytes + granularity_ - 1) / granularity_ * granularity_;
  CUmemAccessDesc own{};
  own.location = p.location;
  own.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  access_.push_back(own);
  int n = 0;
  if (drv_.cuDeviceGetCount(&n) == CUDA_SUCCESS) {
    for (int d = 0; d < n; ++d) {
      int can = 0;
      if (d == device_ || drv_.cuDeviceCanAccessPeer(&can, d, device_) != CUDA_SUCCESS || !can) continue;
      CUmemAccessDesc peer = own;
      peer.location.id = d;
      access_.push_back(peer);
    }
  }
}

CudaVmmUpstream::~CudaVmmUpstream() {
  DriverScope scope(drv_, device_);
  // The pool has given everything back by now (Pool::~Pool); what is left is parked memory.
  for (const ParkedRelease& r : parked_) {
    if (!r.handle) {
      drv_.cuMemFree(r.addr);
      continue;
    }
    drv_.cuStreamSynchronize(reinterpret_cast<CUstream>(r.stream));
    drv_.cuMemUnmap(r.addr, granularity_);
    drv_.cuMemRelease(r.handle);
  }
  for (auto& [addr, h] : handles_) {
    drv_.cuMemUnmap(addr, granularity_);
    drv_.cuMemRelease(h);
  }
  for (auto& [base, bytes] : unreserve_later_) drv_.cuMemAddressFree(base, bytes);
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
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return nullptr;
  release_parked();
  CUdeviceptr p = 0;
  if (drv_.check("cuMemAlloc", drv_.cuMemAlloc(&p, bytes)) != CUDA_SUCCESS) return nullptr;
  return reinterpret_cast<void*>(p);
}

void CudaVmmUpstream::unmap(void* ptr, size_t bytes, uint64_t stream) {
  DriverScope scope(drv_, device_);
  const auto p = reinterpret_cast<CUdeviceptr>(ptr);
  if (scope.ok() && drv_.capturing(stream)) {
    std::lock_guard<std::mutex> g(mu_);
    parked_.push_back({p, bytes, stream, 0});
    return;
  }
  release_parked();
  drv_.check("cuMemFree", drv_.cuMemFree(p));  // synchronizes the device (Note [Unmap after the stream])
}

void* CudaVmmUpstream::reserve(size_t bytes, uint64_t /*stream*/) {
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return nullptr;
  CUdeviceptr p = 0;
  if (drv_.check("cuMemAddressReserve", drv_.cuMemAddressReserve(&p, bytes, granularity_, 0, 0)) != CUDA_SUCCESS)
    return nullptr;
  return reinterpret_cast<void*>(p);
}

void CudaVmmUpstream::unreserve(void* base, size_t bytes, uint64_t /*stream*/) {
  DriverScope scope(drv_, device_);
  const auto b = reinterpret_cast<CUdeviceptr>(base);
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const ParkedRelease& r : parked_)
      if (r.addr >= b && r.addr < b + bytes) {  // still mapped inside: freed after its parked chunks
        unreserve_later_.emplace_back(b, bytes);
        return;
      }
  }
  drv_.check("cuMemAddressFree", drv_.cuMemAddressFree(b, bytes));
}

bool CudaVmmUpstream::map_chunk(void* addr, size_t bytes, uint64_t /*stream: mapping waits for nothing*/) {
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return false;
  release_parked();
  const CUmemAllocationProp p = prop();
  const auto base = reinterpret_cast<CUdeviceptr>(addr);
  std::vector<ParkedRelease> taken_back;  // parked chunks reused by this call (work may still touch them)
  for (size_t off = 0; off < bytes; off += granularity_) {
    {  // a chunk parked during a capture and wanted again: still mapped, take it back
      std::lock_guard<std::mutex> g(mu_);
      auto it = std::find_if(parked_.begin(), parked_.end(), [&](const ParkedRelease& r) { return r.addr == base + off; });
      if (it != parked_.end()) {
        handles_[base + off] = it->handle;
        taken_back.push_back(*it);
        *it = parked_.back();
        parked_.pop_back();
        continue;
      }
    }
    CUmemGenericAllocationHandle h = 0;
    bool ok = drv_.check("cuMemCreate", drv_.cuMemCreate(&h, granularity_, &p, 0)) == CUDA_SUCCESS;
    if (ok && drv_.check("cuMemMap", drv_.cuMemMap(base + off, granularity_, 0, h, 0)) != CUDA_SUCCESS) {
      drv_.cuMemRelease(h);
      ok = false;
    }
    if (ok && drv_.check("cuMemSetAccess", drv_.cuMemSetAccess(base + off, granularity_, access_.data(), access_.size())) !=
                  CUDA_SUCCESS) {
      drv_.cuMemUnmap(base + off, granularity_);
      drv_.cuMemRelease(h);
      ok = false;
    }
    if (!ok) {  // nothing stays mapped on failure: new chunks were never used (no synchronization);
                // chunks taken back from the parked list go back there
      for (size_t o = 0; o < off; o += granularity_) {
        CUmemGenericAllocationHandle hh;
        {
          std::lock_guard<std::mutex> g(mu_);
          auto it = handles_.find(base + o);
          if (it == handles_.end()) continue;
          hh = it->second;
          handles_.erase(it);
          auto tb = std::find_if(taken_back.begin(), taken_back.end(), [&](const ParkedRelease& r) { return r.addr == base + o; });
          if (tb != taken_back.end()) {
            parked_.push_back(*tb);
            continue;
          }
        }
        drv_.cuMemUnmap(base + o, granularity_);
        drv_.cuMemRelease(hh);
      }
      return false;
    }
    std::lock_guard<std::mutex> g(mu_);
    handles_[base + off] = h;
  }
  return true;
}

// Note [Unmap after the stream].
void CudaVmmUpstream::unmap_chunk(void* addr, size_t bytes, uint64_t stream) {
  DriverScope scope(drv_, device_);
  const auto base = reinterpret_cast<CUdeviceptr>(addr);
  const bool parked = scope.ok() && drv_.capturing(stream);
  if (!parked) {
    release_parked();
    drv_.check("cuStreamSynchronize", drv_.cuStreamSynchronize(reinterpret_cast<CUstream>(stream)));
  }
  for (size_t off = 0; off < bytes; off += granularity_) {
    CUmemGenericAllocationHandle h;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = handles_.find(base + off);
      if (it == handles_.end()) continue;
      h = it->second;
      handles_.erase(it);
      if (parked) {
        parked_.push_back({base + off, granularity_, stream, h});
        continue;
      }
    }
    drv_.check("cuMemUnmap", drv_.cuMemUnmap(base + off, granularity_));
    drv_.check("cuMemRelease", drv_.cuMemRelease(h));
  }
}

void CudaVmmUpstream::release_parked() {
  std::vector<ParkedRelease> go = take_uncaptured(drv_, mu_, parked_);
  if (go.empty()) return;
  std::unordered_map<uint64_t, bool> synced;
  for (const ParkedRelease& r : go) {
    if (!r.handle) {
      drv_.check("cuMemFree", drv_.cuMemFree(r.addr));
      continue;
    }
    if (!synced[r.stream]) {
      synced[r.stream] = true;
      drv_.check("cuStreamSynchronize", drv_.cuStreamSynchronize(reinterpret_cast<CUstream>(r.stream)));
    }
    drv_.check("cuMemUnmap", drv_.cuMemUnmap(r.addr, granularity_));
    drv_.check("cuMemRelease", drv_.cuMemRelease(r.handle));
  }
  std::vector<std::pair<CUdeviceptr, size_t>> free_now;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (size_t i = 0; i < unreserve_later_.size();) {
      auto [b, n] = unreserve_later_[i];
      const bool busy = std::any_of(parked_.begin(), parked_.end(), [&](const ParkedRelease& r) { return r.addr >= b && r.addr < b + n; });
      if (busy) {
        ++i;
        continue;
      }
      free_now.push_back(unreserve_later_[i]);
      unreserve_later_[i] = unreserve_later_.back();
      unreserve_later_.pop_back();
    }
  }
  for (auto [b, n] : free_now) drv_.check("cuMemAddressFree", drv_.cuMemAddressFree(b, n));
}

// ---- events -----------------------------------------------------------------------------------

namespace {
struct Ev {
  CUevent event = nullptr;  // null: recorded on a capturing stream, to be recorded after the capture
  uint64_t stream = 0;
};
bool record_now(CudaDriver& d, Ev* ev) {
  CUevent e = nullptr;
  if (d.check("cuEventCreate", d.cuEventCreate(&e, CU_EVENT_DISABLE_TIMING)) != CUDA_SUCCESS) return false;
  if (d.check("cuEventRecord", d.cuEventRecord(e, reinterpret_cast<CUstream>(ev->stream))) != CUDA_SUCCESS) {
    d.cuEventDestroy(e);
    return false;
  }
  ev->event = e;
  return true;
}
}  // namespace

StreamEvents::Event CudaStreamEvents::record(uint64_t stream) {
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return 0;
  auto* ev = new Ev{nullptr, stream};
  if (drv_.capturing(stream)) return reinterpret_cast<Event>(ev);  // recorded once the capture is over
  if (!record_now(drv_, ev)) {
    delete ev;
    return 0;
  }
  return reinterpret_cast<Event>(ev);
}

bool CudaStreamEvents::done(Event e) {
  auto* ev = reinterpret_cast<Ev*>(e);
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return false;
  if (!ev->event) {
    if (drv_.capturing(ev->stream) || !record_now(drv_, ev)) return false;
  }
  const CUresult r = drv_.cuEventQuery(ev->event);
  if (r == CUDA_SUCCESS) return true;
  drv_.check("cuEventQuery", r);  // NOT_READY is not an error; anything else is kept, the block stays deferred
  return false;
}

void CudaStreamEvents::wait(Event e) {
  auto* ev = reinterpret_cast<Ev*>(e);
  DriverScope scope(drv_, device_);
  if (!scope.ok()) return;
  if (!ev->event && (drv_.capturing(ev->stream) || !record_now(drv_, ev))) return;
  drv_.check("cuEventSynchronize", drv_.cuEventSynchronize(ev->event));
}

void CudaStreamEvents::destroy(Event e) {
  auto* ev = reinterpret_cast<Ev*>(e);
  if (ev->event) {
    DriverScope scope(drv_, device_);
    drv_.cuEventDestroy(ev->event);
  }
  delete ev;
}

void CudaStreamEvents::synchronize(uint64_t stream) {
  DriverScope scope(drv_, device_);
  if (!scope.ok() || drv_.capturing(stream)) return;  // record() never fails for a capturing stream
  drv_.check("cuStreamSynchronize", drv_.cuStreamSynchronize(reinterpret_cast<CUstream>(stream)));
}

}  // namespace torchpool
