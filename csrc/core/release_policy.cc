// The release policy: when the pool gives memory back to its upstream (Note [Release policy],
// Note [Reserve target], pool.h).  The only code that reads max_cached_bytes and max_reserved_ratio.
#include "pool.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "debug.h"
#include "pool_internal.h"

namespace torchpool {
using namespace pool_detail;

void Pool::maybe_release(Block* freed) {
  const auto cached = stats_.reserved_bytes.current - stats_.allocated_bytes.current;
  if (static_cast<size_t>(cached) <= config_.max_cached_bytes) return;
  Segment* s = freed->segment;
  if (s->expandable) release_free_chunks(freed);
  else if (segment_is_free(s)) unmap_segment(s);
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
  if (got < want) {
    fruitless_at_ = frees_;
    ++target_shortfalls_;  // blocks lent to thread caches may be what holds the rest: Note [Thread caches]
  }
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

}  // namespace torchpool
