// Introspection: the invariant walk (Pool::check, the header comment of pool.h), snapshots and the
// statistics derived from a walk of the free structures.
#include "pool.h"

#include <algorithm>
#include <sstream>
#include <unordered_set>

#include "debug.h"
#include "pool_internal.h"

namespace torchpool {
using namespace pool_detail;

// ---- introspection --------------------------------------------------------------------------

Stats Pool::stats_with_derived() const {
  Stats s = stats_;
  int64_t largest = 0;
  for (const auto& [stream, fl] : streams_) {
    (void)stream;
    // A free block of an expandable segment counts its mapped bytes (Note [Holes in expandable
    // segments]): the free memory the allocator holds, not the address space.
    for (const FreeSet* set : {&fl.small_free, &fl.large_free})
    for (auto it = set->rbegin(); it != set->rend(); ++it) {
      const Block* b = *it;
      if (static_cast<int64_t>(b->size) <= largest) break;
      largest = std::max(largest, static_cast<int64_t>(mapped_in(b)));
    }
    for (int c = static_cast<int>(kNumSizeClasses) - 1; c >= 0; --c) {
      if (fl.class_head[c]) {
        largest = std::max<int64_t>(largest, class_bytes(c));
        break;
      }
    }
  }
  s.largest_free_block = largest;
  return s;
}

std::vector<SegmentView> Pool::snapshot() const {
  std::vector<SegmentView> out;
  for (const Segment* s = segments_; s; s = s->next) {
    SegmentView v{s->base, s->mapped, s->size, s->stream, s->small, s->expandable, s->reserved, {}};
    for (const Block* b = s->first; b; b = b->next) {
      const bool deferred = b->state == Block::kDeferred;
      // A lent block stays kLent here; CachingAllocator::snapshot() shows it as allocated (handed out by a
      // thread cache: requested != 0, written by that cache without the pool's lock) or cached.
      const Block::State shown = deferred ? Block::kAllocated : b->state;
      const size_t requested = __atomic_load_n(&b->requested, __ATOMIC_RELAXED);
      v.blocks.push_back({b->addr, b->size, requested, b->cls, shown, deferred,
                          b->state == Block::kFree ? mapped_in(b) : b->size});
    }
    out.push_back(std::move(v));
  }
  std::sort(out.begin(), out.end(), [](const SegmentView& a, const SegmentView& b) { return a.base < b.base; });
  return out;
}

std::string Pool::check() const {
  std::ostringstream err;
  auto fail = [&](const char* what, const Block* b) {
    err << what;
    if (b) err << " (block 0x" << std::hex << b->addr << std::dec << " size " << b->size << ")";
    return err.str();
  };
  std::unordered_set<const Block*> parked;
  for (const auto& [stream, fl] : streams_) {
    size_t bytes = 0;
    for (uint32_t c = 0; c < kNumSizeClasses; ++c) {
      const Block* prev = nullptr;
      for (const Block* b = fl.class_head[c]; b; b = b->list_next) {
        if (b->list_prev != prev) return fail("class list back link broken", b);
        if (b->state != Block::kCached) return fail("block on a class list is not parked", b);
        if (b->cls != static_cast<int32_t>(c) || b->size != class_bytes(c)) return fail("parked block has the wrong class or size", b);
        if (b->segment->stream != stream) return fail("parked block on another stream's list", b);
        if (!parked.insert(b).second) return fail("block parked twice", b);
        bytes += b->size;
        prev = b;
      }
    }
    if (bytes != fl.parked_bytes) return fail("parked_bytes disagrees with the class lists", nullptr);
    for (const Segment* e : {fl.expandable, fl.small_expandable}) {
      if (!e) continue;
      bool found = false;
      for (const Segment* s = segments_; s; s = s->next) found = found || s == e;
      if (!found || !e->expandable || e->stream != stream) return fail("a stream's expandable segment is not one of its segments", nullptr);
      if (e->small != (e == fl.small_expandable)) return fail("a stream's expandable segment has the wrong kind", nullptr);
    }
  }
  const size_t gran = upstream_.granularity();
  int64_t deferred_bytes = 0, deferred_blocks = 0;
  Stats want;
  size_t free_blocks = 0;
  size_t lent = 0;
  for (const Segment* s = segments_; s; s = s->next) {
    if (s->first == nullptr || s->first->addr != s->base) return fail("segment does not start with its first block", s->first);
    if (s->first->prev) return fail("first block has a predecessor", s->first);
    if (s->next && s->next->prev != s) return fail("segment list back link broken", nullptr);
    if (s->expandable) {
      if (s->size > s->reserved || s->base % gran || s->size % gran || s->reserved % gran)
        return fail("expandable segment with a bad size, reservation or alignment", s->first);
      auto it = streams_.find(s->stream);
      if (it == streams_.end() || (s->small ? it->second.small_expandable : it->second.expandable) != s)
        return fail("expandable segment is not its stream's", s->first);
      if (s->chunk_mapped.size() != s->size / gran) return fail("expandable segment chunk map has the wrong length", s->first);
      size_t mapped = 0;
      for (size_t i = 0; i < s->chunk_mapped.size(); ++i) {
        if (!s->chunk_mapped[i]) continue;
        if (i * gran >= s->size) return fail("expandable segment maps a chunk past its blocks", s->first);
        mapped += gran;
      }
      if (mapped != s->mapped) return fail("expandable segment's mapped bytes disagree with its chunk map", s->first);
      for (const Block* b = s->first; b; b = b->next) {
        if (b->state == Block::kFree) continue;
        for (size_t i = (b->addr - s->base) / gran; i * gran < b->addr + b->size - s->base; ++i)
          if (!s->chunk_mapped[i]) return fail("a block in use overlaps a chunk with no memory", b);
      }
    } else if (s->mapped != s->size) {
      return fail("segment's mapped bytes differ from its size", s->first);
    }
    size_t total = 0;
    for (const Block* b = s->first; b; b = b->next) {
      if (b->segment != s) return fail("block points at another segment", b);
      if (b->size == 0 || b->size % config_.alignment) return fail("block size is not a positive multiple of the alignment", b);
      if (b->next && b->next->addr != b->addr + b->size) return fail("blocks not contiguous", b);
      if (b->next && b->next->prev != b) return fail("block back link broken", b);
      total += b->size;
      const auto size = static_cast<int64_t>(b->size);
      switch (b->state) {
        case Block::kAllocated:
          if (b->requested == 0 || b->requested > b->size) return fail("allocated block with bad requested size", b);
          want.allocated_bytes.current += size;
          want.requested_bytes.current += static_cast<int64_t>(b->requested);
          want.allocation.current += 1;
          break;
        case Block::kDeferred:
          deferred_bytes += size;
          deferred_blocks += 1;
          break;
        case Block::kCached:
          if (!parked.count(b)) return fail("parked block missing from its class list", b);
          want.cached_class_bytes.current += size;
          break;
        case Block::kLent:  // Note [Lent class blocks]: cached, on no list
          if (!s->small || b->cls < 0 || b->size != class_bytes(static_cast<uint32_t>(b->cls)))
            return fail("lent block has the wrong class or size", b);
          // requested: 0 while idle in a thread cache, the request while the cache has handed it out
          if (b->requested > b->size) return fail("lent block with bad requested size", b);
          want.cached_class_bytes.current += size;
          lent += b->size;
          break;
        case Block::kFree: {
          if (b->next && b->next->state == Block::kFree) return fail("two adjacent free blocks", b);
          auto it = streams_.find(s->stream);
          if (it == streams_.end()) return fail("free block of a stream without lists", b);
          const FreeSet& set = s->small ? it->second.small_free : it->second.large_free;
          if (!set.count(const_cast<Block*>(b))) return fail("free block missing from its free set", b);
          ++free_blocks;
          break;
        }
      }
      if (((b->state == Block::kFree || b->state == Block::kCached) && b->is_split()) ||
          (b->state == Block::kLent && b->lent_split)) {
        want.inactive_split_bytes.current += size;
        want.inactive_split.current += 1;
      }
    }
    if (total != s->size) return fail("block sizes do not add up to the segment size", nullptr);
    want.reserved_bytes.current += static_cast<int64_t>(s->mapped);
    want.segment.current += 1;
  }
  if (lent != lent_bytes_) return fail("lent_bytes disagrees with the lent blocks", nullptr);
  size_t in_sets = 0;
  for (const auto& [stream, fl] : streams_) in_sets += fl.small_free.size() + fl.large_free.size();
  if (in_sets != free_blocks) return fail("free sets hold blocks that are not free in any segment", nullptr);
#define TP_CHECK_GAUGE(name)                                                                   \
  if (want.name.current != stats_.name.current) {                                              \
    err << "gauge " #name " is " << stats_.name.current << " but the walk finds " << want.name.current; \
    return err.str();                                                                          \
  }
  TP_CHECK_GAUGE(allocated_bytes)
  TP_CHECK_GAUGE(requested_bytes)
  TP_CHECK_GAUGE(reserved_bytes)
  TP_CHECK_GAUGE(cached_class_bytes)
  TP_CHECK_GAUGE(inactive_split_bytes)
  TP_CHECK_GAUGE(inactive_split)
  TP_CHECK_GAUGE(allocation)
  TP_CHECK_GAUGE(segment)
#undef TP_CHECK_GAUGE
  if (stats_.active_bytes.current != stats_.allocated_bytes.current + deferred_bytes)
    return fail("active bytes differ from allocated + deferred bytes", nullptr);
  if (stats_.active.current != stats_.allocation.current + deferred_blocks)
    return fail("active blocks differ from allocated + deferred blocks", nullptr);
  return {};
}

}  // namespace torchpool
