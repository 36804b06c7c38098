// The CUDA driver, reached at run time, and the upstreams and stream events built on it.
//
// Note [Reaching the driver]
// --------------------------
// Rationale: one build must work with any CUDA build of torch and build where no CUDA toolkit is
// installed, so nothing links libcudart or libcuda.  Approach: CudaDriver::get() dlopen()s
// $TORCHPOOL_CUDA_DRIVER if set (the fake driver of the tests, tests/fake_driver), else
// "libcuda.so.1", calls cuInit(0), and resolves each function with dlsym by its exported versioned
// name (cuMemAlloc_v2, ...: the names cuda.h's macros select; PyTorch resolves the same functions
// at run time too, through cudaGetDriverEntryPointByVersion in c10/cuda/driver_api.h).  The types
// are declared in cuda_driver_api.h.  A missing library or function is an error message, not a
// crash.  Contexts: every driver call that needs one runs under ensure_context(device), which
// makes the device's primary context (the one the CUDA runtime, hence torch, uses) current when
// the calling thread has none.
#pragma once

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "../core/upstream.h"
#include "cuda_driver_api.h"

namespace torchpool {

using namespace cu;  // the CU* names of cuda_driver_api.h (prefixed, they cannot clash)

struct CudaDriver {
  // Loads the driver once per process; nullptr with *error set when it cannot.
  static CudaDriver* get(std::string* error);
  std::string path;
#define TORCHPOOL_DECLARE_FN(name, symbol, params) CUresult(*name) params = nullptr;
  TORCHPOOL_CUDA_DRIVER_FUNCTIONS(TORCHPOOL_DECLARE_FN)
#undef TORCHPOOL_DECLARE_FN

  std::string error_string(CUresult r) const;
  // Makes the primary context of `device` current on this thread when none is; false on failure.
  bool ensure_context(int device);
};

// Plain device memory: one cuMemAlloc per segment.
class CudaDeviceUpstream final : public Upstream {
 public:
  CudaDeviceUpstream(CudaDriver& driver, int device) : drv_(driver), device_(device) {}
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return 2u << 20; }
  const char* name() const override { return "cuda"; }

 private:
  CudaDriver& drv_;
  int device_;
};

// Note [CUDA expandable segments]
// -------------------------------
// The VMM calls behind Note [Expandable segments] (core/upstream.h): reserve = cuMemAddressReserve;
// map_chunk = per granularity-sized chunk cuMemCreate + cuMemMap + cuMemSetAccess (read-write for
// this device); unmap_chunk = cuMemUnmap + cuMemRelease per chunk; unreserve = cuMemAddressFree.
// One handle per chunk because cuMemUnmap must cover whole mappings: the pool may return any
// chunk-aligned tail.  Small segments still use cuMemAlloc.  The granularity is the driver's
// recommended one, at least 2 MiB; the reservation defaults to the device's total memory plus an
// eighth (PyTorch reserves about the same), so one segment can hold everything the device has.
class CudaVmmUpstream final : public Upstream {
 public:
  CudaVmmUpstream(CudaDriver& driver, int device, size_t reservation_bytes = 0);
  ~CudaVmmUpstream() override;
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return granularity_; }
  const char* name() const override { return "cuda_vmm"; }
  bool can_expand() const override { return true; }
  size_t reservation_bytes() const override { return reservation_; }
  void* reserve(size_t bytes, uint64_t stream) override;
  void unreserve(void* base, size_t bytes, uint64_t stream) override;
  bool map_chunk(void* addr, size_t bytes, uint64_t stream) override;
  void unmap_chunk(void* addr, size_t bytes, uint64_t stream) override;

 private:
  cu::CUmemAllocationProp prop() const;
  CudaDriver& drv_;
  int device_;
  size_t granularity_ = 2u << 20;
  size_t reservation_ = 0;
  std::mutex mu_;
  std::unordered_map<cu::CUdeviceptr, cu::CUmemGenericAllocationHandle> handles_;  // chunk address -> handle
};

// Note [Stream ordering] (core/upstream.h) with CUDA events: record = cuEventCreate (timing off)
// + cuEventRecord, done = cuEventQuery, wait = cuEventSynchronize, synchronize =
// cuStreamSynchronize.  Events are created and destroyed per deferred free (cheap next to the
// kernels that made the deferral necessary).
class CudaStreamEvents final : public StreamEvents {
 public:
  CudaStreamEvents(CudaDriver& driver, int device) : drv_(driver), device_(device) {}
  Event record(uint64_t stream) override;
  bool done(Event e) override;
  void wait(Event e) override;
  void destroy(Event e) override;
  void synchronize(uint64_t stream) override;

 private:
  CudaDriver& drv_;
  int device_;
};

}  // namespace torchpool
