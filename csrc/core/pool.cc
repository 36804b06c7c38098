#include "pool.h"

#include <algorithm>
#include <sstream>
#include <stdexcept>
#include <unordered_set>

#include "debug.h"

namespace torchpool {
namespace {

constexpr size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }  // n, m known small
// Note [Impossible sizes] (allocator.h): false when n rounded up to a multiple of m overflows.
bool checked_round_up(size_t n, size_t m, size_t* out) {
  size_t t;
  if (__builtin_add_overflow(n, m - 1, &t)) return false;
  *out = t / m * m;
  return true;
}
constexpr size_t kLargeBuffer = 20u << 20;  // with max_split_bytes: slack accepted for oversize blocks

bool is_pow2(size_t x) { return x && !(x & (x - 1)); }

// Calls f(first, count) for each maximal run of chunks in [lo, hi) whose mapped flag equals `value`.
template <class F>
void for_each_run(const std::vector<bool>& mapped, size_t lo, size_t hi, bool value, F&& f) {
  size_t i = lo;
  while (i < hi) {
    if (mapped[i] != value) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < hi && mapped[j] == value) ++j;
    f(i, j - i);
    i = j;
  }
}

}  // namespace

bool ReserveBudget::try_take(size_t n) {
  size_t cur = taken_.load(std::memory_order_relaxed);
  do {
    if (max_bytes_ && (n > max_bytes_ || cur > max_bytes_ - n)) return false;
  } while (!taken_.compare_exchange_weak(cur, cur + n, std::memory_order_relaxed));
  return true;
}

void ReserveBudget::give_back(size_t n) { taken_.fetch_sub(n, std::memory_order_relaxed); }
size_t ReserveBudget::taken() const { return taken_.load(std::memory_order_relaxed); }

Pool::Pool(Upstream& upstream, PoolConfig config, ReserveBudget* budget)
    : upstream_(upstream), config_(config), budget_(budget) {
  auto refuse = [](const char* option, size_t value, const char* range) {
    throw std::invalid_argument(std::string("torchpool: option ") + option + "=" + std::to_string(value) +
                                " is out of range; valid: " + range);
  };
  if (!is_pow2(config_.alignment) || config_.alignment < kClassQuantum || config_.alignment > kMaxAlignment)
    refuse("alignment", config_.alignment, "a power of two from 64 to 1048576 (1 MiB)");
  if (config_.large_rounding > kMaxRoundingBytes) refuse("large_rounding", config_.large_rounding, "0 to 1073741824 (1 GiB)");
  if (config_.small_segment_bytes > kMaxRoundingBytes)
    refuse("small_segment_bytes", config_.small_segment_bytes, "0 to 1073741824 (1 GiB)");
  if (!(config_.max_reserved_ratio == 0 || (config_.max_reserved_ratio >= 1 && config_.max_reserved_ratio <= 1e6)))
    throw std::invalid_argument("torchpool: max_reserved_ratio must be 0 (off) or a ratio from 1 to 1e6, not " +
                                std::to_string(config_.max_reserved_ratio));
  if (!is_pow2(upstream_.granularity()))
    throw std::invalid_argument("torchpool: upstream granularity must be a power of two");
  config_.large_rounding = std::max(round_up(config_.large_rounding, config_.alignment), config_.alignment);
  config_.small_segment_bytes = round_up(std::max(config_.small_segment_bytes, kMaxClassBytes), upstream_.granularity());
  config_.min_split_bytes = std::max(config_.min_split_bytes, config_.alignment);
  config_.max_class_bytes = std::min(config_.max_class_bytes, kMaxClassBytes);
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
    if (budget_) budget_->give_back(s->mapped);
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
  if (b->is_split()) {
    if (sign > 0) {
      stats_.inactive_split_bytes.add(size);
      stats_.inactive_split.add(1);
    } else {
      stats_.inactive_split_bytes.sub(size);
      stats_.inactive_split.sub(1);
    }
  }
  if (b->state == Block::kCached) {
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
  if (budget_ && !budget_->try_take(bytes)) return nullptr;
  void* p = upstream_.map(bytes, stream);
  if (!p) {
    if (budget_) budget_->give_back(bytes);
    return nullptr;
  }
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
  if (listener_ && !s->expandable) listener_({true, s->base, s->size, stream});
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
    if (listener_) listener_({false, s->base, s->size, s->stream});
    upstream_.unmap(reinterpret_cast<void*>(s->base), s->size, s->stream);
    if (budget_) budget_->give_back(s->size);
  }
  delete s;
}

void Pool::maybe_release(Block* freed) {
  const auto cached = stats_.reserved_bytes.current - stats_.allocated_bytes.current;
  if (static_cast<size_t>(cached) <= config_.max_cached_bytes) return;
  Segment* s = freed->segment;
  if (s->expandable) release_free_chunks(freed);
  else if (segment_is_free(s)) unmap_segment(s);
}

Block* Pool::last_block(const Segment* s) {
  Block* b = s->first;
  while (b->next) b = b->next;
  return b;
}

// Note [Expandable segments] (upstream.h), Note [Holes in expandable segments] (pool.h): grow the
// stream's segment at its end.  Only address space: map_range() puts memory behind what is allocated.
Block* Pool::grow_expandable(FreeLists& fl, uint64_t stream, size_t rounded, bool small) {
  const size_t gran = upstream_.granularity();
  Segment*& slot = small ? fl.small_expandable : fl.expandable;
  Segment* s = slot;
  if (!s) {
    size_t need, want;
    if (!checked_round_up(rounded, gran, &need) || !checked_round_up(std::max(upstream_.reservation_bytes(), need), gran, &want))
      return nullptr;
    void* base = upstream_.reserve(want, stream);
    if (!base) return nullptr;
    s = link_segment(reinterpret_cast<uintptr_t>(base), need, stream, small, want);
    slot = s;
    return s->first;
  }
  Block* last = last_block(s);
  const size_t have = last->state == Block::kFree ? last->size : 0;
  size_t need;
  if (!checked_round_up(rounded - std::min(have, rounded), gran, &need)) return nullptr;
  if (need == 0 || need > s->reserved - s->size) return nullptr;
  const uintptr_t at = s->base + s->size;
  s->size += need;
  s->chunk_mapped.resize(s->size / gran, false);
  if (have) {
    erase_free(last);
    last->size += need;
    return insert_free(last);
  }
  Block* b = new_block();
  b->addr = at;
  b->size = need;
  b->segment = s;
  b->prev = last;
  last->next = b;
  return insert_free(b);
}

void Pool::unmap_chunks(Segment* s, size_t first, size_t count) {
  const size_t gran = upstream_.granularity();
  const uintptr_t at = s->base + first * gran;
  const size_t bytes = count * gran;
  if (listener_) listener_({false, at, bytes, s->stream});
  upstream_.unmap_chunk(reinterpret_cast<void*>(at), bytes, s->stream);
  for (size_t i = first; i < first + count; ++i) s->chunk_mapped[i] = false;
  s->mapped -= bytes;
  if (budget_) budget_->give_back(bytes);
  stats_.reserved_bytes.sub(static_cast<int64_t>(bytes));
  stats_.num_chunk_unmaps++;
}

bool Pool::map_range(Block* b) {
  Segment* s = b->segment;
  const size_t gran = upstream_.granularity();
  const size_t lo = (b->addr - s->base) / gran;
  const size_t hi = (b->addr + b->size - s->base + gran - 1) / gran;
  size_t missing = 0;
  for (size_t i = lo; i < hi; ++i) missing += s->chunk_mapped[i] ? 0 : gran;
  if (missing == 0) return true;
  make_room(missing, b->size);
  std::vector<std::pair<size_t, size_t>> done;
  bool ok = true;
  for_each_run(s->chunk_mapped, lo, hi, false, [&](size_t first, size_t count) {
    if (!ok) return;
    const uintptr_t at = s->base + first * gran;
    const size_t bytes = count * gran;
    if (budget_ && !budget_->try_take(bytes)) {
      ok = false;
      return;
    }
    if (!upstream_.map_chunk(reinterpret_cast<void*>(at), bytes, s->stream)) {
      if (budget_) budget_->give_back(bytes);
      ok = false;
      return;
    }
    for (size_t i = first; i < first + count; ++i) s->chunk_mapped[i] = true;
    s->mapped += bytes;
    stats_.reserved_bytes.add(static_cast<int64_t>(bytes));
    stats_.num_chunk_maps++;
    if (listener_) listener_({true, at, bytes, s->stream});
    done.emplace_back(first, count);
  });
  if (!ok)
    for (auto [first, count] : done) unmap_chunks(s, first, count);
  return ok;
}

std::pair<size_t, size_t> Pool::inner_chunks(const Block* b) const {
  const size_t gran = upstream_.granularity();
  const uintptr_t base = b->segment->base;
  return {(b->addr - base + gran - 1) / gran, (b->addr + b->size - base) / gran};
}

size_t Pool::release_free_chunks(Block* b) {
  TP_ASSERT(b->state == Block::kFree && b->segment->expandable);
  Segment* s = b->segment;
  const size_t gran = upstream_.granularity();
  const auto [lo, hi] = inner_chunks(b);
  size_t released = 0;
  if (lo < hi) {
    for_each_run(s->chunk_mapped, lo, hi, true, [&](size_t first, size_t count) {
      unmap_chunks(s, first, count);
      released += count * gran;
    });
  }
  if (b->next == nullptr) {  // a free tail: cut the segment back to the last chunk in use
    const uintptr_t cut_at = s->base + lo * gran;
    if (cut_at == s->base) {
      unmap_segment(s);
    } else if (cut_at < s->base + s->size) {
      erase_free(b);
      s->size = cut_at - s->base;
      s->chunk_mapped.resize(s->size / gran);
      if (b->addr == cut_at) {
        b->prev->next = nullptr;
        delete_block(b);
      } else {
        b->size = cut_at - b->addr;
        insert_free(b);
      }
    }
  }
  return released;
}

// Note [Reserve target] (pool.h).
size_t Pool::make_room(size_t need, size_t incoming) {
  if (config_.max_reserved_ratio <= 0) return 0;
  const auto high = std::max<int64_t>(allocated_high_water_, stats_.allocated_bytes.current + static_cast<int64_t>(incoming));
  // A floor of one segment per stream (blocks are never shared across streams, so each stream needs
  // room of its own): a small program gains nothing from returning its last segments.
  const double floor = static_cast<double>(high) + static_cast<double>(std::max<size_t>(1, streams_.size())) *
                                                       static_cast<double>(std::max(upstream_.granularity(), config_.small_segment_bytes));
  const double target = std::max(config_.max_reserved_ratio * static_cast<double>(high), floor);
  const double have = static_cast<double>(stats_.reserved_bytes.current) + static_cast<double>(need);
  if (have <= target) return 0;
  // Nothing was freed since the last search came back short: searching again would walk the same
  // segments for nothing (the walk is O(segments + blocks of expandable segments)).
  if (frees_ == fruitless_at_) return 0;
  stats_.num_target_releases++;
  const size_t want = static_cast<size_t>(have - target) + 1;
  const size_t got = release_free(want);
  if (got < want) fruitless_at_ = frees_;
  return got;
}

size_t Pool::release_free(size_t target_bytes) {
  struct Candidate {
    size_t bytes;
    Segment* segment;  // an entirely free segment, or
    Block* block;      // a free block of an expandable segment
  };
  const size_t gran = upstream_.granularity();
  size_t released = 0;
  for (int pass = 0; pass < 2 && released < target_bytes; ++pass) {
    if (pass == 1) {  // parked class blocks hold small segments: merge them and look again
      bool any = false;
      for (auto& [stream, fl] : streams_) {
        (void)stream;
        any = any || fl.parked_bytes > 0;
        reclaim(fl);
      }
      if (!any) break;
    }
    std::vector<Candidate> c;
    for (Segment* s = segments_; s; s = s->next) {
      if (!s->expandable) {
        if (segment_is_free(s)) c.push_back({s->size, s, nullptr});
        continue;
      }
      for (Block* b = s->first; b; b = b->next) {
        if (b->state != Block::kFree) continue;
        const auto [lo, hi] = inner_chunks(b);
        size_t bytes = 0;
        for (size_t i = lo; i < hi; ++i) bytes += s->chunk_mapped[i] ? gran : 0;
        if (bytes || b->next == nullptr) c.push_back({bytes, nullptr, b});
      }
    }
    std::sort(c.begin(), c.end(), [](const Candidate& a, const Candidate& b) { return a.bytes > b.bytes; });
    for (const Candidate& x : c) {
      if (released >= target_bytes) break;
      if (x.segment) {
        released += x.bytes;
        unmap_segment(x.segment);
      } else {
        released += release_free_chunks(x.block);
      }
    }
  }
  return released;
}

size_t Pool::release_cached(size_t target_bytes) {
  for (auto& [stream, fl] : streams_) {
    (void)stream;
    reclaim(fl);
  }
  const size_t released = release_free(target_bytes);
  TP_ASSERT_EXPENSIVE(check());
  return released;
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
  } else if (rounded <= kMaxClassBytes) {
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

size_t Pool::mapped_in(const Block* b) const {
  const Segment* s = b->segment;
  if (!s->expandable) return b->size;
  const size_t gran = upstream_.granularity();
  size_t bytes = 0;
  for (uintptr_t c = (b->addr - s->base) / gran * gran; s->base + c < b->addr + b->size; c += gran) {
    if (!s->chunk_mapped[c / gran]) continue;
    const uintptr_t lo = std::max<uintptr_t>(s->base + c, b->addr);
    const uintptr_t hi = std::min<uintptr_t>(s->base + c + gran, b->addr + b->size);
    bytes += hi - lo;
  }
  return bytes;
}

std::vector<SegmentView> Pool::snapshot() const {
  std::vector<SegmentView> out;
  for (const Segment* s = segments_; s; s = s->next) {
    SegmentView v{s->base, s->mapped, s->size, s->stream, s->small, s->expandable, s->reserved, {}};
    for (const Block* b = s->first; b; b = b->next) {
      const bool deferred = b->state == Block::kDeferred;
      v.blocks.push_back({b->addr, b->size, b->requested, b->cls, deferred ? Block::kAllocated : b->state, deferred,
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
      if ((b->state == Block::kFree || b->state == Block::kCached) && b->is_split()) {
        want.inactive_split_bytes.current += size;
        want.inactive_split.current += 1;
      }
    }
    if (total != s->size) return fail("block sizes do not add up to the segment size", nullptr);
    want.reserved_bytes.current += static_cast<int64_t>(s->mapped);
    want.segment.current += 1;
  }
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
