// The torch glue: torchpool in PyTorch's CPU allocator slot (c10::SetCPUAllocator).
//
// Note [The CPU allocator slot]
// -----------------------------
// Facts (torch 2.13): SetCPUAllocator(a, priority) replaces the allocator only if priority >= the
// recorded one and the recorded priority never goes down; every DataPtr carries its own deleter, so
// tensors are freed by the allocator that made them; but oneDNN frees its buffers with
// GetAllocator(kCPU)->raw_deallocate(p), i.e. through the allocator current at *free* time, which
// calls raw_deleter()(p) (not virtual).
// Approach: the slot holds one immortal CpuAllocatorSlot that routes.  allocate() goes to the
// installed CachingAllocator, or to the previous allocator after uninstall.  raw_deleter() is
// route_free(p): a pointer some torchpool allocator owns goes back to it, any other pointer to the
// previous allocator's raw deleter.  So install -> mkldnn tensor -> uninstall -> free and the reverse
// both free through the right allocator.  uninstall() puts the previous allocator back in the slot
// (at the same fixed priority) when no torchpool block is alive; otherwise the router stays in the
// slot, forwarding every allocation to the previous allocator, until the last block is gone and
// uninstall() is called again or the process ends.
// Which allocator owns a pointer is the Router's business (core/router.h): the installed one and the
// retired ones that still own blocks; a retired allocator is freed once it owns none (Note [Retired
// allocators]), so install/uninstall cycles hold no memory.  The slot's mutex and the router's are
// taken before fork like every allocator lock (Note [Fork]).
// Limitation: the swap is an unsynchronised store in c10: install at startup, before threads allocate.
#pragma once

#include <c10/core/Allocator.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "../core/allocator.h"
#include "../core/router.h"

namespace torchpool::torch_glue {

// Note [Allocation observer]
// --------------------------
// Monitoring (leak sampling, tracemalloc reporting: csrc/bindings/monitor.cc) sees the slot's
// allocations through one optional observer.  Off, it costs one relaxed load and a predictable
// branch per allocation and free.  on_free runs before the block goes back to its allocator, so an
// address is never reused while the observer still thinks it is live.  on_free also sees pointers
// of the previous allocator (route_free); the observer ignores those it never saw allocated.
struct AllocObserver {
  void (*on_alloc)(void* p, size_t bytes);
  void (*on_free)(void* p);
};
void set_alloc_observer(const AllocObserver* observer);  // nullptr: none

class CpuAllocatorSlot final : public c10::Allocator, public ForkParticipant {
 public:
  static constexpr uint8_t kPriority = 0;
  static CpuAllocatorSlot& instance();

  // Throws std::runtime_error if another allocator holds the slot at a higher priority.
  void install(std::shared_ptr<CachingAllocator> allocator);
  // Returns true if the previous allocator is back in the slot, false if the router stays routing.
  bool uninstall();
  std::shared_ptr<CachingAllocator> active() const;
  bool in_slot() const;
  Router& router() { return router_; }

  void fork_prepare() override { mu_.lock(); }
  void fork_parent() override { mu_.unlock(); }
  void fork_child() override { mu_.unlock(); }

  c10::DataPtr allocate(size_t n) override;
  c10::DeleterFnPtr raw_deleter() const override;
  void copy_data(void* dest, const void* src, std::size_t count) const override;

 private:
  CpuAllocatorSlot();
  static void free_ours(void* p);
  static void route_free(void* p);
  bool free_if_ours(void* p);
  static void report_to_profiler(CachingAllocator& a, void* p, int64_t delta);

  mutable std::mutex mu_;  // install / uninstall; before the router's (Note [Fork])
  Router router_;
  c10::Allocator* previous_ = nullptr;
};

}  // namespace torchpool::torch_glue
