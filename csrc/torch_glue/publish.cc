#include "publish.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <thread>

#include "cpu_allocator.h"

namespace torchpool::torch_glue {

namespace {

struct Publisher {
  std::mutex mu;               // held while writing the page and across fork (Note [Published counters])
  std::condition_variable cv;
  std::thread* thread = nullptr;  // leaked in a forked child, where the thread does not exist
  bool stop = false;
  char* page = nullptr;
  std::string path;
  int interval_ms = 250;
  uint64_t start_time = 0;
};

Publisher& pub() {
  static auto* p = new Publisher();  // immortal: the thread may outlive static destruction order
  return *p;
}

uint64_t proc_start_time() {
  std::ifstream f("/proc/self/stat");
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto rp = s.rfind(')');  // comm may hold spaces; fields after it are plain
  if (rp == std::string::npos) return 0;
  std::istringstream in(s.substr(rp + 2));
  std::string field;
  for (int i = 3; i <= 22 && (in >> field); ++i)
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  return 0;
}

std::string body_of(const Stats& s, const std::string& device) {
  std::ostringstream o;
  o << "device=" << device << "\n";
#define TP_PAGE_GAUGE(name, help)                                                                             \
  o << #name ".all.current=" << s.name.current << "\n" << #name ".all.peak=" << s.name.peak << "\n"           \
    << #name ".all.allocated=" << s.name.allocated << "\n" << #name ".all.freed=" << s.name.freed << "\n";
  TORCHPOOL_GAUGES(TP_PAGE_GAUGE)
#undef TP_PAGE_GAUGE
#define TP_PAGE_COUNTER(name, help) o << #name "=" << s.name << "\n";
  TORCHPOOL_COUNTERS(TP_PAGE_COUNTER)
#undef TP_PAGE_COUNTER
  o << "largest_free_block=" << s.largest_free_block << "\n";
  return o.str();
}

void write_page_locked(Publisher& p) {
  if (!p.page) return;
  std::string body;
  if (auto a = CpuAllocatorSlot::instance().active()) body = body_of(a->stats(), a->config().device_name);
  if (body.size() > kPublishPageBytes - kPublishHeaderBytes) body.resize(kPublishPageBytes - kPublishHeaderBytes);
  auto* seq = reinterpret_cast<std::atomic<uint64_t>*>(p.page + 8);
  const uint64_t s0 = seq->load(std::memory_order_relaxed);
  seq->store(s0 + 1, std::memory_order_relaxed);
  std::atomic_thread_fence(std::memory_order_release);
  const uint64_t now = static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
  std::memcpy(p.page + 32, &now, 8);
  const uint32_t len = static_cast<uint32_t>(body.size());
  std::memcpy(p.page + 40, &len, 4);
  std::memcpy(p.page + kPublishHeaderBytes, body.data(), body.size());
  std::atomic_thread_fence(std::memory_order_release);
  seq->store(s0 + 2, std::memory_order_release);
}

void run(Publisher* p) {
  std::unique_lock<std::mutex> g(p->mu);
  while (!p->stop) {
    write_page_locked(*p);
    p->cv.wait_for(g, std::chrono::milliseconds(p->interval_ms), [p] { return p->stop; });
  }
}

void atfork_prepare() { pub().mu.lock(); }
void atfork_parent() { pub().mu.unlock(); }
void atfork_child() {
  Publisher& p = pub();
  // The thread does not exist here; forget it (its std::thread object is leaked on purpose) and
  // drop the parent's page, which this process must never write.
  p.thread = nullptr;
  if (p.page) munmap(p.page, kPublishPageBytes);
  p.page = nullptr;
  p.path.clear();
  p.stop = false;
  p.mu.unlock();
}

}  // namespace

std::string publish_start(const std::string& dir, int interval_ms) {
  static std::once_flag atfork_once;
  std::call_once(atfork_once, [] { pthread_atfork(&atfork_prepare, &atfork_parent, &atfork_child); });
  Publisher& p = pub();
  std::lock_guard<std::mutex> g(p.mu);
  if (p.thread) return "";
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) return dir + ": cannot create: " + std::strerror(errno);
  struct stat st;
  if (lstat(dir.c_str(), &st) != 0) return dir + ": " + std::strerror(errno);
  if (!S_ISDIR(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 0077) != 0)
    return dir + ": not a directory owned by this user with mode 0700; not publishing";
  const std::string path = dir + "/" + std::to_string(getpid());
  const int fd = open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return path + ": cannot create: " + std::strerror(errno);
  if (ftruncate(fd, kPublishPageBytes) != 0) {
    const std::string e = std::strerror(errno);
    close(fd);
    unlink(path.c_str());
    return path + ": " + e;
  }
  void* m = mmap(nullptr, kPublishPageBytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (m == MAP_FAILED) {
    unlink(path.c_str());
    return path + ": mmap failed: " + std::strerror(errno);
  }
  p.page = static_cast<char*>(m);
  std::memset(p.page, 0, kPublishHeaderBytes);
  std::memcpy(p.page, "TPPAGE1", 8);
  const uint64_t pid = static_cast<uint64_t>(getpid());
  p.start_time = proc_start_time();
  std::memcpy(p.page + 16, &pid, 8);
  std::memcpy(p.page + 24, &p.start_time, 8);
  const uint32_t version = 1;
  std::memcpy(p.page + 44, &version, 4);
  p.path = path;
  p.interval_ms = interval_ms > 0 ? interval_ms : 250;
  p.stop = false;
  write_page_locked(p);
  p.thread = new std::thread(run, &p);
  return "";
}

void publish_stop(bool remove_page) {
  Publisher& p = pub();
  std::thread* t;
  {
    std::lock_guard<std::mutex> g(p.mu);
    t = p.thread;
    p.thread = nullptr;
    p.stop = true;
  }
  p.cv.notify_all();
  if (t) {
    t->join();
    delete t;
  }
  std::lock_guard<std::mutex> g(p.mu);
  if (p.page) munmap(p.page, kPublishPageBytes);
  p.page = nullptr;
  if (remove_page && !p.path.empty()) unlink(p.path.c_str());
  p.path.clear();
}

bool publishing() {
  std::lock_guard<std::mutex> g(pub().mu);
  return pub().thread != nullptr;
}

std::string publish_path() {
  std::lock_guard<std::mutex> g(pub().mu);
  return pub().path;
}

void publish_now() {
  std::lock_guard<std::mutex> g(pub().mu);
  write_page_locked(pub());
}

}  // namespace torchpool::torch_glue
