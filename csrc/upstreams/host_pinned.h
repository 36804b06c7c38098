// Page-locked host memory for staging reads on their way to a device: page-aligned anonymous
// memory, locked with mlock(2) where the process may lock it.
//
// Note [mlock fallback]
// ---------------------
// Rationale: staging buffers are worth locking (a DMA engine can read them without the driver
// bouncing them, and they never go to swap), but an unprivileged process may lock only
// RLIMIT_MEMLOCK bytes (8 MiB by default).  Approach: map() always returns populated, page-aligned
// memory; it then tries mlock.  If the kernel refuses (EPERM / ENOMEM / EAGAIN), the segment stays
// unlocked but usable, and the refusal is counted (lock_failures, last_errno, locked_bytes <
// mapped_bytes) so stats say the staging pool is not actually pinned.  With require_lock = true,
// map() instead returns nullptr, as an upstream out of memory would.  On a CUDA machine a
// cuMemHostAlloc upstream takes this one's place behind the same interface.  This upstream never
// touches a file mapping: registering or locking file pages makes the kernel copy them.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <unordered_set>

#include "../core/upstream.h"

namespace torchpool {

struct HostPinnedOptions {
  bool lock = true;          // try mlock at all
  bool require_lock = false; // map() fails when mlock is refused
};

struct HostPinnedStats {
  uint64_t mapped_bytes;
  uint64_t locked_bytes;
  uint64_t maps;
  uint64_t lock_failures;
  int last_errno;  // errno of the last refused mlock, 0 if none
};

class HostPinnedUpstream final : public Upstream {
 public:
  explicit HostPinnedUpstream(HostPinnedOptions options = {}) : options_(options) {}
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override;
  const char* name() const override { return "host_pinned"; }

  HostPinnedStats stats() const;
  bool is_locked(const void* ptr) const;  // whether the segment starting at ptr was locked

 private:
  HostPinnedOptions options_;
  std::atomic<uint64_t> mapped_{0}, locked_{0}, maps_{0}, lock_failures_{0};
  std::atomic<int> last_errno_{0};
  mutable std::mutex mu_;
  std::unordered_set<uintptr_t> locked_segments_;
};

}  // namespace torchpool
