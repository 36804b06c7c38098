// Allocation trace: a bounded ring of allocator events, recorded only while enabled.
//
// The ring keeps the newest `capacity` events; older ones are overwritten and counted in dropped().
// Recording costs one relaxed atomic load per operation while disabled.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <vector>

namespace torchpool {

enum class TraceOp : uint8_t { kAlloc = 0, kFree = 1, kSegmentMap = 2, kSegmentUnmap = 3, kOom = 4 };

struct TraceEvent {
  uint64_t time_ns;   // steady clock, from the start of recording
  uint64_t addr;
  uint64_t size;      // block size for alloc/free, segment size for map/unmap, request for oom
  uint64_t requested; // bytes asked for (alloc/free), 0 otherwise
  uint64_t stream;
  int32_t device;
  TraceOp op;
  uint8_t pad[3] = {};
};
static_assert(sizeof(TraceEvent) == 48, "TraceEvent is a fixed 48-byte record");

class TraceRing {
 public:
  void start(size_t capacity);
  // Stops recording and returns the events in order (oldest first).
  std::vector<TraceEvent> stop();
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  void record(TraceOp op, uint64_t addr, uint64_t size, uint64_t requested, uint64_t stream, int32_t device);
  uint64_t dropped() const;
  // Note [Fork]: the ring's lock, taken last by CachingAllocator::lock_all.
  void lock() const { mu_.lock(); }
  void unlock() const { mu_.unlock(); }

 private:
  std::vector<TraceEvent> ordered_locked() const;
  std::atomic<bool> enabled_{false};
  mutable std::mutex mu_;
  std::vector<TraceEvent> ring_;
  size_t head_ = 0;      // next slot to write
  uint64_t written_ = 0;
  uint64_t t0_ = 0;
};

uint64_t monotonic_ns();

}  // namespace torchpool
