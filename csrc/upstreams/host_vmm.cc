#include "host_vmm.h"

#include <sys/mman.h>
#include <unistd.h>

#include <stdexcept>
#include <string>

namespace torchpool {
namespace {
size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }
}  // namespace

HostVmmUpstream::HostVmmUpstream(HostVmmOptions options) : options_(options) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t c = options_.chunk_bytes;
  if (c < page || (c & (c - 1)) != 0)
    throw std::invalid_argument("torchpool: host_vmm chunk_bytes must be a power of two of at least the page size (" +
                                std::to_string(page) + ")");
  size_t r = options_.reservation_bytes;
  if (r == 0) r = static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (r > (size_t{1} << 62))  // Note [Impossible sizes]: no address space is that large
    throw std::invalid_argument("torchpool: reserve_bytes=" + std::to_string(r) + " is out of range; valid: 0 to 2^62");
  reservation_ = round_up(r, options_.chunk_bytes);
}

HostVmmUpstream::~HostVmmUpstream() {
  for (auto& [base, bytes] : reservations_) ::munmap(reinterpret_cast<void*>(base), bytes);
}

void* HostVmmUpstream::map(size_t bytes, uint64_t /*stream*/) {
  if (!mapped_.try_take(bytes)) return nullptr;
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (options_.populate ? MAP_POPULATE : 0);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) {
    mapped_.give_back(bytes);
    return nullptr;
  }
  return p;
}

void HostVmmUpstream::unmap(void* ptr, size_t bytes, uint64_t /*stream*/) {
  ::munmap(ptr, bytes);
  mapped_.give_back(bytes);
}

void* HostVmmUpstream::reserve(size_t bytes, uint64_t /*stream*/) {
  // Aligned to the granularity: over-reserve by one chunk and trim the ends.
  size_t span;
  if (__builtin_add_overflow(bytes, options_.chunk_bytes, &span)) return nullptr;
  void* raw = ::mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t base = round_up(start, options_.chunk_bytes);
  if (base > start) ::munmap(raw, base - start);
  if (start + span > base + bytes) ::munmap(reinterpret_cast<void*>(base + bytes), start + span - (base + bytes));
  std::lock_guard<std::mutex> g(mu_);
  reservations_[base] = bytes;
  reserved_.fetch_add(bytes, std::memory_order_relaxed);
  return reinterpret_cast<void*>(base);
}

void HostVmmUpstream::unreserve(void* base, size_t bytes, uint64_t /*stream*/) {
  std::lock_guard<std::mutex> g(mu_);
  auto it = reservations_.find(reinterpret_cast<uintptr_t>(base));
  if (it == reservations_.end() || it->second != bytes)
    throw std::logic_error("host_vmm: unreserve of a range that is not a reservation");
  ::munmap(base, bytes);
  reservations_.erase(it);
  reserved_.fetch_sub(bytes, std::memory_order_relaxed);
}

bool HostVmmUpstream::inside_reservation(uintptr_t addr, size_t bytes) {
  std::lock_guard<std::mutex> g(mu_);
  for (auto& [base, size] : reservations_)
    if (addr >= base && addr + bytes <= base + size) return true;
  return false;
}

bool HostVmmUpstream::map_chunk(void* addr, size_t bytes, uint64_t /*stream*/) {
  if (!inside_reservation(reinterpret_cast<uintptr_t>(addr), bytes))
    throw std::logic_error("host_vmm: map_chunk outside every reservation");
  if (!mapped_.try_take(bytes)) return false;
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | (options_.populate ? MAP_POPULATE : 0);
  void* p = ::mmap(addr, bytes, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (p == MAP_FAILED) {
    mapped_.give_back(bytes);
    return false;
  }
  if (options_.huge_pages) ::madvise(addr, bytes, MADV_HUGEPAGE);  // advisory: failure is harmless
  return true;
}

void HostVmmUpstream::unmap_chunk(void* addr, size_t bytes, uint64_t /*stream*/) {
  if (!inside_reservation(reinterpret_cast<uintptr_t>(addr), bytes))
    throw std::logic_error("host_vmm: unmap_chunk outside every reservation");
  // Address space back to PROT_NONE; replacing the mapping frees its pages (Note [Host VMM]).
  ::mmap(addr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  mapped_.give_back(bytes);
}

}  // namespace torchpool
