// The staging pool: a bounded set of page-locked buffers that reads pass through on their way to
// their destination (a device, or owned CPU memory).
//
// Note [Staging overlap]
// ----------------------
// Rationale: a cold checkpoint comes in fastest with several preads in flight (1.68 GB/s with 8
// threads against 0.63 GB/s for one sequential read here), and a device copy wants page-locked
// source memory; file-mapping pages must never be pinned (the kernel would copy them).  Approach:
// the pool owns at most staging_bytes / chunk_bytes buffers, taken from an Upstream (host_pinned
// here, cuMemHostAlloc on CUDA machines) the first time they are needed and reused for every later
// chunk and call; nothing is allocated per tensor.  A reader that needs a buffer and finds none free
// maps one itself, outside the pool's lock, so a first load does not wait for all of them to be
// populated and locked one after another (measured: 30 ms of a 131 MB cold first tensor).  run() starts `readers` threads; each takes the
// next chunk of the work list, waits for a free buffer (counted in `waits`), preads into it and
// queues it; the calling thread takes filled buffers off the queue and hands each to the consumer
// (memcpy into the destination tensor for device="cpu", an H2D copy elsewhere), then returns the
// buffer.  So the disk reads chunk i+1..i+n while chunk i is copied, and the memory in flight is
// bounded by staging_bytes whatever the checkpoint size.  Limitation: on the CPU the extra memcpy
// costs ~1 s per 10 GB; CPU loads take this path only when asked (mode="read", or
// cold_cpu_path="read"), which is how it is tested without a device (Note [Choosing the read path]
// in python/torchpool/checkpoint/reader.py).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "../core/upstream.h"
#include "shard.h"

namespace torchpool::loader {

struct StagingStats {
  uint64_t bytes_staged = 0;   // bytes that went through a staging buffer
  uint64_t chunks = 0;         // buffer fills
  uint64_t waits = 0;          // times a reader found no free buffer and waited
  uint64_t reuses = 0;         // fills of a buffer that had been filled before
  uint64_t buffers = 0;        // buffers obtained from the upstream (never more than max_buffers)
  uint64_t buffer_bytes = 0;   // bytes of those buffers
  uint64_t max_buffers = 0;
  uint64_t chunk_bytes = 0;
  uint64_t runs = 0;
};

// One chunk handed to the consumer: `len` bytes that belong at dst + 0 (dst already offset).
struct StagedChunk {
  const ReadOp* op;
  uint64_t op_offset;  // offset of this chunk inside the op
  uint64_t len;
  const uint8_t* data;  // the staging buffer
};

class StagingPool {
 public:
  StagingPool(std::shared_ptr<Upstream> upstream, size_t staging_bytes, size_t chunk_bytes);
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  using Consumer = std::function<void(const StagedChunk&)>;
  // Note [Staging overlap]. Rethrows the first reader or consumer error after every thread stopped.
  // on_readers: the consumer is thread-safe and may run on the reader threads (the CPU memcpy): each
  // reader copies its own chunk out while the others read, so the copy is spread over the threads
  // instead of bounding the pipeline on one.  A device consumer runs on the calling thread only.
  void run(const std::vector<ReadOp>& ops, unsigned readers, const Consumer& consume, bool on_readers = false);
  // The consumer for CPU destinations: memcpy into op->dst.
  static void copy_to_dst(const StagedChunk& c);

  StagingStats stats() const;
  size_t chunk_bytes() const { return chunk_bytes_; }
  Upstream& upstream() { return *upstream_; }
  // Returns every buffer to the upstream (only between runs).
  void release_buffers();

 private:
  struct Buffer {
    uint8_t* ptr;
    bool used = false;
  };
  Buffer* acquire(const std::atomic<bool>& abort);  // nullptr when aborted or the upstream refused
  void give(Buffer* b);

  std::shared_ptr<Upstream> upstream_;
  size_t chunk_bytes_;
  size_t max_buffers_;
  std::mutex run_mu_;  // one run at a time per pool
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::unique_ptr<Buffer>> all_;
  std::vector<Buffer*> free_;
  size_t mapping_ = 0;         // buffers being mapped right now (outside mu_)
  bool map_refused_ = false;   // the upstream refused a buffer: no more until release_buffers()
  StagingStats stats_;
};

}  // namespace torchpool::loader
