// _C.churn: the raw multi-thread allocation loop of bench/bench_multithread.py, in C++ so that neither
// the interpreter nor the GIL is measured: each thread keeps a ring of `live` pointers and, per
// iteration, frees the oldest and allocates the next size of `sizes`.  allocator=None runs the same
// loop on malloc/free, i.e. on whichever malloc the process has (glibc, or tcmalloc / jemalloc /
// mimalloc through LD_PRELOAD), so every allocator runs the identical loop.
#include <pybind11/stl.h>

#include <algorithm>
#include <barrier>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "registry.h"

namespace py = pybind11;

namespace torchpool::bindings {
namespace {

double churn(size_t threads, size_t iterations, const std::vector<size_t>& sizes, size_t live, bool touch,
             std::shared_ptr<CachingAllocator> alloc) {
  if (threads == 0 || threads > 256) throw py::value_error("churn: threads must be 1 to 256");
  if (sizes.empty()) throw py::value_error("churn: sizes is empty");
  if (live == 0 || live > (size_t{1} << 20)) throw py::value_error("churn: live must be 1 to 2^20");
  for (size_t s : sizes)
    if (s == 0 || s > (size_t{1} << 34)) throw py::value_error("churn: every size must be 1 B to 16 GiB");
  CachingAllocator* a = alloc.get();
  auto get = [a](size_t n) -> void* {
    void* p = a ? a->allocate(n) : std::malloc(n);
    if (!p) throw std::bad_alloc();
    return p;
  };
  auto put = [a](void* p) {
    if (a) a->free(p);
    else std::free(p);
  };
  std::barrier start(static_cast<std::ptrdiff_t>(threads + 1));
  std::vector<std::thread> ts;
  std::vector<std::exception_ptr> errors(threads);
  using Clock = std::chrono::steady_clock;
  // Each thread times itself: the loop runs from the first thread's start to the last one's end (a
  // clock read by the launching thread could miss the whole loop on a busy machine).
  std::vector<Clock::time_point> begin(threads), end(threads);
  {
    py::gil_scoped_release nogil;
    for (size_t t = 0; t < threads; ++t)
      ts.emplace_back([&, t] {
        std::vector<void*> ring(live, nullptr);
        start.arrive_and_wait();
        begin[t] = Clock::now();
        try {
          size_t k = t * 7919;  // threads start at different points of `sizes`
          for (size_t i = 0; i < iterations; ++i) {
            void*& slot = ring[i % live];
            if (slot) put(slot);
            const size_t n = sizes[k++ % sizes.size()];
            slot = get(n);
            if (touch) static_cast<volatile char*>(slot)[0] = 1;
          }
        } catch (...) {
          errors[t] = std::current_exception();
        }
        for (void* p : ring)
          if (p) put(p);
        end[t] = Clock::now();
      });
    start.arrive_and_wait();
    for (auto& th : ts) th.join();
  }
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  return std::chrono::duration<double>(*std::max_element(end.begin(), end.end()) -
                                       *std::min_element(begin.begin(), begin.end()))
      .count();
}

}  // namespace
}  // namespace torchpool::bindings

TORCHPOOL_BINDINGS(50, bench) {
  m.def("churn", &torchpool::bindings::churn, py::arg("threads"), py::arg("iterations"), py::arg("sizes"),
        py::arg("live") = 64, py::arg("touch") = false, py::arg("allocator") = nullptr,
        R"doc(Runs `threads` threads, each `iterations` times freeing the oldest of its `live` pointers and
allocating the next of `sizes` (from `allocator`, or malloc/free when None), without the GIL.
Returns the wall seconds of the loop (bench/bench_multithread.py).)doc");
}
