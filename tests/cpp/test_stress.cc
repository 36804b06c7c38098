// Multi-thread stress of the allocator and the Router (Note [Retired allocators], Note [Router grace
// periods]): allocate, free from other threads, stats, snapshot, check, empty_cache, trace recording,
// install / uninstall cycles.  CI runs it under ThreadSanitizer (scripts/ci/tsan.sh) as well as
// ASan/UBSan; TORCHPOOL_STRESS_SCALE multiplies the work.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "core/router.h"
#include "upstreams/fake.h"
#include "upstreams/host_vmm.h"

using namespace torchpool;

namespace {

int scale() {
  const char* s = std::getenv("TORCHPOOL_STRESS_SCALE");
  return s ? std::max(1, std::atoi(s)) : 1;
}

std::shared_ptr<CachingAllocator> make(unsigned arenas, bool host, bool tcache = false) {
  AllocatorConfig c;
  c.arenas = arenas;
  c.thread_cache = tcache;
  std::shared_ptr<Upstream> up;
  if (host) {
    HostVmmOptions o;
    o.reservation_bytes = size_t{1} << 30;
    up = std::make_shared<HostVmmUpstream>(o);
  } else {
    up = std::make_shared<FakeUpstream>(SIZE_MAX, 2u << 20, size_t{1} << 32);
  }
  return std::make_shared<CachingAllocator>(up, c);
}

// A shared bag of live pointers, so that frees happen on other threads than the allocations.
struct Bag {
  std::mutex mu;
  std::vector<void*> ptrs;
  void put(void* p) {
    std::lock_guard<std::mutex> g(mu);
    ptrs.push_back(p);
  }
  void* take(std::mt19937_64& rng) {
    std::lock_guard<std::mutex> g(mu);
    if (ptrs.empty()) return nullptr;
    const size_t i = rng() % ptrs.size();
    void* p = ptrs[i];
    ptrs[i] = ptrs.back();
    ptrs.pop_back();
    return p;
  }
};

size_t random_size(std::mt19937_64& rng) {
  const int k = rng() % 10;
  return k < 6 ? 1 + rng() % 4096 : k < 9 ? 1 + rng() % (256u << 10) : (1u << 20) + rng() % (4u << 20);
}

}  // namespace

TEST_CASE("stress: one allocator, every entry point from several threads") {
  for (bool host : {false, true})
  for (bool tcache : {false, true}) {  // Note [Thread caches]
    CAPTURE(host);
    CAPTURE(tcache);
    auto a = make(2, host, tcache);
    Bag bag;
    std::atomic<bool> stop{false};
    std::atomic<int> violations{0};
    const int steps = 4000 * scale();
    std::vector<std::thread> workers;
    for (int t = 0; t < 3; ++t) {
      workers.emplace_back([&, t] {
        std::mt19937_64 rng(t + 1);
        for (int i = 0; i < steps; ++i) {
          if (rng() % 2) {
            void* p = a->allocate(random_size(rng));
            if (host) static_cast<char*>(p)[0] = 1;
            bag.put(p);
          } else if (void* p = bag.take(rng)) {
            CHECK(a->free(p));
          }
        }
      });
    }
    std::thread observer([&] {  // stats, snapshot, check, empty_cache, peaks, trace
      int i = 0;
      while (!stop.load()) {
        (void)a->stats();
        (void)a->snapshot();
        if (!a->check().empty()) violations++;
        if (i % 7 == 0) a->empty_cache();
        if (i % 5 == 0) a->reset_peaks();
        if (i % 11 == 0) a->trace().start(1024);
        if (i % 11 == 6) (void)a->trace().stop();
        ++i;
      }
    });
    for (auto& w : workers) w.join();
    stop = true;
    observer.join();
    std::mt19937_64 rng(99);
    while (void* p = bag.take(rng)) CHECK(a->free(p));
    CHECK(violations.load() == 0);  // check() is a consistent view while others allocate
    CHECK(a->check() == "");
    CHECK(a->stats().allocated_bytes.current == 0);
  }
}

TEST_CASE("stress: router install / uninstall cycles while threads allocate and free through it") {
  Router r;
  Bag bag;
  std::atomic<bool> stop{false};
  std::atomic<int> lost{0};
  std::vector<std::thread> workers;
  for (int t = 0; t < 2; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(t + 7);
      while (!stop.load()) {
        if (rng() % 2) {
          Router::Section s(r);
          if (CachingAllocator* a = r.current()) bag.put(a->allocate(random_size(rng)));
        } else if (void* p = bag.take(rng)) {
          Router::Section s(r);
          if (!r.free(p)) lost++;
        }
      }
    });
  }
  std::thread observer([&] {
    while (!stop.load()) {
      (void)r.stats();
      for (auto& a : r.allocators()) CHECK(a->check() == "");
    }
  });
  const int cycles = 150 * scale();
  for (int i = 0; i < cycles; ++i) {
    r.install(make(1 + i % 2, true, i % 4 < 2));  // real addresses: fake upstreams of two allocators overlap
    std::this_thread::yield();
    if (i % 3 == 0) r.uninstall();
  }
  stop = true;
  for (auto& w : workers) w.join();
  observer.join();
  std::mt19937_64 rng(5);
  while (void* p = bag.take(rng)) {
    Router::Section s(r);
    if (!r.free(p)) lost++;
  }
  CHECK(lost.load() == 0);  // every pointer found its allocator, retired or not
  r.uninstall();
  CHECK(r.allocators().empty());  // no block left: every retired allocator was freed
  CHECK(r.live_blocks() == 0);
  CHECK(r.retired_freed() >= static_cast<size_t>(cycles) - 1);
  const Stats s = r.stats();  // departed allocators keep the counters going
  CHECK(s.allocated_bytes.current == 0);
  CHECK(s.reserved_bytes.current == 0);
  CHECK(s.allocation.allocated == s.allocation.freed);
}

TEST_CASE("router: a retired allocator owning blocks keeps routing, and is freed with its memory after") {
  Router r;
  auto first = make(1, true);
  auto* up = dynamic_cast<HostVmmUpstream*>(&first->upstream());
  r.install(first);
  void* p;
  {
    Router::Section s(r);
    p = r.current()->allocate(64u << 20);
  }
  std::weak_ptr<CachingAllocator> w = first;
  first.reset();
  for (int i = 0; i < 100; ++i) {  // 100 cycles: never "too many", never more than two held
    r.install(make(1, true));
    r.uninstall();
    CHECK(r.allocators().size() == 1);  // the retired one with the live block
  }
  CHECK(up->mapped_bytes() >= (64u << 20));
  {
    Router::Section s(r);
    CHECK(r.free(p) != nullptr);
  }
  CHECK(up->mapped_bytes() == 0);  // the last block of a retired allocator gave its memory back at once
  r.uninstall();  // the sweep frees it
  CHECK(w.expired());
  CHECK(r.allocators().empty());
  CHECK(r.stats().allocation.allocated == 1);  // counters survive the allocator
}

TEST_CASE("router: more than kSlots allocators owning blocks is a clear error, not a crash") {
  Router r;
  std::vector<std::pair<std::shared_ptr<CachingAllocator>, void*>> held;
  bool refused = false;
  for (size_t i = 0; i <= Router::kSlots; ++i) {
    auto a = make(1, true);
    try {
      r.install(a);
    } catch (const std::runtime_error& e) {
      refused = true;
      CHECK(std::string(e.what()).find("still own live tensors") != std::string::npos);
      break;
    }
    held.emplace_back(a, a->allocate(100));
  }
  CHECK(refused);
  for (auto& [a, p] : held) {
    Router::Section s(r);
    CHECK(r.free(p) == a.get());
  }
  r.uninstall();
  CHECK(r.allocators().empty());
}

TEST_CASE("fork: a child forked while threads allocate can allocate (Note [Fork])") {
  for (bool tcache : {false, true}) {
  CAPTURE(tcache);
  auto a = make(2, true, tcache);
  std::atomic<bool> stop{false};
  std::vector<std::thread> workers;
  for (int t = 0; t < 2; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(t + 3);
      while (!stop.load()) {
        void* ps[8];
        for (void*& p : ps) p = a->allocate(random_size(rng));
        (void)a->stats();
        for (void* p : ps) a->free(p);
      }
    });
  }
  int hangs = 0, failures = 0;
  for (int i = 0; i < 40 * scale(); ++i) {
    const pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      void* p = a->allocate(12345);
      static_cast<char*>(p)[0] = 1;
      a->free(p);
      const std::string err = a->check();
      if (!err.empty()) std::fprintf(stderr, "child check: %s\n", err.c_str());
      _exit(err.empty() ? 0 : 3);
    }
    int status = 0;
    bool done = false;
    for (int waited = 0; waited < 2000 && !done; ++waited) {  // 10 s
      done = waitpid(pid, &status, WNOHANG) == pid;
      if (!done) usleep(5000);
    }
    if (!done) {
      ++hangs;
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
    } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      ++failures;
      std::fprintf(stderr, "child status %d\n", status);
    }
  }
  stop = true;
  for (auto& w : workers) w.join();
  CHECK(hangs == 0);
  CHECK(failures == 0);
  }
}
