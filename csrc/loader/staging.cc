#include "staging.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <thread>

namespace torchpool::loader {

StagingPool::StagingPool(std::shared_ptr<Upstream> upstream, size_t staging_bytes, size_t chunk_bytes)
    : upstream_(std::move(upstream)) {
  const size_t g = upstream_->granularity();
  if (chunk_bytes == 0) chunk_bytes = 8u << 20;
  if (staging_bytes < chunk_bytes) chunk_bytes = staging_bytes;
  chunk_bytes_ = std::max<size_t>(g, (chunk_bytes + g - 1) / g * g);
  max_buffers_ = std::max<size_t>(1, staging_bytes / chunk_bytes_);
  stats_.max_buffers = max_buffers_;
  stats_.chunk_bytes = chunk_bytes_;
}

StagingPool::~StagingPool() { release_buffers(); }

void StagingPool::release_buffers() {
  std::lock_guard<std::mutex> r(run_mu_);
  std::lock_guard<std::mutex> g(mu_);
  for (auto& b : all_) upstream_->unmap(b->ptr, chunk_bytes_, 0);
  all_.clear();
  free_.clear();
  map_refused_ = false;
}

StagingPool::Buffer* StagingPool::acquire(const std::atomic<bool>& abort) {
  // Buffers are mapped outside the lock, by the reader that needs one: the first readers of a run
  // map (populate + mlock) their buffers in parallel, and a reader whose buffer is ready starts
  // reading without waiting for the others' (Note [Staging overlap]).
  std::unique_lock<std::mutex> g(mu_);
  for (;;) {
    if (!free_.empty()) {
      Buffer* b = free_.back();
      free_.pop_back();
      if (b->used) stats_.reuses++;
      b->used = true;
      return b;
    }
    if (!map_refused_ && all_.size() + mapping_ < max_buffers_) {
      mapping_++;
      g.unlock();
      void* p = upstream_->map(chunk_bytes_, 0);
      g.lock();
      mapping_--;
      if (p != nullptr) {
        all_.push_back(std::make_unique<Buffer>(Buffer{static_cast<uint8_t*>(p)}));
        stats_.buffers++;
        stats_.buffer_bytes += chunk_bytes_;
        Buffer* b = all_.back().get();
        b->used = true;
        return b;
      }
      map_refused_ = true;  // the upstream is out: make do with the buffers there are
      cv_.notify_all();
      continue;
    }
    if (map_refused_ && all_.empty() && mapping_ == 0) return nullptr;  // not even one buffer
    stats_.waits++;
    cv_.wait(g, [&] {
      return !free_.empty() || abort.load() || (map_refused_ && all_.empty() && mapping_ == 0) ||
             (!map_refused_ && all_.size() + mapping_ < max_buffers_);
    });
    if (free_.empty() && abort.load()) return nullptr;
  }
}

void StagingPool::give(Buffer* b) {
  {
    std::lock_guard<std::mutex> g(mu_);
    free_.push_back(b);
  }
  cv_.notify_one();
}

void StagingPool::copy_to_dst(const StagedChunk& c) { std::memcpy(c.op->dst + c.op_offset, c.data, c.len); }

void StagingPool::run(const std::vector<ReadOp>& ops, unsigned readers, const Consumer& consume, bool on_readers) {
  std::lock_guard<std::mutex> r(run_mu_);
  struct Piece {
    const ReadOp* op;
    uint64_t off;
    uint64_t len;
  };
  std::vector<Piece> pieces;
  for (const ReadOp& op : ops)
    for (uint64_t o = 0; o < op.len; o += chunk_bytes_) pieces.push_back({&op, o, std::min<uint64_t>(chunk_bytes_, op.len - o)});
  {
    std::lock_guard<std::mutex> g(mu_);
    stats_.runs++;
  }
  if (pieces.empty()) return;
  readers = std::max(1u, std::min<unsigned>(readers, static_cast<unsigned>(pieces.size())));

  struct Filled {
    const Piece* piece;
    Buffer* buf;
  };
  std::mutex qmu;
  std::condition_variable qcv;
  std::deque<Filled> ready;
  std::atomic<size_t> next{0};
  std::atomic<bool> abort{false};
  std::atomic<unsigned> live_readers{readers};
  std::exception_ptr error;
  std::atomic<uint64_t> staged_on_readers{0}, consumed_on_readers{0};
  auto fail = [&](std::exception_ptr e) {
    std::lock_guard<std::mutex> g(qmu);
    if (!error) error = e;
    abort = true;
  };
  auto reader = [&] {
    static const std::string kNone;
    for (;;) {
      if (abort.load()) break;
      const size_t i = next.fetch_add(1);
      if (i >= pieces.size()) break;
      const Piece& p = pieces[i];
      Buffer* b = acquire(abort);
      if (b == nullptr) {
        if (!abort.load())
          fail(std::make_exception_ptr(CheckpointError(p.op->file->path(), p.op->tensor ? *p.op->tensor : kNone, kRuleIo,
                                                       "the staging upstream could not provide a buffer")));
        break;
      }
      try {
        p.op->file->pread_exact(b->ptr, p.len, p.op->offset + p.off, p.op->tensor ? *p.op->tensor : kNone);
      } catch (...) {
        give(b);
        fail(std::current_exception());
        break;
      }
      if (on_readers) {
        try {
          consume(StagedChunk{p.op, p.off, p.len, b->ptr});
        } catch (...) {
          give(b);
          fail(std::current_exception());
          break;
        }
        give(b);
        staged_on_readers.fetch_add(p.len, std::memory_order_relaxed);
        consumed_on_readers.fetch_add(1, std::memory_order_relaxed);
        continue;
      }
      {
        std::lock_guard<std::mutex> g(qmu);
        ready.push_back({&p, b});
      }
      qcv.notify_one();
    }
    {
      std::lock_guard<std::mutex> g(qmu);
      live_readers--;
    }
    qcv.notify_all();
    cv_.notify_all();  // readers blocked in acquire() see abort
  };

  std::vector<std::thread> threads;
  threads.reserve(readers);
  for (unsigned t = 0; t < readers; ++t) threads.emplace_back(reader);

  size_t consumed = 0;
  uint64_t staged = 0;
  for (;;) {
    Filled f;
    {
      std::unique_lock<std::mutex> g(qmu);
      qcv.wait(g, [&] { return !ready.empty() || live_readers.load() == 0; });
      if (ready.empty()) break;  // every reader finished (or failed) and nothing is left
      f = ready.front();
      ready.pop_front();
    }
    if (!abort.load()) {
      try {
        consume(StagedChunk{f.piece->op, f.piece->off, f.piece->len, f.buf->ptr});
        staged += f.piece->len;
        consumed++;
      } catch (...) {
        fail(std::current_exception());
        cv_.notify_all();
      }
    }
    give(f.buf);
  }
  for (auto& t : threads) t.join();
  {
    std::lock_guard<std::mutex> g(mu_);
    stats_.bytes_staged += staged + staged_on_readers.load();
    stats_.chunks += consumed + consumed_on_readers.load();
  }
  if (error) std::rethrow_exception(error);
}

StagingStats StagingPool::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  return stats_;
}

}  // namespace torchpool::loader
