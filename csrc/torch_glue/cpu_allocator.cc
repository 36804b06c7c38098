#include "cpu_allocator.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <stdexcept>

namespace torchpool::torch_glue {

namespace {
std::atomic<const AllocObserver*> g_observer{nullptr};  // Note [Allocation observer]
}  // namespace

void set_alloc_observer(const AllocObserver* observer) { g_observer.store(observer, std::memory_order_release); }

CpuAllocatorSlot& CpuAllocatorSlot::instance() {
  static auto* slot = new CpuAllocatorSlot();  // immortal: tensors may be freed during exit
  return *slot;
}

CpuAllocatorSlot::CpuAllocatorSlot() { fork_safety::add_outer(this, 0); }

void CpuAllocatorSlot::install(std::shared_ptr<CachingAllocator> allocator) {
  std::lock_guard<std::mutex> g(mu_);
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != this) previous_ = current;
  router_.install(allocator);
  if (current != this) {
    c10::SetCPUAllocator(this, kPriority);
    if (c10::GetCPUAllocator() != this) {
      router_.uninstall();
      throw std::runtime_error(
          "torchpool: another allocator holds PyTorch's CPU allocator slot at a higher priority; "
          "torchpool could not install itself");
    }
  }
}

bool CpuAllocatorSlot::uninstall() {
  std::lock_guard<std::mutex> g(mu_);
  router_.uninstall();
  if (c10::GetCPUAllocator() != this || previous_ == nullptr) return true;
  if (router_.live_blocks() != 0) return false;  // Note [The CPU allocator slot]: keep routing
  c10::SetCPUAllocator(previous_, kPriority);
  return true;
}

std::shared_ptr<CachingAllocator> CpuAllocatorSlot::active() const { return router_.active(); }

bool CpuAllocatorSlot::in_slot() const { return c10::GetCPUAllocator() == this; }

c10::DataPtr CpuAllocatorSlot::allocate(size_t n) {
  Router::Section section(router_);  // Note [Router grace periods]: `a` lives until it ends
  CachingAllocator* a = router_.current();
  if (a == nullptr) return previous_->allocate(n);
  void* p = nullptr;
  try {
    p = a->allocate(n);
  } catch (const OutOfMemory& e) {
    if (c10::memoryProfilingEnabled()) {
      const Stats s = a->stats();
      c10::reportOutOfMemoryToProfiler(static_cast<int64_t>(n), s.allocated_bytes.current, s.reserved_bytes.current,
                                       c10::Device(c10::DeviceType::CPU));
    }
    TORCH_CHECK_WITH(OutOfMemoryError, false, e.what());
  }
  if (p != nullptr && c10::memoryProfilingEnabled()) report_to_profiler(*a, p, static_cast<int64_t>(n));
  if (const AllocObserver* o = g_observer.load(std::memory_order_acquire); o != nullptr && p != nullptr) [[unlikely]]
    o->on_alloc(p, n);
  return {p, p, &free_ours, c10::Device(c10::DeviceType::CPU)};
}

// The profiler sees an allocator's memory only if it is told (torch.profiler(profile_memory=True)).
// Reported only while profiling is on, so the stats walk costs nothing otherwise.
void CpuAllocatorSlot::report_to_profiler(CachingAllocator& a, void* p, int64_t delta) {
  const Stats s = a.stats();
  c10::reportMemoryUsageToProfiler(p, delta, s.allocated_bytes.current, s.reserved_bytes.current,
                                   c10::Device(c10::DeviceType::CPU));
}

bool CpuAllocatorSlot::free_if_ours(void* p) {
  if (const AllocObserver* o = g_observer.load(std::memory_order_acquire); o != nullptr) [[unlikely]]
    o->on_free(p);
  Router::Section section(router_);
  const bool profiling = c10::memoryProfilingEnabled();
  size_t size = 0;
  CachingAllocator* a = router_.free(p, profiling ? &size : nullptr);
  if (a == nullptr) return false;
  if (profiling) report_to_profiler(*a, p, -static_cast<int64_t>(size));
  return true;
}

void CpuAllocatorSlot::free_ours(void* p) {
  if (p == nullptr) return;
  if (!instance().free_if_ours(p)) {
    // A DataPtr with our deleter always holds one of our pointers; anything else is a bug upstream.
    TORCH_WARN("torchpool: free of a pointer no torchpool allocator owns: ", p);
  }
}

void CpuAllocatorSlot::route_free(void* p) {
  if (p == nullptr) return;
  CpuAllocatorSlot& self = instance();
  if (self.free_if_ours(p)) return;
  self.previous_->raw_deallocate(p);
}

c10::DeleterFnPtr CpuAllocatorSlot::raw_deleter() const { return &route_free; }

void CpuAllocatorSlot::copy_data(void* dest, const void* src, std::size_t count) const {
  default_copy_data(dest, src, count);
}

}  // namespace torchpool::torch_glue
