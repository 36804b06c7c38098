// Published counters: a small shared-memory page per process that `torchpool top` reads.
//
// Note [Published counters]
// -------------------------
// Rationale: `torchpool top` shows every process using torchpool, like nvidia-smi, without asking
// the processes anything and without slowing their allocations.
// Approach: while publishing, a background thread copies the installed CPU allocator's counters
// every `interval_ms` into a 16 KiB file mapped MAP_SHARED: `<dir>/<pid>` where dir is a per-user
// directory (default /dev/shm/torchpool-<uid>, mode 0700, files 0600: another user's processes are
// visible only to that user and root).  The allocation path does no work for it: the thread calls
// CachingAllocator::stats() (each arena's lock, briefly) like any reader would.
// The page is a seqlock: the writer makes `seq` odd, writes the body, makes it even; a reader
// retries while seq is odd or changed under it.  Layout (little-endian):
//     0  char[8] magic "TPPAGE1\0"     8  u64 seq          16 u64 pid
//    24  u64 start time (field 22 of /proc/<pid>/stat: tells a reused pid from the writer)
//    32  u64 last update, ns since the epoch                40 u32 body length   44 u32 version (1)
//    64  body: UTF-8 lines "key=value"; "device=<name>" starts a device, the keys after it are that
//        device's memory_stats() counters (allocated_bytes.all.current, num_ooms, ...).
// A process that exits normally removes its page; pages of dead processes (no such pid, or a pid
// whose start time differs) are removed by readers and by the next process that starts publishing.
// fork: the child must not write its parent's page.  pthread_atfork holds the publisher's lock
// across fork (so the child never inherits an arena lock the publisher held), and the child drops
// the inherited mapping; Python's os.register_at_fork then starts the child's own page
// (python/torchpool/cli/top.py).
#pragma once

#include <cstdint>
#include <string>

namespace torchpool::torch_glue {

constexpr size_t kPublishPageBytes = 16384;
constexpr size_t kPublishHeaderBytes = 64;

// Starts publishing into `dir` (created 0700 if missing; refused unless owned by this user and not
// writable by others).  Returns "" on success, else why not.  Idempotent.
std::string publish_start(const std::string& dir, int interval_ms);
void publish_stop(bool remove_page = true);
bool publishing();
std::string publish_path();
void publish_now();  // writes the page at once (tests, and before a short-lived process exits)

}  // namespace torchpool::torch_glue
