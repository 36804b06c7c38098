// Bindings of the core: Allocator (a CachingAllocator over a chosen upstream), stats, snapshot, trace.
#include <pybind11/stl.h>

#include <limits>
#include <memory>
#include <type_traits>
#include <stdexcept>
#include <string>

#include "../core/allocator.h"
#include "../upstreams/fake.h"
#include "../upstreams/host_mmap.h"
#include "common.h"
#include "registry.h"

namespace py = pybind11;
using namespace torchpool;

namespace torchpool::bindings {

namespace {
// A clear error naming the option, the value and the valid range instead of pybind's "Unable to cast".
template <typename T>
T take(py::dict& d, const char* key, T fallback) {
  if (!d.contains(key)) return fallback;
  py::object value = d[key];
  T v;
  try {
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      if (!py::isinstance<py::int_>(value) || py::isinstance<py::bool_>(value)) throw py::cast_error();
    }
    v = value.cast<T>();
  } catch (const py::cast_error&) {
    std::string range;
    if constexpr (std::is_same_v<T, bool>) range = "a boolean";
    else if constexpr (std::is_floating_point_v<T>) range = "a number";
    else if constexpr (std::is_integral_v<T>)
      range = "an integer from " + std::to_string(std::numeric_limits<T>::min()) + " to " +
              std::to_string(std::numeric_limits<T>::max());
    else range = "a string";
    throw py::value_error("torchpool: option " + std::string(key) + "=" + py::repr(value).cast<std::string>() +
                          " is out of range; valid: " + range);
  }
  d.attr("pop")(key);
  return v;
}
}  // namespace

std::shared_ptr<CachingAllocator> make_allocator(const std::string& upstream, py::dict options) {
  py::dict o = options.attr("copy")();
  AllocatorConfig c;
  c.pool.alignment = take<size_t>(o, "alignment", c.pool.alignment);
  c.pool.size_classes = take<bool>(o, "size_classes", c.pool.size_classes);
  c.pool.max_class_bytes = take<size_t>(o, "max_class_bytes", c.pool.max_class_bytes);
  c.pool.small_segment_bytes = take<size_t>(o, "small_segment_bytes", c.pool.small_segment_bytes);
  c.pool.large_rounding = take<size_t>(o, "large_rounding", c.pool.large_rounding);
  c.pool.min_split_bytes = take<size_t>(o, "min_split_bytes", c.pool.min_split_bytes);
  c.pool.max_split_bytes = take<size_t>(o, "max_split_bytes", c.pool.max_split_bytes);
  c.pool.max_cached_bytes = take<size_t>(o, "max_cached_bytes", c.pool.max_cached_bytes);
  c.pool.max_reserved_ratio = take<double>(o, "max_reserved_ratio", c.pool.max_reserved_ratio);
  if (!(c.pool.max_reserved_ratio == 0 || c.pool.max_reserved_ratio >= 1))
    throw std::invalid_argument("torchpool: max_reserved_ratio must be 0 (off) or a ratio >= 1");
  c.max_bytes = take<size_t>(o, "max_bytes", 0);
  c.arenas = take<unsigned>(o, "arenas", 1);
  if (c.arenas > 256)
    throw py::value_error("torchpool: option arenas=" + std::to_string(c.arenas) + " is out of range; valid: 1 to 256");
  c.device = take<int32_t>(o, "device_index", -1);
  c.device_name = take<std::string>(o, "device_name", "cpu");
  std::shared_ptr<Upstream> up;
  if (upstream == "host") {
    HostMmapOptions h;
    h.huge_pages = take<bool>(o, "huge_pages", h.huge_pages);
    h.populate = take<bool>(o, "populate", h.populate);
    up = std::make_shared<HostMmapUpstream>(h);
  } else if (upstream == "fake") {
    const size_t cap = take<size_t>(o, "capacity", SIZE_MAX);
    const size_t gran = take<size_t>(o, "granularity", 2u << 20);
    up = std::make_shared<FakeUpstream>(cap, gran);
  } else if (auto f = upstream_factories().find(upstream); f != upstream_factories().end()) {
    up = f->second(o);
  } else {
    throw py::value_error("torchpool: unknown upstream '" + upstream + "'");
  }
  if (!o.empty()) {
    std::string keys;
    for (auto item : o) keys += (keys.empty() ? "" : ", ") + py::str(item.first).cast<std::string>();
    throw py::value_error("torchpool: unknown allocator option(s): " + keys);
  }
  return std::make_shared<CachingAllocator>(std::move(up), std::move(c));
}

std::map<std::string, UpstreamFactory>& upstream_factories() {
  static std::map<std::string, UpstreamFactory> f;
  return f;
}

py::dict stats_dict(const Stats& s) {
  py::dict d;
#define TP_EXPORT_GAUGE(name, help)                               \
  d[#name ".all.current"] = s.name.current;                       \
  d[#name ".all.peak"] = s.name.peak;                             \
  d[#name ".all.allocated"] = s.name.allocated;                   \
  d[#name ".all.freed"] = s.name.freed;
  TORCHPOOL_GAUGES(TP_EXPORT_GAUGE)
#undef TP_EXPORT_GAUGE
#define TP_EXPORT_COUNTER(name, help) d[#name] = s.name;
  TORCHPOOL_COUNTERS(TP_EXPORT_COUNTER)
#undef TP_EXPORT_COUNTER
  d["largest_free_block"] = s.largest_free_block;
  py::list classes;
  for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
    const ClassStat& c = s.classes[i];
    if (c.hits == 0 && c.misses == 0 && c.cached_blocks == 0 && c.allocated_blocks == 0) continue;
    py::dict row;
    row["index"] = i;
    row["bytes"] = kSizeClasses[i].bytes;
    row["allocated_blocks"] = c.allocated_blocks;
    row["peak_allocated_blocks"] = c.peak_allocated_blocks;
    row["cached_blocks"] = c.cached_blocks;
    row["requested_bytes"] = c.requested_bytes;
    row["hits"] = c.hits;
    row["misses"] = c.misses;
    classes.append(row);
  }
  d["size_classes"] = classes;
  return d;
}

py::dict stat_help() {
  py::dict d;
#define TP_HELP(name, help) d[#name] = help;
  TORCHPOOL_GAUGES(TP_HELP)
  TORCHPOOL_COUNTERS(TP_HELP)
#undef TP_HELP
  return d;
}

py::list snapshot_list(const std::vector<SegmentView>& segs) {
  static const char* states[] = {"free", "cached", "allocated"};
  py::list out;
  for (const auto& s : segs) {
    py::dict seg;
    seg["address"] = s.base;
    seg["total_size"] = s.size;
    seg["stream"] = s.stream;
    seg["segment_type"] = s.small ? "small" : "large";
    seg["expandable"] = s.expandable;
    seg["reserved_size"] = s.reserved;  // address space held; total_size is what is mapped
    seg["extent"] = s.extent;           // bytes the blocks cover (> total_size when there are holes)
    py::list blocks;
    size_t allocated = 0, requested = 0;
    for (const auto& b : s.blocks) {
      py::dict bd;
      bd["address"] = b.addr;
      bd["size"] = b.size;
      bd["requested_size"] = b.requested;
      bd["size_class"] = b.cls;
      bd["mapped_size"] = b.mapped;  // < size only for a free block over unmapped chunks (expandable)
      // A block freed by its owner while another stream may still use it reads "deferred": it is
      // active (counted in active_bytes) but not allocated.
      bd["state"] = b.deferred ? "deferred" : states[b.state];
      if (b.state == Block::kAllocated && !b.deferred) {
        allocated += b.size;
        requested += b.requested;
      }
      blocks.append(bd);
    }
    seg["allocated_size"] = allocated;
    seg["requested_size"] = requested;
    seg["blocks"] = blocks;
    out.append(seg);
  }
  return out;
}

}  // namespace torchpool::bindings

TORCHPOOL_BINDINGS(0, core) {
  using namespace torchpool::bindings;
  py::register_exception<std::invalid_argument>(m, "InvalidArgument", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OutOfMemory& e) {
      py::object oom = py::module_::import("torch").attr("OutOfMemoryError");
      PyErr_SetString(oom.ptr(), e.what());
    }
  });

  m.attr("num_size_classes") = kNumSizeClasses;
  m.attr("max_class_bytes") = kMaxClassBytes;
  m.def("size_class_table", [] {
    py::list out;
    for (const auto& c : kSizeClasses) out.append(py::make_tuple(c.index, c.bytes, c.worst_waste_bp));
    return out;
  }, "[(index, bytes, worst_case_waste_basis_points)] from the single table in csrc/core");
  m.def("class_of", [](size_t bytes) {
    if (bytes == 0 || bytes > kMaxClassBytes) throw py::value_error("size out of the size-class range");
    return class_of(bytes);
  });
  m.def("stat_help", &stat_help);
  m.attr("trace_record_bytes") = sizeof(TraceEvent);

  py::class_<CachingAllocator, std::shared_ptr<CachingAllocator>>(m, "Allocator", R"doc(
A caching allocator over an upstream ("host": one anonymous mmap per segment; "fake": fake addresses
for tests; more upstreams register themselves). Keyword options configure the pool; unknown ones raise.)doc")
      .def(py::init([](const std::string& upstream, py::kwargs kw) { return make_allocator(upstream, kw); }),
           py::arg("upstream") = "host")
      .def("allocate", [](CachingAllocator& a, size_t n, uint64_t stream) {
             return reinterpret_cast<uintptr_t>(a.allocate(n, stream));
           }, py::arg("nbytes"), py::arg("stream") = 0)
      .def("free", [](CachingAllocator& a, uintptr_t p) {
             if (!a.free(reinterpret_cast<void*>(p)))
               throw py::value_error("torchpool: free of address " + std::to_string(p) + " that this allocator does not own");
           })
      .def("owns", [](const CachingAllocator& a, uintptr_t p) { return a.owns(reinterpret_cast<void*>(p)); })
      .def("block_size", [](const CachingAllocator& a, uintptr_t p) { return a.block_size(reinterpret_cast<void*>(p)); })
      .def("empty_cache", [](CachingAllocator& a) {
             py::gil_scoped_release nogil;
             return a.empty_cache();
           })
      .def("stats", [](const CachingAllocator& a) { return stats_dict(a.stats()); })
      .def("reset_peak_stats", &CachingAllocator::reset_peaks)
      .def("snapshot", [](const CachingAllocator& a) { return snapshot_list(a.snapshot()); })
      .def("check", &CachingAllocator::check, "The is_valid() walk: '' when every invariant holds, else the first violation")
      .def("describe", [](const CachingAllocator& a) { return a.describe(0); })
      .def_property_readonly("upstream_name", [](CachingAllocator& a) { return std::string(a.upstream().name()); })
      .def_property_readonly("device_name", [](const CachingAllocator& a) { return a.config().device_name; })
      .def_property_readonly("max_bytes", [](const CachingAllocator& a) { return a.config().max_bytes; })
      .def("trace_start", [](CachingAllocator& a, size_t capacity) { a.trace().start(capacity); }, py::arg("capacity") = 1u << 20)
      .def("trace_stop", [](CachingAllocator& a) {
             auto ev = a.trace().stop();
             return py::bytes(reinterpret_cast<const char*>(ev.data()), ev.size() * sizeof(TraceEvent));
           }, "Stops recording; returns the events as packed 48-byte records (see torchpool.trace)")
      .def("trace_dropped", [](CachingAllocator& a) { return a.trace().dropped(); })
      .def_property_readonly("tracing", [](CachingAllocator& a) { return a.trace().enabled(); });
}
