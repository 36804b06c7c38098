// Expandable segments: growing a stream's segment, the chunk map (which chunks have memory behind
// them), mapping the chunks under an allocated block and unmapping those inside a free one
// (Note [Expandable segments], upstream.h; Note [Holes in expandable segments], pool.h).
#include "pool.h"

#include <algorithm>
#include <utility>

#include "debug.h"
#include "pool_internal.h"

namespace torchpool {
using namespace pool_detail;

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
  upstream_.unmap_chunk(reinterpret_cast<void*>(at), bytes, s->stream);
  for (size_t i = first; i < first + count; ++i) s->chunk_mapped[i] = false;
  s->mapped -= bytes;
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
    if (!upstream_.map_chunk(reinterpret_cast<void*>(at), bytes, s->stream)) {
      ok = false;
      return;
    }
    for (size_t i = first; i < first + count; ++i) s->chunk_mapped[i] = true;
    s->mapped += bytes;
    stats_.reserved_bytes.add(static_cast<int64_t>(bytes));
    stats_.num_chunk_maps++;
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


}  // namespace torchpool
