// A fake upstream for tests: hands out fake, never-touched addresses from a counter (the core only
// does arithmetic on addresses, so it cannot tell), with a capacity and injectable failures.
// Used by the conformance suite, the randomized invariant tests and the replay benchmark.
// With reservation_bytes > 0 it is also an expandable upstream (Note [Expandable segments]): reserve()
// hands out fake address ranges and map_chunk / unmap_chunk keep a set of mapped chunks, so any
// double map, unmap of an unmapped chunk or chunk outside a reservation is caught (logic_error).
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>

#include "../core/upstream.h"

namespace torchpool {

class FakeUpstream final : public Upstream {
 public:
  explicit FakeUpstream(size_t capacity_bytes = SIZE_MAX, size_t granularity = 2u << 20, size_t reservation_bytes = 0)
      : capacity_(capacity_bytes), granularity_(granularity), reservation_(reservation_bytes) {}

  void* map(size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++map_calls_;
    if (fail_next_ > 0) {
      --fail_next_;
      return nullptr;
    }
    if (bytes > capacity_ - mapped_ || !fits(bytes)) return nullptr;
    const uintptr_t p = next_;
    next_ += bytes + granularity_;  // a gap, so that neighbouring segments are never contiguous
    mapped_ += bytes;
    live_.insert({p, bytes});
    return reinterpret_cast<void*>(p);
  }

  void unmap(void* ptr, size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++unmap_calls_;
    if (!live_.erase({reinterpret_cast<uintptr_t>(ptr), bytes}))
      throw std::logic_error("FakeUpstream: unmap of a range that was not mapped with that size");
    mapped_ -= bytes;
  }

  size_t granularity() const override { return granularity_; }
  const char* name() const override { return "fake"; }

  bool can_expand() const override { return reservation_ != 0; }
  size_t reservation_bytes() const override { return reservation_; }
  void* reserve(size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++map_calls_;
    if (bytes % granularity_) throw std::logic_error("FakeUpstream: reservation not a multiple of the granularity");
    if (!fits(bytes)) return nullptr;
    const uintptr_t p = next_;
    next_ += bytes + granularity_;
    reservations_.insert({p, bytes});
    return reinterpret_cast<void*>(p);
  }
  void unreserve(void* base, size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++unmap_calls_;
    const auto b = reinterpret_cast<uintptr_t>(base);
    if (!reservations_.erase({b, bytes})) throw std::logic_error("FakeUpstream: unreserve of an unknown reservation");
    auto it = chunks_.lower_bound(b);
    if (it != chunks_.end() && *it < b + bytes) throw std::logic_error("FakeUpstream: unreserve with chunks still mapped");
  }
  bool map_chunk(void* addr, size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++map_calls_;
    const auto a = reinterpret_cast<uintptr_t>(addr);
    check_chunk_range(a, bytes);
    if (fail_next_ > 0) {
      --fail_next_;
      return false;
    }
    if (bytes > capacity_ - mapped_) return false;
    for (uintptr_t c = a; c < a + bytes; c += granularity_)
      if (!chunks_.insert(c).second) throw std::logic_error("FakeUpstream: chunk mapped twice");
    mapped_ += bytes;
    return true;
  }
  void unmap_chunk(void* addr, size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++unmap_calls_;
    const auto a = reinterpret_cast<uintptr_t>(addr);
    check_chunk_range(a, bytes);
    for (uintptr_t c = a; c < a + bytes; c += granularity_)
      if (!chunks_.erase(c)) throw std::logic_error("FakeUpstream: unmap of a chunk that is not mapped");
    mapped_ -= bytes;
  }

  void fail_next(int n) {
    std::lock_guard<std::mutex> g(mu_);
    fail_next_ = n;
  }
  size_t mapped() const {
    std::lock_guard<std::mutex> g(mu_);
    return mapped_;
  }
  uint64_t map_calls() const {
    std::lock_guard<std::mutex> g(mu_);
    return map_calls_;
  }
  uint64_t unmap_calls() const {
    std::lock_guard<std::mutex> g(mu_);
    return unmap_calls_;
  }

 private:
  // Fake addresses stay below kTop (Note [Impossible sizes]): the counter never wraps, and so the
  // bytes mapped (and every gauge of the pool above) stay below 2^63.
  static constexpr uintptr_t kTop = uintptr_t{1} << 62;
  bool fits(size_t bytes) const { return next_ <= kTop && bytes <= kTop - next_ && granularity_ <= kTop - next_ - bytes; }

  void check_chunk_range(uintptr_t a, size_t bytes) const {
    if (bytes == 0 || a % granularity_ || bytes % granularity_) throw std::logic_error("FakeUpstream: chunk range not aligned");
    auto it = reservations_.upper_bound({a, SIZE_MAX});
    if (it == reservations_.begin()) throw std::logic_error("FakeUpstream: chunk outside every reservation");
    --it;
    if (a - it->first > it->second || bytes > it->second - (a - it->first)) throw std::logic_error("FakeUpstream: chunk outside every reservation");
  }

  mutable std::mutex mu_;
  size_t capacity_;
  size_t granularity_;
  size_t reservation_;
  std::set<std::pair<uintptr_t, size_t>> reservations_;
  std::set<uintptr_t> chunks_;
  size_t mapped_ = 0;
  uintptr_t next_ = uintptr_t{1} << 40;
  int fail_next_ = 0;
  uint64_t map_calls_ = 0, unmap_calls_ = 0;
  std::set<std::pair<uintptr_t, size_t>> live_;
};

}  // namespace torchpool
