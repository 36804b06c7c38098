// A fake CUDA driver for tests: exports the driver functions torchpool resolves (cuda_driver_api.h)
// and implements them on host memory, so the real backend code, dlopen included, runs in CI.
//
//   device memory  host memory (cuMemAlloc: mmap), bounded by a capacity; failures injectable
//   contexts       a current-context slot per thread; allocation calls fail without one, as on a GPU
//   streams        queues of events; an event completes when the test calls fake_cuda_complete(stream)
//                  (or cuStreamSynchronize) - no work ever runs by itself
//   VMM            cuMemAddressReserve: a PROT_NONE mapping; cuMemCreate: a memfd (counted against the
//                  capacity); cuMemMap: MAP_FIXED of the memfd, inaccessible until cuMemSetAccess
//                  (mprotect); cuMemUnmap must cover exactly one mapping, as the real driver requires
//                  whole mappings; physical memory is freed when unmapped and released
//
// Built by CMake (TORCHPOOL_TESTS) for the C++ tests and compiled by a pytest fixture for the Python
// tests.  Not part of torchpool.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <deque>
#include <map>
#include <mutex>
#include <string>

#define FAKE_API extern "C" __attribute__((visibility("default")))

namespace {

using CUresult = int;
using CUdeviceptr = unsigned long long;
using Handle = unsigned long long;
constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101, INVALID_CONTEXT = 201,
                   NOT_READY = 600, NOT_MAPPED = 211;
constexpr size_t kGran = 2u << 20;
constexpr int kDevices = 2;

struct Event {
  uint64_t stream = 0;
  bool done = true;
};
struct Physical {
  int fd;
  size_t size;
  int maps = 0;
  bool released = false;
};
struct Mapping {
  size_t size;
  Handle handle;
};

struct State {
  std::mutex mu;
  size_t capacity = size_t{8} << 30;
  size_t used = 0;       // device bytes: cuMemAlloc + cuMemCreate
  size_t host = 0;       // cuMemHostAlloc bytes
  int fail_next = 0;
  std::map<uintptr_t, size_t> allocs, host_allocs, reservations;
  std::map<Handle, Physical> handles;
  std::map<uintptr_t, Mapping> mappings;
  Handle next_handle = 1;
  std::map<uint64_t, std::deque<Event*>> queues;
  std::map<std::string, long> calls;
};
State& st() {
  static State* s = new State();  // never destroyed: used from other libraries' destructors
  return *s;
}
thread_local void* current_ctx = nullptr;

bool take(State& s, size_t n) {  // mu held
  if (s.fail_next > 0) {
    --s.fail_next;
    return false;
  }
  if (n > s.capacity - std::min(s.used, s.capacity)) return false;
  s.used += n;
  return true;
}
void drop_physical(State& s, Handle h) {  // mu held
  auto it = s.handles.find(h);
  if (it == s.handles.end() || !it->second.released || it->second.maps) return;
  ::close(it->second.fd);
  s.used -= it->second.size;
  s.handles.erase(it);
}
void* map_anon(size_t n, int prot) {
  void* p = ::mmap(nullptr, n, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}
#define COUNT(name) (st().calls[name]++)

}  // namespace

// ---- driver functions ----------------------------------------------------------------------------

FAKE_API CUresult cuInit(unsigned) { return OK; }
FAKE_API CUresult cuDeviceGetCount(int* n) {
  *n = kDevices;
  return OK;
}
FAKE_API CUresult cuDeviceGet(int* dev, int ordinal) {
  if (ordinal < 0 || ordinal >= kDevices) return INVALID_DEVICE;
  *dev = ordinal;
  return OK;
}
FAKE_API CUresult cuDevicePrimaryCtxRetain(void** ctx, int dev) {
  if (dev < 0 || dev >= kDevices) return INVALID_DEVICE;
  *ctx = reinterpret_cast<void*>(uintptr_t{0x1000} + dev);
  return OK;
}
FAKE_API CUresult cuCtxGetCurrent(void** ctx) {
  *ctx = current_ctx;
  return OK;
}
FAKE_API CUresult cuCtxSetCurrent(void* ctx) {
  current_ctx = ctx;
  return OK;
}
FAKE_API CUresult cuGetErrorString(CUresult r, const char** s) {
  switch (r) {
    case OK: *s = "no error"; break;
    case INVALID_VALUE: *s = "invalid argument"; break;
    case OUT_OF_MEMORY: *s = "out of memory"; break;
    case INVALID_CONTEXT: *s = "invalid device context"; break;
    case NOT_READY: *s = "device not ready"; break;
    default: *s = "unknown error";
  }
  return OK;
}

FAKE_API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
  if (!current_ctx) return INVALID_CONTEXT;
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemAlloc");
  if (n == 0) return INVALID_VALUE;
  if (!take(s, n)) return OUT_OF_MEMORY;
  void* m = map_anon(n, PROT_READ | PROT_WRITE);
  if (!m) {
    s.used -= n;
    return OUT_OF_MEMORY;
  }
  s.allocs[reinterpret_cast<uintptr_t>(m)] = n;
  *p = reinterpret_cast<CUdeviceptr>(m);
  return OK;
}
FAKE_API CUresult cuMemFree_v2(CUdeviceptr p) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemFree");
  auto it = s.allocs.find(p);
  if (it == s.allocs.end()) return INVALID_VALUE;
  ::munmap(reinterpret_cast<void*>(p), it->second);
  s.used -= it->second;
  s.allocs.erase(it);
  return OK;
}
FAKE_API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  *total = s.capacity;
  *free_b = s.capacity - std::min(s.used, s.capacity);
  return OK;
}
FAKE_API CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
  if (!current_ctx) return INVALID_CONTEXT;
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemHostAlloc");
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
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  auto it = s.host_allocs.find(reinterpret_cast<uintptr_t>(p));
  if (it == s.host_allocs.end()) return INVALID_VALUE;
  ::munmap(p, it->second);
  s.host -= it->second;
  s.host_allocs.erase(it);
  return OK;
}

// ---- streams and events ----

FAKE_API CUresult cuEventCreate(Event** e, unsigned) {
  if (!current_ctx) return INVALID_CONTEXT;
  *e = new Event();
  return OK;
}
FAKE_API CUresult cuEventRecord(Event* e, void* stream) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuEventRecord");
  e->stream = reinterpret_cast<uint64_t>(stream);
  e->done = false;
  s.queues[e->stream].push_back(e);
  return OK;
}
FAKE_API CUresult cuEventQuery(Event* e) {
  std::lock_guard<std::mutex> g(st().mu);
  return e->done ? OK : NOT_READY;
}
// Waiting = the stream's work up to the event runs to completion (nothing else would complete it).
FAKE_API CUresult cuEventSynchronize(Event* e) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuEventSynchronize");
  if (e->done) return OK;
  for (Event* x : s.queues[e->stream]) {
    x->done = true;
    if (x == e) break;
  }
  return OK;
}
FAKE_API CUresult cuEventDestroy_v2(Event* e) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  auto& q = s.queues[e->stream];
  for (auto it = q.begin(); it != q.end(); ++it)
    if (*it == e) {
      q.erase(it);
      break;
    }
  delete e;
  return OK;
}
FAKE_API CUresult cuStreamSynchronize(void* stream) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  for (Event* e : s.queues[reinterpret_cast<uint64_t>(stream)]) e->done = true;
  return OK;
}

// ---- virtual memory management ----

FAKE_API CUresult cuMemGetAllocationGranularity(size_t* g, const void*, int) {
  *g = kGran;
  return OK;
}
FAKE_API CUresult cuMemAddressReserve(CUdeviceptr* p, size_t n, size_t align, CUdeviceptr, unsigned long long) {
  if (n == 0 || n % kGran) return INVALID_VALUE;
  if (align < kGran) align = kGran;
  void* raw = map_anon(n + align, PROT_NONE);
  if (!raw) return OUT_OF_MEMORY;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t base = (start + align - 1) / align * align;
  if (base > start) ::munmap(raw, base - start);
  if (start + n + align > base + n) ::munmap(reinterpret_cast<void*>(base + n), start + n + align - base - n);
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemAddressReserve");
  s.reservations[base] = n;
  *p = base;
  return OK;
}
FAKE_API CUresult cuMemAddressFree(CUdeviceptr p, size_t n) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
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
FAKE_API CUresult cuMemCreate(Handle* h, size_t n, const Prop* prop, unsigned long long) {
  if (!current_ctx) return INVALID_CONTEXT;
  if (!prop || prop->type != 1 || prop->loc_type != 1 || prop->loc_id < 0 || prop->loc_id >= kDevices) return INVALID_VALUE;
  if (n == 0 || n % kGran) return INVALID_VALUE;
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemCreate");
  if (!take(s, n)) return OUT_OF_MEMORY;
  const int fd = ::memfd_create("fake-cuda", MFD_CLOEXEC);
  if (fd < 0 || ::ftruncate(fd, static_cast<off_t>(n)) != 0) {
    if (fd >= 0) ::close(fd);
    s.used -= n;
    return OUT_OF_MEMORY;
  }
  *h = s.next_handle++;
  s.handles[*h] = {fd, n};
  return OK;
}
FAKE_API CUresult cuMemRelease(Handle h) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  auto it = s.handles.find(h);
  if (it == s.handles.end() || it->second.released) return INVALID_VALUE;
  it->second.released = true;
  drop_physical(s, h);
  return OK;
}
FAKE_API CUresult cuMemMap(CUdeviceptr p, size_t n, size_t offset, Handle h, unsigned long long) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemMap");
  auto hit = s.handles.find(h);
  if (hit == s.handles.end() || offset != 0 || n != hit->second.size) return INVALID_VALUE;
  auto r = s.reservations.upper_bound(p);
  if (r == s.reservations.begin()) return INVALID_VALUE;
  --r;
  if (p < r->first || p + n > r->first + r->second) return INVALID_VALUE;
  auto m = s.mappings.lower_bound(p);
  if (m != s.mappings.end() && m->first < p + n) return INVALID_VALUE;
  if (m != s.mappings.begin() && std::prev(m)->first + std::prev(m)->second.size > p) return INVALID_VALUE;
  void* q = ::mmap(reinterpret_cast<void*>(p), n, PROT_NONE, MAP_SHARED | MAP_FIXED, hit->second.fd, 0);
  if (q == MAP_FAILED) return OUT_OF_MEMORY;
  s.mappings[p] = {n, h};
  hit->second.maps++;
  return OK;
}
FAKE_API CUresult cuMemSetAccess(CUdeviceptr p, size_t n, const void*, size_t count) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  if (count != 1) return INVALID_VALUE;
  for (size_t off = 0; off < n;) {  // every byte must be mapped
    auto m = s.mappings.upper_bound(p + off);
    if (m == s.mappings.begin()) return INVALID_VALUE;
    --m;
    if (m->first + m->second.size <= p + off) return INVALID_VALUE;
    off = m->first + m->second.size - p;
  }
  return ::mprotect(reinterpret_cast<void*>(p), n, PROT_READ | PROT_WRITE) == 0 ? OK : INVALID_VALUE;
}
FAKE_API CUresult cuMemUnmap(CUdeviceptr p, size_t n) {
  State& s = st();
  std::lock_guard<std::mutex> g(s.mu);
  COUNT("cuMemUnmap");
  auto m = s.mappings.find(p);
  if (m == s.mappings.end()) return NOT_MAPPED;
  if (m->second.size != n) return INVALID_VALUE;  // whole mappings only
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
  st().capacity = bytes;
}
FAKE_API void fake_cuda_fail_next(int n) {
  std::lock_guard<std::mutex> g(st().mu);
  st().fail_next = n;
}
// Completes every event recorded on `stream` so far; returns how many were pending.
FAKE_API int fake_cuda_complete(uint64_t stream) {
  std::lock_guard<std::mutex> g(st().mu);
  int n = 0;
  for (Event* e : st().queues[stream]) n += !e->done, e->done = true;
  return n;
}
FAKE_API int fake_cuda_pending_events() {
  std::lock_guard<std::mutex> g(st().mu);
  int n = 0;
  for (auto& [stream, q] : st().queues)
    for (Event* e : q) n += !e->done;
  return n;
}
FAKE_API size_t fake_cuda_used_bytes() {
  std::lock_guard<std::mutex> g(st().mu);
  return st().used;
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
FAKE_API long fake_cuda_calls(const char* name) {
  std::lock_guard<std::mutex> g(st().mu);
  auto it = st().calls.find(name);
  return it == st().calls.end() ? 0 : it->second;
}
FAKE_API void fake_cuda_clear_context() { current_ctx = nullptr; }
