// A fake CUDA driver for tests: exports the driver functions torchpool resolves (cuda_driver_api.h)
// and implements them on host memory, as strictly as a GPU where torchpool could go wrong, so the
// real backend code, dlopen included, runs in CI.
//
//   devices        kDevices devices, each with its own capacity and primary context; a current
//                  context per thread; allocation calls fail without one, as on a GPU, and memory
//                  belongs to the device of the current context (cuMemAlloc) or of the prop (cuMemCreate)
//   device memory  host memory (cuMemAlloc: mmap), bounded by the device's capacity; failures injectable
//   timeline       streams are queues of work: "kernels" (fake_cuda_launch(stream, ptr, bytes): work
//                  that touches [ptr, ptr + bytes)) and events.  Nothing runs by itself: work completes
//                  when the test calls fake_cuda_complete(stream) or a synchronizing call waits for it
//                  (cuStreamSynchronize, cuEventSynchronize, and cuMemFree, which synchronizes the
//                  device as cudaFree does).
//   hazards        Note [Fake driver hazards]: unmapping, releasing or freeing memory that pending work
//                  touches, launching work on unmapped or inaccessible memory, and launching work on
//                  one stream over memory pending work of another stream touches, are recorded
//                  (fake_cuda_hazards() / fake_cuda_hazard_text()); every test asserts there are none.
//   capture        cuStreamBeginCapture / EndCapture / IsCapturing / GetCaptureInfo, capture modes and
//                  cuThreadExchangeStreamCaptureMode.  As in CUDA: during a global-mode capture (any
//                  thread) or a thread-local one (this thread), "unsafe" calls (cuMemAlloc, cuMemFree,
//                  cuMemHostAlloc, event and stream synchronization and queries) fail with
//                  CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED and invalidate the capture, unless the calling
//                  thread is in relaxed mode; synchronizing or querying a capturing stream, or an event
//                  recorded into a capture, is always an error.  Work launched on a capturing stream
//                  goes into the graph; fake_cuda_graph_launch() replays it (with the launch checks).
//   errors         fake_cuda_inject(call, error, count) makes the next `count` calls of `call` fail
//                  (count < 0: forever); fake_cuda_set_sticky(error) makes every later call that touches
//                  the device fail, as CUDA_ERROR_ILLEGAL_ADDRESS does; cuGetErrorName / String know
//                  the names.
//   VMM            cuMemAddressReserve: a PROT_NONE mapping; cuMemCreate: a memfd (counted against
//                  the device's capacity); cuMemMap: MAP_FIXED of the memfd, inaccessible until
//                  cuMemSetAccess (mprotect; the access list says which devices may touch it);
//                  cuMemUnmap must cover exactly one mapping, as the real driver requires whole
//                  mappings; sizes, offsets and addresses must be multiples of the granularity.
//   fork           cuInit records the process; a forked child that uses the driver gets
//                  CUDA_ERROR_NOT_INITIALIZED (3), as after a real cuInit before fork.
//
// Note [Fake driver hazards]
// --------------------------
// The fake cannot run kernels, so it checks the one thing an allocator decides: when memory may be
// given back or handed out again.  A test enqueues work that touches a block (fake_cuda_launch)
// before freeing it, as torch would; the work stays pending until the test completes it.  If
// torchpool then unmaps, releases or frees memory the pending work touches without waiting for it
// (a real GPU would fault, or read pages mapped elsewhere), or hands the block to work on another
// stream that would overlap the pending work, the fake records a hazard.  Counters for the cost
// side: "sync" (every synchronizing call), "stall" (those that found work pending: the CPU would
// wait for the GPU there), "implicit_sync" (cuMemFree's device synchronization).
//
// Built by CMake (TORCHPOOL_TESTS) for the C++ tests and compiled by a pytest fixture for the Python
// tests.  Not part of torchpool.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define FAKE_API extern "C" __attribute__((visibility("default")))

namespace {

using CUresult = int;
using CUdeviceptr = unsigned long long;
using Handle = unsigned long long;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, INVALID_DEVICE = 101,
                   INVALID_CONTEXT = 201, NOT_MAPPED = 211, INVALID_HANDLE = 400, NOT_READY = 600,
                   ILLEGAL_ADDRESS = 700, CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901,
                   CAPTURE_WRONG_THREAD = 908;
constexpr int kGlobal = 0, kThreadLocal = 1, kRelaxed = 2;  // CUstreamCaptureMode
constexpr size_t kGran = 2u << 20;
constexpr int kDevices = 2;

struct Event {
  uint64_t stream = 0;
  bool done = true;
  bool captured = false;  // recorded into a capture: querying it is an error
};
struct Work {
  Event* event = nullptr;  // an event marker, or
  uintptr_t lo = 0, hi = 0;  // a kernel touching [lo, hi)
};
struct Capture {
  int mode = kGlobal;
  std::thread::id thread;
  bool invalid = false;
  uint64_t id = 0;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // kernels captured
};
struct Graph {
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
};
struct Physical {
  int fd;
  size_t size;
  int device;
  int maps = 0;
  bool released = false;
};
struct Mapping {
  size_t size;
  Handle handle;
  unsigned access = 0;  // bit d: device d may touch it
};
struct Alloc {
  size_t size;
  int device;
};
struct Inject {
  int error;
  long count;
};

struct State {
  std::mutex mu;
  size_t capacity[kDevices] = {size_t{8} << 30, size_t{8} << 30};
  size_t used[kDevices] = {0, 0};  // device bytes: cuMemAlloc + cuMemCreate
  size_t host = 0;       // cuMemHostAlloc bytes
  int fail_next = 0;
  pid_t init_pid = 0;
  int sticky = 0;
  std::map<std::string, Inject> inject;
  std::map<uintptr_t, Alloc> allocs;
  std::map<uintptr_t, size_t> host_allocs, reservations;
  std::map<Handle, Physical> handles;
  std::map<uintptr_t, Mapping> mappings;
  Handle next_handle = 1;
  std::map<uint64_t, std::deque<Work>> queues;
  std::map<uint64_t, int> stream_device;
  std::map<uint64_t, Capture> captures;  // by stream
  uint64_t next_capture_id = 1;
  std::map<std::string, long> calls;
  std::vector<std::string> hazards;
  bool peer_access = true;
};
State& st() {
  static State* s = new State();  // never destroyed: used from other libraries' destructors
  return *s;
}
thread_local void* current_ctx = nullptr;
thread_local int capture_mode = kGlobal;

void* primary(int dev) { return reinterpret_cast<void*>(uintptr_t{0x1000} + dev); }
int device_of_ctx(void* ctx) {
  const auto v = reinterpret_cast<uintptr_t>(ctx);
  return v >= 0x1000 && v < 0x1000 + kDevices ? static_cast<int>(v - 0x1000) : -1;
}
int device_of_stream(State& s, uint64_t stream) {
  auto it = s.stream_device.find(stream);
  if (it != s.stream_device.end()) return it->second;
  const int d = device_of_ctx(current_ctx);
  return d < 0 ? 0 : d;
}
std::string hex(uintptr_t v) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%llx", static_cast<unsigned long long>(v));
  return b;
}
void hazard(State& s, std::string what) { s.hazards.push_back(std::move(what)); }

// Common checks of a driver entry point (mu held): fork, injected and sticky errors, counting.
CUresult enter(State& s, const char* name, bool device_call = true) {
  s.calls[name]++;
  if (s.init_pid == 0) return NOT_INITIALIZED;
  if (s.init_pid != ::getpid()) return NOT_INITIALIZED;  // driver initialised before fork
  auto it = s.inject.find(name);
  if (it != s.inject.end() && it->second.count != 0) {
    if (it->second.count > 0) --it->second.count;
    return it->second.error;
  }
  if (device_call && s.sticky) return s.sticky;
  return OK;
}
#define ENTER(name)                                 \
  State& s = st();                                  \
  std::lock_guard<std::mutex> lock_(s.mu);          \
  if (CUresult r_ = enter(s, name); r_ != OK) return r_
#define ENTER_NODEV(name)                           \
  State& s = st();                                  \
  std::lock_guard<std::mutex> lock_(s.mu);          \
  if (CUresult r_ = enter(s, name, false); r_ != OK) return r_

// An "unsafe" call during a capture (mu held): prohibited unless this thread is in relaxed mode.
CUresult unsafe_call(State& s, const char* what) {
  if (capture_mode == kRelaxed) return OK;
  bool bad = false;
  for (auto& [stream, c] : s.captures) {
    if (c.invalid) continue;
    if (c.mode == kGlobal || (c.mode == kThreadLocal && c.thread == std::this_thread::get_id())) {
      c.invalid = true;
      bad = true;
    }
  }
  if (bad) s.calls[std::string("capture_violation:") + what]++;
  return bad ? CAPTURE_UNSUPPORTED : OK;
}
// Synchronizing or querying a capturing stream: always an error, the capture is invalidated.
CUresult capturing_stream_call(State& s, uint64_t stream, const char* what) {
  auto it = s.captures.find(stream);
  if (it == s.captures.end()) return OK;
  it->second.invalid = true;
  s.calls[std::string("capture_violation:") + what]++;
  return CAPTURE_UNSUPPORTED;
}

bool take(State& s, int dev, size_t n) {  // mu held
  if (s.fail_next > 0) {
    --s.fail_next;
    return false;
  }
  if (n > s.capacity[dev] - std::min(s.used[dev], s.capacity[dev])) return false;
  s.used[dev] += n;
  return true;
}
void drop_physical(State& s, Handle h) {  // mu held
  auto it = s.handles.find(h);
  if (it == s.handles.end() || !it->second.released || it->second.maps) return;
  ::close(it->second.fd);
  s.used[it->second.device] -= it->second.size;
  s.handles.erase(it);
}
void* map_anon(size_t n, int prot) {
  void* p = ::mmap(nullptr, n, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

// Pending work touching [lo, hi) (mu held): the stream of the first such kernel, or nullptr.
const uint64_t* pending_over(State& s, uintptr_t lo, uintptr_t hi, uint64_t except_stream, bool skip_stream) {
  for (auto& [stream, q] : s.queues) {
    if (skip_stream && stream == except_stream) continue;
    for (const Work& w : q)
      if (!w.event && w.lo < hi && lo < w.hi) return &stream;
  }
  return nullptr;
}
// Completes the stream's work (up to `until`, or all); returns whether any was pending.
bool complete(State& s, uint64_t stream, const Event* until = nullptr) {
  auto& q = s.queues[stream];
  bool any = false;
  while (!q.empty()) {
    Work w = q.front();
    q.pop_front();
    if (w.event) {
      any = any || !w.event->done;
      w.event->done = true;
      if (w.event == until) break;
    } else {
      any = true;
    }
  }
  return any;
}
void count_sync(State& s, bool stalled) {
  s.calls["sync"]++;
  if (stalled) s.calls["stall"]++;
}
// Accessible device memory for device `dev` covering [lo, hi)?
bool accessible(State& s, uintptr_t lo, uintptr_t hi, int dev) {
  auto a = s.allocs.upper_bound(lo);
  if (a != s.allocs.begin()) {
    --a;
    if (lo >= a->first && hi <= a->first + a->second.size) return a->second.device == dev || s.peer_access;
  }
  for (uintptr_t p = lo; p < hi;) {
    auto m = s.mappings.upper_bound(p);
    if (m == s.mappings.begin()) return false;
    --m;
    if (m->first + m->second.size <= p || !(m->second.access & (1u << dev))) return false;
    p = m->first + m->second.size;
  }
  return true;
}
// Enqueues a kernel (or captures it): the launch checks of Note [Fake driver hazards].
void launch(State& s, uint64_t stream, uintptr_t lo, uintptr_t hi) {
  const int dev = device_of_stream(s, stream);
  if (!accessible(s, lo, hi, dev))
    hazard(s, "work on stream " + hex(stream) + " (device " + std::to_string(dev) + ") touches " + hex(lo) + "+" +
                  std::to_string(hi - lo) + ", which is not device memory mapped and accessible to that device");
  auto c = s.captures.find(stream);
  if (c != s.captures.end()) {
    c->second.ranges.emplace_back(lo, hi);
    return;
  }
  if (const uint64_t* other = pending_over(s, lo, hi, stream, true))
    hazard(s, "work on stream " + hex(stream) + " touches " + hex(lo) + "+" + std::to_string(hi - lo) +
                  " while work pending on stream " + hex(*other) + " still touches it (reused too early)");
  s.queues[stream].push_back(Work{nullptr, lo, hi});
}

const char* error_name(CUresult r) {
  switch (r) {
    case OK: return "CUDA_SUCCESS";
    case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case NOT_MAPPED: return "CUDA_ERROR_NOT_MAPPED";
    case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case NOT_READY: return "CUDA_ERROR_NOT_READY";
    case ILLEGAL_ADDRESS: return "CUDA_ERROR_ILLEGAL_ADDRESS";
    case CAPTURE_UNSUPPORTED: return "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED";
    case CAPTURE_INVALIDATED: return "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED";
    case CAPTURE_WRONG_THREAD: return "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD";
    default: return nullptr;
  }
}

}  // namespace

// ---- driver functions ----------------------------------------------------------------------------

FAKE_API CUresult cuInit(unsigned) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  s.calls["cuInit"]++;
  if (s.init_pid != 0 && s.init_pid != ::getpid()) return NOT_INITIALIZED;
  s.init_pid = ::getpid();
  return OK;
}
FAKE_API CUresult cuDeviceGetCount(int* n) {
  ENTER_NODEV("cuDeviceGetCount");
  *n = kDevices;
  return OK;
}
FAKE_API CUresult cuDeviceGet(int* dev, int ordinal) {
  ENTER_NODEV("cuDeviceGet");
  if (ordinal < 0 || ordinal >= kDevices) return INVALID_DEVICE;
  *dev = ordinal;
  return OK;
}
FAKE_API CUresult cuDeviceCanAccessPeer(int* can, int dev, int peer) {
  ENTER_NODEV("cuDeviceCanAccessPeer");
  if (dev < 0 || dev >= kDevices || peer < 0 || peer >= kDevices) return INVALID_DEVICE;
  *can = s.peer_access && dev != peer;
  return OK;
}
FAKE_API CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  ENTER_NODEV("cuDevicePrimaryCtxRetain");
  if (dev < 0 || dev >= kDevices) return INVALID_DEVICE;
  *ctx = primary(dev);
  return OK;
}
FAKE_API CUresult cuCtxGetCurrent(void** ctx) {
  ENTER_NODEV("cuCtxGetCurrent");
  *ctx = current_ctx;
  return OK;
}
FAKE_API CUresult cuCtxSetCurrent(void* ctx) {
  ENTER_NODEV("cuCtxSetCurrent");
  if (ctx && device_of_ctx(ctx) < 0) return INVALID_CONTEXT;
  current_ctx = ctx;
  return OK;
}
FAKE_API CUresult cuGetErrorString(CUresult r, const char** out) {
  switch (r) {
    case OK: *out = "no error"; break;
    case INVALID_VALUE: *out = "invalid argument"; break;
    case OUT_OF_MEMORY: *out = "out of memory"; break;
    case NOT_INITIALIZED: *out = "initialization error"; break;
    case INVALID_CONTEXT: *out = "invalid device context"; break;
    case INVALID_HANDLE: *out = "invalid resource handle"; break;
    case NOT_READY: *out = "device not ready"; break;
    case ILLEGAL_ADDRESS: *out = "an illegal memory access was encountered"; break;
    case CAPTURE_UNSUPPORTED: *out = "operation not permitted when stream is capturing"; break;
    case CAPTURE_INVALIDATED: *out = "operation failed due to a previous error during capture"; break;
    default: *out = nullptr; return INVALID_VALUE;
  }
  return OK;
}
FAKE_API CUresult cuGetErrorName(CUresult r, const char** out) {
  *out = error_name(r);
  return *out ? OK : INVALID_VALUE;
}

FAKE_API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
  ENTER("cuMemAlloc");
  const int dev = device_of_ctx(current_ctx);
  if (dev < 0) return INVALID_CONTEXT;
  if (CUresult r = unsafe_call(s, "cuMemAlloc")) return r;
  if (n == 0) return INVALID_VALUE;
  if (!take(s, dev, n)) return OUT_OF_MEMORY;
  void* m = map_anon(n, PROT_READ | PROT_WRITE);
  if (!m) {
    s.used[dev] -= n;
    return OUT_OF_MEMORY;
  }
  s.allocs[reinterpret_cast<uintptr_t>(m)] = {n, dev};
  s.calls["cuMemAlloc:device" + std::to_string(dev)]++;
  *p = reinterpret_cast<CUdeviceptr>(m);
  return OK;
}
// cudaFree / cuMemFree synchronize the device first (PyTorch relies on it: "unlike cudaFree,
// MemUnmap and MemRelease do not appear to synchronize").
FAKE_API CUresult cuMemFree_v2(CUdeviceptr p) {
  ENTER("cuMemFree");
  if (device_of_ctx(current_ctx) < 0) return INVALID_CONTEXT;
  if (CUresult r = unsafe_call(s, "cuMemFree")) return r;
  auto it = s.allocs.find(p);
  if (it == s.allocs.end()) return INVALID_VALUE;
  const int dev = it->second.device;
  bool stalled = false;
  for (auto& [stream, q] : s.queues)
    if (device_of_stream(s, stream) == dev && !s.captures.count(stream)) stalled = complete(s, stream) || stalled;
  s.calls["implicit_sync"]++;
  if (stalled) s.calls["stall"]++;
  ::munmap(reinterpret_cast<void*>(p), it->second.size);
  s.used[dev] -= it->second.size;
  s.allocs.erase(it);
  return OK;
}
FAKE_API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
  ENTER("cuMemGetInfo");
  const int dev = device_of_ctx(current_ctx);
  if (dev < 0) return INVALID_CONTEXT;
  *total = s.capacity[dev];
  *free_b = s.capacity[dev] - std::min(s.used[dev], s.capacity[dev]);
  return OK;
}
FAKE_API CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
  ENTER("cuMemHostAlloc");
  if (device_of_ctx(current_ctx) < 0) return INVALID_CONTEXT;
  if (CUresult r = unsafe_call(s, "cuMemHostAlloc")) return r;
  if (s.fail_next > 0) {
    --s.fail_next;
    return OUT_OF_MEMORY;
  }
  void* m = map_anon(n, PROT_READ | PROT_WRITE);
  if (!m) return OUT_OF_MEMORY;
  s.host_allocs[reinterpret_cast<uintptr_t>(m)] = n;
  s.host += n;
  *p = m;
  return OK;
}
FAKE_API CUresult cuMemFreeHost(void* p) {
  ENTER("cuMemFreeHost");
  auto it = s.host_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.host_allocs.end()) return INVALID_VALUE;
  ::munmap(p, it->second);
  s.host -= it->second;
  s.host_allocs.erase(it);
  return OK;
}

// ---- streams and events ----

FAKE_API CUresult cuEventCreate(Event** e, unsigned) {
  ENTER("cuEventCreate");
  if (device_of_ctx(current_ctx) < 0) return INVALID_CONTEXT;
  *e = new Event();
  return OK;
}
FAKE_API CUresult cuEventRecord(Event* e, void* stream) {
  ENTER("cuEventRecord");
  e->stream = reinterpret_cast<uint64_t>(stream);
  if (s.captures.count(e->stream)) {  // becomes a node of the graph
    e->captured = true;
    e->done = false;
    return OK;
  }
  e->captured = false;
  e->done = false;
  s.queues[e->stream].push_back(Work{e});
  return OK;
}
FAKE_API CUresult cuEventQuery(Event* e) {
  ENTER("cuEventQuery");
  if (e->captured) return CAPTURE_UNSUPPORTED;
  if (CUresult r = unsafe_call(s, "cuEventQuery")) return r;
  return e->done ? OK : NOT_READY;
}
// Waiting = the stream's work up to the event runs to completion (nothing else would complete it).
FAKE_API CUresult cuEventSynchronize(Event* e) {
  ENTER("cuEventSynchronize");
  if (e->captured) return CAPTURE_UNSUPPORTED;
  if (CUresult r = unsafe_call(s, "cuEventSynchronize")) return r;
  count_sync(s, !e->done);
  if (!e->done) complete(s, e->stream, e);
  return OK;
}
FAKE_API CUresult cuEventDestroy_v2(Event* e) {
  ENTER_NODEV("cuEventDestroy");
  auto& q = s.queues[e->stream];
  for (auto it = q.begin(); it != q.end(); ++it)
    if (it->event == e) {
      q.erase(it);
      break;
    }
  delete e;
  return OK;
}
FAKE_API CUresult cuStreamSynchronize(void* stream) {
  ENTER("cuStreamSynchronize");
  const auto id = reinterpret_cast<uint64_t>(stream);
  if (CUresult r = capturing_stream_call(s, id, "cuStreamSynchronize")) return r;
  if (CUresult r = unsafe_call(s, "cuStreamSynchronize")) return r;
  count_sync(s, complete(s, id));
  return OK;
}
FAKE_API CUresult cuStreamQuery(void* stream) {
  ENTER("cuStreamQuery");
  const auto id = reinterpret_cast<uint64_t>(stream);
  if (CUresult r = capturing_stream_call(s, id, "cuStreamQuery")) return r;
  if (CUresult r = unsafe_call(s, "cuStreamQuery")) return r;
  return s.queues[id].empty() ? OK : NOT_READY;
}
FAKE_API CUresult cuCtxSynchronize() {
  ENTER("cuCtxSynchronize");
  const int dev = device_of_ctx(current_ctx);
  if (dev < 0) return INVALID_CONTEXT;
  if (CUresult r = unsafe_call(s, "cuCtxSynchronize")) return r;
  bool stalled = false;
  for (auto& [stream, q] : s.queues) {
    if (device_of_stream(s, stream) != dev) continue;
    if (s.captures.count(stream)) return capturing_stream_call(s, stream, "cuCtxSynchronize");
    stalled = complete(s, stream) || stalled;
  }
  count_sync(s, stalled);
  return OK;
}

// ---- stream capture ----

FAKE_API CUresult cuStreamBeginCapture_v2(void* stream, int mode) {
  ENTER("cuStreamBeginCapture");
  const auto id = reinterpret_cast<uint64_t>(stream);
  if (id == 0 || s.captures.count(id) || mode < kGlobal || mode > kRelaxed) return INVALID_VALUE;  // not the legacy stream
  Capture c;
  c.mode = mode;
  c.thread = std::this_thread::get_id();
  c.id = s.next_capture_id++;
  s.captures[id] = c;
  return OK;
}
FAKE_API CUresult cuStreamEndCapture(void* stream, Graph** graph) {
  ENTER("cuStreamEndCapture");
  auto it = s.captures.find(reinterpret_cast<uint64_t>(stream));
  if (it == s.captures.end()) return INVALID_VALUE;
  if (it->second.mode == kGlobal && it->second.thread != std::this_thread::get_id()) return CAPTURE_WRONG_THREAD;
  Capture c = std::move(it->second);
  s.captures.erase(it);
  *graph = nullptr;
  if (c.invalid) return CAPTURE_INVALIDATED;
  *graph = new Graph{std::move(c.ranges)};
  return OK;
}
FAKE_API CUresult cuStreamIsCapturing(void* stream, int* status) {
  ENTER("cuStreamIsCapturing");
  auto it = s.captures.find(reinterpret_cast<uint64_t>(stream));
  *status = it == s.captures.end() ? 0 : it->second.invalid ? 2 : 1;  // NONE, ACTIVE, INVALIDATED
  return OK;
}
FAKE_API CUresult cuStreamGetCaptureInfo_v2(void* stream, int* status, uint64_t* id, void** graph, const void** deps,
                                            size_t* ndeps) {
  ENTER("cuStreamGetCaptureInfo");
  auto it = s.captures.find(reinterpret_cast<uint64_t>(stream));
  *status = it == s.captures.end() ? 0 : it->second.invalid ? 2 : 1;
  if (id) *id = it == s.captures.end() ? 0 : it->second.id;
  if (graph) *graph = nullptr;
  if (deps) *deps = nullptr;
  if (ndeps) *ndeps = 0;
  return OK;
}
FAKE_API CUresult cuThreadExchangeStreamCaptureMode(int* mode) {
  ENTER_NODEV("cuThreadExchangeStreamCaptureMode");
  if (*mode < kGlobal || *mode > kRelaxed) return INVALID_VALUE;
  std::swap(*mode, capture_mode);
  return OK;
}

// ---- virtual memory management ----

FAKE_API CUresult cuMemGetAllocationGranularity(size_t* g, const void*, int) {
  ENTER("cuMemGetAllocationGranularity");
  *g = kGran;
  return OK;
}
FAKE_API CUresult cuMemAddressReserve(CUdeviceptr* p, size_t n, size_t align, CUdeviceptr, unsigned long long) {
  ENTER("cuMemAddressReserve");
  if (n == 0 || n % kGran) return INVALID_VALUE;
  if (align & (align - 1)) return INVALID_VALUE;
  if (align < kGran) align = kGran;
  void* raw = map_anon(n + align, PROT_NONE);
  if (!raw) return OUT_OF_MEMORY;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t base = (start + align - 1) / align * align;
  if (base > start) ::munmap(raw, base - start);
  if (start + n + align > base + n) ::munmap(reinterpret_cast<void*>(base + n), start + n + align - base - n);
  s.reservations[base] = n;
  *p = base;
  return OK;
}
FAKE_API CUresult cuMemAddressFree(CUdeviceptr p, size_t n) {
  ENTER("cuMemAddressFree");
  auto it = s.reservations.find(p);
  if (it == s.reservations.end() || it->second != n) return INVALID_VALUE;
  auto m = s.mappings.lower_bound(p);
  if (m != s.mappings.end() && m->first < p + n) return INVALID_VALUE;  // still mapped inside
  ::munmap(reinterpret_cast<void*>(p), n);
  s.reservations.erase(it);
  return OK;
}
struct Prop {
  int type, handle_types, loc_type, loc_id;
};
struct AccessDesc {
  int loc_type, loc_id, flags;
};
FAKE_API CUresult cuMemCreate(Handle* h, size_t n, const Prop* prop, unsigned long long) {
  ENTER("cuMemCreate");
  if (device_of_ctx(current_ctx) < 0) return INVALID_CONTEXT;
  if (!prop || prop->type != 1 || prop->loc_type != 1 || prop->loc_id < 0 || prop->loc_id >= kDevices) return INVALID_VALUE;
  if (n == 0 || n % kGran) return INVALID_VALUE;
  const int dev = prop->loc_id;
  if (!take(s, dev, n)) return OUT_OF_MEMORY;
  const int fd = ::memfd_create("fake-cuda", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(n)) != 0) {
    if (fd >= 0) ::close(fd);
    s.used[dev] -= n;
    return OUT_OF_MEMORY;
  }
  *h = s.next_handle++;
  s.handles[*h] = {fd, n, dev};
  return OK;
}
FAKE_API CUresult cuMemRelease(Handle h) {
  ENTER("cuMemRelease");
  auto it = s.handles.find(h);
  if (it == s.handles.end() || it->second.released) return INVALID_HANDLE;
  it->second.released = true;
  drop_physical(s, h);
  return OK;
}
FAKE_API CUresult cuMemMap(CUdeviceptr p, size_t n, size_t offset, Handle h, unsigned long long) {
  ENTER("cuMemMap");
  auto hit = s.handles.find(h);
  if (hit == s.handles.end()) return INVALID_HANDLE;
  if (offset != 0 || n != hit->second.size || p % kGran || n % kGran) return INVALID_VALUE;
  auto r = s.reservations.upper_bound(p);
  if (r == s.reservations.begin()) return INVALID_VALUE;
  --r;
  if (p < r->first || p + n > r->first + r->second) return INVALID_VALUE;
  auto m = s.mappings.lower_bound(p);
  if (m != s.mappings.end() && m->first < p + n) return INVALID_VALUE;
  if (m != s.mappings.begin() && std::prev(m)->first + std::prev(m)->second.size > p) return INVALID_VALUE;
  void* q = ::mmap(reinterpret_cast<void*>(p), n, PROT_NONE, MAP_SHARED | MAP_FIXED, hit->second.fd, 0);
  if (q == MAP_FAILED) return OUT_OF_MEMORY;
  s.mappings[p] = {n, h, 0};
  hit->second.maps++;
  return OK;
}
FAKE_API CUresult cuMemSetAccess(CUdeviceptr p, size_t n, const AccessDesc* desc, size_t count) {
  ENTER("cuMemSetAccess");
  if (count == 0 || !desc || p % kGran || n % kGran) return INVALID_VALUE;
  unsigned mask = 0;
  for (size_t i = 0; i < count; ++i) {
    if (desc[i].loc_type != 1 || desc[i].loc_id < 0 || desc[i].loc_id >= kDevices || desc[i].flags != 3) return INVALID_VALUE;
    mask |= 1u << desc[i].loc_id;
  }
  std::vector<Mapping*> ms;
  for (size_t off = 0; off < n;) {  // every byte must be mapped
    auto m = s.mappings.upper_bound(p + off);
    if (m == s.mappings.begin()) return INVALID_VALUE;
    --m;
    if (m->first + m->second.size <= p + off) return INVALID_VALUE;
    const int owner = s.handles[m->second.handle].device;
    for (int d = 0; d < kDevices; ++d)
      if ((mask >> d & 1) && d != owner && !s.peer_access) return INVALID_VALUE;  // no peer path
    ms.push_back(&m->second);
    off = m->first + m->second.size - p;
  }
  for (Mapping* m : ms) m->access = mask;
  return ::mprotect(reinterpret_cast<void*>(p), n, PROT_READ | PROT_WRITE) == 0 ? OK : INVALID_VALUE;
}
FAKE_API CUresult cuMemUnmap(CUdeviceptr p, size_t n) {
  ENTER("cuMemUnmap");
  auto m = s.mappings.find(p);
  if (m == s.mappings.end()) return NOT_MAPPED;
  if (m->second.size != n) return INVALID_VALUE;  // whole mappings only
  if (const uint64_t* stream = pending_over(s, p, p + n, 0, false))
    hazard(s, "cuMemUnmap of " + hex(p) + "+" + std::to_string(n) + " while work pending on stream " + hex(*stream) +
                  " still touches it (no synchronization before the unmap)");
  ::mmap(reinterpret_cast<void*>(p), n, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  const Handle h = m->second.handle;
  s.mappings.erase(m);
  s.handles[h].maps--;
  drop_physical(s, h);
  return OK;
}

// ---- control, for tests ----------------------------------------------------------------------

FAKE_API void fake_cuda_set_capacity(size_t bytes) {
  std::lock_guard<std::mutex> g(st().mu);
  for (auto& c : st().capacity) c = bytes;
}
FAKE_API void fake_cuda_set_device_capacity(int dev, size_t bytes) {
  std::lock_guard<std::mutex> g(st().mu);
  if (dev >= 0 && dev < kDevices) st().capacity[dev] = bytes;
}
FAKE_API void fake_cuda_fail_next(int n) {
  std::lock_guard<std::mutex> g(st().mu);
  st().fail_next = n;
}
// The next `count` calls of `call` (e.g. "cuMemCreate") return `error`; count < 0: every call; 0 clears.
FAKE_API void fake_cuda_inject(const char* call, int error, long count) {
  std::lock_guard<std::mutex> g(st().mu);
  st().inject[call] = {error, count};
}
// Every later device call returns `error` (0 clears), as after a kernel fault.
FAKE_API void fake_cuda_set_sticky(int error) {
  std::lock_guard<std::mutex> g(st().mu);
  st().sticky = error;
}
FAKE_API void fake_cuda_set_peer_access(int on) {
  std::lock_guard<std::mutex> g(st().mu);
  st().peer_access = on != 0;
}
// Which device a stream belongs to (default: the device of the caller's current context, else 0).
FAKE_API void fake_cuda_stream_device(uint64_t stream, int dev) {
  std::lock_guard<std::mutex> g(st().mu);
  st().stream_device[stream] = dev;
}
// Enqueues work on `stream` that touches [ptr, ptr + bytes) (Note [Fake driver hazards]).
FAKE_API void fake_cuda_launch(uint64_t stream, uintptr_t ptr, size_t bytes) {
  std::lock_guard<std::mutex> g(st().mu);
  launch(st(), stream, ptr, ptr + bytes);
}
// Enqueues the work of a graph made by cuStreamEndCapture on `stream`.
FAKE_API void fake_cuda_graph_launch(Graph* graph, uint64_t stream) {
  std::lock_guard<std::mutex> g(st().mu);
  for (auto [lo, hi] : graph->ranges) launch(st(), stream, lo, hi);
}
FAKE_API void fake_cuda_graph_destroy(Graph* graph) { delete graph; }
// Completes every piece of work queued on `stream` so far; returns how many items were pending.
FAKE_API int fake_cuda_complete(uint64_t stream) {
  std::lock_guard<std::mutex> g(st().mu);
  auto& q = st().queues[stream];
  int n = 0;
  for (Work& w : q) n += w.event ? !w.event->done : 1;
  while (!q.empty()) {
    if (q.front().event) q.front().event->done = true;
    q.pop_front();
  }
  return n;
}
FAKE_API void fake_cuda_complete_all() {
  std::lock_guard<std::mutex> g(st().mu);
  for (auto& [stream, q] : st().queues) complete(st(), stream);
}
FAKE_API int fake_cuda_pending_events() {
  std::lock_guard<std::mutex> g(st().mu);
  int n = 0;
  for (auto& [stream, q] : st().queues)
    for (Work& w : q) n += w.event && !w.event->done;
  return n;
}
FAKE_API int fake_cuda_pending_work() {
  std::lock_guard<std::mutex> g(st().mu);
  int n = 0;
  for (auto& [stream, q] : st().queues)
    for (Work& w : q) n += !w.event;
  return n;
}
FAKE_API int fake_cuda_hazards() {
  std::lock_guard<std::mutex> g(st().mu);
  return static_cast<int>(st().hazards.size());
}
// The hazards so far, one a line ("" when none).
FAKE_API const char* fake_cuda_hazard_text() {
  static std::string text;
  std::lock_guard<std::mutex> g(st().mu);
  text.clear();
  for (auto& h : st().hazards) text += h + "\n";
  return text.c_str();
}
FAKE_API void fake_cuda_clear_hazards() {
  std::lock_guard<std::mutex> g(st().mu);
  st().hazards.clear();
}
// 0: no capture on the stream, 1: active, 2: invalidated.
FAKE_API int fake_cuda_capture_status(uint64_t stream) {
  std::lock_guard<std::mutex> g(st().mu);
  auto it = st().captures.find(stream);
  return it == st().captures.end() ? 0 : it->second.invalid ? 2 : 1;
}
FAKE_API size_t fake_cuda_used_bytes() {
  std::lock_guard<std::mutex> g(st().mu);
  size_t n = 0;
  for (size_t u : st().used) n += u;
  return n;
}
FAKE_API size_t fake_cuda_device_used_bytes(int dev) {
  std::lock_guard<std::mutex> g(st().mu);
  return dev >= 0 && dev < kDevices ? st().used[dev] : 0;
}
FAKE_API size_t fake_cuda_host_bytes() {
  std::lock_guard<std::mutex> g(st().mu);
  return st().host;
}
FAKE_API size_t fake_cuda_reserved_bytes() {
  std::lock_guard<std::mutex> g(st().mu);
  size_t n = 0;
  for (auto& [b, sz] : st().reservations) n += sz;
  return n;
}
FAKE_API size_t fake_cuda_num_mappings() {
  std::lock_guard<std::mutex> g(st().mu);
  return st().mappings.size();
}
// Devices that may access the mapping at ptr (bit mask), or -1 when nothing is mapped there.
FAKE_API int fake_cuda_mapping_access(uintptr_t ptr) {
  std::lock_guard<std::mutex> g(st().mu);
  auto m = st().mappings.upper_bound(ptr);
  if (m == st().mappings.begin()) return -1;
  --m;
  return m->first + m->second.size > ptr ? static_cast<int>(m->second.access) : -1;
}
FAKE_API long fake_cuda_calls(const char* name) {
  std::lock_guard<std::mutex> g(st().mu);
  auto it = st().calls.find(name);
  return it == st().calls.end() ? 0 : it->second;
}
FAKE_API void fake_cuda_reset_calls() {
  std::lock_guard<std::mutex> g(st().mu);
  st().calls.clear();
}
FAKE_API void fake_cuda_clear_context() { current_ctx = nullptr; }
FAKE_API void* fake_cuda_current_context() { return current_ctx; }
FAKE_API void fake_cuda_set_context(int dev) { current_ctx = dev < 0 ? nullptr : primary(dev); }
// The device of the memory at ptr (cuMemAlloc or mapped chunk), or -1.
FAKE_API int fake_cuda_device_of(uintptr_t ptr) {
  std::lock_guard<std::mutex> g(st().mu);
  State& s = st();
  auto a = s.allocs.upper_bound(ptr);
  if (a != s.allocs.begin()) {
    --a;
    if (ptr < a->first + a->second.size) return a->second.device;
  }
  auto m = s.mappings.upper_bound(ptr);
  if (m == s.mappings.begin()) return -1;
  --m;
  return m->first + m->second.size > ptr ? s.handles[m->second.handle].device : -1;
}
