// Bindings of the CUDA path and the host VMM: upstream factories ("host_vmm", "cuda_pinned", "cuda",
// "cuda_vmm"), and the out-of-memory handler that torchpool.cuda hands to libtorchpool_cuda.so
// (Note [The pluggable allocator library]).
#include <c10/util/Exception.h>

#include <memory>
#include <string>

#include "../upstreams/cuda_driver.h"
#include "../upstreams/cuda_pinned.h"
#include "../upstreams/host_vmm.h"
#include "common.h"
#include "registry.h"

namespace py = pybind11;
using namespace torchpool;

namespace {

CudaDriver& driver() {
  std::string err;
  CudaDriver* d = CudaDriver::get(&err);
  if (!d) throw std::runtime_error(err);
  return *d;
}

// Called by libtorchpool_cuda.so from inside torch's allocation call: throwing c10::OutOfMemoryError
// here makes torch raise torch.OutOfMemoryError in Python.
extern "C" void torchpool_cuda_throw_oom(const char* message) {
  TORCH_CHECK_WITH(OutOfMemoryError, false, message);
}

// Note [Driver errors] (csrc/cuda/torchpool_cuda.cc): kind 1 is an out-of-memory
// (torch.OutOfMemoryError), anything else a RuntimeError with the driver call and error name.
extern "C" void torchpool_cuda_throw_error(int kind, const char* message) {
  if (kind == 1) TORCH_CHECK_WITH(OutOfMemoryError, false, message);
  TORCH_CHECK(false, message);
}

}  // namespace

TORCHPOOL_BINDINGS(20, cuda) {
  using bindings::upstream_factories;
  using bindings::take;
  upstream_factories()["host_vmm"] = {
      {"expandable_segments", "reserve_bytes", "populate", "huge_pages", "chunk_bytes"},
      [](const OptionValues& v, py::dict&, int) -> std::shared_ptr<Upstream> {
        HostVmmOptions h;
        h.expandable = v.expandable_segments;
        h.reservation_bytes = v.reserve_bytes;
        h.populate = v.populate;
        h.huge_pages = v.huge_pages;
        h.chunk_bytes = v.chunk_bytes;
        return std::make_shared<HostVmmUpstream>(h);
      }};
  upstream_factories()["cuda_pinned"] = {{}, [](const OptionValues&, py::dict&, int device) -> std::shared_ptr<Upstream> {
    std::string err;
    auto up = CudaPinnedUpstream::create(&err, device < 0 ? 0 : device);
    if (!up) throw std::runtime_error(err + "; use the host_pinned upstream (mlock) where no CUDA driver exists");
    return up;
  }};
  upstream_factories()["cuda"] = {{}, [](const OptionValues&, py::dict& o, int) -> std::shared_ptr<Upstream> {
    const int dev = take<int>(o, "cuda_device", 0);
    return std::make_shared<CudaDeviceUpstream>(driver(), dev);
  }};
  upstream_factories()["cuda_vmm"] = {{"reserve_bytes"}, [](const OptionValues& v, py::dict& o, int) -> std::shared_ptr<Upstream> {
    const int dev = take<int>(o, "cuda_device", 0);
    return std::make_shared<CudaVmmUpstream>(driver(), dev, v.reserve_bytes);
  }};
  m.def("_cuda_oom_handler", [] { return reinterpret_cast<uintptr_t>(&torchpool_cuda_throw_oom); },
        "Address of a void(const char*) that throws c10::OutOfMemoryError (for libtorchpool_cuda.so)");
  m.def("_cuda_error_handler", [] { return reinterpret_cast<uintptr_t>(&torchpool_cuda_throw_error); },
        "Address of a void(int kind, const char*) that throws c10::OutOfMemoryError (kind 1) or c10::Error");
  m.def("_cuda_driver", [] {
    std::string err;
    CudaDriver* d = CudaDriver::get(&err);
    return d ? d->path : "error: " + err;
  }, "Path of the CUDA driver torchpool loaded, or 'error: <why not>'");
}
