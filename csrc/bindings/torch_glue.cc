// Bindings of the torch glue: the CPU allocator slot.
#include <pybind11/stl.h>

#include "../torch_glue/cpu_allocator.h"
#include "common.h"
#include "registry.h"

namespace py = pybind11;

TORCHPOOL_BINDINGS(10, torch_glue) {
  using torchpool::torch_glue::CpuAllocatorSlot;
  m.def("install_cpu", [](std::shared_ptr<torchpool::CachingAllocator> a) { CpuAllocatorSlot::instance().install(std::move(a)); },
        "Put the allocator in PyTorch's CPU slot (Note [The CPU allocator slot])");
  m.def("uninstall_cpu", [] { return CpuAllocatorSlot::instance().uninstall(); },
        "Stop serving CPU tensors; True if the previous allocator is back in the slot, False if "
        "torchpool still routes because torchpool tensors are alive");
  m.def("cpu_active", [] { return CpuAllocatorSlot::instance().active(); });
  // Statistics over every torchpool CPU allocator (Note [Retired allocators]): readable after uninstall().
  m.def("cpu_allocators", [] { return CpuAllocatorSlot::instance().router().allocators(); },
        "The installed allocator (first) and the retired ones that still own tensors");
  m.def("cpu_stats", [] { return torchpool::bindings::stats_dict(CpuAllocatorSlot::instance().router().stats()); });
  m.def("cpu_reset_peaks", [] { CpuAllocatorSlot::instance().router().reset_peaks(); });
  m.def("cpu_retired_freed", [] { return CpuAllocatorSlot::instance().router().retired_freed(); },
        "How many retired allocators were freed (their memory returned) so far");
}
