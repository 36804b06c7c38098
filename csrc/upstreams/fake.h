// A fake upstream for tests: hands out fake, never-touched addresses from a counter (the core only
// does arithmetic on addresses, so it cannot tell), with a capacity and injectable failures.
// Used by the conformance suite, the randomized invariant tests and the replay benchmark.
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
  explicit FakeUpstream(size_t capacity_bytes = SIZE_MAX, size_t granularity = 2u << 20)
      : capacity_(capacity_bytes), granularity_(granularity) {}

  void* map(size_t bytes, uint64_t /*stream*/) override {
    std::lock_guard<std::mutex> g(mu_);
    ++map_calls_;
    if (fail_next_ > 0) {
      --fail_next_;
      return nullptr;
    }
    if (bytes > capacity_ - mapped_) return nullptr;
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
  mutable std::mutex mu_;
  size_t capacity_;
  size_t granularity_;
  size_t mapped_ = 0;
  uintptr_t next_ = uintptr_t{1} << 40;
  int fail_next_ = 0;
  uint64_t map_calls_ = 0, unmap_calls_ = 0;
  std::set<std::pair<uintptr_t, size_t>> live_;
};

}  // namespace torchpool
