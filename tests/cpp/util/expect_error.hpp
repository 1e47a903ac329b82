// Shared by the C++ tests: asserts that `f` throws a dde::Error whose message contains every
// one of `parts` (the boundary checks promise to say what, where, expected and actual).
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

#include "dde/util/error.hpp"

inline void expect_error_mentions(const std::function<void()>& f,
                                  const std::vector<std::string>& parts) {
  try {
    f();
    FAIL() << "expected dde::Error";
  } catch (const dde::Error& e) {
    for (const auto& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "'" << part << "' not in: " << e.what();
    }
  }
}
