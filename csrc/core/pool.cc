// The pool's blocks: construction, the request path (class lists, best fit, split), the free
// structures and their accounting, and ordinary segments.  The other parts of Pool live in
// pool_expandable.cc (the chunk map of expandable segments), release_policy.cc (when memory goes
// back to the upstream) and pool_check.cc (the invariant walk, snapshots, derived statistics).
#include "pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "debug.h"
#include "options.h"
#include "pool_internal.h"

namespace torchpool {
using namespace pool_detail;
namespace {
constexpr size_t kLargeBuffer = 20u << 20;  // with max_split_bytes: slack accepted for oversize blocks
}  // namespace

Pool::Pool(Upstream& upstream, PoolConfig config) : upstream_(upstream), config_(config) {
  // Every rule on a PoolConfig lives once, in the option schema (Note [One option schema]).
  if (std::string e = pool_config_error(config_); !e.empty()) throw std::invalid_argument(e);
  if (!is_pow2(upstream_.granularity()))
    throw std::invalid_argument("torchpool: upstream granularity must be a power of two");
  config_.large_rounding = std::max(round_up(config_.large_rounding, config_.alignment), config_.alignment);
  config_.small_segment_bytes = round_up(std::max(config_.small_segment_bytes, kSmallRequestLimit), upstream_.granularity());
  config_.min_split_bytes = std::max(config_.min_split_bytes, config_.alignment);
  config_.max_class_bytes = std::min(config_.max_class_bytes, kSmallRequestLimit);
  for (uint32_t c = 0; c < kNumSizeClasses; ++c) {
    uint32_t j = c;
    while (j + 1 < kNumSizeClasses && class_bytes(j) % config_.alignment != 0) ++j;
    aligned_class_[c] = j;
  }
}

Pool::~Pool() {
  while (segments_) {
    Segment* s = segments_;
    segments_ = s->next;
    for (Block* b = s->first; b;) {
      Block* n = b->next;
      delete b;
      b = n;
    }
    if (s->expandable) {
      const size_t gran = upstream_.granularity();
      for_each_run(s->chunk_mapped, 0, s->chunk_mapped.size(), true, [&](size_t first, size_t count) {
        upstream_.unmap_chunk(reinterpret_cast<void*>(s->base + first * gran), count * gran, s->stream);
      });
      upstream_.unreserve(reinterpret_cast<void*>(s->base), s->reserved, s->stream);
    } else {
      upstream_.unmap(reinterpret_cast<void*>(s->base), s->size, s->stream);
    }
    delete s;
  }
  for (Block* b : spare_blocks_) delete b;
}

Pool::FreeLists& Pool::lists(uint64_t stream) {
  if (stream == last_stream_) return *last_lists_;
  FreeLists& fl = streams_[stream];  // unordered_map references are stable
  last_stream_ = stream;
  last_lists_ = &fl;
  return fl;
}

Pool::FreeSet& Pool::free_set(Block* b) {
  FreeLists& fl = lists(b->segment->stream);
  return b->segment->small ? fl.small_free : fl.large_free;
}

Block* Pool::new_block() {
  if (spare_blocks_.empty()) return new Block();
  Block* b = spare_blocks_.back();
  spare_blocks_.pop_back();
  *b = Block();
  return b;
}

void Pool::delete_block(Block* b) { spare_blocks_.push_back(b); }

// ---- accounting: the only place gauges change ------------------------------------------------

void Pool::account_alloc(Block* b, size_t requested) {
  b->state = Block::kAllocated;
  b->requested = requested;
  const auto size = static_cast<int64_t>(b->size);
  stats_.allocated_bytes.add(size);
  stats_.requested_bytes.add(static_cast<int64_t>(requested));
  stats_.active_bytes.add(size);
  stats_.allocation.add(1);
  stats_.active.add(1);
  allocated_high_water_ = std::max(allocated_high_water_, stats_.allocated_bytes.current);
  if (b->cls >= 0) {
    ClassStat& c = stats_.classes[b->cls];
    c.allocated_blocks += 1;
    c.peak_allocated_blocks = std::max(c.peak_allocated_blocks, c.allocated_blocks);
    c.requested_bytes += static_cast<int64_t>(requested);
  }
}

void Pool::account_free(Block* b) {
  const auto size = static_cast<int64_t>(b->size);
  stats_.allocated_bytes.sub(size);
  stats_.requested_bytes.sub(static_cast<int64_t>(b->requested));
  stats_.allocation.sub(1);
  if (b->cls >= 0) {
    ClassStat& c = stats_.classes[b->cls];
    c.allocated_blocks -= 1;
    c.requested_bytes -= static_cast<int64_t>(b->requested);
  }
  b->requested = 0;
}

void Pool::account_inactive_active(Block* b) {
  stats_.active_bytes.sub(static_cast<int64_t>(b->size));
  stats_.active.sub(1);
}

void Pool::account_inactive(Block* b, int sign) {
  const auto size = static_cast<int64_t>(b->size);
  // A lent block keeps the accounting it was lent with (neighbours may change while a cache has it).
  if (b->state == Block::kLent ? b->lent_split : b->is_split()) {
    if (sign > 0) {
      stats_.inactive_split_bytes.add(size);
      stats_.inactive_split.add(1);
    } else {
      stats_.inactive_split_bytes.sub(size);
      stats_.inactive_split.sub(1);
    }
  }
  if (b->state == Block::kCached || b->state == Block::kLent) {  // Note [Lent class blocks]
    if (sign > 0) {
      stats_.cached_class_bytes.add(size);
    } else {
      stats_.cached_class_bytes.sub(size);
    }
    stats_.classes[b->cls].cached_blocks += sign;
  }
}

// ---- free structures ------------------------------------------------------------------------

void Pool::erase_free(Block* b) {
  TP_ASSERT(b->state == Block::kFree);
  size_t n = free_set(b).erase(b);
  TP_ASSERT(n == 1);
  (void)n;
  account_inactive(b, -1);
}

Block* Pool::insert_free(Block* b) {
  b->state = Block::kFree;
  b->cls = -1;
  if (b->prev && b->prev->state == Block::kFree) {
    Block* p = b->prev;
    erase_free(p);
    p->size += b->size;
    p->next = b->next;
    if (b->next) b->next->prev = p;
    delete_block(b);
    b = p;
    stats_.num_merges++;
  }
  if (b->next && b->next->state == Block::kFree) {
    Block* n = b->next;
    erase_free(n);
    b->size += n->size;
    b->next = n->next;
    if (n->next) n->next->prev = b;
    delete_block(n);
    stats_.num_merges++;
  }
  b->state = Block::kFree;
  free_set(b).insert(b);
  account_inactive(b, +1);
  return b;
}

void Pool::park(Block* b) {
  FreeLists& fl = lists(b->segment->stream);
  b->state = Block::kCached;
  b->list_prev = nullptr;
  b->list_next = fl.class_head[b->cls];
  if (b->list_next) b->list_next->list_prev = b;
  fl.class_head[b->cls] = b;
  fl.parked_bytes += b->size;
  account_inactive(b, +1);
}

void Pool::unpark(Block* b) {
  FreeLists& fl = lists(b->segment->stream);
  account_inactive(b, -1);
  if (b->list_prev) b->list_prev->list_next = b->list_next;
  else fl.class_head[b->cls] = b->list_next;
  if (b->list_next) b->list_next->list_prev = b->list_prev;
  b->list_prev = b->list_next = nullptr;
  fl.parked_bytes -= b->size;
  b->state = Block::kFree;  // transient: the caller allocates or inserts it
}

void Pool::reclaim(FreeLists& fl) {
  if (fl.parked_bytes == 0) return;
  stats_.num_reclaims++;
  std::vector<Segment*> touched;
  for (uint32_t c = 0; c < kNumSizeClasses; ++c) {
    while (Block* b = fl.class_head[c]) {
      unpark(b);
      Segment* s = b->segment;
      insert_free(b);
      touched.push_back(s);
    }
  }
  std::sort(touched.begin(), touched.end());
  touched.erase(std::unique(touched.begin(), touched.end()), touched.end());
  for (Segment* s : touched)
    if (segment_is_free(s)) maybe_release(s->first);
}

// ---- segments -------------------------------------------------------------------------------

Segment* Pool::map_segment(size_t bytes, uint64_t stream, bool small) {
  void* p = upstream_.map(bytes, stream);
  if (!p) return nullptr;
  return link_segment(reinterpret_cast<uintptr_t>(p), bytes, stream, small, 0);
}

Segment* Pool::link_segment(uintptr_t base, size_t bytes, uint64_t stream, bool small, size_t reserved) {
  auto* s = new Segment();
  s->expandable = reserved != 0;
  s->reserved = reserved;
  s->base = base;
  s->size = bytes;
  s->mapped = s->expandable ? 0 : bytes;  // an expandable segment's chunks are mapped by map_range()
  if (s->expandable) s->chunk_mapped.assign(bytes / upstream_.granularity(), false);
  s->stream = stream;
  s->small = small;
  s->id = next_segment_id_++;
  s->next = segments_;
  if (segments_) segments_->prev = s;
  segments_ = s;
  Block* b = new_block();
  b->addr = s->base;
  b->size = bytes;
  b->segment = s;
  s->first = b;
  stats_.reserved_bytes.add(static_cast<int64_t>(s->mapped));
  stats_.segment.add(1);
  stats_.num_upstream_maps++;
  insert_free(b);
  return s;
}

bool Pool::segment_is_free(const Segment* s) const {
  return s->first->state == Block::kFree && s->first->next == nullptr;
}

void Pool::unmap_segment(Segment* s) {
  TP_ASSERT(segment_is_free(s));
  erase_free(s->first);
  delete_block(s->first);
  if (s->prev) s->prev->next = s->next;
  else segments_ = s->next;
  if (s->next) s->next->prev = s->prev;
  stats_.segment.sub(1);
  stats_.num_upstream_unmaps++;
  if (s->expandable) {
    FreeLists& fl = lists(s->stream);
    if (fl.expandable == s) fl.expandable = nullptr;
    if (fl.small_expandable == s) fl.small_expandable = nullptr;
    for_each_run(s->chunk_mapped, 0, s->chunk_mapped.size(), true,
                 [&](size_t first, size_t count) { unmap_chunks(s, first, count); });
    upstream_.unreserve(reinterpret_cast<void*>(s->base), s->reserved, s->stream);
  } else {
    stats_.reserved_bytes.sub(static_cast<int64_t>(s->size));
    upstream_.unmap(reinterpret_cast<void*>(s->base), s->size, s->stream);
  }
  delete s;
}

Block* Pool::last_block(const Segment* s) {
  Block* b = s->first;
  while (b->next) b = b->next;
  return b;
}

// ---- allocation -----------------------------------------------------------------------------

Block* Pool::split(Block* b, size_t size) {
  TP_ASSERT(b->size > size);
  Block* r = new_block();
  r->addr = b->addr + size;
  r->size = b->size - size;
  r->segment = b->segment;
  r->prev = b;
  r->next = b->next;
  if (b->next) b->next->prev = r;
  b->next = r;
  b->size = size;
  stats_.num_splits++;
  insert_free(r);
  return b;
}

Block* Pool::find_free(FreeSet& set, size_t rounded) const {
  Block key;
  key.size = rounded;
  key.addr = 0;
  auto it = set.lower_bound(&key);
  if (it == set.end()) return nullptr;
  Block* b = *it;
  if (config_.max_split_bytes != SIZE_MAX) {
    if (rounded < config_.max_split_bytes && b->size >= config_.max_split_bytes) return nullptr;
    if (rounded >= config_.max_split_bytes && b->size - rounded >= kLargeBuffer) return nullptr;  // b->size >= rounded
  }
  return b;
}

Block* Pool::allocate_best_fit(size_t rounded, size_t bytes, uint64_t stream, bool small) {
  (void)bytes;
  FreeLists& fl = lists(stream);
  FreeSet& set = small ? fl.small_free : fl.large_free;
  Block* b = find_free(set, rounded);
  if (!b && small && fl.parked_bytes >= config_.small_segment_bytes) {
    reclaim(fl);  // Note [Parked class blocks]
    b = find_free(set, rounded);
  }
  if (!b) {
    const size_t gran = upstream_.granularity();
    size_t seg_bytes;
    if (!checked_round_up(rounded, gran, &seg_bytes)) return nullptr;
    if (small) seg_bytes = std::max(config_.small_segment_bytes, seg_bytes);
    if (upstream_.can_expand()) b = grow_expandable(fl, stream, rounded, small);
    if (!b) {
      make_room(seg_bytes, rounded);
      Segment* s = map_segment(seg_bytes, stream, small);
      if (!s) return nullptr;
      b = s->first;
    }
  }
  erase_free(b);
  b->state = Block::kAllocated;  // not free while it is split, so the remainder does not merge back
  const size_t min_rest = small ? config_.alignment : config_.min_split_bytes;
  if (b->size - rounded >= min_rest && b->size - rounded > 0) split(b, rounded);
  if (b->segment->expandable && !map_range(b)) {  // Note [Holes in expandable segments]
    release_free_chunks(insert_free(b));  // back as it was; an empty reservation is given back
    return nullptr;
  }
  return b;
}

Block* Pool::allocate_class(uint32_t cls, size_t bytes, uint64_t stream) {
  FreeLists& fl = lists(stream);
  if (Block* b = fl.class_head[cls]) {
    unpark(b);
    stats_.num_class_hits++;
    stats_.classes[cls].hits++;
    account_alloc(b, bytes);
    return b;
  }
  Block* b = allocate_best_fit(class_bytes(cls), bytes, stream, /*small=*/true);
  if (!b) return nullptr;
  stats_.num_class_misses++;
  stats_.classes[cls].misses++;
  b->cls = static_cast<int32_t>(cls);
  account_alloc(b, bytes);
  return b;
}

Block* Pool::allocate(size_t bytes, uint64_t stream) {
  TP_ASSERT(bytes > 0);
  size_t rounded;  // Note [Impossible sizes]: a size whose rounding overflows is out of memory
  if (!checked_round_up(bytes, config_.alignment, &rounded)) return nullptr;
  Block* b;
  if (rounded <= config_.max_class_bytes && config_.size_classes) {
    b = allocate_class(aligned_class_[class_of(rounded)], bytes, stream);
  } else if (rounded <= kSmallRequestLimit) {
    b = allocate_best_fit(rounded, bytes, stream, /*small=*/true);
    if (b) account_alloc(b, bytes);
  } else {
    size_t large;
    if (!checked_round_up(rounded, config_.large_rounding, &large)) return nullptr;
    b = allocate_best_fit(large, bytes, stream, /*small=*/false);
    if (b) {
      stats_.num_large_allocs++;
      account_alloc(b, bytes);
    }
  }
  TP_ASSERT_EXPENSIVE(check());
  return b;
}

// ---- lending class blocks to a thread cache: Note [Lent class blocks] -------------------------

int32_t Pool::class_for(size_t bytes) const {
  size_t rounded;
  if (bytes == 0 || !checked_round_up(bytes, config_.alignment, &rounded)) return -1;
  if (rounded > config_.max_class_bytes || !config_.size_classes) return -1;
  return static_cast<int32_t>(aligned_class_[class_of(rounded)]);
}

size_t Pool::lend(uint32_t cls, uint64_t stream, Block** out, size_t n) {
  TP_ASSERT(cls < kNumSizeClasses);
  FreeLists& fl = lists(stream);
  size_t k = 0;
  while (k < n) {
    Block* b = fl.class_head[cls];
    const bool carved = b == nullptr;
    if (b) {
      unpark(b);  // leaves it kFree, off the list and out of the gauges
    } else {
      b = allocate_best_fit(class_bytes(cls), class_bytes(cls), stream, /*small=*/true);
      if (!b) break;
      b->cls = static_cast<int32_t>(cls);
      stats_.num_class_misses++;  // carved for a thread cache: its first hand-out is not a hit
      stats_.classes[cls].misses++;
    }
    b->lent_carved = carved;
    b->state = Block::kLent;
    b->lent_split = b->is_split();
    b->requested = 0;
    lent_bytes_ += b->size;
    account_inactive(b, +1);
    out[k++] = b;
  }
  TP_ASSERT_EXPENSIVE(check());
  return k;
}

void Pool::take_back(Block* const* blocks, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    Block* b = blocks[i];
    TP_ASSERT(b->state == Block::kLent);
    ++frees_;  // a later reserve-target search may find more now
    account_inactive(b, -1);
    lent_bytes_ -= b->size;
    park(b);
  }
  TP_ASSERT_EXPENSIVE(check());
}

void Pool::defer(Block* b) {
  TP_ASSERT(b->state == Block::kAllocated);
  account_free(b);
  b->state = Block::kDeferred;
  stats_.num_deferred_frees++;
  TP_ASSERT_EXPENSIVE(check());
}

void Pool::free(Block* b) {
  TP_ASSERT(b->state == Block::kAllocated || b->state == Block::kDeferred);
  ++frees_;
  if (b->state == Block::kAllocated) account_free(b);
  account_inactive_active(b);
  if (b->cls >= 0) {
    park(b);
  } else {
    maybe_release(insert_free(b));
  }
  TP_ASSERT_EXPENSIVE(check());
}

}  // namespace torchpool
