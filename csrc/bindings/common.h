// Shared by the bindings files: making an allocator from Python options, and exporting its state.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../core/allocator.h"
#include "../core/options.h"

namespace torchpool::bindings {

// Other components (host VMM, pinned, CUDA driver) add upstreams by name.  `uses` names the
// upstream-level options of the schema (options.h) the upstream reads: one given for an upstream that
// does not read it is an error.  `make` gets every option's value, pops the construction arguments it
// understands that are not options (a fake's capacity, a device number) from `extra`; make_allocator
// rejects whatever is left.
struct UpstreamFactory {
  std::vector<std::string> uses;
  std::function<std::shared_ptr<Upstream>(const OptionValues&, pybind11::dict& extra, int device_index)> make;
};
std::map<std::string, UpstreamFactory>& upstream_factories();

// _C.Allocator(upstream, **options): the schema's CPU defaults, then the options (each checked by
// the schema's rule), then the upstream ("cpu": host_vmm, or host with expandable_segments=False).
std::shared_ptr<CachingAllocator> make_allocator(const std::string& upstream, pybind11::dict options);
// The option values an allocator from make_allocator was built from; null for others.
const OptionValues* allocator_options(const CachingAllocator* a);
// {name: value} of every option of pool and upstream scope.
pybind11::dict options_dict(const OptionValues& v);
pybind11::dict stats_dict(const Stats& s);
pybind11::list snapshot_list(const std::vector<SegmentView>& segs);

// A construction argument that is not an option (upstream factories): a clear error naming the key,
// the value and the valid range instead of pybind's "Unable to cast".
template <typename T>
T take(pybind11::dict& d, const char* key, T fallback) {
  namespace py = pybind11;
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

}  // namespace torchpool::bindings
