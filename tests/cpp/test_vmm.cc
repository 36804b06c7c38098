// Expandable segments on the host VMM upstream (Note [Expandable segments], Note [Host VMM]) and
// stream-ordered reuse with a scripted StreamEvents (Note [Stream ordering]), with the is_valid()
// walk after every step (TORCHPOOL_DEBUG=2 in CI).
#include <doctest/doctest.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "core/limiting_upstream.h"
#include "upstreams/host_vmm.h"

using namespace torchpool;

namespace {
constexpr size_t MiB = 1u << 20;

// 2 MiB chunks (CUDA's VMM granularity) so that the byte counts below read in whole MiB; the
// default 512 KiB chunk has its own case at the end.
std::shared_ptr<HostVmmUpstream> vmm(size_t chunk = 2 * MiB) {
  HostVmmOptions o;
  o.chunk_bytes = chunk;
  o.reservation_bytes = 256 * MiB;
  return std::make_shared<HostVmmUpstream>(o);
}

// Events complete when the test says so.
class ScriptedEvents final : public StreamEvents {
 public:
  Event record(uint64_t stream) override {
    std::lock_guard<std::mutex> g(mu_);
    events_[++next_] = {stream, false};
    return next_;
  }
  bool done(Event e) override {
    std::lock_guard<std::mutex> g(mu_);
    return events_.at(e).second;
  }
  void wait(Event e) override {  // the stream's work up to e runs to completion
    std::lock_guard<std::mutex> g(mu_);
    ++waits_;
    events_.at(e).second = true;
  }
  int waits() const {
    std::lock_guard<std::mutex> g(mu_);
    return waits_;
  }
  void destroy(Event e) override {
    std::lock_guard<std::mutex> g(mu_);
    events_.erase(e);
  }
  void synchronize(uint64_t stream) override { complete(stream); }
  void complete(uint64_t stream) {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& [id, ev] : events_)
      if (ev.first == stream) ev.second = true;
  }
  size_t live() const {
    std::lock_guard<std::mutex> g(mu_);
    return events_.size();
  }

 private:
  mutable std::mutex mu_;
  Event next_ = 0;
  int waits_ = 0;
  std::map<Event, std::pair<uint64_t, bool>> events_;
};
}  // namespace

TEST_CASE("host_vmm: a large request grows the segment in place and the new chunk merges with the free tail") {
  auto up = vmm();
  CachingAllocator a(up, {});
  void* p = a.allocate(10 * MiB);
  void* q = a.allocate(6 * MiB);
  CHECK(reinterpret_cast<uintptr_t>(q) == reinterpret_cast<uintptr_t>(p) + 10 * MiB);  // same reservation
  CHECK(a.stats().segment.current == 1);
  a.free(q);                         // free tail of 6 MiB
  void* r = a.allocate(9 * MiB);     // grows by 4 MiB (rounded to 2 MiB chunks), not by 9 MiB
  CHECK(r == q);
  CHECK(a.stats().reserved_bytes.current == static_cast<int64_t>(20 * MiB));
  CHECK(up->mapped_bytes() == 20 * MiB);
  CHECK(a.stats().num_chunk_maps == 3);
  std::memset(r, 0x5a, 9 * MiB);     // the memory is real
  std::memset(p, 0x11, 10 * MiB);
  CHECK(static_cast<unsigned char*>(r)[9 * MiB - 1] == 0x5a);
  a.free(p);
  a.free(r);
  CHECK(a.check() == "");
  CHECK(a.stats().inactive_split_bytes.current == 0);  // everything coalesced into one block
  CHECK(a.empty_cache() == 20 * MiB);
  CHECK(up->mapped_bytes() == 0);
  CHECK(up->reserved_bytes() == 0);
}

TEST_CASE("host_vmm: empty_cache unmaps whole free chunks at the tail and keeps live data") {
  auto up = vmm();
  CachingAllocator a(up, {});
  auto* p = static_cast<unsigned char*>(a.allocate(5 * MiB));
  void* q = a.allocate(12 * MiB);
  std::memset(p, 7, 5 * MiB);
  a.free(q);
  CHECK(a.stats().reserved_bytes.current == static_cast<int64_t>(18 * MiB));
  const size_t released = a.empty_cache();
  CHECK(released == 12 * MiB);  // the chunk holding p's last MiB stays
  CHECK(a.stats().reserved_bytes.current == static_cast<int64_t>(6 * MiB));
  CHECK(up->mapped_bytes() == 6 * MiB);
  CHECK(a.stats().num_chunk_unmaps == 1);
  CHECK(p[5 * MiB - 1] == 7);
  void* r = a.allocate(3 * MiB);  // grows again at the tail, merging the 1 MiB free remainder
  CHECK(reinterpret_cast<uintptr_t>(r) == reinterpret_cast<uintptr_t>(p) + 5 * MiB);
  a.free(r);
  a.free(p);
  CHECK(a.check() == "");
}

TEST_CASE("host_vmm: the map limit gives out-of-memory, and the retry's tail release makes room") {
  // The limit is an adaptor around the upstream (Note [Limiting upstream]), not an option of host_vmm.
  auto up = vmm();
  CachingAllocator a(std::make_shared<LimitingUpstream>(up, 24 * MiB), {});
  void* p = a.allocate(8 * MiB);
  void* q = a.allocate(12 * MiB);
  a.free(q);
  void* r = a.allocate(4 * MiB);  // carved from the free tail: no new memory
  CHECK(up->mapped_bytes() == 20 * MiB);
  CHECK_THROWS_AS(a.allocate(20 * MiB), OutOfMemory);
  CHECK(a.stats().num_ooms == 1);
  a.free(r);
  void* s = a.allocate(16 * MiB);  // grows the free 12 MiB tail by 4 MiB, up to the limit
  CHECK(s != nullptr);
  CHECK(a.stats().num_alloc_retries == 1);
  CHECK(up->mapped_bytes() <= 24 * MiB);
  a.free(s);
  a.free(p);
  CHECK(a.check() == "");
}

TEST_CASE("host_vmm: max_cached_bytes shrinks the tail on free") {
  auto up = vmm();
  AllocatorConfig cfg;
  cfg.pool.max_cached_bytes = 2 * MiB;
  CachingAllocator a(up, cfg);
  void* p = a.allocate(4 * MiB);
  void* q = a.allocate(16 * MiB);
  a.free(q);
  CHECK(a.stats().reserved_bytes.current == static_cast<int64_t>(4 * MiB));
  a.free(p);  // the whole segment is free and over the limit: it is unreserved
  CHECK(up->reserved_bytes() == 0);
  CHECK(a.check() == "");
}

TEST_CASE("host_vmm: random workload keeps every invariant and returns every byte") {
  auto up = vmm();
  CachingAllocator a(up, {});
  std::mt19937_64 rng(11);
  std::vector<std::pair<unsigned char*, size_t>> live;
  for (int i = 0; i < 1500; ++i) {
    if (live.empty() || rng() % 100 < 55) {
      const size_t n = rng() % 4 ? 1 + rng() % 8192 : MiB + rng() % (12 * MiB);
      auto* p = static_cast<unsigned char*>(a.allocate(n));
      p[0] = p[n - 1] = 0xab;
      live.push_back({p, n});
    } else {
      const size_t k = rng() % live.size();
      CHECK(live[k].first[live[k].second - 1] == 0xab);
      a.free(live[k].first);
      live[k] = live.back();
      live.pop_back();
    }
    if (i % 100 == 0) a.empty_cache();
  }
  for (auto& [p, n] : live) a.free(p);
  CHECK(a.check() == "");
  a.empty_cache();
  CHECK(a.stats().reserved_bytes.current == 0);
  CHECK(up->mapped_bytes() == 0);
}

TEST_CASE("stream ordering: a block used on another stream is reused only after its event completes") {
  auto events = std::make_shared<ScriptedEvents>();
  CachingAllocator a(vmm(), {}, events);
  constexpr uint64_t s1 = 1, s2 = 2;
  void* p = a.allocate(3 * MiB, s1);
  CHECK(a.record_stream(p, s2));
  CHECK(a.record_stream(p, s1));  // its own stream: nothing to wait for
  a.free(p);
  auto st = a.stats();
  CHECK(st.allocated_bytes.current == 0);
  CHECK(st.active_bytes.current == static_cast<int64_t>(3 * MiB));  // active, not allocated
  CHECK(st.num_deferred_frees == 1);
  CHECK(events->live() == 1);
  void* q = a.allocate(3 * MiB, s1);
  CHECK(q != p);  // s2 may still use p
  CHECK(a.empty_cache() == 0);  // neither p's chunks nor q's can go
  CHECK(a.check() == "");
  events->complete(s2);
  a.free(q);
  void* r = a.allocate(3 * MiB, s1);
  CHECK(r == p);  // released by the poll in allocate(): reused on the stream that allocated it
  CHECK(events->live() == 0);
  CHECK(a.stats().active_bytes.current == static_cast<int64_t>(3 * MiB));
  a.free(r);
  CHECK(a.check() == "");
  CHECK(a.empty_cache() > 0);
  CHECK(a.stats().reserved_bytes.current == 0);
}

TEST_CASE("stream ordering: blocks are reused only on their own stream") {
  auto events = std::make_shared<ScriptedEvents>();
  CachingAllocator a(std::make_shared<HostVmmUpstream>(HostVmmOptions{false}), {}, events);
  void* p = a.allocate(1000, 1);
  a.free(p);
  void* q = a.allocate(1000, 2);
  CHECK(q != p);
  void* r = a.allocate(1000, 1);
  CHECK(r == p);
  a.free(q);
  a.free(r);
  CHECK(a.check() == "");
}

TEST_CASE("stream ordering: small blocks wait too, empty_cache keeps their segment, host allocators refuse") {
  auto events = std::make_shared<ScriptedEvents>();
  CachingAllocator a(vmm(), {}, events);
  void* p = a.allocate(4096, 5);
  a.record_stream(p, 6);
  a.free(p);
  CHECK(a.empty_cache() == 0);
  CHECK(a.stats().segment.current == 1);
  CHECK(a.process_events() == 1);
  events->complete(6);
  CHECK(a.process_events() == 0);
  CHECK(a.empty_cache() == 2 * MiB);
  CHECK(a.check() == "");
  CachingAllocator host(vmm(), {});
  void* h = host.allocate(64);
  CHECK_FALSE(host.record_stream(h, 3));
  host.free(h);
}

TEST_CASE("stream ordering: random cross-stream use on expandable segments keeps every invariant") {
  auto events = std::make_shared<ScriptedEvents>();
  auto up = vmm();
  CachingAllocator a(up, {}, events);
  std::mt19937_64 rng(5);
  std::vector<void*> live;
  for (int i = 0; i < 1200; ++i) {
    const int op = static_cast<int>(rng() % 100);
    if (live.empty() || op < 50) {
      const size_t n = rng() % 3 ? 1 + rng() % 8192 : MiB + rng() % (6 * MiB);
      void* p = a.allocate(n, 1 + rng() % 3);
      if (rng() % 3 == 0) a.record_stream(p, 1 + rng() % 3);
      live.push_back(p);
    } else if (op < 90) {
      const size_t k = rng() % live.size();
      a.free(live[k]);
      live[k] = live.back();
      live.pop_back();
    } else if (op < 97) {
      events->complete(1 + rng() % 3);
    } else {
      a.empty_cache();
    }
    REQUIRE(a.check() == "");
  }
  for (void* p : live) a.free(p);
  for (uint64_t s = 1; s <= 3; ++s) events->complete(s);
  CHECK(a.process_events() == 0);
  CHECK(events->live() == 0);
  const auto st = a.stats();
  CHECK(st.active.current == 0);
  CHECK(st.active_bytes.current == 0);
  a.empty_cache();
  CHECK(up->mapped_bytes() == 0);
  CHECK(a.check() == "");
}

TEST_CASE("stream ordering: threads free recorded blocks while another completes events") {
  auto events = std::make_shared<ScriptedEvents>();
  AllocatorConfig cfg;
  cfg.arenas = 3;
  CachingAllocator a(vmm(), cfg, events);
  std::atomic<bool> stop{false};
  std::thread completer([&] {
    uint64_t s = 0;
    while (!stop.load()) events->complete(10 + (s++ % 4));
  });
  std::vector<std::thread> ts;
  for (int t = 0; t < 3; ++t)
    ts.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      std::vector<void*> mine;
      for (int i = 0; i < 3000; ++i) {
        if (mine.size() < 32 || rng() % 2) {
          void* p = a.allocate(1 + rng() % ((rng() % 20) ? 16384 : (3u << 20)), 10 + t);
          if (rng() % 4 == 0) a.record_stream(p, 10 + rng() % 4);
          mine.push_back(p);
        } else {
          const size_t k = rng() % mine.size();
          a.free(mine[k]);
          mine[k] = mine.back();
          mine.pop_back();
        }
      }
      for (void* p : mine) a.free(p);
    });
  for (auto& t : ts) t.join();
  stop = true;
  completer.join();
  for (uint64_t s = 10; s < 14; ++s) events->complete(s);
  CHECK(a.process_events() == 0);
  CHECK(a.check() == "");
  CHECK(a.stats().active.current == 0);
  CHECK(a.stats().num_deferred_frees > 0);
}

TEST_CASE("stream ordering: the out-of-memory retry waits for pending events instead of failing") {
  auto events = std::make_shared<ScriptedEvents>();
  AllocatorConfig cfg;
  cfg.max_bytes = 16 * MiB;
  CachingAllocator a(vmm(), cfg, events);
  void* p = a.allocate(12 * MiB, 1);
  a.record_stream(p, 2);
  a.free(p);                         // deferred: s2 may still use it
  void* q = a.allocate(12 * MiB, 1);  // only fits in p's memory: the retry waits for s2's event
  CHECK(q == p);
  CHECK(events->waits() == 1);
  CHECK(a.stats().num_alloc_retries == 1);
  CHECK(a.stats().num_ooms == 0);
  CHECK(events->live() == 0);
  a.free(q);
  CHECK(a.check() == "");
}

TEST_CASE("host_vmm: the default 512 KiB chunks return memory at that unit, anywhere in the range") {
  auto up = vmm(512 << 10);
  CachingAllocator a(up, {});
  auto* x = static_cast<char*>(a.allocate(3 * MiB));
  auto* y = static_cast<char*>(a.allocate(3 * MiB));
  auto* z = static_cast<char*>(a.allocate(1 * MiB + 1000));
  std::memset(x, 1, 3 * MiB);
  std::memset(y, 2, 3 * MiB);
  std::memset(z, 3, MiB + 1000);
  CHECK(up->mapped_bytes() == 7 * MiB + 512 * 1024);  // 3 + 3 + 1.5 (z rounded to the chunk)
  a.free(y);
  a.empty_cache();  // the hole between x and z goes back whole
  CHECK(up->mapped_bytes() == 4 * MiB + 512 * 1024);
  CHECK(x[3 * MiB - 1] == 1);
  CHECK(z[0] == 3);
  CHECK(a.check() == "");
  a.free(x);
  a.free(z);
  a.empty_cache();
  CHECK(up->mapped_bytes() == 0);
}
