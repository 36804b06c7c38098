// Bindings of the torch glue: the CPU allocator slot.
#include "../torch_glue/cpu_allocator.h"
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
  m.def("cpu_in_slot", [] { return CpuAllocatorSlot::instance().in_slot(); });
}
