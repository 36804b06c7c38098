// Note [Measuring system allocators]
// ----------------------------------
// Rationale: malloc hands out address space; memory is spent only when pages are written.  A
// replay that never writes its blocks measures nothing real, and glibc's own statistics
// (mallinfo2: arena + mmapped chunks) count the whole process's heap: the replay reuses free chunks
// that Python and torch left in the main arena, so reserved grew less than live (kv_decode: 23 MiB
// "reserved" for 30 MiB live, utilization 131%; 184% in an earlier build).
// Approach:
//   * Touching.  In the measured pass every block is written, one byte per page from its first to
//     its last requested byte, right after it is allocated, as the tensor using it would be.  The
//     write happens in block_size(), which only measure() calls: the timed passes (time_ops, which
//     give ops/s) call allocate/deallocate only, so ops/s counts the allocator's calls and no page
//     faults, like the torchpool and PyTorch-emulation rows (on fake addresses).  allocate() pays
//     two stores to remember the block for block_size().
//   * Reserved bytes.
//       glibc     resident bytes of the process (/proc/self/statm), minus the same read after
//                 malloc_trim(0) when the adapter is made.  malloc_trim returns the pages of free
//                 chunks (MADV_DONTNEED), so reusing one costs resident pages again; the replay is
//                 the only code running (GIL released, single thread), so the growth is glibc
//                 serving the replay: its live blocks, its retained free chunks and its headers.
//       jemalloc  mallctl "stats.resident" after an "epoch" refresh: active, metadata and dirty pages
//       tcmalloc  "generic.heap_size" - "tcmalloc.pageheap_unmapped_bytes" (bytes mapped from the OS)
//       mimalloc  mi_process_info(): committed bytes
//     each minus its value after the allocator released its caches when the adapter was made.  The
//     three dlopen'ed allocators keep heaps no other code uses, so their own counters are exact.
//   * Isolation.  glibc's behaviour depends on the process's history (its dynamic mmap threshold
//     rises when a large mmapped chunk is freed; free chunks left by earlier work get reused), so
//     torchpool.replay measures every system allocator in a fresh interpreter, one per trace
//     (tracing/replay.py, isolate=True).  Measured in one process after other replays, glibc's utilization
//     on cnn_infer moved from 76% to 56%; after a training run, kv_decode's from 95% to 76%.
// Limitation: a page already resident at the baseline and reused (part of a small free chunk that
// malloc_trim could not return) is not counted, so glibc's figure can be a little low; it cannot
// exceed what the process holds.  Even in a fresh interpreter glibc's figure varies from run to run
// (the heap torch's import leaves differs): over 9 runs, cnn_infer 67%, 76% or 99%, finetune_ckpt
// 72-87%, gpt_train 89% or 95%, kv_decode 95-96%; always <= 100%.

#include "system.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

namespace torchpool::replay {
namespace {

struct Api {
  void* (*alloc)(size_t bytes) = nullptr;
  void (*dealloc)(void* p, size_t bytes) = nullptr;
  size_t (*usable)(void* p) = nullptr;
  size_t (*committed)() = nullptr;
  void (*release)() = nullptr;
};

// ---- glibc: the process's malloc ----
void* glibc_alloc(size_t n) {
  void* p = nullptr;
  return posix_memalign(&p, 64, n) == 0 ? p : nullptr;
}
void glibc_free(void* p, size_t) { ::free(p); }
size_t glibc_usable(void* p) { return malloc_usable_size(p); }
// Not used for glibc's reserved bytes (Note [Measuring system allocators] below: the process's
// other malloc users pollute it); kept for diagnostics.
[[maybe_unused]] size_t glibc_mallinfo() {
  struct mallinfo2 mi = mallinfo2();
  return mi.arena + mi.hblkhd;
}
void glibc_release() { malloc_trim(0); }

// ---- jemalloc ----
void* (*je_mallocx)(size_t, int);
void (*je_dallocx)(void*, int);
size_t (*je_sallocx)(const void*, int);
int (*je_mallctl)(const char*, void*, size_t*, void*, size_t);
constexpr int kJeAlign64 = 6;  // MALLOCX_LG_ALIGN(6)
void* jemalloc_alloc(size_t n) { return je_mallocx(n, kJeAlign64); }
void jemalloc_free(void* p, size_t) { je_dallocx(p, kJeAlign64); }
size_t jemalloc_usable(void* p) { return je_sallocx(p, kJeAlign64); }
size_t jemalloc_committed() {
  uint64_t epoch = 1;
  size_t len = sizeof(epoch);
  je_mallctl("epoch", &epoch, &len, &epoch, len);
  size_t resident = 0;
  len = sizeof(resident);
  if (je_mallctl("stats.resident", &resident, &len, nullptr, 0) != 0) return 0;
  return resident;
}
void jemalloc_release() { je_mallctl("arena.4096.purge", nullptr, nullptr, nullptr, 0); }  // MALLCTL_ARENAS_ALL

// ---- tcmalloc (gperftools) ----
int (*tc_posix_memalign_fn)(void**, size_t, size_t);
void (*tc_free_fn)(void*);
size_t (*tc_malloc_size_fn)(void*);
int (*tc_get_property)(const char*, size_t*);
void (*tc_release_free)();
void* tcmalloc_alloc(size_t n) {
  void* p = nullptr;
  return tc_posix_memalign_fn(&p, 64, n) == 0 ? p : nullptr;
}
void tcmalloc_free(void* p, size_t) { tc_free_fn(p); }
size_t tcmalloc_usable(void* p) { return tc_malloc_size_fn(p); }
size_t tcmalloc_committed() {
  size_t heap = 0, unmapped = 0;
  tc_get_property("generic.heap_size", &heap);
  tc_get_property("tcmalloc.pageheap_unmapped_bytes", &unmapped);
  return heap - unmapped;
}
void tcmalloc_release() { tc_release_free(); }

// ---- mimalloc ----
void* (*mi_malloc_aligned_fn)(size_t, size_t);
void (*mi_free_fn)(void*);
size_t (*mi_usable_size_fn)(const void*);
void (*mi_process_info_fn)(size_t*, size_t*, size_t*, size_t*, size_t*, size_t*, size_t*, size_t*);
void (*mi_collect_fn)(bool);
void* mimalloc_alloc(size_t n) { return mi_malloc_aligned_fn(n, 64); }
void mimalloc_free(void* p, size_t) { mi_free_fn(p); }
size_t mimalloc_usable(void* p) { return mi_usable_size_fn(p); }
size_t mimalloc_committed() {
  size_t elapsed, user, sys, rss, peak_rss, commit = 0, peak_commit, faults;
  mi_process_info_fn(&elapsed, &user, &sys, &rss, &peak_rss, &commit, &peak_commit, &faults);
  return commit;
}
void mimalloc_release() { mi_collect_fn(true); }

template <typename F>
bool sym(void* h, const char* name, F& out, std::string* why) {
  out = reinterpret_cast<F>(dlsym(h, name));
  if (!out && why) *why = std::string("symbol ") + name + " not found";
  return out != nullptr;
}

void* open_first(const char* const* names, std::string* why) {
  std::string errs;
  for (const char* const* n = names; *n; ++n) {
    if (void* h = dlopen(*n, RTLD_NOW | RTLD_LOCAL)) return h;
    const char* e = dlerror();
    errs += (errs.empty() ? "" : "; ") + std::string(e ? e : *n);
  }
  if (why) *why = errs;
  return nullptr;
}

bool load(const std::string& name, Api& api, std::string* why) {
  if (name == "glibc") {
    api = {glibc_alloc, glibc_free, glibc_usable, nullptr, glibc_release};  // committed: resident bytes
    return true;
  }
  if (name == "jemalloc") {
    static const char* names[] = {"libjemalloc.so.2", "libjemalloc.so", nullptr};
    void* h = open_first(names, why);
    if (!h || !sym(h, "mallocx", je_mallocx, why) || !sym(h, "dallocx", je_dallocx, why) ||
        !sym(h, "sallocx", je_sallocx, why) || !sym(h, "mallctl", je_mallctl, why))
      return false;
    api = {jemalloc_alloc, jemalloc_free, jemalloc_usable, jemalloc_committed, jemalloc_release};
    return true;
  }
  if (name == "tcmalloc") {
    static const char* names[] = {"libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", nullptr};
    void* h = open_first(names, why);
    if (!h || !sym(h, "tc_posix_memalign", tc_posix_memalign_fn, why) || !sym(h, "tc_free", tc_free_fn, why) ||
        !sym(h, "tc_malloc_size", tc_malloc_size_fn, why) ||
        !sym(h, "MallocExtension_GetNumericProperty", tc_get_property, why) ||
        !sym(h, "MallocExtension_ReleaseFreeMemory", tc_release_free, why))
      return false;
    api = {tcmalloc_alloc, tcmalloc_free, tcmalloc_usable, tcmalloc_committed, tcmalloc_release};
    return true;
  }
  if (name == "mimalloc") {
    static const char* names[] = {"libmimalloc.so.2", "libmimalloc.so", nullptr};
    void* h = open_first(names, why);
    if (!h || !sym(h, "mi_malloc_aligned", mi_malloc_aligned_fn, why) || !sym(h, "mi_free", mi_free_fn, why) ||
        !sym(h, "mi_usable_size", mi_usable_size_fn, why) || !sym(h, "mi_process_info", mi_process_info_fn, why) ||
        !sym(h, "mi_collect", mi_collect_fn, why))
      return false;
    api = {mimalloc_alloc, mimalloc_free, mimalloc_usable, mimalloc_committed, mimalloc_release};
    return true;
  }
  if (why) *why = "unknown system allocator '" + name + "'";
  return false;
}

// Resident bytes of this process (/proc/self/statm, second field), read through a kept descriptor.
class Resident {
 public:
  Resident() : fd_(::open("/proc/self/statm", O_RDONLY | O_CLOEXEC)), page_(static_cast<size_t>(sysconf(_SC_PAGESIZE))) {}
  ~Resident() {
    if (fd_ >= 0) ::close(fd_);
  }
  Resident(const Resident&) = delete;
  Resident& operator=(const Resident&) = delete;
  size_t bytes() const {
    char buf[128];
    const ssize_t n = fd_ >= 0 ? ::pread(fd_, buf, sizeof(buf) - 1, 0) : -1;
    if (n <= 0) return 0;
    buf[n] = 0;
    const char* p = std::strchr(buf, ' ');
    return p ? std::strtoull(p + 1, nullptr, 10) * page_ : 0;
  }
  size_t page() const { return page_; }

 private:
  int fd_;
  size_t page_;
};

class SystemAdapter final : public Adapter {
 public:
  explicit SystemAdapter(const Api& api) : api_(api) {
    api_.release();
    baseline_ = committed();
  }
  // The timed pass (time_ops) calls only allocate/deallocate: remembering the block is two stores.
  void* allocate(size_t bytes, uint64_t) override {
    void* p = api_.alloc(bytes);
    last_ = p;
    last_bytes_ = bytes;
    return p;
  }
  void deallocate(void* p, size_t bytes, uint64_t) override { api_.dealloc(p, bytes); }
  // Only the measured pass asks for block sizes: it writes every page of the block it just got, as
  // the tensor using it would (Note [Measuring system allocators] below).
  size_t block_size(void* p) override {
    if (p == last_) {
      touch(static_cast<char*>(p), last_bytes_);
      last_ = nullptr;
    }
    return api_.usable(p);
  }
  size_t reserved_bytes() override {
    const size_t now = committed();
    return now > baseline_ ? now - baseline_ : 0;
  }
  bool reserved_is_cheap() const override { return false; }
  void release() override { api_.release(); }

 private:
  size_t committed() const { return api_.committed ? api_.committed() : resident_.bytes(); }
  void touch(char* p, size_t n) const {
    if (n == 0) return;
    const size_t page = resident_.page();
    volatile char* v = p;
    // The first byte, then the first byte of every following page, then the last byte.
    v[0] = 0;
    for (size_t off = page - (reinterpret_cast<uintptr_t>(p) & (page - 1)); off < n; off += page) v[off] = 0;
    v[n - 1] = 0;
  }

  Api api_;
  Resident resident_;
  size_t baseline_ = 0;
  void* last_ = nullptr;
  size_t last_bytes_ = 0;
};

}  // namespace

AdapterFactory system_allocator(const std::string& name, std::string* why) {
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer replaces malloc and cannot share the process with another allocator.
  if (why) *why = "not loaded in an AddressSanitizer build";
  (void)name;
  return nullptr;
#endif
  static std::mutex mu;
  std::lock_guard<std::mutex> g(mu);
  Api api;
  if (!load(name, api, why)) return nullptr;
  return [api] { return std::unique_ptr<Adapter>(new SystemAdapter(api)); };
}

}  // namespace torchpool::replay
