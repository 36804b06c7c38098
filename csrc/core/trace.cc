#include "trace.h"

#include <chrono>

namespace torchpool {

uint64_t monotonic_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

void TraceRing::start(size_t capacity) {
  std::lock_guard<std::mutex> g(mu_);
  ring_.assign(capacity ? capacity : 1, TraceEvent{});
  head_ = 0;
  written_ = 0;
  t0_ = monotonic_ns();
  enabled_.store(true, std::memory_order_release);
}

void TraceRing::record(TraceOp op, uint64_t addr, uint64_t size, uint64_t requested, uint64_t stream, int32_t device) {
  const uint64_t now = monotonic_ns();
  std::lock_guard<std::mutex> g(mu_);
  if (!enabled_.load(std::memory_order_relaxed)) return;
  TraceEvent& e = ring_[head_];
  e = TraceEvent{now - t0_, addr, size, requested, stream, device, op};
  head_ = (head_ + 1) % ring_.size();
  ++written_;
}

std::vector<TraceEvent> TraceRing::ordered_locked() const {
  std::vector<TraceEvent> out;
  if (ring_.empty()) return out;
  const size_t n = written_ < ring_.size() ? static_cast<size_t>(written_) : ring_.size();
  out.reserve(n);
  const size_t start = written_ < ring_.size() ? 0 : head_;
  for (size_t i = 0; i < n; ++i) out.push_back(ring_[(start + i) % ring_.size()]);
  return out;
}

std::vector<TraceEvent> TraceRing::stop() {
  std::lock_guard<std::mutex> g(mu_);
  enabled_.store(false, std::memory_order_release);
  return ordered_locked();
}

uint64_t TraceRing::dropped() const {
  std::lock_guard<std::mutex> g(mu_);
  return written_ > ring_.size() ? written_ - ring_.size() : 0;
}

}  // namespace torchpool
