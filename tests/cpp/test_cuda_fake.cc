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
#undef SYM
    return x;
  }();
  f.set_capacity(size_t{8} << 30);
  f.fail_next(0);
  return f;
}

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
  CHECK(f.complete(s2) == 1);
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
