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

template <typename T>
T pop(py::dict& d, const char* key, T fallback) {
  if (!d.contains(key)) return fallback;
  T v = d[key].cast<T>();
  d.attr("pop")(key);
  return v;
}

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
  upstream_factories()["host_vmm"] = [](py::dict& o) -> std::shared_ptr<Upstream> {
    HostVmmOptions h;
    h.expandable = pop<bool>(o, "expandable_segments", true);
    h.reservation_bytes = pop<size_t>(o, "reserve_bytes", 0);
    h.populate = pop<bool>(o, "populate", false);
    h.max_mapped_bytes = pop<size_t>(o, "max_mapped_bytes", 0);
    h.huge_pages = pop<bool>(o, "huge_pages", false);
    h.chunk_bytes = pop<size_t>(o, "chunk_bytes", h.chunk_bytes);
    return std::make_shared<HostVmmUpstream>(h);
  };
  upstream_factories()["cuda_pinned"] = [](py::dict& o) -> std::shared_ptr<Upstream> {
    std::string err;
    auto up = CudaPinnedUpstream::create(&err, pop<int>(o, "device_index", 0));
    if (!up) throw std::runtime_error(err + "; use the host_pinned upstream (mlock) where no CUDA driver exists");
    return up;
  };
  upstream_factories()["cuda"] = [](py::dict& o) -> std::shared_ptr<Upstream> {
    const int dev = pop<int>(o, "cuda_device", 0);
    return std::make_shared<CudaDeviceUpstream>(driver(), dev);
  };
  upstream_factories()["cuda_vmm"] = [](py::dict& o) -> std::shared_ptr<Upstream> {
    const int dev = pop<int>(o, "cuda_device", 0);
    const size_t reserve = pop<size_t>(o, "reserve_bytes", 0);
    return std::make_shared<CudaVmmUpstream>(driver(), dev, reserve);
  };
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
