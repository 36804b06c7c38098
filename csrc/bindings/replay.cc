// Bindings of the replay engine (csrc/replay): ReplayTrace compiles packed 48-byte TraceEvent records
// once and measures/times them against named allocators.  torchpool.replay is the Python front.
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>

#include "../replay/pytorch_policy.h"
#include "../replay/replay.h"
#include "common.h"
#include "registry.h"

namespace py = pybind11;
using namespace torchpool;
using namespace torchpool::replay;

namespace {

std::vector<TraceEvent> events_from(const py::bytes& data) {
  std::string_view v = data;
  if (v.size() % sizeof(TraceEvent) != 0)
    throw py::value_error("torchpool: trace records must be a multiple of " + std::to_string(sizeof(TraceEvent)) +
                          " bytes, got " + std::to_string(v.size()));
  std::vector<TraceEvent> ev(v.size() / sizeof(TraceEvent));
  if (!ev.empty()) std::memcpy(ev.data(), v.data(), v.size());
  return ev;
}

const AllocatorInfo& lookup(const std::string& name) {
  const AllocatorInfo* a = find_allocator(name);
  if (!a) {
    std::string names;
    for (const auto& x : allocators()) names += (names.empty() ? "" : ", ") + x.name;
    throw py::value_error("torchpool: unknown allocator '" + name + "' (known: " + names + ")");
  }
  if (!a->available) throw py::value_error("torchpool: allocator '" + name + "' is not available: " + a->unavailable_reason);
  return *a;
}

py::dict result_dict(const Result& r) {
  py::dict d;
  d["allocator"] = r.allocator;
  d["ops"] = r.ops;
  d["allocs"] = r.allocs;
  d["frees"] = r.frees;
  d["ooms"] = r.ooms;
  d["peak_live_bytes"] = r.peak_live_bytes;
  d["peak_reserved_bytes"] = r.peak_reserved_bytes;
  d["peak_reserved_op"] = r.peak_reserved_op;
  d["internal_waste_bytes"] = r.internal_waste_bytes;
  d["external_fragmentation"] = std::isnan(r.external_fragmentation) ? py::object(py::none()) : py::float_(r.external_fragmentation);
  d["upstream_calls"] = r.upstream_calls < 0 ? py::object(py::none()) : py::int_(r.upstream_calls);
  d["reserved_samples"] = r.reserved_samples;
  d["measure_seconds"] = r.measure_seconds;
  py::list tl;
  for (const Sample& s : r.timeline) tl.append(py::make_tuple(s.op, s.live, s.reserved));
  d["timeline"] = tl;
  return d;
}

struct PyReplayTrace {
  CompiledTrace trace;
};

}  // namespace

TORCHPOOL_BINDINGS(40, replay) {
  // Note [Replay input bounds]: both are ValueErrors; torchpool.replay turns them into
  // TraceFormatError / TraceLimitError naming the trace.
  py::register_exception<ReplayInputError>(m, "ReplayInputError", PyExc_ValueError);
  py::register_exception<ReplayLimitError>(m, "ReplayLimitError", PyExc_ValueError);
  m.attr("replay_default_max_system_bytes") = kDefaultMaxSystemBytes;
  m.def("replay_allocators", [] {
    py::list out;
    for (const auto& a : allocators()) {
      py::dict d;
      d["name"] = a.name;
      d["kind"] = a.kind;
      d["description"] = a.description;
      d["available"] = a.available;
      d["unavailable_reason"] = a.unavailable_reason;
      out.append(d);
    }
    return out;
  }, "Every allocator the replay knows: name, kind (torchpool / emulation / system), availability");

  m.def("replay_modes", [] {
    py::list out;
    for (const TorchpoolMode& mode : torchpool_modes()) {
      py::dict d;
      d["name"] = mode.name;
      d["description"] = mode.description;
      d["device"] = mode.device == Device::kCpu ? "cpu" : "cuda";
      d["options"] = bindings::options_dict(mode.options);
      out.append(d);
    }
    return out;
  }, "torchpool's replay modes (Note [Replay modes]): name, description, device, options (the schema's values)");

  py::class_<PyReplayTrace>(m, "ReplayTrace", "A trace compiled for replay (Note [Replay slots] in csrc/replay/replay.h)")
      .def(py::init([](const py::bytes& records) {
             auto ev = events_from(records);
             auto t = std::make_unique<PyReplayTrace>();
             {
               py::gil_scoped_release nogil;
               t->trace = compile(ev.data(), ev.size());
             }
             return t;
           }), py::arg("records"))
      .def_property_readonly("ops", [](const PyReplayTrace& t) { return t.trace.ops.size(); })
      .def_property_readonly("info", [](const PyReplayTrace& t) {
        py::dict d;
        d["ops"] = t.trace.ops.size();
        d["allocs"] = t.trace.allocs;
        d["frees"] = t.trace.frees;
        d["slots"] = t.trace.num_slots;
        d["unmatched_frees"] = t.trace.unmatched_frees;
        d["reused_live_addresses"] = t.trace.reused_live_addresses;
        d["ignored_events"] = t.trace.ignored_events;
        d["peak_live_bytes"] = t.trace.peak_live_bytes;
        d["peak_live_op"] = t.trace.peak_live_op;
        d["final_live_bytes"] = t.trace.final_live_bytes;
        return d;
      })
      .def("measure", [](const PyReplayTrace& t, const std::string& name, size_t timeline_points, size_t sample_every,
                         uint64_t max_system_bytes) {
             const AllocatorInfo& a = lookup(name);
             MeasureOptions o;
             o.timeline_points = timeline_points;
             o.sample_every = sample_every;
             o.max_system_bytes = max_system_bytes;
             Result r;
             {
               py::gil_scoped_release nogil;
               r = measure(a, t.trace, o);
             }
             return result_dict(r);
           }, py::arg("allocator"), py::arg("timeline_points") = 0, py::arg("sample_every") = 64,
           py::arg("max_system_bytes") = kDefaultMaxSystemBytes,
           "One measured pass on a fresh allocator (Note [Measures] in csrc/replay/replay.h)")
      .def("time", [](const PyReplayTrace& t, const std::string& name, int repeats, uint64_t max_system_bytes) {
             const AllocatorInfo& a = lookup(name);
             py::gil_scoped_release nogil;
             return time_ops(a, t.trace, repeats, max_system_bytes);
           }, py::arg("allocator"), py::arg("repeats") = 3, py::arg("max_system_bytes") = kDefaultMaxSystemBytes, "Seconds of the fastest of `repeats` timed passes")
      .def("snapshot_at", [](const PyReplayTrace& t, const std::string& name, uint64_t op) {
             const AllocatorInfo& a = lookup(name);
             MeasureOptions o;
             o.stop_after_op = op;
             std::unique_ptr<Adapter> keep;
             std::vector<SegmentView> segs;
             {
               py::gil_scoped_release nogil;
               measure(a, t.trace, o, &keep);
               segs = keep->snapshot();
             }
             return bindings::snapshot_list(segs);
           }, py::arg("allocator"), py::arg("op"),
           "Segments and blocks of the allocator after replaying ops [0, op] (empty for system allocators)");

  m.def("pytorch_policy_check", [](const py::bytes& records, bool expandable) {
    // Replays against the emulation with its invariant walk after every op (tests).
    auto ev = events_from(records);
    CompiledTrace t = compile(ev.data(), ev.size());
    PytorchPolicyConfig c;
    c.expandable_segments = expandable;
    PytorchPolicy p(c);
    std::vector<void*> ptr(t.num_slots, nullptr);
    for (size_t i = 0; i < t.ops.size(); ++i) {
      const Op& op = t.ops[i];
      if (!op.is_free) ptr[op.slot] = p.allocate(op.size, op.stream);
      else p.free(ptr[op.slot]);
      std::string e = p.check();
      if (!e.empty()) return "op " + std::to_string(i) + ": " + e;
    }
    return std::string();
  });
}
