// The size-class table is the single source of truth: every size maps to the smallest class that
// fits, and the annotated worst-case waste is what the table implies.
#include <doctest/doctest.h>

#include "core/size_classes.h"

using namespace torchpool;

TEST_CASE("class table is strictly increasing multiples of the quantum") {
  for (uint32_t i = 0; i < kNumSizeClasses; ++i) {
    CHECK(kSizeClasses[i].index == i);
    CHECK(kSizeClasses[i].bytes % kClassQuantum == 0);
    if (i) CHECK(kSizeClasses[i].bytes > kSizeClasses[i - 1].bytes);
  }
  CHECK(kSmallRequestLimit == (1u << 20));
}

TEST_CASE("every size up to the largest class maps to the smallest class that fits") {
  uint32_t expect = 0;
  for (size_t bytes = 1; bytes <= kSmallRequestLimit; ++bytes) {
    while (kSizeClasses[expect].bytes < bytes) ++expect;
    const uint32_t got = class_of(bytes);
    if (got != expect) {
      FAIL_CHECK("size " << bytes << " maps to class " << got << " but the smallest fitting class is " << expect);
      break;
    }
  }
}

TEST_CASE("annotated worst-case waste matches the table") {
  uint32_t prev = 0;
  for (const auto& c : kSizeClasses) {
    const uint64_t waste_bp = uint64_t{c.bytes - (prev + 1)} * 10000 / c.bytes;
    CHECK(c.worst_waste_bp == waste_bp);
    // above 1 KiB eight classes per doubling bound the waste by 1/9
    if (c.bytes > 1024) CHECK(c.worst_waste_bp <= 1112);
    prev = c.bytes;
  }
}
