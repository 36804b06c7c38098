// Replay: run a recorded allocation trace against an allocator and measure its memory and speed.
//
//   CompiledTrace  the trace's alloc/free events turned into slot operations (compile())
//   Adapter        one allocator behind a common interface: torchpool (any PoolConfig, on fake
//                  addresses), the PyTorch-policy emulation (pytorch_policy.h), system allocators
//                  loaded with dlopen (system.h)
//   registry       named allocators: "torchpool" (the CPU default), "torchpool-cuda", ..., "pytorch",
//                  "pytorch-expandable", "glibc", "jemalloc", "tcmalloc", "mimalloc"
//   measure()      one pass that records the memory measures; time_ops() passes that only time
//
// No torch, no Python: the bindings (csrc/bindings/replay.cc) and torchpool.replay drive it.
//
// Note [Replay slots]
// -------------------
// Rationale: a trace names blocks by the address the recording allocator gave them; the replayed
// allocator gives other addresses.  Looking addresses up in a hash map while timing would charge
// every allocator for the replay's own bookkeeping.  Approach: compile() maps each live address to
// a small integer slot once (slots are reused after a free, so the slot array stays as small as the
// peak number of live blocks); replay then indexes an array.  Limitation: frees of addresses that
// were allocated before recording started have no slot and are dropped (counted in
// unmatched_frees); an alloc at an address that is still live (a lost free) frees the old slot first
// (counted in reused_live_addresses).
//
// Note [Measures]
// ---------------
//   peak_live_bytes         max over time of the bytes the program asked for and still holds.
//                           A property of the trace: the same for every allocator.
//   peak_reserved_bytes     max over time of the memory the allocator holds from its upstream
//                           (segments for torchpool and the PyTorch emulation; the allocator's own
//                           statistics for system allocators, sampled, see system.h).
//   utilization             peak_live / peak_reserved.
//   internal_waste_bytes    at the moment of peak reserved: Σ (block size - requested) of live blocks.
//   external_fragmentation  at the moment of peak reserved: 1 - largest free block / free bytes,
//                           free = reserved - allocated (0 when nothing is free; unknown for system
//                           allocators, which do not expose their free lists).
//   upstream_calls          segment maps + unmaps (cudaMalloc/cudaFree or page maps for the
//                           emulation); unknown (-1) for system allocators.
//   ops_per_s               (allocs + frees) / seconds of the fastest timed pass, which does nothing
//                           but the allocator calls.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../core/options.h"
#include "../core/pool.h"
#include "../core/trace.h"

namespace torchpool::replay {

// Note [Replay input bounds]
// ---------------------------
// Rationale: a trace is a file; sizes near 2^64 wrapped the live-byte sums (utilization 8.8e12) and
// overflowed the allocators' rounding, and a 145-byte trace made the glibc replay write 2.3 GB.
// Approach: compile() checks every size where it enters, with checked arithmetic: a block of at
// most kMaxReplayAllocBytes (1 TiB, more than any device or host holds in one tensor), live bytes
// at most kMaxReplayLiveBytes, the sum of every allocation at most kMaxReplayTotalBytes (the fake
// upstreams' address counters never wrap), at most kMaxReplayStreams distinct streams (the
// emulation reserves a range per stream) and fewer than 2^32 slots; anything else is a
// ReplayInputError naming the record and the field.  Replays that write real memory (system
// allocators: Note [Measuring system allocators]) are refused when the trace's peak live bytes
// exceed MeasureOptions::max_system_bytes (ReplayLimitError naming the limit); torchpool modes
// and the emulation run on fake addresses and write nothing.
constexpr uint64_t kMaxReplayAllocBytes = uint64_t{1} << 40;
constexpr uint64_t kMaxReplayLiveBytes = uint64_t{1} << 42;
constexpr uint64_t kMaxReplayTotalBytes = uint64_t{1} << 60;
constexpr uint64_t kMaxReplayStreams = 1u << 16;
constexpr uint64_t kDefaultMaxSystemBytes = uint64_t{2} << 30;

// A trace the replay refuses (Note [Replay input bounds]); the message names record and field.
struct ReplayInputError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// A replay that would exceed a limit (Note [Replay input bounds]); the message names the limit.
struct ReplayLimitError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Op {
  uint64_t size;    // bytes requested (alloc) / the matching alloc's request (free)
  uint64_t stream;
  uint32_t slot;
  uint8_t is_free;
};

struct CompiledTrace {
  std::vector<Op> ops;
  uint32_t num_slots = 0;
  uint64_t allocs = 0, frees = 0;
  uint64_t unmatched_frees = 0;        // Note [Replay slots]
  uint64_t reused_live_addresses = 0;
  uint64_t ignored_events = 0;         // segment map/unmap, oom: not replayed
  uint64_t peak_live_bytes = 0;
  uint64_t peak_live_op = 0;           // op index where the peak is first reached
  uint64_t final_live_bytes = 0;
};

// Events in recording order. Alloc uses `requested` (or `size` when requested is 0).
// Throws ReplayInputError for what Note [Replay input bounds] refuses.
CompiledTrace compile(const TraceEvent* events, size_t n);

class Adapter {
 public:
  virtual ~Adapter() = default;
  // nullptr when the allocator refuses (out of memory).
  virtual void* allocate(size_t bytes, uint64_t stream) = 0;
  virtual void deallocate(void* p, size_t bytes, uint64_t stream) = 0;
  // Bytes the allocator set aside for the live block p (>= what was asked).
  virtual size_t block_size(void* p) = 0;
  // Bytes held from the upstream now.
  virtual size_t reserved_bytes() = 0;
  // false: reserved_bytes() is costly and measure() samples it (Note [Sampling] in system.h).
  virtual bool reserved_is_cheap() const { return true; }
  // -1: not observable.
  virtual int64_t largest_free_block() { return -1; }
  virtual int64_t upstream_calls() { return -1; }
  // Segments and blocks now (empty when not observable).
  virtual std::vector<SegmentView> snapshot() { return {}; }
  // Return what the allocator caches to the system (between runs of system allocators).
  virtual void release() {}
};

using AdapterFactory = std::function<std::unique_ptr<Adapter>()>;

struct AllocatorInfo {
  std::string name;
  std::string kind;         // "torchpool", "emulation", "system"
  std::string description;
  bool available = true;
  std::string unavailable_reason;
  AdapterFactory make;
};

// Every named allocator, the unavailable ones (a system allocator that is not installed) included
// with the reason. Built once.
const std::vector<AllocatorInfo>& allocators();
const AllocatorInfo* find_allocator(const std::string& name);

// torchpool's modes as named configurations (Note [Replay modes], replay.cc); a new mode is one more
// entry there.
struct TorchpoolMode {
  std::string name;
  std::string description;
  Device device;
  OptionValues options;  // the schema's values (core/options.h)
};
const std::vector<TorchpoolMode>& torchpool_modes();
const TorchpoolMode* find_torchpool_mode(const std::string& name);
std::unique_ptr<Adapter> make_torchpool_adapter(const TorchpoolMode& mode);

struct Sample {
  uint64_t op;
  uint64_t live;      // requested bytes held
  uint64_t reserved;  // last known reserved bytes
};

struct Result {
  std::string allocator;
  uint64_t ops = 0, allocs = 0, frees = 0, ooms = 0;
  uint64_t peak_live_bytes = 0;
  uint64_t peak_reserved_bytes = 0;
  uint64_t peak_reserved_op = 0;
  int64_t internal_waste_bytes = 0;
  double external_fragmentation = NAN;  // NAN: unknown
  int64_t upstream_calls = -1;
  uint64_t reserved_samples = 0;        // how often reserved_bytes() was read
  double measure_seconds = 0;
  std::vector<Sample> timeline;
};

struct MeasureOptions {
  size_t timeline_points = 0;   // about this many samples of (live, reserved); 0: none
  uint64_t stop_after_op = UINT64_MAX;  // stop after this op (snapshot at a moment), keep blocks live
  size_t sample_every = 64;     // Note [Sampling] in system.h: for allocators with costly stats
  size_t sample_bytes = 256u << 10;
  // System allocators write every page they hand out: refuse traces whose peak live bytes exceed this
  // (Note [Replay input bounds]).
  uint64_t max_system_bytes = kDefaultMaxSystemBytes;
};

// One measured pass on a fresh adapter. If `keep` is given it receives the adapter after the pass
// (with its live blocks) so that the caller can take a snapshot.
Result measure(const AllocatorInfo& alloc, const CompiledTrace& trace, const MeasureOptions& opt = {},
               std::unique_ptr<Adapter>* keep = nullptr);

// Seconds of the fastest of `repeats` timed passes (each on a fresh adapter, every live block freed
// after the pass and not timed).
double time_ops(const AllocatorInfo& alloc, const CompiledTrace& trace, int repeats,
                uint64_t max_system_bytes = kDefaultMaxSystemBytes);

// Throws ReplayLimitError when `alloc` writes real memory and the trace's peak live bytes exceed the limit.
void check_system_limit(const AllocatorInfo& alloc, const CompiledTrace& trace, uint64_t max_system_bytes);

}  // namespace torchpool::replay
