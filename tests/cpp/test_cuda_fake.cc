// The CUDA backend (cuda_driver.h, cuda_pinned.h) against the fake driver (tests/fake_driver), reached
// the real way: TORCHPOOL_CUDA_DRIVER + dlopen + dlsym.  Addresses are real host memory, so the
// tests also write through them.
#include <doctest/doctest.h>
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <memory>

#include "core/allocator.h"
#include "upstreams/cuda_driver.h"
#include "upstreams/cuda_pinned.h"

#ifdef TORCHPOOL_FAKE_CUDA_PATH
using namespace torchpool;

namespace {
constexpr size_t MiB = 1u << 20;

struct Fake {
  void (*set_capacity)(size_t);
  void (*fail_next)(int);
  int (*complete)(uint64_t);
  int (*pending_events)();
  size_t (*used_bytes)();
  size_t (*host_bytes)();
  size_t (*reserved_bytes)();
  size_t (*num_mappings)();
  void (*clear_context)();
  void (*launch)(uint64_t, uintptr_t, size_t);
  int (*hazards)();
  const char* (*hazard_text)();
  void (*clear_hazards)();
  long (*calls)(const char*);
  void (*reset_calls)();
  void (*inject)(const char*, int, long);
  void (*set_sticky)(int);
  void (*set_context)(int);
  void* (*current_context)();
  int (*device_of)(uintptr_t);
  int (*mapping_access)(uintptr_t);
  void (*complete_all)();
  int (*pending_work)();
  int (*capture_status)(uint64_t);
  void (*stream_device)(uint64_t, int);
  int (*begin_capture)(uint64_t, int);
  int (*end_capture)(uint64_t, void**);
  void (*graph_launch)(void*, uint64_t);
  void (*graph_destroy)(void*);
};

CudaDriver& driver() {
  ::setenv("TORCHPOOL_CUDA_DRIVER", TORCHPOOL_FAKE_CUDA_PATH, 1);
  std::string err;
  CudaDriver* d = CudaDriver::get(&err);
  REQUIRE_MESSAGE(d != nullptr, err);
  return *d;
}

Fake& fake() {
  static Fake f = [] {
    driver();
    void* h = ::dlopen(TORCHPOOL_FAKE_CUDA_PATH, RTLD_NOW | RTLD_NOLOAD);
    REQUIRE(h != nullptr);
    Fake x;
#define SYM(field, name) x.field = reinterpret_cast<decltype(x.field)>(::dlsym(h, name)); REQUIRE(reinterpret_cast<void*>(x.field) != nullptr);
    SYM(set_capacity, "fake_cuda_set_capacity")
    SYM(fail_next, "fake_cuda_fail_next")
    SYM(complete, "fake_cuda_complete")
    SYM(pending_events, "fake_cuda_pending_events")
    SYM(used_bytes, "fake_cuda_used_bytes")
    SYM(host_bytes, "fake_cuda_host_bytes")
    SYM(reserved_bytes, "fake_cuda_reserved_bytes")
    SYM(num_mappings, "fake_cuda_num_mappings")
    SYM(clear_context, "fake_cuda_clear_context")
    SYM(launch, "fake_cuda_launch")
    SYM(hazards, "fake_cuda_hazards")
    SYM(hazard_text, "fake_cuda_hazard_text")
    SYM(clear_hazards, "fake_cuda_clear_hazards")
    SYM(calls, "fake_cuda_calls")
    SYM(reset_calls, "fake_cuda_reset_calls")
    SYM(inject, "fake_cuda_inject")
    SYM(set_sticky, "fake_cuda_set_sticky")
    SYM(set_context, "fake_cuda_set_context")
    SYM(current_context, "fake_cuda_current_context")
    SYM(device_of, "fake_cuda_device_of")
    SYM(mapping_access, "fake_cuda_mapping_access")
    SYM(complete_all, "fake_cuda_complete_all")
    SYM(pending_work, "fake_cuda_pending_work")
    SYM(capture_status, "fake_cuda_capture_status")
    SYM(stream_device, "fake_cuda_stream_device")
    SYM(begin_capture, "cuStreamBeginCapture_v2")
    SYM(end_capture, "cuStreamEndCapture")
    SYM(graph_launch, "fake_cuda_graph_launch")
    SYM(graph_destroy, "fake_cuda_graph_destroy")
#undef SYM
    return x;
  }();
  f.set_capacity(size_t{8} << 30);
  f.fail_next(0);
  f.set_sticky(0);
  f.complete_all();
  f.clear_hazards();
  f.clear_context();
  CudaDriver::clear_error();
  return f;
}

// Enqueues fake work over the block at p (what a kernel reading or writing the tensor would be).
void use(Fake& f, void* p, size_t bytes, uint64_t stream) { f.launch(stream, reinterpret_cast<uintptr_t>(p), bytes); }

std::unique_ptr<CachingAllocator> device_allocator(bool vmm, size_t reservation = 256 * MiB, double reserved_ratio = 1.05) {
  CudaDriver& d = driver();
  std::shared_ptr<Upstream> up;
  if (vmm) up = std::make_shared<CudaVmmUpstream>(d, 0, reservation);
  else up = std::make_shared<CudaDeviceUpstream>(d, 0);
  AllocatorConfig cfg;
  cfg.device = 0;
  cfg.device_name = "cuda:0";
  cfg.pool.max_reserved_ratio = reserved_ratio;
  return std::make_unique<CachingAllocator>(up, cfg, std::make_shared<CudaStreamEvents>(d, 0));
}
}  // namespace

TEST_CASE("cuda fake: the driver is found through TORCHPOOL_CUDA_DRIVER and a missing context is made current") {
  CudaDriver& d = driver();
  CHECK(d.path == TORCHPOOL_FAKE_CUDA_PATH);
  Fake& f = fake();
  f.clear_context();
  auto a = device_allocator(false);
  auto* p = static_cast<unsigned char*>(a->allocate(1 << 20));
  REQUIRE(p != nullptr);
  std::memset(p, 3, 1 << 20);
  CHECK(f.used_bytes() == 2 * MiB);
  a->free(p);
  a->empty_cache();
  CHECK(f.used_bytes() == 0);
}

TEST_CASE("cuda fake: a block recorded on another stream is reused only after the fake completes its event") {
  Fake& f = fake();
  auto a = device_allocator(false);
  const uint64_t s1 = 0x51, s2 = 0x52;
  void* p = a->allocate(5 * MiB, s1);
  CHECK(a->record_stream(p, s2));
  a->free(p);
  CHECK(f.pending_events() == 1);
  CHECK(a->stats().active_bytes.current - a->stats().allocated_bytes.current == static_cast<int64_t>(5 * MiB));
  void* q = a->allocate(5 * MiB, s1);
  CHECK(q != p);
  a->free(q);
  CHECK(a->empty_cache() == 6 * MiB);  // q's segment goes, p's stays: s2 may still use it
  CHECK(f.used_bytes() == 6 * MiB);
  CHECK(f.complete(s2) == 0);  // empty_cache's cuMemFree synchronized the device (as cudaFree does)
  void* r = a->allocate(5 * MiB, s1);
  CHECK(r == p);
  a->free(r);
  CHECK(a->check() == "");
  a->empty_cache();
  CHECK(f.used_bytes() == 0);
}

TEST_CASE("cuda fake: out of memory, then the retry after empty_cache succeeds; the OOM names the device") {
  Fake& f = fake();
  f.set_capacity(64 * MiB);
  auto a = device_allocator(false, 256 * MiB, /*reserved_ratio=*/0);  // no reserve target: the retry must do it
  a->free(a->allocate(40 * MiB));
  void* p = a->allocate(50 * MiB);  // 40 cached + 50 > 64: the retry releases the cache
  CHECK(a->stats().num_alloc_retries == 1);
  CHECK(a->stats().num_ooms == 0);
  try {
    a->allocate(20 * MiB);
    FAIL("expected OutOfMemory");
  } catch (const OutOfMemory& e) {
    CHECK(std::string(e.what()).find("out of memory on cuda:0") != std::string::npos);
    CHECK(std::string(e.what()).find("upstream cuda") != std::string::npos);
  }
  CHECK(CudaDriver::last_error() == "");  // an out-of-memory is not a driver error
  a->free(p);
  f.fail_next(1);  // an injected failure: the retry maps again
  void* q = a->allocate(60 * MiB);
  CHECK(q != nullptr);
  a->free(q);
  a->empty_cache();
  CHECK(f.used_bytes() == 0);
}

TEST_CASE("cuda fake: the out-of-memory retry waits on the event of a deferred free (cuEventSynchronize)") {
  Fake& f = fake();
  f.set_capacity(16 * MiB);
  auto a = device_allocator(false);
  void* p = a->allocate(12 * MiB, 0x61);
  a->record_stream(p, 0x62);
  a->free(p);
  CHECK(f.pending_events() == 1);
  void* q = a->allocate(12 * MiB, 0x61);  // 12 + 12 > 16: the retry waits for 0x62, then reuses p
  CHECK(q == p);
  CHECK(f.pending_events() == 0);
  CHECK(a->stats().num_ooms == 0);
  a->free(q);
  a->empty_cache();
  CHECK(f.used_bytes() == 0);
}

TEST_CASE("cuda fake: expandable segments grow by chunk mappings and return the free tail") {
  Fake& f = fake();
  auto a = device_allocator(true);
  auto* p = static_cast<unsigned char*>(a->allocate(7 * MiB));
  void* q = a->allocate(9 * MiB);
  CHECK(reinterpret_cast<uintptr_t>(q) == reinterpret_cast<uintptr_t>(p) + 7 * MiB);
  CHECK(f.reserved_bytes() == 256 * MiB);
  CHECK(f.num_mappings() == 8);  // 16 MiB in 2 MiB chunks, one handle each
  std::memset(p, 9, 7 * MiB);    // accessible: cuMemSetAccess ran
  std::memset(q, 1, 9 * MiB);
  a->free(q);
  CHECK(a->empty_cache() == 8 * MiB);
  CHECK(f.num_mappings() == 4);
  CHECK(f.used_bytes() == 8 * MiB);
  CHECK(p[7 * MiB - 1] == 9);
  a->free(p);
  CHECK(a->check() == "");
  a->empty_cache();
  CHECK(f.num_mappings() == 0);
  CHECK(f.reserved_bytes() == 0);
  CHECK(f.used_bytes() == 0);
}

TEST_CASE("cuda fake: a chunk that cannot be created leaves nothing mapped; the allocator recovers") {
  Fake& f = fake();
  f.set_capacity(20 * MiB);
  auto a = device_allocator(true);
  void* p = a->allocate(12 * MiB);
  CHECK_THROWS_AS(a->allocate(10 * MiB), OutOfMemory);  // 4 chunks would exceed 20 MiB
  CHECK(f.num_mappings() == 6);
  CHECK(f.used_bytes() == 12 * MiB);
  a->free(p);
  void* q = a->allocate(18 * MiB);  // the free 12 MiB tail grows by 6 MiB
  CHECK(q == p);
  a->free(q);
  CHECK(a->check() == "");
}

// ---- hazards a GPU would hit (Note [Fake driver hazards], tests/fake_driver/fake_cuda.cc) ----------

TEST_CASE("cuda fake: empty_cache of an expandable segment waits for the work queued on its stream") {
  Fake& f = fake();
  auto a = device_allocator(true);
  const uint64_t s = 0x71;
  void* keep = a->allocate(2 * MiB, s);
  void* p = a->allocate(8 * MiB, s);
  use(f, p, 8 * MiB, s);  // a kernel still reads p when the caller frees it (normal: stream order)
  a->free(p);
  f.reset_calls();
  CHECK(a->empty_cache() == 8 * MiB);
  CHECK_MESSAGE(f.hazards() == 0, f.hazard_text());
  CHECK(f.pending_work() == 0);        // the unmap waited for the kernel
  CHECK(f.calls("stall") == 1);        // one synchronization that actually waited
  CHECK(f.calls("cuStreamSynchronize") == 1);
  a->free(keep);
  a->empty_cache();
  CHECK(f.hazards() == 0);
}

TEST_CASE("cuda fake: the reserve target unmaps another stream's chunks only after that stream's work") {
  Fake& f = fake();
  auto a = device_allocator(true);  // reserve target on (1.05)
  const uint64_t s1 = 0x81, s2 = 0x82;
  void* p = a->allocate(40 * MiB, s1);
  use(f, p, 40 * MiB, s1);
  a->free(p);
  void* q = a->allocate(60 * MiB, s2);  // 40 cached + 60 > 1.05 x 60: s1's chunks go first
  CHECK(a->stats().num_target_releases >= 1);
  CHECK_MESSAGE(f.hazards() == 0, f.hazard_text());
  a->free(q);
  a->empty_cache();
  CHECK(f.hazards() == 0);
}

TEST_CASE("cuda fake: the out-of-memory retry unmaps cached chunks only after their stream's work") {
  Fake& f = fake();
  f.set_capacity(64 * MiB);
  auto a = device_allocator(true, 256 * MiB, /*reserved_ratio=*/0);
  const uint64_t s1 = 0x91, s2 = 0x92;
  void* p = a->allocate(40 * MiB, s1);
  use(f, p, 40 * MiB, s1);
  a->free(p);
  void* q = a->allocate(50 * MiB, s2);  // 40 + 50 > 64: the retry releases s1's cache
  CHECK(a->stats().num_alloc_retries == 1);
  CHECK_MESSAGE(f.hazards() == 0, f.hazard_text());
  a->free(q);
  a->empty_cache();
}

TEST_CASE("cuda fake: cuMemFree segments synchronize by themselves (no hazard, counted as implicit syncs)") {
  Fake& f = fake();
  auto a = device_allocator(false);
  void* p = a->allocate(8 * MiB, 0xa1);
  use(f, p, 8 * MiB, 0xa1);
  a->free(p);
  f.reset_calls();
  a->empty_cache();
  CHECK(f.hazards() == 0);
  CHECK(f.calls("implicit_sync") == 1);
  CHECK(f.calls("cuStreamSynchronize") == 0);
}

TEST_CASE("cuda fake: the fake catches what it must (an unsynchronized unmap, a reuse race, unmapped memory)") {
  // The checks the other tests rely on, exercised directly so that they cannot silently pass.
  Fake& f = fake();
  CudaDriver& d = driver();
  CudaVmmUpstream up(d, 0, 64 * MiB);
  void* base = up.reserve(64 * MiB, 0);
  REQUIRE(base != nullptr);
  REQUIRE(up.map_chunk(base, 4 * MiB, 0));
  f.launch(0xb1, reinterpret_cast<uintptr_t>(base), 4 * MiB);
  f.launch(0xb2, reinterpret_cast<uintptr_t>(base), MiB);  // another stream, no ordering: a race
  CHECK(f.hazards() == 1);
  f.set_context(0);
  auto unmap = reinterpret_cast<int (*)(unsigned long long, size_t)>(::dlsym(::dlopen(TORCHPOOL_FAKE_CUDA_PATH, RTLD_NOW | RTLD_NOLOAD), "cuMemUnmap"));
  CHECK(unmap(reinterpret_cast<uintptr_t>(base) + 2 * MiB, 2 * MiB) == 0);  // while 0xb1's work is pending
  CHECK(f.hazards() == 2);
  f.launch(0xb1, reinterpret_cast<uintptr_t>(base) + 2 * MiB, 4096);  // unmapped now
  CHECK(f.hazards() == 3);
  f.complete_all();
  f.clear_hazards();
  f.clear_context();
  up.unmap_chunk(base, 2 * MiB, 0);
  up.unreserve(base, 64 * MiB, 0);
}

TEST_CASE("cuda fake: driver calls run in the device's primary context and restore the caller's") {
  Fake& f = fake();
  CudaDriver& d = driver();
  CudaDeviceUpstream up0(d, 0);
  f.set_context(1);  // the thread works on device 1 (torch.cuda.set_device(1))
  void* const ctx1 = f.current_context();
  void* p = up0.map(2 * MiB, 0);
  REQUIRE(p != nullptr);
  CHECK(f.device_of(reinterpret_cast<uintptr_t>(p)) == 0);  // memory of the device asked for
  CHECK(f.current_context() == ctx1);                      // the caller's context is back
  f.clear_context();
  up0.unmap(p, 2 * MiB, 0);
  CHECK(f.current_context() == nullptr);  // none before, none after
}

TEST_CASE("cuda fake: expandable segments are accessible to peer devices") {
  Fake& f = fake();
  auto a = device_allocator(true);
  void* p = a->allocate(4 * MiB, 0xc1);
  CHECK(f.mapping_access(reinterpret_cast<uintptr_t>(p)) == 0x3);  // device 0 and its peer, device 1
  f.stream_device(0xc2, 1);
  use(f, p, 4 * MiB, 0xc2);  // a kernel of device 1 reads the tensor (after the owner's work: none here)
  CHECK_MESSAGE(f.hazards() == 0, f.hazard_text());
  f.complete(0xc2);
  a->free(p);
  a->empty_cache();
}

TEST_CASE("cuda fake: per-device capacity; an allocator of device 1 allocates on device 1") {
  Fake& f = fake();
  CudaDriver& d = driver();
  AllocatorConfig cfg;
  cfg.device = 1;
  cfg.device_name = "cuda:1";
  auto set_dev_capacity = reinterpret_cast<void (*)(int, size_t)>(
      ::dlsym(::dlopen(TORCHPOOL_FAKE_CUDA_PATH, RTLD_NOW | RTLD_NOLOAD), "fake_cuda_set_device_capacity"));
  set_dev_capacity(1, 16 * MiB);
  CachingAllocator a(std::make_shared<CudaDeviceUpstream>(d, 1), cfg, std::make_shared<CudaStreamEvents>(d, 1));
  void* p = a.allocate(10 * MiB);
  CHECK(f.device_of(reinterpret_cast<uintptr_t>(p)) == 1);
  CHECK_THROWS_AS(a.allocate(10 * MiB), OutOfMemory);  // device 1 is full, device 0 is not
  a.free(p);
  a.empty_cache();
}

TEST_CASE("cuda fake: a driver error is kept with its call and name, not mistaken for out of memory") {
  Fake& f = fake();
  CudaDriver& d = driver();
  CHECK(d.error_string(700).find("CUDA_ERROR_ILLEGAL_ADDRESS (700)") == 0);
  auto a = device_allocator(true);
  f.inject("cuMemCreate", 400, -1);  // CUDA_ERROR_INVALID_HANDLE on every call
  CudaDriver::clear_error();
  CHECK_THROWS_AS(a->allocate(4 * MiB), OutOfMemory);  // the core only knows "no memory" ...
  CHECK(CudaDriver::last_error().find("cuMemCreate: CUDA_ERROR_INVALID_HANDLE (400)") == 0);  // ... the driver error is kept
  f.inject("cuMemCreate", 0, 0);
  CudaDriver::clear_error();
  f.set_sticky(700);
  CHECK_THROWS_AS(a->allocate(4 * MiB), OutOfMemory);
  CHECK(CudaDriver::last_error().find("CUDA_ERROR_ILLEGAL_ADDRESS") != std::string::npos);
  f.set_sticky(0);
  CudaDriver::clear_error();
  a->free(a->allocate(4 * MiB));
  CHECK(a->check() == "");
}

TEST_CASE("cuda fake: an allocation on another stream does not invalidate a global-mode capture") {
  Fake& f = fake();
  auto a = device_allocator(false);
  const uint64_t cap = 0xd1, other = 0xd2;
  void* p = a->allocate(MiB, other);
  a->record_stream(p, 0xd3);
  a->free(p);  // a deferred free: allocate() will query its event
  REQUIRE(f.begin_capture(cap, 0) == 0);  // CU_STREAM_CAPTURE_MODE_GLOBAL, this thread
  void* q = a->allocate(4 * MiB, other);  // cold: cuMemAlloc, and cuEventQuery of the deferred free
  CHECK(q != nullptr);
  CHECK(f.capture_status(cap) == 1);  // still active, not invalidated
  void* graph = nullptr;
  CHECK(f.end_capture(cap, &graph) == 0);
  f.graph_destroy(graph);
  f.complete_all();
  a->free(q);
  a->process_events();
  a->empty_cache();
}

TEST_CASE("cuda fake: a free recorded on a capturing stream waits until the capture is over") {
  Fake& f = fake();
  auto a = device_allocator(false);
  const uint64_t s1 = 0xe1, cap = 0xe2;
  void* p = a->allocate(4 * MiB, s1);
  use(f, p, 4 * MiB, cap);  // cap reads p (eagerly, before the capture)
  a->record_stream(p, cap);
  REQUIRE(f.begin_capture(cap, 2) == 0);  // relaxed capture
  a->free(p);  // the event for cap cannot be recorded into the graph
  CHECK(a->process_events() == 1);
  CHECK(f.capture_status(cap) == 1);
  void* graph = nullptr;
  CHECK(f.end_capture(cap, &graph) == 0);
  f.graph_destroy(graph);
  CHECK(a->process_events() == 1);  // recorded now, after cap's eager work
  f.complete(cap);
  CHECK(a->process_events() == 0);
  void* q = a->allocate(4 * MiB, s1);
  CHECK(q == p);
  a->free(q);
  CHECK_MESSAGE(f.hazards() == 0, f.hazard_text());
  a->empty_cache();
}

TEST_CASE("cuda fake: chunks given back while their stream is capturing are parked, then released after it") {
  Fake& f = fake();
  auto a = device_allocator(true);
  const uint64_t s = 0xf1;
  void* keep = a->allocate(2 * MiB, s);
  void* p = a->allocate(8 * MiB, s);
  use(f, p, 8 * MiB, s);
  a->free(p);
  REQUIRE(f.begin_capture(s, 0) == 0);
  CHECK(a->empty_cache() == 8 * MiB);  // accounted as released ...
  CHECK(f.num_mappings() == 5);        // ... but still mapped: s cannot be synchronized now
  CHECK(f.capture_status(s) == 1);
  CHECK(f.hazards() == 0);
  void* graph = nullptr;
  CHECK(f.end_capture(s, &graph) == 0);
  f.graph_destroy(graph);
  a->free(keep);
  a->empty_cache();  // the next upstream call after the capture releases the parked chunks
  CHECK(f.num_mappings() == 0);
  CHECK(f.reserved_bytes() == 0);
  CHECK_MESSAGE(f.hazards() == 0, f.hazard_text());
}

TEST_CASE("cuda fake: pinned host memory through cuMemHostAlloc") {
  Fake& f = fake();
  std::string err;
  auto up = CudaPinnedUpstream::create(&err);
  REQUIRE_MESSAGE(up != nullptr, err);
  CachingAllocator a(up, {});
  auto* p = static_cast<unsigned char*>(a.allocate(3 * MiB));
  std::memset(p, 4, 3 * MiB);
  CHECK(f.host_bytes() == 4 * MiB);
  a.free(p);
  a.empty_cache();
  CHECK(f.host_bytes() == 0);
  CHECK(up->mapped_bytes() == 0);
}
#endif
