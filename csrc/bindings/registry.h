// Each bindings file registers itself; module.cc runs them all, so adding a component's bindings
// never edits another component's file.
#pragma once

#include <pybind11/pybind11.h>

#include <functional>
#include <utility>
#include <vector>

namespace torchpool::bindings {

using BindFn = void (*)(pybind11::module_&);

struct Registration {
  int order;
  const char* name;
  BindFn fn;
};

std::vector<Registration>& registrations();

struct Registrar {
  Registrar(int order, const char* name, BindFn fn) { registrations().push_back({order, name, fn}); }
};

}  // namespace torchpool::bindings

// TORCHPOOL_BINDINGS(order, name) { ...body using `m`... }  Lower order binds first.
#define TORCHPOOL_BINDINGS(order, name)                                                         \
  static void torchpool_bind_##name(pybind11::module_& m);                                      \
  static ::torchpool::bindings::Registrar torchpool_registrar_##name(order, #name, &torchpool_bind_##name); \
  static void torchpool_bind_##name(pybind11::module_& m)
