// Expandable segments on host memory (Note [Expandable segments], core/upstream.h): the CUDA VMM
// design (reserve address space, map physical chunks into it, unmap them again) built from mmap.
//
// Note [Host VMM]
// ---------------
// Approach: a reservation is an anonymous PROT_NONE, MAP_NORESERVE mapping (address space only, no
// memory, no commit charge).  map_chunk replaces a chunk-aligned part of it with a private anonymous
// read-write mapping (MAP_FIXED); unmap_chunk replaces it with PROT_NONE, MAP_NORESERVE address space
// again, which frees the pages at once.  Any page-aligned part of a mapped range can be unmapped
// (CUDA needs one handle per cuMemCreate; here the kernel does the bookkeeping).  map() (ordinary
// segments) is a plain anonymous mapping.  Why private anonymous memory and not a memfd mapped
// MAP_SHARED (the literal image of cuMemCreate handles, and this upstream's first version): shared
// pages stay shared across fork(), so a DataLoader worker writing a tensor it inherited would change
// the parent's; private pages are copy-on-write like every other malloc'd byte (tested).  The
// commit charge is taken when a chunk is mapped, so under the kernel's overcommit policy a shortage
// can fail map_chunk cleanly; with populate, the pages are faulted in at map time (MAP_POPULATE).
// Chunk size: CUDA's VMM maps 2 MiB at a time; the kernel maps any page.  512 KiB (chunk_bytes) is
// the default: smaller chunks return the free bytes that sat in 2 MiB chunks shared with live blocks,
// at no measured cost in the allocator benches (the measurements: docs/measurements/2026-11-24-allocators.md, "Measurements
// behind the defaults"); adjacent chunks merge into one kernel mapping.
#pragma once

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "../core/limiting_upstream.h"
#include "../core/upstream.h"

namespace torchpool {

struct HostVmmOptions {
  bool expandable = true;         // false: behaves like host_mmap (map() only)
  size_t reservation_bytes = 0;   // per expandable segment; 0: physical memory size
  bool populate = false;          // fault chunks in at map time
  bool huge_pages = false;        // madvise(MADV_HUGEPAGE) on mapped chunks (2 MiB-aligned)
  size_t chunk_bytes = 512u << 10;  // the mapping unit (a power of two, >= the page size): Note [Host VMM]
};

class HostVmmUpstream final : public Upstream {
 public:
  explicit HostVmmUpstream(HostVmmOptions options = {});
  ~HostVmmUpstream() override;
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return options_.chunk_bytes; }
  const char* name() const override { return "host_vmm"; }

  bool can_expand() const override { return options_.expandable; }
  size_t reservation_bytes() const override { return reservation_; }
  void* reserve(size_t bytes, uint64_t stream) override;
  void unreserve(void* base, size_t bytes, uint64_t stream) override;
  bool map_chunk(void* addr, size_t bytes, uint64_t stream) override;
  void unmap_chunk(void* addr, size_t bytes, uint64_t stream) override;

  size_t mapped_bytes() const { return mapped_.taken(); }
  size_t reserved_bytes() const { return reserved_.load(std::memory_order_relaxed); }

 private:
  // true when [addr, addr + bytes) lies inside one reservation
  bool inside_reservation(uintptr_t addr, size_t bytes);

  HostVmmOptions options_;
  size_t reservation_;
  std::mutex mu_;
  std::unordered_map<uintptr_t, size_t> reservations_;  // base -> bytes
  ByteLimit mapped_;  // bytes mapped (no ceiling: a limit is a LimitingUpstream around this one)
  std::atomic<size_t> reserved_{0};
};

}  // namespace torchpool
