// Bindings of monitoring: the leak sampler and tracemalloc reporting (both observers of the CPU
// slot, Note [Allocation observer]), and the published counters page (Note [Published counters]).
//
// Note [Sampled allocation stacks]
// --------------------------------
// Rationale: a leak detector must know where live memory was allocated, but running Python on
// every operator (Note [Python stacks of allocations], tracing/trace.py) costs 2-3x; the leak detector's
// budget is a few percent.
// Approach: allocations are sampled by bytes, as tcmalloc's heap profiler does: each thread counts
// down an exponentially distributed number of bytes (mean `sample_bytes`); the allocation that
// crosses zero is sampled, and every allocation of at least sample_bytes is.  A sampled allocation
// of n bytes stands for n / (1 - exp(-n / sample_bytes)) bytes (1 - exp(...) is its chance of being
// sampled), so sums over sites estimate live bytes without bias.  For a sampled allocation the
// thread's Python stack is read from its frames, as PyTorch's CUDA allocator does for
// _record_memory_history: the GIL is taken back for a few microseconds (the allocating thread
// released it inside the operator).  Threads Python does not know (OpenMP workers) get no stack
// ("<no Python frame>"), and are never made to wait for the GIL.  Stacks are interned (code object,
// line) tuples; the live map holds address -> (stack, bytes, weight, step of birth).  The step is
// the number of LeakDetector.step() calls so far (python/torchpool/leaks.py decides what grows).
// Limitations: a thread that holds a lock that the GIL holder waits for would deadlock when sampled
// (the same caveat as PyTorch's recorder); frames deeper than 48 are cut.
//
// Note [tracemalloc domain]
// -------------------------
// Live CPU blocks are reported with PyTraceMalloc_Track(domain, address, bytes) and
// PyTraceMalloc_Untrack on free, as NumPy does for its buffers (NumPy's domain is 389047;
// torchpool's is kTraceDomain).  tracemalloc takes the GIL to record a traceback, so only
// Python threads report; when tracemalloc is not tracing both calls return at once.
#include <Python.h>
#include <dlfcn.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <random>
#include <unordered_map>
#include <vector>

#include "../torch_glue/cpu_allocator.h"
#include "../torch_glue/publish.h"
#include "registry.h"

namespace py = pybind11;

namespace {

constexpr unsigned kTraceDomain = 0x7470;  // "tp"
constexpr int kMaxFrames = 48;

struct FrameKey {
  PyCodeObject* code;
  int line;
  bool operator==(const FrameKey& o) const { return code == o.code && line == o.line; }
};
struct StackHash {
  size_t operator()(const std::vector<FrameKey>& v) const {
    size_t h = 1469598103934665603ull;
    for (const auto& f : v) h = (h ^ (reinterpret_cast<uintptr_t>(f.code) * 31 + static_cast<size_t>(f.line))) * 1099511628211ull;
    return h;
  }
};

struct LiveSample {
  uint32_t stack;
  uint32_t birth;
  uint64_t bytes;
  double weight;  // 1 / chance of being sampled
};

struct Sampler {
  std::atomic<bool> on{false};
  std::atomic<int64_t> mean{512 << 10};
  std::atomic<uint32_t> step{0};
  std::atomic<size_t> num_live{0};
  std::atomic<uint64_t> samples{0}, no_stack{0};
  std::mutex mu;  // lock order: GIL before mu; mu is never held while taking the GIL
  std::unordered_map<uintptr_t, LiveSample> live;
  std::unordered_map<std::vector<FrameKey>, uint32_t, StackHash> index;
  std::vector<std::vector<FrameKey>> stacks{std::vector<FrameKey>{}};  // 0: no Python frame
};

Sampler& sampler() {
  static auto* s = new Sampler();  // immortal: frees arrive during interpreter exit
  return *s;
}

// Python 3.11's tracemalloc.h declares these without extern "C" under C++; resolve them by name.
using TrackFn = int (*)(unsigned int, uintptr_t, size_t);
using UntrackFn = int (*)(unsigned int, uintptr_t);
TrackFn g_track = nullptr;
UntrackFn g_untrack = nullptr;
std::atomic<bool> g_tracemalloc{false};
std::atomic<bool> g_tracemalloc_ever{false};

bool python_alive() { return Py_IsInitialized() && !_Py_IsFinalizing(); }

struct ThreadCountdown {
  std::minstd_rand rng{static_cast<unsigned>(reinterpret_cast<uintptr_t>(this) ^ 0x5bd1e995u)};
  int64_t left = -1;  // < 0: draw on first use
  int64_t draw(int64_t mean) {
    std::uniform_real_distribution<double> u(1e-12, 1.0);
    return static_cast<int64_t>(-std::log(u(rng)) * static_cast<double>(mean)) + 1;
  }
};
thread_local ThreadCountdown t_countdown;

// GIL held. Innermost frame first.
int capture_frames(FrameKey* out) {
  PyFrameObject* f = PyEval_GetFrame();  // borrowed
  if (!f) return 0;
  Py_INCREF(f);
  int n = 0;
  while (f && n < kMaxFrames) {
    PyCodeObject* c = PyFrame_GetCode(f);
    out[n++] = {c, PyFrame_GetLineNumber(f)};
    Py_DECREF(c);  // the executing frame keeps its code alive while we hold the GIL
    PyFrameObject* back = PyFrame_GetBack(f);
    Py_DECREF(f);
    f = back;
  }
  Py_XDECREF(f);
  return n;
}

void sample(void* p, size_t n) {
  Sampler& s = sampler();
  const int64_t mean = s.mean.load(std::memory_order_relaxed);
  const auto bytes = static_cast<int64_t>(n);
  if (bytes < mean) {
    ThreadCountdown& c = t_countdown;
    if (c.left < 0) c.left = c.draw(mean);
    c.left -= bytes;
    if (c.left > 0) return;
    c.left = c.draw(mean);
  }
  const double chance = bytes >= mean ? 1.0 : -std::expm1(-static_cast<double>(bytes) / static_cast<double>(mean));
  LiveSample ls{0, s.step.load(std::memory_order_relaxed), static_cast<uint64_t>(n), 1.0 / chance};
  s.samples.fetch_add(1, std::memory_order_relaxed);
  if (python_alive() && PyGILState_GetThisThreadState() != nullptr) {
    PyGILState_STATE g = PyGILState_Ensure();
    FrameKey frames[kMaxFrames];
    const int k = capture_frames(frames);
    {
      std::lock_guard<std::mutex> lk(s.mu);
      std::vector<FrameKey> key(frames, frames + k);
      auto it = s.index.find(key);
      if (it == s.index.end()) {
        for (auto& f : key) Py_INCREF(f.code);
        const auto id = static_cast<uint32_t>(s.stacks.size());
        s.stacks.push_back(key);
        it = s.index.emplace(std::move(key), id).first;
      }
      ls.stack = it->second;
      s.live[reinterpret_cast<uintptr_t>(p)] = ls;
      s.num_live.store(s.live.size(), std::memory_order_relaxed);
    }
    PyGILState_Release(g);
    return;
  }
  s.no_stack.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::mutex> lk(s.mu);
  s.live[reinterpret_cast<uintptr_t>(p)] = ls;
  s.num_live.store(s.live.size(), std::memory_order_relaxed);
}

void on_alloc(void* p, size_t n) {
  if (g_tracemalloc.load(std::memory_order_relaxed) && python_alive() && PyGILState_GetThisThreadState() != nullptr)
    g_track(kTraceDomain, reinterpret_cast<uintptr_t>(p), n);
  if (sampler().on.load(std::memory_order_relaxed)) sample(p, n);
}

void on_free(void* p) {
  if (g_tracemalloc_ever.load(std::memory_order_relaxed) && python_alive())
    g_untrack(kTraceDomain, reinterpret_cast<uintptr_t>(p));  // no GIL needed
  Sampler& s = sampler();
  if (s.num_live.load(std::memory_order_relaxed) == 0) return;
  std::lock_guard<std::mutex> lk(s.mu);
  if (s.live.erase(reinterpret_cast<uintptr_t>(p))) s.num_live.store(s.live.size(), std::memory_order_relaxed);
}

const torchpool::torch_glue::AllocObserver kObserver{&on_alloc, &on_free};

void update_observer() {
  const bool any = sampler().on.load() || g_tracemalloc.load() || g_tracemalloc_ever.load() || sampler().num_live.load();
  torchpool::torch_glue::set_alloc_observer(any ? &kObserver : nullptr);
}

py::list stack_strings(const std::vector<FrameKey>& frames) {
  py::list out;  // innermost last: "path:line in function"
  for (auto it = frames.rbegin(); it != frames.rend(); ++it) {
    PyCodeObject* c = it->code;
    py::str file = py::reinterpret_borrow<py::object>(c->co_filename);
    py::str name = py::reinterpret_borrow<py::object>(c->co_name);
    out.append(py::str("{}:{} in {}").format(file, it->line, name));
  }
  return out;
}

}  // namespace

TORCHPOOL_BINDINGS(60, monitor) {
  auto mon = m.def_submodule("monitor", "monitoring internals (python/torchpool/leaks.py, cli/top.py, memory.py)");
  mon.attr("tracemalloc_domain") = kTraceDomain;
  mon.def("sampler_start", [](int64_t sample_bytes) {
    if (sample_bytes < 1) throw py::value_error("torchpool: sample_bytes must be >= 1");
    Sampler& s = sampler();
    if (s.on.load()) throw std::runtime_error("torchpool: a LeakDetector is already running in this process; stop it first");
    s.mean.store(sample_bytes);
    s.on.store(true);
    update_observer();
  }, py::arg("sample_bytes"), "Note [Sampled allocation stacks]");
  mon.def("sampler_stop", [] {
    Sampler& s = sampler();
    s.on.store(false);
    {
      std::lock_guard<std::mutex> lk(s.mu);
      s.live.clear();
      s.num_live.store(0);
    }
    update_observer();
  });
  mon.def("sampler_running", [] { return sampler().on.load(); });
  mon.def("sampler_step", [] { return sampler().step.fetch_add(1) + 1; }, "Advance the step counter; returns the new step");
  mon.def("sampler_live", [] {
    // [(stack id, birth step, estimated bytes, estimated count, sampled blocks)] per (stack, birth)
    Sampler& s = sampler();
    std::map<std::pair<uint32_t, uint32_t>, std::tuple<double, double, int64_t>> agg;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lk(s.mu);
      for (const auto& [addr, ls] : s.live) {
        auto& a = agg[{ls.stack, ls.birth}];
        std::get<0>(a) += static_cast<double>(ls.bytes) * ls.weight;
        std::get<1>(a) += ls.weight;
        std::get<2>(a) += 1;
      }
    }
    py::list out;
    for (const auto& [k, v] : agg) out.append(py::make_tuple(k.first, k.second, std::get<0>(v), std::get<1>(v), std::get<2>(v)));
    return out;
  });
  mon.def("sampler_addresses", [](uint32_t stack) {
    std::vector<std::tuple<uintptr_t, uint64_t, uint32_t>> out;
    {
      py::gil_scoped_release nogil;
      std::lock_guard<std::mutex> lk(sampler().mu);
      for (const auto& [addr, ls] : sampler().live)
        if (ls.stack == stack) out.emplace_back(addr, ls.bytes, ls.birth);
    }
    return out;
  }, "[(address, bytes, birth step)] of the live sampled blocks of one stack");
  mon.def("sampler_stack", [](uint32_t id) {
    Sampler& s = sampler();
    std::vector<FrameKey> frames;
    {
      std::lock_guard<std::mutex> lk(s.mu);  // GIL held: order GIL -> mu
      if (id >= s.stacks.size()) throw py::index_error("torchpool: no such stack");
      frames = s.stacks[id];
    }
    return stack_strings(frames);
  });
  mon.def("sampler_counts", [] {
    Sampler& s = sampler();
    return py::make_tuple(s.samples.load(), s.no_stack.load(), s.num_live.load());
  });
  mon.def("tracemalloc_enable", [](bool on) {
    if (!g_track || !g_untrack) {
      g_track = reinterpret_cast<TrackFn>(dlsym(RTLD_DEFAULT, "PyTraceMalloc_Track"));
      g_untrack = reinterpret_cast<UntrackFn>(dlsym(RTLD_DEFAULT, "PyTraceMalloc_Untrack"));
      if (!g_track || !g_untrack) throw std::runtime_error("torchpool: this Python has no PyTraceMalloc_Track");
    }
    g_tracemalloc.store(on);
    if (on) g_tracemalloc_ever.store(true);
    update_observer();
  }, "Note [tracemalloc domain]");
  mon.def("tracemalloc_enabled", [] { return g_tracemalloc.load(); });
  mon.def("publish_start", [](const std::string& dir, int interval_ms) {
    return torchpool::torch_glue::publish_start(dir, interval_ms);
  }, py::arg("dir"), py::arg("interval_ms") = 250, "Note [Published counters]; returns '' or why not");
  mon.def("publish_stop", [](bool remove) {
    py::gil_scoped_release nogil;
    torchpool::torch_glue::publish_stop(remove);
  }, py::arg("remove") = true);
  mon.def("publishing", &torchpool::torch_glue::publishing);
  mon.def("publish_path", &torchpool::torch_glue::publish_path);
  mon.def("publish_now", [] {
    py::gil_scoped_release nogil;
    torchpool::torch_glue::publish_now();
  });
  mon.attr("page_bytes") = torchpool::torch_glue::kPublishPageBytes;
  mon.attr("page_header_bytes") = torchpool::torch_glue::kPublishHeaderBytes;
}
