#include "replay.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <unordered_map>

#include "../core/allocator.h"
#include "../upstreams/fake.h"
#include "pytorch_policy.h"
#include "system.h"

namespace torchpool::replay {

// ---- compile: Note [Replay slots] -----------------------------------------------------------------

namespace {

std::string record_error(size_t i, const char* field, uint64_t value, const std::string& why) {
  return "record " + std::to_string(i) + ": field '" + field + "' is " + std::to_string(value) + ": " + why +
         " (Note [Replay input bounds])";
}

}  // namespace

CompiledTrace compile(const TraceEvent* events, size_t n) {
  CompiledTrace t;
  t.ops.reserve(n);
  std::unordered_map<uint64_t, std::pair<uint32_t, uint64_t>> live;  // addr -> (slot, size)
  live.reserve(1024);
  std::unordered_map<uint64_t, char> streams;
  std::vector<uint32_t> spare;
  uint64_t live_bytes = 0, total_bytes = 0;
  auto emit_free = [&](uint32_t slot, uint64_t size, uint64_t stream) {
    t.ops.push_back({size, stream, slot, 1});
    spare.push_back(slot);
    live_bytes -= size;  // size was added when the slot was allocated: no underflow
    ++t.frees;
  };
  for (size_t i = 0; i < n; ++i) {
    const TraceEvent& e = events[i];
    if (e.op == TraceOp::kAlloc) {
      const uint64_t size = e.requested ? e.requested : e.size;
      if (size == 0) {
        ++t.ignored_events;
        continue;
      }
      if (size > kMaxReplayAllocBytes)
        throw ReplayInputError(record_error(i, e.requested ? "requested" : "size", size,
                                            "an allocation of more than 1 TiB (" + std::to_string(kMaxReplayAllocBytes) + ")"));
      if (streams.size() < kMaxReplayStreams) streams.emplace(e.stream, 0);
      else if (!streams.count(e.stream))
        throw ReplayInputError(record_error(i, "stream", e.stream,
                                            "more than " + std::to_string(kMaxReplayStreams) + " distinct streams"));
      if (auto it = live.find(e.addr); it != live.end()) {
        ++t.reused_live_addresses;
        emit_free(it->second.first, it->second.second, e.stream);
        live.erase(it);
      }
      uint64_t new_live = 0, new_total = 0;
      if (__builtin_add_overflow(live_bytes, size, &new_live) || new_live > kMaxReplayLiveBytes)
        throw ReplayInputError(record_error(i, "size", size, "live bytes would exceed " + std::to_string(kMaxReplayLiveBytes)));
      if (__builtin_add_overflow(total_bytes, size, &new_total) || new_total > kMaxReplayTotalBytes)
        throw ReplayInputError(record_error(i, "size", size, "the trace would allocate more than " +
                                                                 std::to_string(kMaxReplayTotalBytes) + " bytes in all"));
      uint32_t slot;
      if (!spare.empty()) {
        slot = spare.back();
        spare.pop_back();
      } else {
        if (t.num_slots == UINT32_MAX)
          throw ReplayInputError("record " + std::to_string(i) + ": more than 2^32 - 1 blocks live at once");
        slot = t.num_slots++;
      }
      live.emplace(e.addr, std::make_pair(slot, size));
      t.ops.push_back({size, e.stream, slot, 0});
      ++t.allocs;
      live_bytes = new_live;
      total_bytes = new_total;
      if (live_bytes > t.peak_live_bytes) {
        t.peak_live_bytes = live_bytes;
        t.peak_live_op = t.ops.size() - 1;
      }
    } else if (e.op == TraceOp::kFree) {
      auto it = live.find(e.addr);
      if (it == live.end()) {
        ++t.unmatched_frees;
        continue;
      }
      emit_free(it->second.first, it->second.second, e.stream);
      live.erase(it);
    } else {
      ++t.ignored_events;
    }
  }
  t.final_live_bytes = live_bytes;
  return t;
}

// ---- adapters ---------------------------------------------------------------------------------

namespace {

class TorchpoolAdapter final : public Adapter {
 public:
  TorchpoolAdapter(std::shared_ptr<FakeUpstream> upstream, AllocatorConfig config)
      : upstream_(std::move(upstream)), alloc_(upstream_, std::move(config)) {}
  void* allocate(size_t bytes, uint64_t stream) override {
    try {
      return alloc_.allocate(bytes, stream);
    } catch (const OutOfMemory&) {
      return nullptr;
    }
  }
  void deallocate(void* p, size_t, uint64_t) override { alloc_.free(p); }
  size_t block_size(void* p) override { return alloc_.block_size(p).first; }
  size_t reserved_bytes() override { return upstream_->mapped(); }
  int64_t largest_free_block() override { return alloc_.stats().largest_free_block; }
  int64_t upstream_calls() override { return static_cast<int64_t>(upstream_->map_calls() + upstream_->unmap_calls()); }
  std::vector<SegmentView> snapshot() override { return alloc_.snapshot(); }

 private:
  std::shared_ptr<FakeUpstream> upstream_;
  CachingAllocator alloc_;
};

class PytorchAdapter final : public Adapter {
 public:
  explicit PytorchAdapter(PytorchPolicyConfig c) : p_(c) {}
  void* allocate(size_t bytes, uint64_t stream) override { return p_.allocate(bytes, stream); }
  void deallocate(void* p, size_t, uint64_t) override { p_.free(p); }
  size_t block_size(void* p) override { return p_.block_size(p); }
  size_t reserved_bytes() override { return p_.reserved_bytes(); }
  int64_t largest_free_block() override { return static_cast<int64_t>(p_.largest_free_block()); }
  int64_t upstream_calls() override { return static_cast<int64_t>(p_.upstream_calls()); }
  std::vector<SegmentView> snapshot() override { return p_.snapshot(); }

 private:
  PytorchPolicy p_;
};

}  // namespace

// Note [Replay modes]
// -------------------
// A torchpool mode is a device's defaults from the option schema (default_options, core/options.h:
// the same function _C.Allocator starts from, so "torchpool" is exactly what install() builds on the
// CPU, and "torchpool-cuda" what the CUDA library builds) with at most a few options changed, named
// for what they change.  The allocator config comes from allocator_config() as everywhere; only the
// upstream is a fake one (no memory is touched) with the real one's geometry: CPU expandable
// segments map chunk_bytes at a time, CUDA VMM and one-mapping-per-segment round to 2 MiB, and a
// reservation of 0 (the machine's memory) is 1 TiB.
std::unique_ptr<Adapter> make_torchpool_adapter(const TorchpoolMode& mode) {
  const OptionValues& o = mode.options;
  const bool cpu_chunks = mode.device == Device::kCpu && o.expandable_segments;
  const size_t granularity = cpu_chunks ? o.chunk_bytes : size_t{2} << 20;
  const size_t reservation = !o.expandable_segments ? 0 : o.reserve_bytes ? o.reserve_bytes : size_t{1} << 40;
  AllocatorConfig c = allocator_config(o, mode.device);
  c.device_name = "replay";
  return std::make_unique<TorchpoolAdapter>(std::make_shared<FakeUpstream>(SIZE_MAX, granularity, reservation), std::move(c));
}

const std::vector<TorchpoolMode>& torchpool_modes() {
  static const std::vector<TorchpoolMode> modes = [] {
    std::vector<TorchpoolMode> m;
    const OptionValues cpu = default_options(Device::kCpu), cuda = default_options(Device::kCuda);
    m.push_back({"torchpool", "the CPU default, exactly what torchpool.install() builds: expandable segments with 512 KiB chunks",
                 Device::kCpu, cpu});
    OptionValues v = cpu;
    v.chunk_bytes = 2u << 20;
    m.push_back({"torchpool-chunks-2m", "the CPU default with chunk_bytes=2 MiB (CUDA's VMM granularity)", Device::kCpu, v});
    v = cpu;
    v.expandable_segments = false;
    m.push_back({"torchpool-segments", "the CPU default with expandable_segments=0: one mapping per 2 MiB-rounded segment",
                 Device::kCpu, v});
    v.max_reserved_ratio = 0;
    m.push_back({"torchpool-segments-no-target",
                 "expandable_segments=0 and max_reserved_ratio=0: keeps every segment it mapped (torchpool before the "
                 "reserve target)", Device::kCpu, v});
    v = cpu;
    v.thread_cache = !cpu.thread_cache;  // Note [Thread caches]: the CPU default with the other choice
    m.push_back({cpu.thread_cache ? "torchpool-no-thread-cache" : "torchpool-thread-cache",
                 cpu.thread_cache ? "the CPU default with thread_cache=0: every request takes its arena's lock"
                                  : "the CPU default with thread_cache=1: per-thread caches of size-class blocks",
                 Device::kCpu, v});
    v = cpu;
    v.size_classes = false;
    m.push_back({"torchpool-bestfit", "the CPU default with size_classes=0: best fit for every size", Device::kCpu, v});
    m.push_back({"torchpool-cuda", "the CUDA default: 512 B alignment, one cuMemAlloc per 2 MiB-rounded segment, one arena",
                 Device::kCuda, cuda});
    v = cuda;
    v.expandable_segments = true;
    m.push_back({"torchpool-cuda-expandable", "the CUDA default with expandable_segments=1 (VMM, 2 MiB chunks)", Device::kCuda, v});
    return m;
  }();
  return modes;
}

const TorchpoolMode* find_torchpool_mode(const std::string& name) {
  for (const TorchpoolMode& m : torchpool_modes())
    if (m.name == name) return &m;
  return nullptr;
}

const std::vector<AllocatorInfo>& allocators() {
  static const std::vector<AllocatorInfo> all = [] {
    std::vector<AllocatorInfo> v;
    for (const TorchpoolMode& m : torchpool_modes())
      v.push_back({m.name, "torchpool", m.description, true, "", [&m] { return make_torchpool_adapter(m); }});
    PytorchPolicyConfig pt;
    v.push_back({"pytorch", "emulation", "emulation of PyTorch's CUDACachingAllocator policy (defaults)", true, "",
                 [pt] { return std::unique_ptr<Adapter>(new PytorchAdapter(pt)); }});
    PytorchPolicyConfig pte;
    pte.expandable_segments = true;
    v.push_back({"pytorch-expandable", "emulation", "emulation of PyTorch's policy with expandable_segments:True", true, "",
                 [pte] { return std::unique_ptr<Adapter>(new PytorchAdapter(pte)); }});
    for (const char* name : {"glibc", "jemalloc", "tcmalloc", "mimalloc"}) {
      std::string why;
      AdapterFactory f = system_allocator(name, &why);
      v.push_back({name, "system", std::string(name) + " through its own API (Note [System allocators by dlopen])",
                   static_cast<bool>(f), why, f});
    }
    return v;
  }();
  return all;
}

const AllocatorInfo* find_allocator(const std::string& name) {
  for (const auto& a : allocators())
    if (a.name == name) return &a;
  return nullptr;
}

// ---- measure / time ---------------------------------------------------------------------------

namespace {

void require(const AllocatorInfo& alloc) {
  if (!alloc.available || !alloc.make)
    throw std::runtime_error("allocator '" + alloc.name + "' is not available: " + alloc.unavailable_reason);
}

}  // namespace

void check_system_limit(const AllocatorInfo& alloc, const CompiledTrace& trace, uint64_t max_system_bytes) {
  if (alloc.kind == "system" && trace.peak_live_bytes > max_system_bytes)
    throw ReplayLimitError("replaying this trace against " + alloc.name + " would write " +
                           std::to_string(trace.peak_live_bytes) + " bytes of real memory (its peak live bytes), more than "
                           "the limit max_replay_bytes=" + std::to_string(max_system_bytes) +
                           " (Note [Replay input bounds]); if you mean it, raise it: torchpool.replay.replay(..., "
                           "max_replay_bytes=N) or `torchpool bench fragmentation --max-replay-bytes N`");
}

Result measure(const AllocatorInfo& alloc, const CompiledTrace& trace, const MeasureOptions& opt,
               std::unique_ptr<Adapter>* keep) {
  require(alloc);
  check_system_limit(alloc, trace, opt.max_system_bytes);
  std::unique_ptr<Adapter> a = alloc.make();
  Result r;
  r.allocator = alloc.name;
  std::vector<void*> ptr(trace.num_slots, nullptr);
  std::vector<size_t> block(trace.num_slots, 0);
  const bool cheap = a->reserved_is_cheap();
  const size_t stride = opt.timeline_points ? std::max<size_t>(1, trace.ops.size() / opt.timeline_points) : 0;
  uint64_t live = 0, allocated = 0, reserved = 0;
  const auto t0 = std::chrono::steady_clock::now();
  const size_t n = std::min<uint64_t>(trace.ops.size(), opt.stop_after_op == UINT64_MAX ? UINT64_MAX : opt.stop_after_op + 1);
  for (size_t i = 0; i < n; ++i) {
    const Op& op = trace.ops[i];
    bool sample = cheap;
    if (!op.is_free) {
      void* p = a->allocate(op.size, op.stream);
      ++r.allocs;
      if (!p) {
        ++r.ooms;
        ptr[op.slot] = nullptr;
        block[op.slot] = 0;
      } else {
        const size_t b = a->block_size(p);
        ptr[op.slot] = p;
        block[op.slot] = b;
        live += op.size;
        allocated += b;
        if (live > r.peak_live_bytes) r.peak_live_bytes = live;
      }
      if (op.size >= opt.sample_bytes) sample = true;
    } else {
      ++r.frees;
      if (void* p = ptr[op.slot]) {
        a->deallocate(p, op.size, op.stream);
        live -= op.size;
        allocated -= block[op.slot];
        ptr[op.slot] = nullptr;
      }
    }
    if (!sample && opt.sample_every && i % opt.sample_every == 0) sample = true;
    if (sample || i + 1 == n) {
      reserved = a->reserved_bytes();
      ++r.reserved_samples;
      if (reserved > r.peak_reserved_bytes) {  // a new peak: the "at the peak" measures are taken here
        r.peak_reserved_bytes = reserved;
        r.peak_reserved_op = i;
        r.internal_waste_bytes = static_cast<int64_t>(allocated) - static_cast<int64_t>(live);
        const int64_t lfb = a->largest_free_block();
        const int64_t free_bytes = static_cast<int64_t>(reserved) - static_cast<int64_t>(allocated);
        if (lfb < 0) r.external_fragmentation = NAN;
        else r.external_fragmentation = free_bytes > 0 ? 1.0 - static_cast<double>(lfb) / static_cast<double>(free_bytes) : 0.0;
      }
    }
    if (stride && (i % stride == 0 || i + 1 == n)) r.timeline.push_back({i, live, reserved});
  }
  r.measure_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.ops = n;
  r.upstream_calls = a->upstream_calls();
  if (keep) {
    *keep = std::move(a);
    return r;
  }
  for (size_t s = 0; s < ptr.size(); ++s)
    if (ptr[s]) a->deallocate(ptr[s], 0, 0);
  a->release();
  return r;
}

double time_ops(const AllocatorInfo& alloc, const CompiledTrace& trace, int repeats, uint64_t max_system_bytes) {
  require(alloc);
  check_system_limit(alloc, trace, max_system_bytes);
  double best = 1e300;
  std::vector<void*> ptr(trace.num_slots, nullptr);
  for (int rep = 0; rep < std::max(1, repeats); ++rep) {
    std::unique_ptr<Adapter> a = alloc.make();
    std::fill(ptr.begin(), ptr.end(), nullptr);
    const Op* ops = trace.ops.data();
    const size_t n = trace.ops.size();
    Adapter* ad = a.get();
    const auto t0 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < n; ++i) {
      const Op& op = ops[i];
      if (!op.is_free) {
        ptr[op.slot] = ad->allocate(op.size, op.stream);
      } else if (void* p = ptr[op.slot]) {
        ad->deallocate(p, op.size, op.stream);
        ptr[op.slot] = nullptr;
      }
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    for (void* p : ptr)
      if (p) ad->deallocate(p, 0, 0);
    ad->release();
  }
  return best;
}

}  // namespace torchpool::replay
