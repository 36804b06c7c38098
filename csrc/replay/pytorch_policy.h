// An emulation of the policy of PyTorch's CUDACachingAllocator (c10/cuda/CUDACachingAllocator.cpp)
// on fake addresses, to compare torchpool with what a CUDA user gets today.
//
// Note [PyTorch policy emulation]
// -------------------------------
// Emulated (PyTorch's published constants, c10 AllocatorConfig.h / CUDACachingAllocator.cpp):
//   * every request is rounded up to a multiple of 512 B (kMinBlockSize);
//   * requests <= 1 MiB (kSmallSize) use the small pool, whose segments are 2 MiB (kSmallBuffer);
//     larger requests use the large pool: 1 MiB < size < 10 MiB (kMinLargeAlloc) get a 20 MiB
//     segment (kLargeBuffer), larger ones a segment rounded up to 2 MiB (kRoundLarge);
//   * best fit: the smallest free block of the same stream and pool with size >= request, ties by
//     address; a found block is split when the rest is >= 512 B (small pool) or > 1 MiB (large
//     pool, and only for requests below max_split_size); freed blocks merge with free neighbours;
//   * max_split_size: a request below it never takes a free block >= it; a request >= it takes a
//     free block only if that block is smaller than request + 20 MiB (max_non_split_rounding_size);
//   * expandable_segments: one segment per stream and pool that grows at its end by pages of 2 MiB
//     (small pool) or 20 MiB (large pool) when no free block fits; split whenever the rest is
//     >= 512 B;
//   * memory is never returned while nothing fails: replay assumes the device is large enough, so
//     reserved memory only grows, as in PyTorch until an OOM retry or empty_cache().
// Left out: stream events and record_stream (a freed block is reusable at once), the OOM path
// (release of one cached block, then of all, then garbage_collection_threshold), CUDA graph
// private pools and MemPools, roundup_power2_divisions, per-process memory fractions, and the
// "expandable size" tie-break by which PyTorch prefers a free block at the end of an expandable
// segment.  Segment placement (addresses) is made up; only sizes and adjacency matter here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <unordered_map>
#include <vector>

#include "../core/pool.h"

namespace torchpool::replay {

struct PytorchPolicyConfig {
  bool expandable_segments = false;
  size_t max_split_size = SIZE_MAX;
  size_t max_non_split_rounding_size = 20u << 20;
};

class PytorchPolicy {
 public:
  static constexpr size_t kMinBlockSize = 512;
  static constexpr size_t kSmallSize = 1u << 20;
  static constexpr size_t kSmallBuffer = 2u << 20;
  static constexpr size_t kLargeBuffer = 20u << 20;
  static constexpr size_t kMinLargeAlloc = 10u << 20;
  static constexpr size_t kRoundLarge = 2u << 20;

  explicit PytorchPolicy(PytorchPolicyConfig config = {});
  ~PytorchPolicy();
  PytorchPolicy(const PytorchPolicy&) = delete;
  PytorchPolicy& operator=(const PytorchPolicy&) = delete;

  void* allocate(size_t bytes, uint64_t stream);
  void free(void* p);
  size_t block_size(void* p) const;  // 0 when p is not live

  size_t reserved_bytes() const { return reserved_; }
  size_t allocated_bytes() const { return allocated_; }
  size_t largest_free_block() const;
  uint64_t upstream_calls() const { return mallocs_ + frees_; }
  std::vector<SegmentView> snapshot() const;
  std::string check() const;  // "" when the block lists and the gauges agree

  static size_t round_size(size_t n) { return n < kMinBlockSize ? kMinBlockSize : (n + kMinBlockSize - 1) / kMinBlockSize * kMinBlockSize; }
  static size_t allocation_size(size_t rounded) {
    if (rounded <= kSmallSize) return kSmallBuffer;
    if (rounded < kMinLargeAlloc) return kLargeBuffer;
    return (rounded + kRoundLarge - 1) / kRoundLarge * kRoundLarge;
  }

 private:
  struct Seg;
  struct Blk {
    uintptr_t addr = 0;
    size_t size = 0;
    size_t requested = 0;
    uint64_t stream = 0;
    bool small = false;
    bool allocated = false;
    Blk* prev = nullptr;
    Blk* next = nullptr;
    Seg* seg = nullptr;
  };
  struct Seg {
    uintptr_t base = 0;
    size_t size = 0;  // mapped bytes
    uint64_t stream = 0;
    bool small = false;
    bool expandable = false;
    Blk* first = nullptr;
    Blk* last = nullptr;
  };
  struct Cmp {  // PyTorch orders a pool by (stream, size, address)
    bool operator()(const Blk* a, const Blk* b) const {
      if (a->stream != b->stream) return a->stream < b->stream;
      if (a->size != b->size) return a->size < b->size;
      return a->addr < b->addr;
    }
  };
  using BlockSet = std::set<Blk*, Cmp>;

  BlockSet& pool(bool small) { return small ? small_ : large_; }
  Blk* get_free_block(size_t size, uint64_t stream, bool small);
  Blk* new_segment(size_t size, uint64_t stream, bool small);
  Blk* expand(size_t size, uint64_t stream, bool small);
  bool should_split(const Blk* b, size_t size) const;

  PytorchPolicyConfig config_;
  BlockSet small_, large_;
  std::unordered_map<uintptr_t, Blk*> live_;
  std::vector<std::unique_ptr<Seg>> segments_;
  std::map<std::pair<uint64_t, bool>, Seg*> expandable_;
  uintptr_t next_base_ = uintptr_t{1} << 40;
  size_t reserved_ = 0, allocated_ = 0;
  uint64_t mallocs_ = 0, frees_ = 0;
};

}  // namespace torchpool::replay
