// Graded assertions (as mimalloc's mi_assert / mi_assert_internal / mi_assert_expensive).
//
//   TP_ASSERT(cond)           level >= 1: cheap checks on every operation (debug builds)
//   TP_ASSERT_EXPENSIVE(cond) level >= 2: whole-structure walks (Pool::check after every operation)
//
// TORCHPOOL_DEBUG is set by the build (cmake -DTORCHPOOL_DEBUG=2); release builds compile these away.
#pragma once

#include <cstdio>
#include <cstdlib>

#ifndef TORCHPOOL_DEBUG
#define TORCHPOOL_DEBUG 0
#endif

namespace torchpool::detail {
[[noreturn]] inline void assert_fail(const char* expr, const char* file, int line, const char* msg) {
  std::fprintf(stderr, "torchpool: assertion failed: %s at %s:%d %s\n", expr, file, line, msg ? msg : "");
  std::abort();
}
}  // namespace torchpool::detail

#if TORCHPOOL_DEBUG >= 1
#define TP_ASSERT(cond) ((cond) ? (void)0 : ::torchpool::detail::assert_fail(#cond, __FILE__, __LINE__, nullptr))
#else
#define TP_ASSERT(cond) ((void)0)
#endif

#if TORCHPOOL_DEBUG >= 2
#define TP_ASSERT_EXPENSIVE(check_expr)                                                       \
  do {                                                                                        \
    const std::string tp_msg_ = (check_expr);                                                 \
    if (!tp_msg_.empty())                                                                     \
      ::torchpool::detail::assert_fail(#check_expr, __FILE__, __LINE__, tp_msg_.c_str());     \
  } while (0)
#else
#define TP_ASSERT_EXPENSIVE(check_expr) ((void)0)
#endif
