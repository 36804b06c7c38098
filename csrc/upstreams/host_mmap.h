// Host memory from anonymous mmap, with transparent huge pages for large segments.
//
// Note [Huge pages]
// -----------------
// The machine runs THP in "madvise" mode: a region gets huge pages only if it is 2 MiB aligned and
// marked MADV_HUGEPAGE.  Segments of at least huge_page_bytes are mapped 2 MiB aligned (map a little
// more, trim the ends) and marked.  A huge page is faulted and zeroed once per 2 MiB instead of 512
// times, and the TLB covers 512x more memory; the price is that a partly used 2 MiB page is all
// resident, so small segments (the size-class ones) are marked too only when they are 2 MiB long.
// Off by default: on the VM this was measured on, faulting huge pages was slower, not faster
// (bench/bench_allocators.py, 2026-11-24, 3 interleaved runs: W1 touched 7.4 GB/s with huge pages
// against 16.9 GB/s without, W2 0.185 against 0.167 s CPU per step, W3 17.4 against 16.0 ms CPU per
// image; the kernel's khugepaged and compaction cost more than the 511 saved faults per 2 MiB).
// Machines with cheap huge-page allocation should try huge_pages=1.
#pragma once

#include <atomic>

#include "../core/upstream.h"

namespace torchpool {

struct HostMmapOptions {
  bool huge_pages = false;  // Note [Huge pages]
  size_t huge_page_bytes = 2u << 20;
  bool populate = false;  // MAP_POPULATE: fault pages in at map time
};

class HostMmapUpstream final : public Upstream {
 public:
  explicit HostMmapUpstream(HostMmapOptions options = {}) : options_(options) {}
  void* map(size_t bytes, uint64_t stream) override;
  void unmap(void* ptr, size_t bytes, uint64_t stream) override;
  size_t granularity() const override { return 2u << 20; }
  const char* name() const override { return "host_mmap"; }

  uint64_t mapped_bytes() const { return mapped_.load(std::memory_order_relaxed); }

 private:
  HostMmapOptions options_;
  std::atomic<uint64_t> mapped_{0};
};

}  // namespace torchpool
