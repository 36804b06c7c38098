#include "sigbus.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "shard.h"

namespace torchpool::loader {

namespace {

// Note [SIGBUS message]
struct Slot {
  std::atomic<const ShardFile*> shard{nullptr};
  std::atomic<uintptr_t> base{0};
  std::atomic<uint64_t> len{0};
};
Slot g_slots[kSigbusSlots];
struct sigaction g_prev;
std::atomic<bool> g_installed{false};
// Several threads may fault at once (torch's intra-op threads reading one view): the first writes the
// message, the others wait for it to be complete before handing the signal on (which kills the process).
std::atomic<int> g_writing{0};  // 0: nobody yet, 1: a thread is writing, 2: written
std::once_flag g_once;

void put(const char* s, size_t n) {
  while (n > 0) {
    const ssize_t r = ::write(2, s, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return;
    s += r;
    n -= static_cast<size_t>(r);
  }
}
void put(const char* s) { put(s, ::strlen(s)); }
void put_u64(uint64_t v) {
  char buf[24];
  size_t i = sizeof(buf);
  do {
    buf[--i] = static_cast<char>('0' + v % 10);
    v /= 10;
  } while (v);
  put(buf + i, sizeof(buf) - i);
}

void wait_written() {
  while (g_writing.load(std::memory_order_acquire) == 1) {
    struct timespec ts = {0, 1000000};
    ::nanosleep(&ts, nullptr);
  }
}

// Writes the message for a fault at addr in a registered mapping.  Returns false only for a thread
// that faulted in a mapping while another thread wrote (or had written) the message.
bool describe(uintptr_t addr) {
  for (Slot& s : g_slots) {
    const ShardFile* f = s.shard.load(std::memory_order_acquire);
    if (!f) continue;
    const uintptr_t base = s.base.load(std::memory_order_acquire);
    const uint64_t len = s.len.load(std::memory_order_acquire);
    if (addr < base || addr - base >= len) continue;
    const uint64_t off = addr - base;
    int expect = 0;
    if (!g_writing.compare_exchange_strong(expect, 1, std::memory_order_acq_rel)) {
      wait_written();
      return false;
    }
    put("torchpool: SIGBUS at ");
    put(f->path().c_str());
    put(" file offset ");
    put_u64(off);
    const TensorEntry* e = f->tensor_at(off);
    if (e) {
      put(" (tensor '");
      put(e->name.c_str());
      put("')");
    }
    put(": the file is shorter than when it was opened (truncated or rewritten by another process?), so a "
        "tensor that maps it (ck[name], ck.load() on the CPU, load_lazily) cannot be read and the process "
        "dies. Files that may change under a running process: open_checkpoint(path, copy=True) returns "
        "owned memory only.\n");
    g_writing.store(2, std::memory_order_release);
    return true;
  }
  return true;
}

void handler(int sig, siginfo_t* info, void*) {
  const int saved = errno;
  const bool fault = info != nullptr && info->si_code > 0;  // sent by the kernel for this access
  if (fault && !describe(reinterpret_cast<uintptr_t>(info->si_addr))) {
    // Another thread faulted in a mapping first and is handing its signal on, which ends the process.
    // Wait for that (up to 5 s) instead of entering the next handler too: two threads at once in
    // faulthandler's handler interleave their dumps and can crash it (SIGSEGV instead of SIGBUS).
    for (int i = 0; i < 5000; ++i) {
      struct timespec ts = {0, 1000000};
      ::nanosleep(&ts, nullptr);
    }
  }
  // Hand the signal to the action this one replaced: a fault re-executes the access and arrives
  // there; a sent signal is sent again (delivered when this handler returns).
  ::sigaction(sig, &g_prev, nullptr);
  g_installed.store(false, std::memory_order_relaxed);
  if (!fault) ::raise(sig);
  errno = saved;
}

void install() {
  const char* env = ::getenv("TORCHPOOL_SIGBUS_HANDLER");
  if (env && env[0] == '0' && env[1] == '\0') return;
  struct sigaction sa;
  ::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(SIGBUS, &sa, &g_prev) == 0) g_installed.store(true, std::memory_order_relaxed);
}

}  // namespace

void register_mapping(const ShardFile* shard) {
  std::call_once(g_once, install);
  for (Slot& s : g_slots) {
    const ShardFile* expect = nullptr;
    if (s.shard.load(std::memory_order_relaxed) == nullptr &&
        s.shard.compare_exchange_strong(expect, shard, std::memory_order_acq_rel)) {
      s.base.store(reinterpret_cast<uintptr_t>(shard->map_base()), std::memory_order_release);
      s.len.store(shard->map_len(), std::memory_order_release);
      return;
    }
  }
}

void unregister_mapping(const ShardFile* shard) {
  for (Slot& s : g_slots) {
    if (s.shard.load(std::memory_order_acquire) == shard) {
      s.len.store(0, std::memory_order_release);
      s.base.store(0, std::memory_order_release);
      s.shard.store(nullptr, std::memory_order_release);
      return;
    }
  }
}

bool sigbus_handler_installed() { return g_installed.load(std::memory_order_relaxed); }

}  // namespace torchpool::loader
