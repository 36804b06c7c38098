// The one serializer of statistics and snapshots: what Allocator.stats() / snapshot() return in
// Python and what libtorchpool_cuda.so returns through its C API.
//
// Note [One serializer]
// ---------------------
// Rationale: the pybind module built dicts from Stats / SegmentView, and the CUDA library wrote its own
// text lines that Python parsed back (_parse_stats / _parse_snapshot), so every new field had to be
// added three times and CUDA snapshots lacked mapped_size.  Approach: emit_stats() and
// emit_snapshot() walk the structures once, naming every key, and hand the values to an emitter:
// the bindings' emitter builds Python dicts and lists directly (bindings/core.cc), JsonWriter below
// writes JSON for the C ABI, which torchpool.cuda reads with json.loads.  Why two emitters and not
// JSON everywhere: stats() of the CPU allocator is read often (monitors, `torchpool top`) and building
// the dict directly skips a print and a parse of ~90 numbers; the CUDA library links no Python, and
// JSON is the text both sides already have a well-kept reader for.
//
// Emitter: begin_object(), end_object(), begin_array(), end_array(), key(std::string_view),
// value(int64_t), value(uint64_t), value(bool), value(std::string_view).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "pool.h"
#include "size_classes.h"
#include "stats.h"

namespace torchpool {

template <class E>
void emit_stats(const Stats& s, E& e) {
  e.begin_object();
#define TP_EMIT_GAUGE(name, help)          \
  e.key(#name ".all.current");             \
  e.value(int64_t{s.name.current});        \
  e.key(#name ".all.peak");                \
  e.value(int64_t{s.name.peak});           \
  e.key(#name ".all.allocated");           \
  e.value(int64_t{s.name.allocated});      \
  e.key(#name ".all.freed");               \
  e.value(int64_t{s.name.freed});
  TORCHPOOL_GAUGES(TP_EMIT_GAUGE)
#undef TP_EMIT_GAUGE
#define TP_EMIT_COUNTER(name, help) \
  e.key(#name);                     \
  e.value(int64_t{s.name});
  TORCHPOOL_COUNTERS(TP_EMIT_COUNTER)
#undef TP_EMIT_COUNTER
  e.key("largest_free_block");
  e.value(int64_t{s.largest_free_block});
  e.key("size_classes");  // the classes in use, each a row
  e.begin_array();
  for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
    const ClassStat& c = s.classes[i];
    if (!c.used()) continue;
    e.begin_object();
    e.key("index");
    e.value(uint64_t{i});
    e.key("bytes");
    e.value(uint64_t{kSizeClasses[i].bytes});
#define TP_EMIT_CLASS(name, help) \
  e.key(#name);                   \
  e.value(int64_t{c.name});
    TORCHPOOL_CLASS_STATS(TP_EMIT_CLASS)
#undef TP_EMIT_CLASS
    e.end_object();
  }
  e.end_array();
  e.end_object();
}

// A block freed by its owner while another stream may still use it reads "deferred": it is active
// (counted in active_bytes) but not allocated.
inline const char* block_state_name(const BlockView& b) {
  if (b.deferred) return "deferred";
  switch (b.state) {
    case Block::kFree: return "free";
    case Block::kCached: return "cached";
    case Block::kAllocated: return "allocated";
    case Block::kDeferred: return "deferred";
    case Block::kLent: return "cached";  // Note [Lent class blocks]; snapshot() shows it as kCached
  }
  return "?";
}

template <class E>
void emit_snapshot(const std::vector<SegmentView>& segs, E& e) {
  e.begin_array();
  for (const SegmentView& s : segs) {
    uint64_t allocated = 0, requested = 0;
    for (const BlockView& b : s.blocks)
      if (b.state == Block::kAllocated && !b.deferred) {
        allocated += b.size;
        requested += b.requested;
      }
    e.begin_object();
    e.key("address");
    e.value(uint64_t{s.base});
    e.key("total_size");  // bytes mapped
    e.value(uint64_t{s.size});
    e.key("stream");
    e.value(uint64_t{s.stream});
    e.key("segment_type");
    e.value(std::string_view(s.small ? "small" : "large"));
    e.key("expandable");
    e.value(s.expandable);
    e.key("reserved_size");  // address space held
    e.value(uint64_t{s.reserved});
    e.key("extent");  // bytes the blocks cover (> total_size when there are holes)
    e.value(uint64_t{s.extent});
    e.key("allocated_size");
    e.value(allocated);
    e.key("requested_size");
    e.value(requested);
    e.key("blocks");
    e.begin_array();
    for (const BlockView& b : s.blocks) {
      e.begin_object();
      e.key("address");
      e.value(uint64_t{b.addr});
      e.key("size");
      e.value(uint64_t{b.size});
      e.key("requested_size");
      e.value(uint64_t{b.requested});
      e.key("size_class");
      e.value(int64_t{b.cls});
      e.key("mapped_size");  // < size only for a free block over unmapped chunks (expandable)
      e.value(uint64_t{b.mapped});
      e.key("state");
      e.value(std::string_view(block_state_name(b)));
      e.end_object();
    }
    e.end_array();
    e.end_object();
  }
  e.end_array();
}

// JSON text (the keys and strings above need no escaping beyond quotes and backslashes).
class JsonWriter {
 public:
  void begin_object() { open('{'); }
  void end_object() { close('}'); }
  void begin_array() { open('['); }
  void end_array() { close(']'); }
  void key(std::string_view k) {
    comma();
    quoted(k);
    out_ += ':';
    after_key_ = true;
  }
  void value(int64_t v) { scalar(std::to_string(v)); }
  void value(uint64_t v) { scalar(std::to_string(v)); }
  void value(bool v) { scalar(v ? "true" : "false"); }
  void value(std::string_view v) {
    comma();
    quoted(v);
  }
  const std::string& str() const { return out_; }

 private:
  void comma() {
    if (after_key_) after_key_ = false;
    else if (!first_.empty() && !first_.back()) out_ += ',';
    if (!first_.empty()) first_.back() = false;
  }
  void open(char c) {
    comma();
    out_ += c;
    first_.push_back(true);
  }
  void close(char c) {
    out_ += c;
    first_.pop_back();
  }
  void scalar(const std::string& s) {
    comma();
    out_ += s;
  }
  void quoted(std::string_view s) {
    out_ += '"';
    for (char c : s) {
      if (c == '"' || c == '\\') out_ += '\\';
      out_ += c;
    }
    out_ += '"';
  }
  std::string out_;
  std::vector<bool> first_;  // per open container: nothing written in it yet
  bool after_key_ = false;
};

inline std::string stats_json(const Stats& s) {
  JsonWriter w;
  emit_stats(s, w);
  return w.str();
}

inline std::string snapshot_json(const std::vector<SegmentView>& segs) {
  JsonWriter w;
  emit_snapshot(segs, w);
  return w.str();
}

}  // namespace torchpool
