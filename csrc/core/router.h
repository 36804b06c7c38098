// Router: the installed allocator and the retired ones that still own blocks, behind one free path.
//
// Used by the torch glue's CPU slot (Note [The CPU allocator slot]); it knows no torch, so the C++
// stress tests drive install / uninstall / free through it directly.
//
// Note [Retired allocators]
// -------------------------
// Problem: a tensor outlives the install() that made it, and its DataPtr deleter has only the
// address; so every allocator that was ever installed used to stay alive and cached for good (30
// install/uninstall cycles with a 64 MiB tensor: RSS 219 MiB -> 2.1 GiB; the 33rd install failed on a
// fixed table).  Approach: the router holds the active allocator and the retired ones still owning
// blocks, in a fixed table of slots that the free path scans without a lock.  install() and
// uninstall() retire the active allocator; a sweep (run by both) frees every retired allocator that
// owns no block: its slot is cleared, a grace period passes (Note [Router grace periods]), its final
// statistics join departed_ (so cumulative counters never go back), and the reference is dropped,
// which returns its memory.  A free that leaves a retired allocator with no block empties its cache
// at once, so the memory goes back without waiting for the next install.  At most kSlots allocators
// can own blocks at once; install() beyond that raises (tensors of 63 earlier installs alive).
//
// Note [Router grace periods]
// ---------------------------
// The free and allocate paths are read sections: each bumps one of kReaderSlots padded counters
// (chosen by thread) of the current epoch parity before it loads an allocator pointer, and drops it
// after its last use of that allocator.  synchronize() (writers only, under mu_) flips the epoch and
// waits until the old parity's counters drain, twice, so both parities are drained once: a reader
// that read the epoch long before counts itself in either (found by the TSan stress: with one flip,
// such a reader allocated from an allocator already freed).  A writer clears a slot before it
// synchronizes, all of these are sequentially consistent atomics, so a reader that did not show up
// in a drained counter loads the slot after it was cleared.  Each flip sends new readers to the other
// parity, so a steady stream of frees cannot starve the writer.  Cost on the hot path: two uncontended atomic operations.  After fork,
// the child zeroes the counters (the threads that held them do not exist there: Note [Fork]).
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <vector>

#include "allocator.h"
#include "fork.h"

namespace torchpool {

class Router final : public ForkParticipant {
 public:
  static constexpr size_t kSlots = 64;
  static constexpr size_t kReaderSlots = 32;

  Router();
  ~Router() override;
  Router(const Router&) = delete;
  Router& operator=(const Router&) = delete;

  // A read section (Note [Router grace periods]): pointers from current() / free() stay valid in it.
  class Section {
   public:
    explicit Section(const Router& r);
    ~Section();
    Section(const Section&) = delete;
    Section& operator=(const Section&) = delete;

   private:
    const Router& r_;
    uint32_t parity_;
    uint32_t slot_;
  };

  // `a` serves new requests; the previous active allocator is retired.  Throws std::runtime_error
  // when kSlots allocators already own blocks.
  void install(std::shared_ptr<CachingAllocator> a);
  // No allocator serves new requests; the active one is retired.
  void uninstall();
  std::shared_ptr<CachingAllocator> active() const;

  // Inside a Section: the active allocator or null.
  CachingAllocator* current() const { return active_.load(std::memory_order_seq_cst); }
  // Inside a Section: frees p in the allocator that owns it and returns that allocator, or null if
  // none does.  requested (optional) receives the block's requested size before it is freed.
  CachingAllocator* free(void* p, size_t* requested = nullptr);

  // Every allocator the router holds (active first), and the blocks they own.
  std::vector<std::shared_ptr<CachingAllocator>> allocators() const;
  size_t live_blocks() const;
  // The statistics of every held allocator summed, plus departed_ (Note [Retired allocators]):
  // current gauges are exact sums; a peak is max(departed peak, sum of the held peaks).
  Stats stats() const;
  void reset_peaks();
  // Frees retired allocators that own no block; returns how many were freed.
  size_t sweep();
  size_t retired_freed() const;

  void fork_prepare() override;
  void fork_parent() override;
  void fork_child() override;

 private:
  struct alignas(64) Counter {
    std::atomic<int64_t> n{0};
  };
  void synchronize() const;  // mu_ held
  size_t sweep_locked(std::vector<std::shared_ptr<CachingAllocator>>& dead);
  void retire_active_locked();

  mutable std::mutex mu_;
  std::atomic<CachingAllocator*> active_{nullptr};
  std::atomic<CachingAllocator*> slots_[kSlots] = {};
  std::atomic<bool> retired_[kSlots] = {};
  std::atomic<size_t> used_{0};  // slots [0, used_) may be set
  std::shared_ptr<CachingAllocator> owners_[kSlots];  // mu_
  mutable Counter readers_[2][kReaderSlots];
  mutable std::atomic<uint32_t> epoch_{0};
  Stats departed_;  // mu_
  // What each freed allocator added to departed_, while someone else still holds it: installed
  // again, it leaves departed_ (its counters are counted once).  Expired entries are pruned.
  std::vector<std::pair<std::weak_ptr<CachingAllocator>, Stats>> departed_parts_;  // mu_
  size_t freed_ = 0;  // mu_
};

}  // namespace torchpool
