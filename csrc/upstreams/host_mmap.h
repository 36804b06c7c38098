// Host memory from anonymous mmap, with transparent huge pages for large segments.
//
// Note [Huge pages]
// -----------------
// The machine runs THP in "madvise" mode: a region gets huge pages only if it is 2 MiB aligned and
// marked MADV_HUGEPAGE.  Segments of at least huge_page_bytes are mapped 2 MiB aligned (map a little
// more, trim the ends) and marked.  A huge page is faulted and zeroed once per 2 MiB instead of 512
// times, and the TLB covers 512x more memory; the price is that a partly used 2 MiB page is all
// resident, so small segments (the size-class ones) are marked too only when they are 2 MiB long.
#pragma once

#include <atomic>

#include "../core/upstream.h"

namespace torchpool {

struct HostMmapOptions {
  bool huge_pages = true;
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
