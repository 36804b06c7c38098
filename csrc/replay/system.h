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
// How system allocators' memory is measured (resident pages for glibc, the allocator's own
// statistics for the others, every page of every block written) is Note [Measuring system
// allocators] in system.cc.  These reads cost microseconds, so measure() reads them after every
// allocation of >= 256 KiB and every 64th operation; peak_reserved is the largest value read, which
// can miss growth from fewer than 64 small operations.
#pragma once

#include <memory>
#include <string>

#include "replay.h"

namespace torchpool::replay {

// Loads (once) the named system allocator: "glibc", "jemalloc", "tcmalloc", "mimalloc".
// On failure returns nullptr and sets `why`.
AdapterFactory system_allocator(const std::string& name, std::string* why);

}  // namespace torchpool::replay
