#include <algorithm>

#include "registry.h"

#ifndef TORCHPOOL_TORCH_VERSION
#error "TORCHPOOL_TORCH_VERSION must be defined by the build"
#endif

namespace torchpool::bindings {
std::vector<Registration>& registrations() {
  static std::vector<Registration> r;
  return r;
}
}  // namespace torchpool::bindings

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchpool native extension";
  m.attr("built_with_torch") = TORCHPOOL_TORCH_VERSION;
#if TORCHPOOL_DEBUG
  m.attr("debug_level") = TORCHPOOL_DEBUG;
#else
  m.attr("debug_level") = 0;
#endif
  auto regs = torchpool::bindings::registrations();
  std::stable_sort(regs.begin(), regs.end(), [](const auto& a, const auto& b) { return a.order < b.order; });
  for (const auto& r : regs) r.fn(m);
}
