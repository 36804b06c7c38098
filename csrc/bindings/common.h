// Shared by the bindings files: making an allocator from Python options, and exporting its state.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "../core/allocator.h"

namespace torchpool::bindings {

// Other components (host VMM, pinned, CUDA driver) add upstreams by name. The factory pops the
// options it understands from the dict; make_allocator rejects whatever is left.
using UpstreamFactory = std::function<std::shared_ptr<Upstream>(pybind11::dict&)>;
std::map<std::string, UpstreamFactory>& upstream_factories();

std::shared_ptr<CachingAllocator> make_allocator(const std::string& upstream, pybind11::dict options);
pybind11::dict stats_dict(const Stats& s);
pybind11::list snapshot_list(const std::vector<SegmentView>& segs);

}  // namespace torchpool::bindings
