#include "host_pinned.h"

#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

namespace torchpool {

size_t HostPinnedUpstream::granularity() const {
  const long page = ::sysconf(_SC_PAGESIZE);
  return page > 0 ? static_cast<size_t>(page) : 4096;
}

void* HostPinnedUpstream::map(size_t bytes, uint64_t /*stream*/) {
  if (bytes == 0) return nullptr;
  // Populated at map time: a staging buffer is written right away, and faulting it here keeps page
  // faults out of the read loop.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  bool locked = false;
  if (options_.lock) {
    if (::mlock(p, bytes) == 0) {
      locked = true;
    } else {
      last_errno_.store(errno, std::memory_order_relaxed);
      lock_failures_.fetch_add(1, std::memory_order_relaxed);
      if (options_.require_lock) {
        ::munmap(p, bytes);
        return nullptr;
      }
    }
  }
  // A fork()ed child (dataloader workers) must not inherit buffers meant for DMA.
  ::madvise(p, bytes, MADV_DONTFORK);
  mapped_.fetch_add(bytes, std::memory_order_relaxed);
  maps_.fetch_add(1, std::memory_order_relaxed);
  if (locked) {
    std::lock_guard<std::mutex> g(mu_);
    locked_segments_.insert(reinterpret_cast<uintptr_t>(p));
    locked_.fetch_add(bytes, std::memory_order_relaxed);
  }
  return p;
}

void HostPinnedUpstream::unmap(void* ptr, size_t bytes, uint64_t /*stream*/) {
  if (ptr == nullptr) return;
  bool was_locked;
  {
    std::lock_guard<std::mutex> g(mu_);
    was_locked = locked_segments_.erase(reinterpret_cast<uintptr_t>(ptr)) > 0;
  }
  if (was_locked) {
    ::munlock(ptr, bytes);
    locked_.fetch_sub(bytes, std::memory_order_relaxed);
  }
  ::munmap(ptr, bytes);
  mapped_.fetch_sub(bytes, std::memory_order_relaxed);
}

bool HostPinnedUpstream::is_locked(const void* ptr) const {
  std::lock_guard<std::mutex> g(mu_);
  return locked_segments_.count(reinterpret_cast<uintptr_t>(ptr)) > 0;
}

HostPinnedStats HostPinnedUpstream::stats() const {
  return {mapped_.load(), locked_.load(), maps_.load(), lock_failures_.load(), last_errno_.load()};
}

}  // namespace torchpool
