// libtorchpool_cuda.so: torchpool's caching allocator behind PyTorch's CUDAPluggableAllocator.
//
// Note [The pluggable allocator library]
// --------------------------------------
// Facts (torch 2.13, torch/csrc/cuda/CUDAPluggableAllocator.cpp): torch calls
// alloc(size, device, stream) and free(ptr, size, device, stream) through function pointers found
// by name in a shared library; it checks nothing about the returned pointer; memory_stats,
// snapshot, reset_peak_stats raise and empty_cache / record_stream call hooks that only C++ can
// set.  Approach: this library holds one CachingAllocator (core/allocator.h) per device, created
// on first use over the CUDA driver reached with dlopen (Note [Reaching the driver]), with
// cudaStream_t values as stream ids (blocks are reused on the stream that freed them) and CUDA
// events for cross-stream reuse (Note [Stream ordering]).  It links no torch, no CUDA runtime and
// no Python; everything else is a small C API that torchpool.cuda drives with ctypes: configure
// before the first allocation, stats / snapshot as JSON (Note [One serializer]), empty_cache, reset_peak_stats,
// record_stream, check.  Failures: torch would wrap a null pointer in a tensor, so alloc calls the
// handler torchpool.cuda installs (Note [Driver errors]); with no handler it returns null and the
// message is in torchpool_cuda_last_error().  Limitations: allocators are never destroyed while
// blocks live (a tensor may outlive everything); at most 64 devices; configuration is process-wide.
//
// Note [Driver errors]
// --------------------
// An allocation fails for one of four reasons, each reported as what it is (torchpool_cuda_last_
// error_kind()): out of memory (kind 1: the allocator's state, torch.OutOfMemoryError), a driver
// error (kind 2: the call and the error's name, e.g. "cuMemCreate: CUDA_ERROR_ILLEGAL_ADDRESS (700):
// an illegal memory access was encountered", RuntimeError; a sticky error leaves the context
// unusable, so the message says to restart the process), graph capture (kind 3, Note [Graph
// capture]), and no driver / bad device (kind 4).  The upstreams can only return "no memory", so the
// driver error is read back from CudaDriver::last_error() (Note [Driver calls]).  The handler
// torchpool.cuda installs throws c10::OutOfMemoryError for kind 1 and c10::Error otherwise; it is
// meant to unwind into torch's C++ allocation call (that is how torch raises it in Python), so it is
// only called from torchpool_cuda_alloc, the function torch calls.  Python's own calls go through
// torchpool_cuda_alloc_nothrow, which never calls it: no C++ exception crosses ctypes.  Every other
// function of the C API catches everything.
//
// Note [Graph capture]
// --------------------
// Facts (torch 2.13): during CUDA graph capture PyTorch's own allocator serves the captured
// allocations from a private pool that is kept until the graph is destroyed
// (beginAllocateToPool / endAllocateToPool / releasePool); under a pluggable allocator those hooks
// can only be set from C++ with torch linked in (this library links no torch), so they do nothing,
// and memory the graph uses would be an ordinary free block the cache may hand out or give back
// while the graph can still be replayed: silent corruption.  cuMemAlloc is also illegal in
// global-mode capture.  Decision: refuse.  Every allocation asks the driver whether its stream is
// capturing (cuStreamIsCapturing, one call) and fails with a message that says what to do (kind 3)
// before touching the cache or any event.  Memory given back while a stream is capturing is parked
// (Note [Unmap after the stream]); events recorded on a capturing stream are recorded after the
// capture (CudaStreamEvents); all driver calls run in relaxed capture mode (Note [Driver calls]), so
// allocations on other streams do not invalidate a capture.  Capture without allocation (a graph
// over static tensors allocated before) works.
//
// Note [512-byte alignment]
// -------------------------
// PyTorch's CUDA caching allocator rounds every block to 512 bytes (kMinBlockSize), so every CUDA
// tensor's storage starts 512-byte aligned.  cuBLASLt and other libraries pick kernels by pointer
// alignment, so a 64-byte aligned block could select another kernel than under the default
// allocator and give slightly different results.  The CUDA library therefore defaults to
// alignment=512 (the CUDA default of the "alignment" option in the schema, core/options.h); the size
// classes of the core keep working, only classes that are multiples of 512 are used.
#include <sys/types.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "core/allocator.h"
#include "core/options.h"
#include "core/serialize.h"
#include "upstreams/cuda_driver.h"

#define TP_API extern "C" __attribute__((visibility("default")))

namespace {

using namespace torchpool;

constexpr int kMaxDevices = 64;

enum Kind { kOk = 0, kOom = 1, kDriverError = 2, kCapture = 3, kUnavailable = 4 };

std::mutex g_mu;
OptionValues g_options = default_options(Device::kCuda);  // the schema's CUDA column (core/options.h)
std::array<std::atomic<CachingAllocator*>, kMaxDevices> g_alloc{};
std::atomic<void (*)(const char*)> g_oom_handler{nullptr};
std::atomic<void (*)(int, const char*)> g_error_handler{nullptr};
std::atomic<CudaDriver*> g_driver{nullptr};
thread_local std::string t_error;
thread_local int t_kind = kOk;
thread_local std::string t_text;

CachingAllocator* get(int device, bool create) {
  if (device < 0 || device >= kMaxDevices) {
    t_error = "torchpool: CUDA device index " + std::to_string(device) + " out of range";
    return nullptr;
  }
  CachingAllocator* a = g_alloc[device].load(std::memory_order_acquire);
  if (a || !create) return a;
  std::lock_guard<std::mutex> g(g_mu);
  a = g_alloc[device].load(std::memory_order_relaxed);
  if (a) return a;
  std::string err;
  CudaDriver* d = CudaDriver::get(&err);
  if (!d) {
    t_error = err;
    return nullptr;
  }
  g_driver.store(d, std::memory_order_release);
  std::shared_ptr<Upstream> up;
  if (g_options.expandable_segments) up = std::make_shared<CudaVmmUpstream>(*d, device, g_options.reserve_bytes);
  else up = std::make_shared<CudaDeviceUpstream>(*d, device);
  AllocatorConfig cfg = allocator_config(g_options, Device::kCuda);
  cfg.device = device;
  cfg.device_name = "cuda:" + std::to_string(device);
  a = new CachingAllocator(std::move(up), std::move(cfg), std::make_shared<CudaStreamEvents>(*d, device));
  g_alloc[device].store(a, std::memory_order_release);
  return a;
}

bool any_allocator() {
  for (auto& a : g_alloc)
    if (a.load(std::memory_order_relaxed)) return true;
  return false;
}

// Every function of the C API: no exception leaves it (Note [Driver errors]).
template <class R, class F>
R guarded(R fallback, F&& f) noexcept {
  try {
    return f();
  } catch (const std::exception& e) {
    try {
      t_error = std::string("torchpool: ") + e.what();
    } catch (...) {
    }
  } catch (...) {
  }
  return fallback;
}

const char* text(std::string s) {
  t_text = std::move(s);
  return t_text.c_str();
}

}  // namespace

// ---- the two functions CUDAPluggableAllocator calls -------------------------------------------

namespace {

std::string hex(const void* p) {
  char b[32];
  std::snprintf(b, sizeof b, "%p", p);
  return b;
}

// Note [Driver errors]: never throws; the kind and message are in t_kind / t_error.
void* alloc_impl(ssize_t size, int device, void* stream) noexcept {
  t_kind = kOk;
  if (size <= 0) return nullptr;
  try {
    CachingAllocator* a = get(device, true);
    if (!a) {
      t_kind = kUnavailable;
      return nullptr;
    }
    CudaDriver& d = *g_driver.load(std::memory_order_acquire);
    CudaDriver::clear_error();
    const auto st = reinterpret_cast<uint64_t>(stream);
    bool failed = false;
    bool capturing = d.capturing(st, &failed);
    if (failed) {  // e.g. no current context for the legacy stream: ask again in the device's
      DriverScope scope(d, device);
      CudaDriver::clear_error();
      capturing = scope.ok() && d.capturing(st, &failed);
    }
    const std::string dev = "cuda:" + std::to_string(device);
    if (!failed && capturing) {  // Note [Graph capture]
      t_kind = kCapture;
      t_error = "torchpool: CUDA graph capture on stream " + hex(stream) + " (" + dev +
                ") is not supported by torchpool's CUDA allocator: a pluggable allocator gets no private graph "
                "pool in torch, so memory a graph uses could be handed out again and corrupted on replay. "
                "Run programs that capture CUDA graphs (torch.cuda.graph, torch.compile mode='reduce-overhead', "
                "CUDA-graph inference engines) without torchpool.install(device='cuda') / TORCHPOOL_CONF=cuda=1, "
                "or scope torchpool to the non-captured parts with torchpool.cuda.mempool().";
      return nullptr;
    }
    if (!failed) {
      try {
        void* p = a->allocate(static_cast<size_t>(size), st);
        if (p) return p;
      } catch (const OutOfMemory& e) {
        t_kind = kOom;
        t_error = e.what();
      }
    }
    const std::string drv = CudaDriver::last_error();
    if (!drv.empty()) {  // the real reason beats "out of memory"
      t_kind = kDriverError;
      t_error = "torchpool: CUDA driver error on " + dev + " while allocating " + std::to_string(size) + " bytes: " + drv +
                ". A sticky error (an illegal address, a launch failure) leaves the CUDA context unusable: "
                "the process must restart; run with CUDA_LAUNCH_BLOCKING=1 to find the kernel that caused it.";
    }
    if (t_kind == kOk) {
      t_kind = kOom;
      t_error = "torchpool: out of memory on " + dev;
    }
  } catch (const std::exception& e) {
    t_kind = kDriverError;
    t_error = std::string("torchpool: ") + e.what();
  } catch (...) {
    t_kind = kDriverError;
    t_error = "torchpool: unknown error in torchpool_cuda_alloc";
  }
  return nullptr;
}

}  // namespace

// The function torch calls.  On failure it calls the handler torchpool.cuda installed, which throws
// a C++ exception into torch's allocation call (Note [Driver errors]); with none it returns null.
TP_API void* torchpool_cuda_alloc(ssize_t size, int device, void* stream) {
  void* p = alloc_impl(size, device, stream);
  if (p || size <= 0) return p;
  if (auto h = g_error_handler.load(std::memory_order_acquire)) h(t_kind, t_error.c_str());  // throws
  if (auto h = g_oom_handler.load(std::memory_order_acquire)) h(t_error.c_str());  // may throw
  return nullptr;
}

// For ctypes: never calls a handler, never throws; *kind gets the Kind of a failure (0: none).
TP_API void* torchpool_cuda_alloc_nothrow(ssize_t size, int device, void* stream, int* kind) {
  void* p = alloc_impl(size, device, stream);
  if (kind) *kind = p ? kOk : t_kind;
  return p;
}

TP_API int torchpool_cuda_last_error_kind() { return t_kind; }

TP_API void torchpool_cuda_free(void* ptr, size_t /*size*/, int device, void* /*stream*/) {
  if (!ptr) return;
  try {
    CachingAllocator* a = get(device, false);
    if (a && a->free(ptr)) return;
    for (auto& other : g_alloc)  // a pointer freed with another current device
      if (CachingAllocator* o = other.load(std::memory_order_acquire); o && o->free(ptr)) return;
    std::fprintf(stderr, "torchpool: torchpool_cuda_free of %p, which no torchpool CUDA allocator owns (ignored)\n", ptr);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "torchpool: torchpool_cuda_free of %p failed: %s\n", ptr, e.what());
  } catch (...) {
    std::fprintf(stderr, "torchpool: torchpool_cuda_free of %p failed\n", ptr);
  }
}

// ---- control, used by torchpool.cuda through ctypes -------------------------------------------

// "key=value,key=value" (the options of the schema, core/options.h, that apply to CUDA; booleans 1/0),
// before the first allocation; the others keep their defaults. 0 or -1 (the message in last_error).
TP_API int torchpool_cuda_configure(const char* conf) {
  return guarded(-1, [&]() -> int {
    std::lock_guard<std::mutex> g(g_mu);
    if (any_allocator()) {
      t_error = "torchpool: the CUDA allocator is already in use; configure it before the first CUDA allocation";
      return -1;
    }
    // Note [One option schema]: every key known, for CUDA, parsed and checked by the schema's rule.
    OptionValues o = default_options(Device::kCuda);
    if (!apply_conf(o, conf ? conf : "", Device::kCuda, &t_error)) return -1;
    g_options = o;
    return 0;
  });
}

TP_API const char* torchpool_cuda_last_error() { return t_error.c_str(); }

TP_API void torchpool_cuda_set_oom_handler(void (*handler)(const char*)) {
  g_oom_handler.store(handler, std::memory_order_release);
}

// handler(kind, message), Note [Driver errors]; takes precedence over the OOM handler.
TP_API void torchpool_cuda_set_error_handler(void (*handler)(int, const char*)) {
  g_error_handler.store(handler, std::memory_order_release);
}

// The loaded driver's path, "" before the first allocation, or the load error prefixed "error: ".
TP_API const char* torchpool_cuda_driver() {
  return guarded(static_cast<const char*>(""), [&]() -> const char* {
    std::string err;
    CudaDriver* d = CudaDriver::get(&err);
    return text(d ? d->path : "error: " + err);
  });
}

TP_API int torchpool_cuda_has_allocator(int device) {
  return guarded(0, [&]() -> int { return get(device, false) != nullptr; });
}

TP_API int torchpool_cuda_record_stream(void* ptr, int device, void* stream) {
  return guarded(-1, [&]() -> int {
    CachingAllocator* a = get(device, false);
    return a && a->record_stream(ptr, reinterpret_cast<uint64_t>(stream)) ? 0 : -1;
  });
}

TP_API long long torchpool_cuda_process_events(int device) {
  return guarded(-1LL, [&]() -> long long {
    CachingAllocator* a = get(device, false);
    return a ? static_cast<long long>(a->process_events()) : -1;
  });
}

TP_API long long torchpool_cuda_empty_cache(int device) {
  return guarded(-1LL, [&]() -> long long {
    CachingAllocator* a = get(device, false);
    return a ? static_cast<long long>(a->empty_cache()) : -1;
  });
}

TP_API int torchpool_cuda_reset_peak_stats(int device) {
  return guarded(-1, [&]() -> int {
    CachingAllocator* a = get(device, false);
    if (!a) return -1;
    a->reset_peaks();
    return 0;
  });
}

// Allocator.stats() as JSON (Note [One serializer], core/serialize.h); null without an allocator.
TP_API const char* torchpool_cuda_stats(int device) {
  return guarded(static_cast<const char*>(nullptr), [&]() -> const char* {
    CachingAllocator* a = get(device, false);
    return a ? text(stats_json(a->stats())) : nullptr;
  });
}

// Allocator.snapshot() as JSON (Note [One serializer]); null without an allocator.
TP_API const char* torchpool_cuda_snapshot(int device) {
  return guarded(static_cast<const char*>(nullptr), [&]() -> const char* {
    CachingAllocator* a = get(device, false);
    return a ? text(snapshot_json(a->snapshot())) : nullptr;
  });
}

TP_API const char* torchpool_cuda_check(int device) {
  return guarded(static_cast<const char*>(""), [&]() -> const char* {
    CachingAllocator* a = get(device, false);
    return text(a ? a->check() : "no allocator for this device");
  });
}

TP_API const char* torchpool_cuda_upstream_name(int device) {
  return guarded(static_cast<const char*>(""), [&]() -> const char* {
    CachingAllocator* a = get(device, false);
    return text(a ? a->upstream().name() : "");
  });
}

// For tests: destroys every allocator when none holds a live or deferred block, so that another
// configuration can be tried in the same process. 0, or -1 (nothing destroyed).
TP_API int torchpool_cuda_reset_for_tests() {
  return guarded(-1, [&]() -> int {
    std::lock_guard<std::mutex> g(g_mu);
    for (auto& slot : g_alloc)
      if (CachingAllocator* a = slot.load(std::memory_order_relaxed); a && a->stats().active.current) {
        t_error = "torchpool: " + a->config().device_name + " still has live blocks";
        return -1;
      }
    for (auto& slot : g_alloc) delete slot.exchange(nullptr);
    g_options = default_options(Device::kCuda);
    return 0;
  });
}
