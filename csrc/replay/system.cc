#include "system.h"

#include <dlfcn.h>
#include <malloc.h>

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
size_t glibc_committed() {
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
    api = {glibc_alloc, glibc_free, glibc_usable, glibc_committed, glibc_release};
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

class SystemAdapter final : public Adapter {
 public:
  explicit SystemAdapter(const Api& api) : api_(api) {
    api_.release();
    baseline_ = api_.committed();
  }
  void* allocate(size_t bytes, uint64_t) override { return api_.alloc(bytes); }
  void deallocate(void* p, size_t bytes, uint64_t) override { api_.dealloc(p, bytes); }
  size_t block_size(void* p) override { return api_.usable(p); }
  size_t reserved_bytes() override {
    const size_t now = api_.committed();
    return now > baseline_ ? now - baseline_ : 0;
  }
  bool reserved_is_cheap() const override { return false; }
  void release() override { api_.release(); }

 private:
  Api api_;
  size_t baseline_ = 0;
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
