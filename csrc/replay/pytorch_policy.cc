#include "pytorch_policy.h"

#include <algorithm>
#include <sstream>

namespace torchpool::replay {

PytorchPolicy::PytorchPolicy(PytorchPolicyConfig config) : config_(config) {}

PytorchPolicy::~PytorchPolicy() {
  for (auto& s : segments_) {
    for (Blk* b = s->first; b;) {
      Blk* n = b->next;
      delete b;
      b = n;
    }
  }
}

bool PytorchPolicy::should_split(const Blk* b, size_t size) const {
  const size_t remaining = b->size - size;
  if (b->small || config_.expandable_segments) return remaining >= kMinBlockSize;
  return size < config_.max_split_size && remaining > kSmallSize;
}

PytorchPolicy::Blk* PytorchPolicy::get_free_block(size_t size, uint64_t stream, bool small) {
  BlockSet& set = pool(small);
  Blk key;
  key.stream = stream;
  key.size = size;
  key.addr = 0;
  auto it = set.lower_bound(&key);
  if (it == set.end() || (*it)->stream != stream) return nullptr;
  Blk* b = *it;
  if (size < config_.max_split_size && b->size >= config_.max_split_size) return nullptr;
  if (size >= config_.max_split_size && b->size >= size + config_.max_non_split_rounding_size) return nullptr;
  set.erase(it);
  return b;
}

PytorchPolicy::Blk* PytorchPolicy::new_segment(size_t size, uint64_t stream, bool small) {
  const size_t bytes = allocation_size(size);
  auto seg = std::make_unique<Seg>();
  seg->base = next_base_;
  seg->size = bytes;
  seg->stream = stream;
  seg->small = small;
  next_base_ += bytes + kRoundLarge;  // never adjacent to the next segment
  auto* b = new Blk();
  b->addr = seg->base;
  b->size = bytes;
  b->stream = stream;
  b->small = small;
  b->seg = seg.get();
  seg->first = seg->last = b;
  segments_.push_back(std::move(seg));
  reserved_ += bytes;
  ++mallocs_;
  return b;
}

// Note [PyTorch policy emulation]: an expandable segment grows at its end; a free block at the end
// is extended rather than left behind.
PytorchPolicy::Blk* PytorchPolicy::expand(size_t size, uint64_t stream, bool small) {
  Seg*& seg = expandable_[{stream, small}];
  if (!seg) {
    auto s = std::make_unique<Seg>();
    s->base = next_base_;
    s->stream = stream;
    s->small = small;
    s->expandable = true;
    next_base_ += uintptr_t{1} << 44;  // the reserved virtual range (> kMaxReplayLiveBytes: Note [Replay input bounds])
    seg = s.get();
    segments_.push_back(std::move(s));
  }
  const size_t page = small ? kSmallBuffer : kLargeBuffer;
  Blk* tail = seg->last;
  size_t have = 0;
  if (tail && !tail->allocated) {
    pool(small).erase(tail);
    have = tail->size;
  }
  const size_t need = size - have;
  const size_t pages = (need + page - 1) / page;
  const size_t bytes = pages * page;
  if (tail && !tail->allocated) {
    tail->size += bytes;
  } else {
    auto* b = new Blk();
    b->addr = seg->base + seg->size;
    b->size = bytes;
    b->stream = stream;
    b->small = small;
    b->seg = seg;
    b->prev = seg->last;
    if (seg->last) seg->last->next = b;
    else seg->first = b;
    seg->last = b;
    tail = b;
  }
  seg->size += bytes;
  reserved_ += bytes;
  mallocs_ += pages;  // one cuMemCreate + cuMemMap per page
  return tail;
}

void* PytorchPolicy::allocate(size_t bytes, uint64_t stream) {
  const size_t size = round_size(bytes);
  const bool small = size <= kSmallSize;
  Blk* b = get_free_block(size, stream, small);
  if (!b) b = config_.expandable_segments ? expand(size, stream, small) : new_segment(size, stream, small);
  if (should_split(b, size)) {
    auto* r = new Blk();
    r->addr = b->addr + size;
    r->size = b->size - size;
    r->stream = stream;
    r->small = small;
    r->seg = b->seg;
    r->prev = b;
    r->next = b->next;
    if (b->next) b->next->prev = r;
    else b->seg->last = r;
    b->next = r;
    b->size = size;
    pool(small).insert(r);
  }
  b->allocated = true;
  b->requested = bytes;
  allocated_ += b->size;
  live_.emplace(b->addr, b);
  return reinterpret_cast<void*>(b->addr);
}

void PytorchPolicy::free(void* p) {
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  if (it == live_.end()) return;
  Blk* b = it->second;
  live_.erase(it);
  allocated_ -= b->size;
  b->allocated = false;
  b->requested = 0;
  BlockSet& set = pool(b->small);
  if (Blk* prev = b->prev; prev && !prev->allocated) {
    set.erase(prev);
    prev->size += b->size;
    prev->next = b->next;
    if (b->next) b->next->prev = prev;
    else b->seg->last = prev;
    delete b;
    b = prev;
  }
  if (Blk* next = b->next; next && !next->allocated) {
    set.erase(next);
    b->size += next->size;
    b->next = next->next;
    if (next->next) next->next->prev = b;
    else b->seg->last = b;
    delete next;
  }
  set.insert(b);
}

size_t PytorchPolicy::block_size(void* p) const {
  auto it = live_.find(reinterpret_cast<uintptr_t>(p));
  return it == live_.end() ? 0 : it->second->size;
}

size_t PytorchPolicy::largest_free_block() const {
  size_t best = 0;
  for (const BlockSet* set : {&small_, &large_})
    for (const Blk* b : *set) best = std::max(best, b->size);
  return best;
}

std::vector<SegmentView> PytorchPolicy::snapshot() const {
  std::vector<SegmentView> out;
  for (const auto& s : segments_) {
    if (s->size == 0) continue;
    SegmentView v{};  // fields by name: the core's view types gain fields
    v.base = s->base;
    v.size = s->size;
    v.extent = s->size;
    v.stream = s->stream;
    v.small = s->small;
    for (const Blk* b = s->first; b; b = b->next) {
      BlockView bv{};
      bv.addr = b->addr;
      bv.size = b->size;
      bv.requested = b->requested;
      bv.cls = -1;
      bv.state = b->allocated ? Block::kAllocated : Block::kFree;
      bv.mapped = b->size;
      v.blocks.push_back(bv);
    }
    out.push_back(std::move(v));
  }
  std::sort(out.begin(), out.end(), [](const SegmentView& a, const SegmentView& b) { return a.base < b.base; });
  return out;
}

std::string PytorchPolicy::check() const {
  size_t reserved = 0, allocated = 0, free_blocks = 0, live = 0;
  for (const auto& s : segments_) {
    size_t total = 0;
    const Blk* last = nullptr;
    for (const Blk* b = s->first; b; b = b->next) {
      if (b->seg != s.get()) return "block points at another segment";
      if (b->prev != last) return "block back link broken";
      if (b->addr != s->base + total) return "blocks not contiguous";
      if (!b->allocated && b->next && !b->next->allocated) return "two adjacent free blocks";
      if (b->allocated) {
        allocated += b->size;
        ++live;
      } else {
        ++free_blocks;
        if (!(b->small ? small_ : large_).count(const_cast<Blk*>(b))) return "free block missing from its pool";
      }
      total += b->size;
      last = b;
    }
    if (s->last != last) return "segment tail pointer is stale";
    if (total != s->size) return "block sizes do not add up to the segment size";
    reserved += s->size;
  }
  if (small_.size() + large_.size() != free_blocks) return "pools hold blocks that are not free";
  if (live != live_.size()) return "live map disagrees with the segments";
  if (reserved != reserved_ || allocated != allocated_) return "gauges disagree with the segment walk";
  return {};
}

}  // namespace torchpool::replay
