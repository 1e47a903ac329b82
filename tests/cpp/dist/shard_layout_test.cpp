#include "dde/dist/shard_layout.hpp"

#include <gtest/gtest.h>

#include "dde/util/error.hpp"

namespace {

using dde::dist::partition_parameters;

// Every parameter belongs to exactly one rank, in order, without overlap in the flat buffer.
void expect_consistent(const dde::dist::ShardLayout& l, const std::vector<int64_t>& numels) {
  ASSERT_EQ(l.owner.size(), numels.size());
  std::vector<int64_t> used(static_cast<size_t>(l.world_size), 0);
  for (int64_t r = 0; r < l.world_size; ++r) {
    for (int64_t i = l.first[r]; i < l.end[r]; ++i) {
      EXPECT_EQ(l.owner[i], r);
      EXPECT_EQ(l.offset[i], used[r]) << "parameters back to back in the segment";
      used[r] += numels[i];
    }
    EXPECT_LE(used[r], l.segment);
    if (r + 1 < l.world_size) {
      EXPECT_EQ(l.end[r], l.first[r + 1]);
    }
  }
  EXPECT_EQ(l.first.front(), 0);
  EXPECT_EQ(l.end.back(), static_cast<int64_t>(numels.size()));
}

TEST(ShardLayout, SplitsWholeParametersIntoBalancedContiguousRuns) {
  const std::vector<int64_t> numels{100, 100, 100, 100, 10, 90, 100, 100};
  const auto l = partition_parameters(numels, 2);
  expect_consistent(l, numels);
  EXPECT_EQ(l.end[0], 4);  // 400 | 400
  EXPECT_EQ(l.segment, 400);
  EXPECT_EQ(l.flat_offset(4), 400);
}

TEST(ShardLayout, ARankMayOwnNothingAndTheSegmentIsTheLargestShare) {
  const std::vector<int64_t> numels{10, 1000, 5};
  const auto l = partition_parameters(numels, 4);
  expect_consistent(l, numels);
  EXPECT_EQ(l.segment, 1010);  // starts 0 and 10 fall in rank 0's quarter: 10 + 1000
  int64_t empty = 0;
  for (int64_t r = 0; r < 4; ++r) empty += l.first[r] == l.end[r] ? 1 : 0;
  EXPECT_GE(empty, 1);
}

TEST(ShardLayout, OneRankHoldsEverything) {
  const std::vector<int64_t> numels{3, 4, 5};
  const auto l = partition_parameters(numels, 1);
  expect_consistent(l, numels);
  EXPECT_EQ(l.segment, 12);
}

TEST(ShardLayout, BadWorldSizeIsAnError) {
  EXPECT_THROW(partition_parameters({1, 2}, 0), dde::Error);
}

}  // namespace
