// Expandable segments on host memory (Note [Expandable segments], core/upstream.h): the CUDA VMM
// design (reserve address space, map physical chunks into it, unmap them again) built from mmap.
//
// Note [Host VMM]
// ---------------
// Approach: a reservation is an anonymous PROT_NONE, MAP_NORESERVE mapping (address space only,
// no memory, no commit charge).  Its physical memory is one memfd per reservation, sized to the
// reservation (a sparse tmpfs file: pages exist only where written).  map_chunk maps the file range
// at the same offset over the reservation with MAP_FIXED | MAP_SHARED; unmap_chunk punches a hole in
// the file (fallocate PUNCH_HOLE, which frees the pages at once) and puts PROT_NONE address space
// back with MAP_FIXED.  The file plays the role of cuMemCreate's handles; unlike CUDA, any
// page-aligned part of a mapped range can be unmapped.  map() (the pool's small segments) is a plain
// anonymous mapping.  Limitations: memfd memory is shmem: it shows as "Shmem" in /proc/meminfo and is
// bounded by RAM + swap, not by the overcommit policy, and transparent huge pages follow the
// shmem_enabled setting rather than MADV_HUGEPAGE.  A map_chunk that the kernel cannot back fails
// only when the pages are touched (SIGBUS), unless populate is set, which faults them in at map time
// (MAP_POPULATE) and turns a shortage into a clean nullptr / out-of-memory.
#pragma once

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "../core/upstream.h"

namespace torchpool {

struct HostVmmOptions {
  bool expandable = true;         // false: behaves like host_mmap (map() only)
  size_t reservation_bytes = 0;   // per expandable segment; 0: physical memory size
  bool populate = false;          // fault chunks in at map time
  size_t max_mapped_bytes = 0;    // 0: no limit; else map/map_chunk fail beyond it (tests, quotas)
};

class HostVmmUpstream final : public Upstream {
 public:
  explicit HostVmmUpstream(HostVmmOptions options = {});
  ~HostVmmUpstream() override;
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return 2u << 20; }
  const char* name() const override { return "host_vmm"; }

  bool can_expand() const override { return options_.expandable; }
  size_t reservation_bytes() const override { return reservation_; }
  void* reserve(size_t bytes, uint64_t stream) override;
  void unreserve(void* base, size_t bytes, uint64_t stream) override;
  bool map_chunk(void* addr, size_t bytes, uint64_t stream) override;
  void unmap_chunk(void* addr, size_t bytes, uint64_t stream) override;

  size_t mapped_bytes() const { return mapped_.load(std::memory_order_relaxed); }
  size_t reserved_bytes() const { return reserved_.load(std::memory_order_relaxed); }

 private:
  struct Reservation {
    size_t bytes;
    int fd;
  };
  bool take(size_t bytes);
  // the reservation holding [addr, addr + bytes), with its base; fd -1 if none
  std::pair<uintptr_t, Reservation> find(uintptr_t addr, size_t bytes);

  HostVmmOptions options_;
  size_t reservation_;
  std::mutex mu_;
  std::unordered_map<uintptr_t, Reservation> reservations_;  // by base
  std::atomic<size_t> mapped_{0};
  std::atomic<size_t> reserved_{0};
};

}  // namespace torchpool
