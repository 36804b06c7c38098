// Bindings of the core: Allocator (a CachingAllocator over a chosen upstream), stats, snapshot, trace.
#include <pybind11/stl.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "../core/allocator.h"
#include "../core/options.h"
#include "../core/serialize.h"
#include "../upstreams/fake.h"
#include "../upstreams/host_mmap.h"
#include "common.h"
#include "registry.h"

namespace py = pybind11;
using namespace torchpool;

namespace torchpool::bindings {

namespace {

// A Python value as the option's type, checked by the schema's rule (Note [One option schema]).
OptionValue to_value(const OptionInfo& info, py::handle value) {
  const auto bad = [&](const char* what) {
    return py::value_error("torchpool: option " + std::string(info.name) + "=" + py::repr(value).cast<std::string>() +
                           " " + what + "; valid: " + rule_text(info));
  };
  OptionValue x;
  const bool is_bool = py::isinstance<py::bool_>(value);
  const bool is_int = py::isinstance<py::int_>(value) && !is_bool;
  switch (info.type) {
    case OptionType::kBool:
      if (is_bool) x.u = value.cast<bool>();
      else if (is_int && (value.cast<py::int_>().equal(py::int_(0)) || value.cast<py::int_>().equal(py::int_(1))))
        x.u = value.cast<int>();
      else throw bad("is not a boolean");
      return x;
    case OptionType::kRatio:
      if (!is_int && !py::isinstance<py::float_>(value)) throw bad("is not a number");
      x.d = PyFloat_AsDouble(value.ptr());
      if (x.d == -1.0 && PyErr_Occurred()) {  // an int too large for a double
        PyErr_Clear();
        throw bad("is out of range");
      }
      break;
    case OptionType::kBytes:
    case OptionType::kCount:
      if (!is_int) throw bad("is not an integer");
      x.u = PyLong_AsUnsignedLongLong(value.ptr());
      if (x.u == static_cast<uint64_t>(-1) && PyErr_Occurred()) {  // negative, or above 2**64-1
        PyErr_Clear();
        throw bad("is out of range");
      }
      break;
  }
  if (!in_range(info, x)) throw bad("is out of range");
  return x;
}

py::object to_python(const OptionInfo& info, const OptionValue& x) {
  switch (info.type) {
    case OptionType::kBool: return py::bool_(x.u != 0);
    case OptionType::kRatio: return py::float_(x.d);
    default: return py::int_(x.u);
  }
}

const char* scope_name(OptionScope s) {
  switch (s) {
    case OptionScope::kPool: return "pool";
    case OptionScope::kUpstream: return "upstream";
    case OptionScope::kInstall: return "install";
  }
  return "?";
}

// Allocator.options.  Immortal, as the CPU slot: an allocator may be freed with the last tensor during exit.
struct OptionRecords {
  std::mutex mu;
  std::unordered_map<const CachingAllocator*, OptionValues> values;
};
OptionRecords& records() {
  static auto* r = new OptionRecords();
  return *r;
}

// Builds dicts and lists as the serializer walks (Note [One serializer], core/serialize.h).
class PyEmitter {
 public:
  void begin_object() { open(py::dict()); }
  void end_object() { stack_.pop_back(); }
  void begin_array() { open(py::list()); }
  void end_array() { stack_.pop_back(); }
  void key(std::string_view k) { key_ = py::str(k.data(), k.size()); }
  void value(int64_t v) { put(py::int_(v)); }
  void value(uint64_t v) { put(py::int_(v)); }
  void value(bool v) { put(py::bool_(v)); }
  void value(std::string_view v) { put(py::str(v.data(), v.size())); }
  py::object result() const { return result_; }

 private:
  void put(py::object v) {
    if (stack_.empty()) result_ = v;
    else if (py::isinstance<py::dict>(stack_.back())) stack_.back()[key_] = v;
    else stack_.back().cast<py::list>().append(v);
  }
  void open(py::object container) {
    put(container);
    stack_.push_back(container);
  }
  std::vector<py::object> stack_;
  py::object result_;
  py::object key_;
};

}  // namespace

std::shared_ptr<CachingAllocator> make_allocator(const std::string& upstream_name, py::dict options) {
  py::dict o = options.attr("copy")();
  OptionValues v = default_options(Device::kCpu);
  std::vector<const OptionInfo*> given;
  for (auto item : py::list(o.attr("items")())) {
    const py::tuple kv = item.cast<py::tuple>();
    const std::string name = py::str(kv[0]).cast<std::string>();
    const OptionInfo* info = find_option(name);
    if (!info) continue;  // an upstream's construction argument, or unknown (refused below)
    if (info->scope == OptionScope::kInstall)
      throw py::value_error("torchpool: option '" + name + "' is read by torchpool.install(), not by Allocator()");
    set_option(v, *info, to_value(*info, kv[1]));
    given.push_back(info);
    o.attr("pop")(kv[0]);
  }
  std::string upstream = upstream_name;
  if (upstream == "cpu") {  // what install() builds: the expandable_segments option picks the upstream
    upstream = v.expandable_segments ? "host_vmm" : "host";
    std::erase_if(given, [](const OptionInfo* i) { return i->id == OptionId::expandable_segments; });
  }
  const auto f = upstream_factories().find(upstream);
  if (f == upstream_factories().end()) throw py::value_error("torchpool: unknown upstream '" + upstream + "'");
  for (const OptionInfo* info : given)
    if (info->scope == OptionScope::kUpstream &&
        std::find(f->second.uses.begin(), f->second.uses.end(), info->name) == f->second.uses.end())
      throw py::value_error("torchpool: option '" + std::string(info->name) + "' does not apply to upstream '" + upstream +
                            "'");
  AllocatorConfig c = allocator_config(v, Device::kCpu);
  c.device = take<int32_t>(o, "device_index", -1);
  c.device_name = take<std::string>(o, "device_name", "cpu");
  std::shared_ptr<Upstream> up = f->second.make(v, o, c.device);
  if (!o.empty()) {
    std::string keys;
    for (auto item : o) keys += (keys.empty() ? "" : ", ") + py::str(item.first).cast<std::string>();
    throw py::value_error("torchpool: unknown allocator option(s): " + keys + " (the options: torchpool.options())");
  }
  auto* a = new CachingAllocator(std::move(up), std::move(c));
  {
    std::lock_guard<std::mutex> g(records().mu);
    records().values[a] = v;
  }
  return std::shared_ptr<CachingAllocator>(a, [](CachingAllocator* p) {
    {
      std::lock_guard<std::mutex> g(records().mu);
      records().values.erase(p);
    }
    delete p;
  });
}

const OptionValues* allocator_options(const CachingAllocator* a) {
  std::lock_guard<std::mutex> g(records().mu);
  const auto it = records().values.find(a);
  return it == records().values.end() ? nullptr : &it->second;  // stable: entries leave only with the allocator
}

py::dict options_dict(const OptionValues& v) {
  py::dict d;
  for (const OptionInfo& info : option_table())
    if (info.scope != OptionScope::kInstall) d[info.name] = to_python(info, get_option(v, info));
  return d;
}

std::map<std::string, UpstreamFactory>& upstream_factories() {
  static std::map<std::string, UpstreamFactory> f;
  return f;
}

py::dict stats_dict(const Stats& s) {
  PyEmitter e;
  emit_stats(s, e);
  return e.result();
}

py::list snapshot_list(const std::vector<SegmentView>& segs) {
  PyEmitter e;
  emit_snapshot(segs, e);
  return e.result();
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

  upstream_factories()["host"] = {{"huge_pages", "populate"}, [](const OptionValues& v, py::dict&, int) {
    HostMmapOptions h;
    h.huge_pages = v.huge_pages;
    h.populate = v.populate;
    return std::shared_ptr<Upstream>(std::make_shared<HostMmapUpstream>(h));
  }};
  upstream_factories()["fake"] = {{}, [](const OptionValues&, py::dict& o, int) {
    const size_t cap = take<size_t>(o, "capacity", SIZE_MAX);
    const size_t gran = take<size_t>(o, "granularity", 2u << 20);
    return std::shared_ptr<Upstream>(std::make_shared<FakeUpstream>(cap, gran));
  }};

  m.attr("num_size_classes") = kNumSizeClasses;
  m.attr("small_request_limit") = kSmallRequestLimit;  // the largest size class (not the max_class_bytes option)
  m.def("size_class_table", [] {
    py::list out;
    for (const auto& c : kSizeClasses) out.append(py::make_tuple(c.index, c.bytes, c.worst_waste_bp));
    return out;
  }, "[(index, bytes, worst_case_waste_basis_points)] from the single table in csrc/core");
  m.def("class_of", [](size_t bytes) {
    if (bytes == 0 || bytes > kSmallRequestLimit) throw py::value_error("size out of the size-class range");
    return class_of(bytes);
  });
  m.def("options", [] {
    py::list out;
    const OptionValues cpu = default_options(Device::kCpu), cuda = default_options(Device::kCuda);
    for (const OptionInfo& info : option_table()) {
      py::dict d, defaults;
      py::list devices;
      d["name"] = info.name;
      d["type"] = type_name(info.type);
      d["unit"] = info.type == OptionType::kBytes ? "bytes" : "";
      if (info.on(Device::kCpu)) {
        devices.append("cpu");
        defaults["cpu"] = to_python(info, get_option(cpu, info));
      }
      if (info.on(Device::kCuda)) {
        devices.append("cuda");
        defaults["cuda"] = to_python(info, get_option(cuda, info));
      }
      d["default"] = defaults;
      d["default_text"] = info.default_text;
      d["devices"] = devices;
      d["scope"] = scope_name(info.scope);
      d["range"] = rule_text(info);
      d["help"] = info.help;
      out.append(d);
    }
    return out;
  }, "The option schema (csrc/core/options.h): one dict per option");
  m.def("option_in_range", [](const std::string& name, py::handle value) {
    const OptionInfo* info = find_option(name);
    if (!info) throw py::value_error("torchpool: unknown option '" + name + "'");
    try {
      to_value(*info, value);
      return true;
    } catch (const py::value_error&) {
      return false;
    }
  }, "Whether value (of the option's Python type) is valid for the option, by the schema's rule");

  py::class_<CachingAllocator, std::shared_ptr<CachingAllocator>>(m, "Allocator", R"doc(
A caching allocator over an upstream ("cpu": what torchpool.install() builds, host_vmm or host by
expandable_segments; "host": one anonymous mmap per segment; "host_vmm"; "fake": fake addresses for tests;
more upstreams register themselves). Keyword options are those of torchpool.options(), checked by the
schema's rule, defaults from its CPU column; unknown ones raise.)doc")
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
      .def_property_readonly("options", [](const CachingAllocator& a) -> py::object {
             const OptionValues* v = allocator_options(&a);
             return v ? py::object(options_dict(*v)) : py::object(py::none());
           }, "{option: value} this allocator was built with (the schema's defaults and the options given)")
      .def("trace_start", [](CachingAllocator& a, size_t capacity) { a.trace().start(capacity); }, py::arg("capacity") = 1u << 20)
      .def("trace_stop", [](CachingAllocator& a) {
             auto ev = a.trace().stop();
             return py::bytes(reinterpret_cast<const char*>(ev.data()), ev.size() * sizeof(TraceEvent));
           }, "Stops recording; returns the events as packed 48-byte records (see torchpool.trace)")
      .def("trace_dropped", [](CachingAllocator& a) { return a.trace().dropped(); })
      .def_property_readonly("tracing", [](CachingAllocator& a) { return a.trace().enabled(); });
}
