#include "dde/util/error.hpp"

#include <gtest/gtest.h>

TEST(Error, MessageNamesWhatWhereExpectedActualHint) {
  const dde::Error e(
      {"value out of range", "cfg.yaml: optim.lr", "> 0", "-1", "set a positive lr"});
  EXPECT_STREQ(e.what(),
               "value out of range (cfg.yaml: optim.lr): expected > 0, got -1. set a positive lr");
}

TEST(Error, OptionalPartsAreLeftOut) {
  const dde::Error e({"file not found", "/x/y", "", "", ""});
  EXPECT_STREQ(e.what(), "file not found (/x/y)");
}
