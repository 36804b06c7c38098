// The CUDA driver, reached at run time, and the upstreams and stream events built on it.
//
// Note [Reaching the driver]
// --------------------------
// Rationale: one build must work with any CUDA build of torch and build where no CUDA toolkit is
// installed, so nothing links libcudart or libcuda.  Approach: CudaDriver::get() dlopen()s
// $TORCHPOOL_CUDA_DRIVER if set (the fake driver of the tests, tests/fake_driver), else
// "libcuda.so.1", and resolves each function with dlsym by its exported versioned name
// (cuMemAlloc_v2, ...: the names cuda.h's macros select; PyTorch resolves the same functions at run
// time too, through cudaGetDriverEntryPointByVersion in c10/cuda/driver_api.h).  The types are
// declared in cuda_driver_api.h.  A missing library or function is an error message, not a crash.
// cuInit is NOT called when the library is loaded (loading happens at `import torchpool` with
// TORCHPOOL_CONF=cuda=1): it runs at the first DriverScope, i.e. the first allocation, so a process
// that imports torchpool and then forks leaves its children a usable driver.
//
// Note [Driver calls]
// -------------------
// Every sequence of driver calls runs inside a DriverScope(device), which (1) makes the device's
// primary context (the one the CUDA runtime, hence torch, uses) current and restores the caller's
// context afterwards (the thread may be working on another device, or in a context of its own);
// (2) switches the thread to relaxed stream-capture mode and back, as PyTorch's allocator does
// around cudaMalloc (CUDAStreamCaptureModeGuard): a global-mode capture on another thread must not
// be invalidated by our allocation or event queries.  Failed calls go through CudaDriver::check(),
// which keeps the first error other than out-of-memory / not-ready of the thread with its call and
// name ("cuMemCreate: CUDA_ERROR_ILLEGAL_ADDRESS (700): ..."): the upstream interface can only say
// "no memory", so libtorchpool_cuda.so reads the error back after a failed allocation and reports
// it as what it is (Note [Driver errors], csrc/cuda/torchpool_cuda.cc).
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
  // Loads the driver once per process (no cuInit: Note [Reaching the driver]); nullptr with
  // *error set when it cannot.
  static CudaDriver* get(std::string* error);
  std::string path;
#define TORCHPOOL_DECLARE_FN(name, symbol, params) CUresult(*name) params = nullptr;
  TORCHPOOL_CUDA_DRIVER_FUNCTIONS(TORCHPOOL_DECLARE_FN)
#undef TORCHPOOL_DECLARE_FN

  // "CUDA_ERROR_ILLEGAL_ADDRESS (700): an illegal memory access was encountered"
  std::string error_string(CUresult r) const;
  // cuInit(0) once per process; false (error recorded) when it fails.
  bool init();
  // The primary context of `device`, retained once; nullptr (error recorded) on failure.
  CUcontext primary_context(int device);
  // Returns r; a failure other than out-of-memory / not-ready is kept as this thread's driver error
  // (the first one since clear_error()).  Note [Driver calls].
  CUresult check(const char* call, CUresult r);
  static void clear_error();
  // The thread's driver error ("cuMemCreate: CUDA_ERROR_..."), "" when none.
  static std::string last_error();
  // Whether `stream` is being captured into a CUDA graph (active or invalidated capture).  Sets
  // *failed (and records the error) when the driver cannot say.
  bool capturing(uint64_t stream, bool* failed = nullptr);

 private:
  std::mutex mu_;
  bool initialised_ = false;
  CUresult init_result_ = CUDA_SUCCESS;
  std::unordered_map<int, CUcontext> primary_;
};

// Note [Driver calls]: the device's primary context and relaxed capture mode for the scope's
// lifetime; the caller's context and mode are restored on exit.
class DriverScope {
 public:
  DriverScope(CudaDriver& driver, int device);
  ~DriverScope();
  DriverScope(const DriverScope&) = delete;
  DriverScope& operator=(const DriverScope&) = delete;
  bool ok() const { return ok_; }

 private:
  CudaDriver& drv_;
  CUcontext prev_ = nullptr;
  bool switched_ = false;
  bool mode_set_ = false;
  int prev_mode_ = 0;
  bool ok_ = false;
};

// Memory the pool gave back while its stream was being captured: synchronizing that stream is
// illegal during capture, so the memory is only released once the capture is over (Note [Unmap
// after the stream], below).
struct ParkedRelease {
  cu::CUdeviceptr addr;
  size_t bytes;
  uint64_t stream;
  cu::CUmemGenericAllocationHandle handle;  // 0: a cuMemAlloc segment
};

// Note [Unmap after the stream]
// -----------------------------
// Rationale: the pool gives memory back (empty_cache, max_cached_bytes, the out-of-memory retry, and
// the reserve target in the middle of an allocation) as soon as its blocks are free for the caller,
// but kernels queued on the segment's stream may still read or write them.  cuMemFree synchronizes
// the device by itself (as cudaFree does); cuMemUnmap and cuMemRelease do not ("unlike cudaFree,
// MemUnmap and MemRelease do not appear to synchronize in all cases", CUDACachingAllocator.cpp).
// Approach: blocks are only ever used on the stream of their segment, and use on other streams is
// ordered by events before a block becomes free (Note [Stream ordering]), so the segment's stream
// is the one that last used the memory: unmap_chunk() synchronizes that stream once per call (one
// call covers a run of chunks), then unmaps and releases.  Cost: one cuStreamSynchronize per run of
// chunks given back; it blocks the CPU only when the stream still has work queued (measured on the
// fake driver's timeline: docs/reference/cuda.md).  During a capture of that stream synchronizing is illegal,
// so the chunks are parked (still mapped, still counted by the driver) and released at the first
// upstream call after the capture ends; a parked chunk the pool maps again is taken back as it is.
// Limitation: memory used on a stream the allocator was not told about (Tensor.record_stream does
// nothing under a pluggable allocator: docs/reference/cuda.md) is not waited for, as with reuse.

// Plain device memory: one cuMemAlloc per segment.
class CudaDeviceUpstream final : public Upstream {
 public:
  CudaDeviceUpstream(CudaDriver& driver, int device) : drv_(driver), device_(device) {}
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return 2u << 20; }
  const char* name() const override { return "cuda"; }

 private:
  void release_parked();  // DriverScope held
  CudaDriver& drv_;
  int device_;
  std::mutex mu_;
  std::vector<ParkedRelease> parked_;
};

// Note [CUDA expandable segments]
// -------------------------------
// The VMM calls behind Note [Expandable segments] (core/upstream.h): reserve = cuMemAddressReserve;
// map_chunk = per granularity-sized chunk cuMemCreate + cuMemMap + cuMemSetAccess (read-write for
// this device and every device that cuDeviceCanAccessPeer says can reach it, so a peer kernel may
// read a tensor of an expandable segment as it can a cudaMalloc one with peer access enabled);
// unmap_chunk = cuStreamSynchronize of the segment's stream (Note [Unmap after the stream]) then
// cuMemUnmap + cuMemRelease per chunk; unreserve = cuMemAddressFree.
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
  void release_parked();  // DriverScope held
  CudaDriver& drv_;
  int device_;
  size_t granularity_ = 2u << 20;
  size_t reservation_ = 0;
  std::vector<cu::CUmemAccessDesc> access_;  // this device and its peers
  std::mutex mu_;
  std::unordered_map<cu::CUdeviceptr, cu::CUmemGenericAllocationHandle> handles_;  // chunk address -> handle
  std::vector<ParkedRelease> parked_;
  std::vector<std::pair<cu::CUdeviceptr, size_t>> unreserve_later_;  // reservations holding parked chunks
};

// Note [Stream ordering] (core/upstream.h) with CUDA events: record = cuEventCreate (timing off)
// + cuEventRecord, done = cuEventQuery, wait = cuEventSynchronize, synchronize =
// cuStreamSynchronize.  Events are created and destroyed per deferred free (cheap next to the
// kernels that made the deferral necessary).  Graph capture: an event recorded on a capturing
// stream would become a node of the graph, and querying it is illegal, so record() on a capturing
// stream returns an event that is recorded for real only once the capture is over (done() is false
// until then).  done() is true only for CUDA_SUCCESS: an error (a sticky fault, an invalid handle)
// keeps the block deferred (leaked rather than reused while a kernel may still touch it) and is
// kept as the thread's driver error.
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
