#include "host_mmap.h"

#include <sys/mman.h>

#include <cstdint>

namespace torchpool {

void* HostMmapUpstream::map(size_t bytes, uint64_t /*stream*/) {
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (options_.populate ? MAP_POPULATE : 0);
  const bool huge = options_.huge_pages && bytes >= options_.huge_page_bytes;
  if (!huge) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mapped_.fetch_add(bytes, std::memory_order_relaxed);
    return p;
  }
  // Note [Huge pages]: over-map by one huge page and trim to an aligned range.
  const size_t align = options_.huge_page_bytes;
  size_t span;
  if (__builtin_add_overflow(bytes, align, &span)) return nullptr;
  void* raw = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, (flags & ~MAP_POPULATE), -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + align - 1) & ~(static_cast<uintptr_t>(align) - 1);
  if (aligned > start) ::munmap(raw, aligned - start);
  const uintptr_t end = start + span;
  if (end > aligned + bytes) ::munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
  void* p = reinterpret_cast<void*>(aligned);
  ::madvise(p, bytes, MADV_HUGEPAGE);
  if (options_.populate) ::madvise(p, bytes, MADV_WILLNEED);
  mapped_.fetch_add(bytes, std::memory_order_relaxed);
  return p;
}

void HostMmapUpstream::unmap(void* ptr, size_t bytes, uint64_t /*stream*/) {
  ::munmap(ptr, bytes);
  mapped_.fetch_sub(bytes, std::memory_order_relaxed);
}

}  // namespace torchpool
