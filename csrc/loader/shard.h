// One safetensors file, opened read-only: its validated header, a private mapping of the whole file,
// and the file descriptor for pread.  Reads are counted (bytes_read) so that callers can show how much
// of a checkpoint a process actually read, e.g. one tensor-parallel rank.
//
// Note [Mapping protection]
// -------------------------
// The file is opened O_RDONLY, so no write through any path can reach it.  The mapping is
// MAP_PRIVATE | MAP_NORESERVE with PROT_READ | PROT_WRITE: zero-copy tensors handed to torch cannot be
// marked read-only in torch, and with PROT_READ alone an in-place op on such a tensor would kill the
// process with SIGSEGV.  With a private writable mapping, a write copies the touched page into
// anonymous memory of this process (copy-on-write), exactly as safetensors' own mapping behaves: the
// tensor changes, the checkpoint never does, and other views of the same page in other processes do
// not see it.  Limitation: if another process truncates the file while it is mapped, touching a
// page past the new end raises SIGBUS, as with every mmap-based reader (Note [SIGBUS message] in
// sigbus.h: a message names the file and tensor before the process dies); pread paths report
// read-short, and populate_ranges too while a load runs.
#pragma once

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "safetensors.h"

namespace torchpool::loader {

class ShardFile {
 public:
  // Opens, validates the header (throws CheckpointError), maps.
  explicit ShardFile(const std::string& path);
  ~ShardFile();
  ShardFile(const ShardFile&) = delete;
  ShardFile& operator=(const ShardFile&) = delete;

  const Header& header() const { return header_; }
  const std::string& path() const { return header_.path; }
  int fd() const { return fd_; }
  uint8_t* map_base() const { return base_; }
  uint64_t map_len() const { return header_.file_size; }
  // The tensor whose data holds absolute file offset `off`, or null (header, past the data, or an
  // empty tensor). Async-signal-safe: reads only memory fixed at construction.
  const TensorEntry* tensor_at(uint64_t off) const;
  // Absolute file offset of a tensor's data.
  uint64_t file_offset(const TensorEntry& e) const { return header_.data_start + e.begin; }

  // Fraction of the pages of [offset, offset + len) (absolute file offsets) in the page cache.
  double resident_fraction(uint64_t offset, uint64_t len) const;
  // madvise(WILLNEED) on a range: the kernel starts reading it in the background.
  void prefetch(uint64_t offset, uint64_t len) const;
  // madvise(DONTNEED) on a range of the mapping: drops this process's page-table entries (RSS), the
  // page cache keeps the data.
  void drop_mapped(uint64_t offset, uint64_t len) const;
  // Faults a range of the mapping in (MADV_POPULATE_READ, or touching one byte per page), with
  // `threads` threads over pieces of 8 MiB so that a cold range comes in with several reads in flight
  // (populate_ranges over one range, prefetching it first).
  void populate(uint64_t offset, uint64_t len, unsigned threads) const;

  // pread of exactly len bytes, counted. Throws CheckpointError (read-short / io-error).
  void pread_exact(uint8_t* dst, uint64_t len, uint64_t offset, const std::string& tensor) const;

  uint64_t bytes_read() const { return bytes_read_.load(std::memory_order_relaxed); }
  uint64_t preads() const { return preads_.load(std::memory_order_relaxed); }
  void reset_counters() { bytes_read_ = 0; preads_ = 0; }

 private:
  int fd_ = -1;
  uint8_t* base_ = nullptr;
  Header header_;
  std::vector<uint32_t> by_offset_;  // positions in header_.tensors of the non-empty tensors, by begin
  mutable std::atomic<uint64_t> bytes_read_{0}, preads_{0};
};

// One contiguous read: len bytes at file offset `offset` of `file` into `dst`.
struct ReadOp {
  const ShardFile* file;
  uint64_t offset;
  uint64_t len;
  uint8_t* dst;
  const std::string* tensor;  // for error messages; may be null
};

// Note [Cold mapping]
// -------------------
// Rationale: measured here (2 GB, 4 shards, cold, 2 shared cores), what bounds a cold CPU load is not
// the disk but the CPU: every 4 KiB page of fresh anonymous destination memory is faulted and zeroed
// (0.43-0.58 s per GB on one core in this VM, more than the copy), and huge pages are worse here
// (0.16-2.3 s per GB: the balloon hands freed 2 MiB blocks back to the host, which faults them in again).
// Page-cache pages are filled by the disk and never zeroed, and a private mapping of them needs only
// page-table entries.  Approach: populate_ranges() first asks the kernel to read every piece
// (posix_fadvise WILLNEED, which queues large asynchronous reads, issued by `threads` threads so the
// queue stays full), then the same threads fault the pieces into the mapping (MADV_POPULATE_READ)
// as they arrive.  The tensors are zero-copy views (Note [Mapping protection]).  Measured: 1.05-1.29 s
// for 2 GB against 1.29-1.90 s for pread straight into owned memory and 1.38-2.31 s staged.
// Limitation: the data is file-backed page cache mapped into this process (as with the safetensors
// package): counted in RSS as file pages, reclaimable, and shared with other readers of the file.
// Errors: a range the file no longer covers is reported as read-short with the tensor and offset,
// never a SIGBUS, when the kernel has MADV_POPULATE_READ (5.14+).
void populate_ranges(const std::vector<ReadOp>& ops, unsigned threads, bool prefetch, size_t chunk_bytes = 8u << 20);

// Reads every op with `threads` threads, each op split into pieces of at most chunk_bytes; the first
// error is rethrown after every thread has stopped.
void parallel_pread(const std::vector<ReadOp>& ops, unsigned threads, size_t chunk_bytes = 8u << 20);

// The contiguous byte runs of a slice [start_d, stop_d) per dimension of a C-contiguous tensor of
// `shape` with elem_bytes per element starting at file offset `base`; dst offsets follow in order.
struct Run {
  uint64_t offset;
  uint64_t len;
  uint64_t dst_offset;
};
std::vector<Run> slice_runs(const std::vector<uint64_t>& shape, size_t elem_bytes, uint64_t base,
                            const std::vector<uint64_t>& start, const std::vector<uint64_t>& stop);

}  // namespace torchpool::loader
