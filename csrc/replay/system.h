// System allocators for replay: glibc (the process's malloc) and jemalloc, tcmalloc, mimalloc loaded
// with dlopen when their shared libraries are installed.
//
// Note [System allocators by dlopen]
// ----------------------------------
// Rationale: comparing against the allocators people LD_PRELOAD needs them in this process without
// replacing the process's malloc.  Approach: each library is opened RTLD_LOCAL and used only through
// its own prefixed entry points (jemalloc mallocx/dallocx/sallocx, tcmalloc tc_*, mimalloc mi_*),
// so no other code in the process ever calls it and nothing it returns is freed by another
// allocator.  glibc is the process's own malloc (posix_memalign / free).  Every block is 64-byte
// aligned, as PyTorch's CPU allocator asks.  A library that is not installed, or fails to load,
// is reported unavailable with the dlerror() text.
//
// Note [Sampling]
// ---------------
// Memory is measured from the allocator's own statistics, never guessed:
//   glibc     mallinfo2(): arena (heap from brk/sbrk, free chunks included) + hblkhd (mmapped chunks)
//   jemalloc  mallctl "stats.resident" after an "epoch" refresh: active, metadata and dirty pages
//   tcmalloc  "generic.heap_size" - "tcmalloc.pageheap_unmapped_bytes" (bytes mapped from the OS)
//   mimalloc  mi_process_info(): committed bytes
// minus the same figure read after the allocator released its caches before the run.  These reads
// cost microseconds, so measure() reads them after every allocation of >= 256 KiB and every 64th
// operation; peak_reserved is the largest value read, which can miss growth from fewer than 64
// small operations.  The process's malloc serves other code too (Python), but nothing else runs
// during a replay (the GIL is released and the replay is single-threaded).
#pragma once

#include <memory>
#include <string>

#include "replay.h"

namespace torchpool::replay {

// Loads (once) the named system allocator: "glibc", "jemalloc", "tcmalloc", "mimalloc".
// On failure returns nullptr and sets `why`.
AdapterFactory system_allocator(const std::string& name, std::string* why);

}  // namespace torchpool::replay
