// The few CUDA driver API types torchpool uses, declared here so that nothing needs a CUDA toolkit
// to build (the layouts and values are those of cuda.h, CUDA 12/13; they are part of the driver's
// stable ABI).  Functions are not declared: CudaDriver (cuda_driver.h) resolves pointers at run time.
#pragma once

#include <cstddef>
#include <cstdint>

namespace torchpool::cu {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;
using CUmemGenericAllocationHandle = unsigned long long;

constexpr CUresult CUDA_SUCCESS = 0;
constexpr CUresult CUDA_ERROR_INVALID_VALUE = 1;
constexpr CUresult CUDA_ERROR_OUT_OF_MEMORY = 2;
constexpr CUresult CUDA_ERROR_NOT_INITIALIZED = 3;
constexpr CUresult CUDA_ERROR_NO_DEVICE = 100;
constexpr CUresult CUDA_ERROR_INVALID_CONTEXT = 201;
constexpr CUresult CUDA_ERROR_NOT_READY = 600;

// CUstreamCaptureStatus, CUstreamCaptureMode
constexpr int CU_STREAM_CAPTURE_STATUS_NONE = 0;
constexpr int CU_STREAM_CAPTURE_MODE_RELAXED = 2;

constexpr unsigned CU_EVENT_DISABLE_TIMING = 0x2;
constexpr unsigned CU_MEMHOSTALLOC_PORTABLE = 0x1;

constexpr int CU_MEM_ALLOCATION_TYPE_PINNED = 0x1;
constexpr int CU_MEM_HANDLE_TYPE_NONE = 0x0;
constexpr int CU_MEM_LOCATION_TYPE_DEVICE = 0x1;
constexpr int CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 0x3;
constexpr int CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 0x1;

struct CUmemLocation {
  int type;  // CUmemLocationType
  int id;
};

struct CUmemAllocationProp {
  int type;                  // CUmemAllocationType
  int requestedHandleTypes;  // CUmemAllocationHandleType
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType;
    unsigned char gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};

struct CUmemAccessDesc {
  CUmemLocation location;
  int flags;  // CUmemAccess_flags
};

static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp layout differs from cuda.h");
static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc layout differs from cuda.h");

// X(name, exported symbol, (parameter types))
#define TORCHPOOL_CUDA_DRIVER_FUNCTIONS(X)                                                               \
  X(cuInit, "cuInit", (unsigned))                                                                        \
  X(cuDeviceGet, "cuDeviceGet", (CUdevice*, int))                                                        \
  X(cuDeviceGetCount, "cuDeviceGetCount", (int*))                                                        \
  X(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain", (CUcontext*, CUdevice))                        \
  X(cuCtxGetCurrent, "cuCtxGetCurrent", (CUcontext*))                                                    \
  X(cuCtxSetCurrent, "cuCtxSetCurrent", (CUcontext))                                                     \
  X(cuGetErrorString, "cuGetErrorString", (CUresult, const char**))                                      \
  X(cuGetErrorName, "cuGetErrorName", (CUresult, const char**))                                          \
  X(cuDeviceCanAccessPeer, "cuDeviceCanAccessPeer", (int*, CUdevice, CUdevice))                          \
  X(cuStreamIsCapturing, "cuStreamIsCapturing", (CUstream, int*))                                        \
  X(cuThreadExchangeStreamCaptureMode, "cuThreadExchangeStreamCaptureMode", (int*))                      \
  X(cuMemAlloc, "cuMemAlloc_v2", (CUdeviceptr*, size_t))                                                 \
  X(cuMemFree, "cuMemFree_v2", (CUdeviceptr))                                                            \
  X(cuMemGetInfo, "cuMemGetInfo_v2", (size_t*, size_t*))                                                 \
  X(cuMemHostAlloc, "cuMemHostAlloc", (void**, size_t, unsigned))                                        \
  X(cuMemFreeHost, "cuMemFreeHost", (void*))                                                             \
  X(cuEventCreate, "cuEventCreate", (CUevent*, unsigned))                                                \
  X(cuEventRecord, "cuEventRecord", (CUevent, CUstream))                                                 \
  X(cuEventQuery, "cuEventQuery", (CUevent))                                                             \
  X(cuEventSynchronize, "cuEventSynchronize", (CUevent))                                                 \
  X(cuEventDestroy, "cuEventDestroy_v2", (CUevent))                                                      \
  X(cuStreamSynchronize, "cuStreamSynchronize", (CUstream))                                              \
  X(cuMemAddressReserve, "cuMemAddressReserve", (CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long)) \
  X(cuMemAddressFree, "cuMemAddressFree", (CUdeviceptr, size_t))                                         \
  X(cuMemCreate, "cuMemCreate", (CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long)) \
  X(cuMemRelease, "cuMemRelease", (CUmemGenericAllocationHandle))                                        \
  X(cuMemMap, "cuMemMap", (CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long)) \
  X(cuMemUnmap, "cuMemUnmap", (CUdeviceptr, size_t))                                                     \
  X(cuMemSetAccess, "cuMemSetAccess", (CUdeviceptr, size_t, const CUmemAccessDesc*, size_t))             \
  X(cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity", (size_t*, const CUmemAllocationProp*, int))

}  // namespace torchpool::cu
