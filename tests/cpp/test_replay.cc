// Replay engine: compiling traces into slots, the PyTorch-policy emulation's rules (each published
// constant), and the measures of a replay against torchpool and the emulation.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <vector>

#include "replay/pytorch_policy.h"
#include "replay/replay.h"

using namespace torchpool;
using namespace torchpool::replay;

namespace {

constexpr size_t MiB = 1u << 20;

TraceEvent ev(TraceOp op, uint64_t addr, uint64_t requested, uint64_t stream = 0) {
  TraceEvent e{};
  e.op = op;
  e.addr = addr;
  e.size = requested;
  e.requested = requested;
  e.stream = stream;
  return e;
}

}  // namespace

TEST_CASE("compile maps addresses to reused slots and drops frees it cannot match") {
  std::vector<TraceEvent> t = {
      ev(TraceOp::kAlloc, 0x1000, 100), ev(TraceOp::kAlloc, 0x2000, 300), ev(TraceOp::kFree, 0x1000, 100),
      ev(TraceOp::kFree, 0x9999, 5),  // allocated before recording started
      ev(TraceOp::kSegmentMap, 0x0, 2 * MiB), ev(TraceOp::kAlloc, 0x3000, 50),
      ev(TraceOp::kAlloc, 0x3000, 70),  // the free of 0x3000 was lost
  };
  CompiledTrace c = compile(t.data(), t.size());
  CHECK(c.allocs == 4);
  CHECK(c.frees == 2);  // 0x1000, and the implicit free of the first 0x3000
  CHECK(c.unmatched_frees == 1);
  CHECK(c.reused_live_addresses == 1);
  CHECK(c.ignored_events == 1);
  CHECK(c.num_slots == 2);  // the slot of 0x1000 is reused for 0x3000
  CHECK(c.peak_live_bytes == 400);
  CHECK(c.final_live_bytes == 370);
  CHECK(c.ops[3].slot == c.ops[2].slot);
}

TEST_CASE("pytorch policy: rounding, pools and segment sizes follow the published constants") {
  CHECK(PytorchPolicy::round_size(1) == 512);
  CHECK(PytorchPolicy::round_size(513) == 1024);
  CHECK(PytorchPolicy::allocation_size(MiB) == 2 * MiB);           // small pool: 2 MiB buffers
  CHECK(PytorchPolicy::allocation_size(MiB + 512) == 20 * MiB);    // 1..10 MiB: 20 MiB buffers
  CHECK(PytorchPolicy::allocation_size(10 * MiB) == 10 * MiB);     // >= 10 MiB: rounded to 2 MiB
  CHECK(PytorchPolicy::allocation_size(11 * MiB) == 12 * MiB);

  PytorchPolicy p;
  void* a = p.allocate(1000, 0);
  CHECK(p.block_size(a) == 1024);
  CHECK(p.reserved_bytes() == 2 * MiB);
  void* b = p.allocate(3 * MiB, 0);
  CHECK(p.reserved_bytes() == 22 * MiB);  // a 20 MiB buffer, split
  void* c = p.allocate(5 * MiB, 0);       // from the rest of the same buffer
  CHECK(p.reserved_bytes() == 22 * MiB);
  CHECK(p.upstream_calls() == 2);
  CHECK(p.check() == "");
  p.free(b);
  p.free(c);
  p.free(a);
  CHECK(p.check() == "");
  CHECK(p.allocated_bytes() == 0);
  CHECK(p.largest_free_block() == 20 * MiB);  // merged back into one block
}

TEST_CASE("pytorch policy: large blocks split only when more than 1 MiB would remain") {
  PytorchPolicy p;
  void* a = p.allocate(12 * MiB, 0);
  CHECK(p.reserved_bytes() == 12 * MiB);
  p.free(a);
  void* b = p.allocate(11 * MiB, 0);  // 1 MiB would remain: not > kSmallSize, the whole block is used
  CHECK(p.block_size(b) == 12 * MiB);
  CHECK(p.reserved_bytes() == 12 * MiB);
  p.free(b);
  void* c = p.allocate(10 * MiB, 0);  // 2 MiB remain: split
  CHECK(p.block_size(c) == 10 * MiB);
  CHECK(p.check() == "");
}

TEST_CASE("pytorch policy: max_split_size keeps small requests out of oversize blocks") {
  PytorchPolicyConfig cfg;
  cfg.max_split_size = 16 * MiB;
  PytorchPolicy p(cfg);
  void* a = p.allocate(40 * MiB, 0);
  p.free(a);
  void* b = p.allocate(12 * MiB, 0);  // below max_split_size: may not take the 40 MiB block
  CHECK(p.reserved_bytes() == 52 * MiB);
  void* c = p.allocate(30 * MiB, 0);  // >= max_split_size: 40 < 30 + 20, takes it unsplit
  CHECK(p.block_size(c) == 40 * MiB);
  CHECK(p.reserved_bytes() == 52 * MiB);
  p.free(b);
  p.free(c);
  CHECK(p.check() == "");
}

TEST_CASE("pytorch policy: streams never share free blocks") {
  PytorchPolicy p;
  void* a = p.allocate(4096, 1);
  p.free(a);
  p.allocate(4096, 2);
  CHECK(p.reserved_bytes() == 4 * MiB);
  CHECK(p.check() == "");
}

TEST_CASE("pytorch policy with expandable segments grows one segment by 20 MiB pages") {
  PytorchPolicyConfig cfg;
  cfg.expandable_segments = true;
  PytorchPolicy p(cfg);
  void* a = p.allocate(30 * MiB, 0);
  CHECK(p.reserved_bytes() == 40 * MiB);
  void* b = p.allocate(30 * MiB, 0);  // the free 10 MiB tail is extended by one page
  CHECK(p.reserved_bytes() == 60 * MiB);
  CHECK(reinterpret_cast<uintptr_t>(b) == reinterpret_cast<uintptr_t>(a) + 30 * MiB);
  CHECK(p.upstream_calls() == 3);
  p.free(a);
  void* c = p.allocate(25 * MiB, 0);  // fits the freed hole
  CHECK(c == a);
  CHECK(p.reserved_bytes() == 60 * MiB);
  CHECK(p.check() == "");
}

TEST_CASE("pytorch policy keeps its invariants under a random workload") {
  for (bool expandable : {false, true}) {
    PytorchPolicyConfig cfg;
    cfg.expandable_segments = expandable;
    PytorchPolicy p(cfg);
    std::mt19937_64 rng(expandable ? 7 : 3);
    std::vector<void*> live;
    for (int i = 0; i < 3000; ++i) {
      if (live.empty() || rng() % 3 != 0) {
        const size_t size = rng() % 4 == 0 ? 1 + rng() % (30 * MiB) : 1 + rng() % 200000;
        live.push_back(p.allocate(size, rng() % 2));
      } else {
        const size_t k = rng() % live.size();
        p.free(live[k]);
        live[k] = live.back();
        live.pop_back();
      }
      if (i % 50 == 0) REQUIRE(p.check() == "");
    }
    for (void* x : live) p.free(x);
    REQUIRE(p.check() == "");
    CHECK(p.allocated_bytes() == 0);
  }
}

TEST_CASE("measure: live bytes come from the trace, reserved and waste from the allocator") {
  std::vector<TraceEvent> t;
  uint64_t addr = 0x10000;
  std::vector<uint64_t> live;
  for (int step = 0; step < 20; ++step) {
    for (int k = 0; k < 10; ++k) {
      t.push_back(ev(TraceOp::kAlloc, addr, 1000 + 977 * k + 13 * step));
      live.push_back(addr);
      addr += 1u << 22;
    }
    t.push_back(ev(TraceOp::kAlloc, addr, (3 + step % 5) * MiB));
    live.push_back(addr);
    addr += 1u << 24;
    for (uint64_t a : live) t.push_back(ev(TraceOp::kFree, a, 0));
    live.clear();
  }
  CompiledTrace c = compile(t.data(), t.size());
  for (const char* name : {"torchpool", "torchpool-bestfit", "pytorch", "pytorch-expandable"}) {
    CAPTURE(name);
    const AllocatorInfo* a = find_allocator(name);
    REQUIRE(a != nullptr);
    MeasureOptions o;
    o.timeline_points = 10;
    Result r = measure(*a, c, o);
    CHECK(r.peak_live_bytes == c.peak_live_bytes);
    CHECK(r.peak_reserved_bytes >= r.peak_live_bytes);
    CHECK(r.internal_waste_bytes >= 0);
    CHECK(r.allocs == c.allocs);
    CHECK(r.ooms == 0);
    CHECK(r.upstream_calls > 0);
    CHECK(!std::isnan(r.external_fragmentation));
    CHECK(r.external_fragmentation >= 0.0);
    CHECK(r.external_fragmentation <= 1.0);
    CHECK(r.timeline.size() >= 10);
    CHECK(time_ops(*a, c, 1) > 0.0);
  }
  // The emulation's 20 MiB buffer for 3..7 MiB requests is visible in its reserved bytes.
  Result pt = measure(*find_allocator("pytorch"), c);
  CHECK(pt.peak_reserved_bytes >= 22 * MiB);
}

TEST_CASE("measure can stop at an op and hand the allocator over for a snapshot") {
  std::vector<TraceEvent> t = {ev(TraceOp::kAlloc, 1, 5 * MiB), ev(TraceOp::kAlloc, 2, 100), ev(TraceOp::kFree, 1, 0)};
  CompiledTrace c = compile(t.data(), t.size());
  MeasureOptions o;
  o.stop_after_op = 1;
  std::unique_ptr<Adapter> keep;
  Result r = measure(*find_allocator("pytorch"), c, o, &keep);
  CHECK(r.ops == 2);
  auto segs = keep->snapshot();
  REQUIRE(segs.size() == 2);
  size_t allocated = 0;
  for (const auto& s : segs)
    for (const auto& b : s.blocks)
      if (b.state == Block::kAllocated) allocated += b.size;
  CHECK(allocated == 5 * MiB + 512);
}

TEST_CASE("unknown allocators are not found; system allocators say why they are unavailable") {
  CHECK(find_allocator("no-such-allocator") == nullptr);
  const AllocatorInfo* g = find_allocator("glibc");
  REQUIRE(g != nullptr);
#if !defined(__SANITIZE_ADDRESS__)
  CHECK(g->available);  // the process's own malloc is always there
#endif
  for (const auto& a : allocators())
    if (!a.available) CHECK(!a.unavailable_reason.empty());
}

TEST_CASE("compile refuses sizes the replay cannot honour (Note [Replay input bounds])") {
  for (uint64_t size : {UINT64_MAX, UINT64_MAX - 99, uint64_t{1} << 62, kMaxReplayAllocBytes + 1}) {
    std::vector<TraceEvent> t = {ev(TraceOp::kAlloc, 0x1000, size), ev(TraceOp::kFree, 0x1000, size)};
    CHECK_THROWS_AS(compile(t.data(), t.size()), ReplayInputError);
  }
  // Live bytes and the total are checked sums: five 1-TiB blocks pass the per-block bound, not the live one.
  std::vector<TraceEvent> t;
  for (uint64_t i = 0; i < 5; ++i) t.push_back(ev(TraceOp::kAlloc, 0x1000 * (i + 1), kMaxReplayAllocBytes));
  try {
    compile(t.data(), t.size());
    FAIL("no error");
  } catch (const ReplayInputError& e) {
    CHECK(std::string(e.what()).find("record 4") != std::string::npos);
  }
  // Allocating and freeing 1 TiB over and over: the total is bounded too.
  t.clear();
  for (uint64_t i = 0; i < (kMaxReplayTotalBytes / kMaxReplayAllocBytes) + 1; ++i) {
    t.push_back(ev(TraceOp::kAlloc, 0x1000, kMaxReplayAllocBytes));
    t.push_back(ev(TraceOp::kFree, 0x1000, kMaxReplayAllocBytes));
  }
  CHECK_THROWS_AS(compile(t.data(), t.size()), ReplayInputError);
  // The largest block replays on fake addresses with exact numbers.
  std::vector<TraceEvent> ok = {ev(TraceOp::kAlloc, 0x1000, kMaxReplayAllocBytes), ev(TraceOp::kAlloc, 0x2000, 4096),
                                ev(TraceOp::kFree, 0x1000, kMaxReplayAllocBytes)};
  CompiledTrace c = compile(ok.data(), ok.size());
  CHECK(c.peak_live_bytes == kMaxReplayAllocBytes + 4096);
  for (const char* name : {"torchpool", "torchpool-segments", "pytorch", "pytorch-expandable"}) {
    Result r = measure(*find_allocator(name), c);
    CHECK(r.peak_live_bytes == kMaxReplayAllocBytes + 4096);
    CHECK(r.peak_reserved_bytes >= r.peak_live_bytes);
    CHECK(r.ooms == 0);
  }
}

TEST_CASE("system allocators refuse traces past max_system_bytes") {
  std::vector<TraceEvent> t = {ev(TraceOp::kAlloc, 0x1000, 3 * MiB), ev(TraceOp::kFree, 0x1000, 3 * MiB)};
  CompiledTrace c = compile(t.data(), t.size());
  AllocatorInfo sys{"fake-system", "system", "", true, "", nullptr};
  CHECK_THROWS_AS(check_system_limit(sys, c, MiB), ReplayLimitError);
  CHECK_NOTHROW(check_system_limit(sys, c, 4 * MiB));
  AllocatorInfo tp{"torchpool", "torchpool", "", true, "", nullptr};
  CHECK_NOTHROW(check_system_limit(tp, c, MiB));  // fake addresses: nothing written
}
