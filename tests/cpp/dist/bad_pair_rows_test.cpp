#include "dde/dist/bad_pair_rows.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "dde/util/error.hpp"

namespace dde::dist {
namespace {

data::BadPair bad(const std::string& reason, const std::string& key, int64_t pair_id) {
  data::BadPair b;
  b.reason = reason;
  b.shard = "shard-000007.tar";
  b.key = key;
  b.pair_id = pair_id;
  b.message = "not sent";
  return b;
}

TEST(BadPairRows, RoundTripThroughAGatherInRankOrder) {
  // Two ranks padded to the step's global count (3): what all_gather concatenates.
  const torch::Tensor rank0 = bad_pair_rows({bad("undecodable_image", "k0", 5)}, 0, 3);
  const torch::Tensor rank1 =
      bad_pair_rows({bad("bad_input_ids", "k1", 6), bad("image_too_large", "k2", 1LL << 40)}, 1, 3);
  ASSERT_EQ(rank0.size(0), 3);
  ASSERT_EQ(rank0.scalar_type(), torch::kInt64);  // a collective's tensor: fixed width, int64
  const std::vector<RankedBadPair> got = bad_pairs_from_rows(torch::cat({rank0, rank1}));
  ASSERT_EQ(got.size(), 3U);  // the padding rows are dropped
  EXPECT_EQ(got[0].rank, 0);
  EXPECT_EQ(got[0].pair.reason, "undecodable_image");
  EXPECT_EQ(got[0].pair.key, "k0");
  EXPECT_EQ(got[0].pair.shard, "shard-000007.tar");
  EXPECT_EQ(got[0].pair.pair_id, 5);
  EXPECT_EQ(got[1].rank, 1);
  EXPECT_EQ(got[1].pair.reason, "bad_input_ids");
  EXPECT_EQ(got[2].pair.pair_id, 1LL << 40);  // an epoch in the high bits survives
  EXPECT_TRUE(got[2].pair.message.empty());   // the message stays on its rank
}

TEST(BadPairRows, LongTextIsCutAt64BytesAndTooFewRowsIsABug) {
  const std::string key(100, 'x');
  const auto got = bad_pairs_from_rows(bad_pair_rows({bad("r", key, 1)}, 2, 1));
  ASSERT_EQ(got.size(), 1U);
  EXPECT_EQ(got[0].pair.key, std::string(64, 'x'));
  EXPECT_EQ(got[0].rank, 2);
  EXPECT_THROW(bad_pair_rows({bad("r", "k", 1), bad("r", "k", 2)}, 0, 1), Error);
  EXPECT_TRUE(bad_pairs_from_rows(bad_pair_rows({}, 0, 4)).empty());
}

}  // namespace
}  // namespace dde::dist
