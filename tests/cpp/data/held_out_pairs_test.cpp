#include "dde/data/held_out_pairs.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "data/shard_fixture.hpp"

namespace dde::data {
namespace {

using testing::kResolution;
using testing::kTokenizers;

using testing::expect_error;
using testing::FixturePair;
using testing::TempDir;

// 2 shards, 7 pairs, 2 ties (numbers 1 and 5): held-out ids 0..4 are pair numbers 0, 2, 3, 4, 6.
std::vector<std::vector<FixturePair>> held_out_shards() {
  return {{{1.0}, {0.5}, {0.0}, {1.0}}, {{0.0}, {0.5}, {1.0}}};
}
const std::vector<int64_t> kNumbers = {0, 2, 3, 4, 6};
double held_out_label(int64_t number) {
  const std::vector<double> labels = {1.0, 0.5, 0.0, 1.0, 0.0, 0.5, 1.0};
  return labels[static_cast<size_t>(number)];
}

HeldOutOptions options(const std::string& index, int64_t rank = 0, int64_t world = 1) {
  HeldOutOptions o;
  o.index_path = index;
  o.resolution = kResolution;
  o.rank = rank;
  o.world_size = world;
  o.expected_vocab_sha256 = {"sha_a", "sha_b"};
  return o;
}

std::vector<PairBatch> read_all(HeldOutPairs& pairs, int64_t batch) {
  std::vector<PairBatch> out;
  while (std::optional<PairBatch> b = pairs.next(batch)) out.push_back(std::move(*b));
  return out;
}

// Mean green level in [0, 255] of uint8 images [B, 3, H, W], per image.
torch::Tensor green(const torch::Tensor& images) {
  return images.select(1, 1).flatten(1).to(torch::kFloat64).mean(1);
}

TEST(HeldOutPairs, EveryNonTiePairInFileOrderWithoutAugmentation) {
  TempDir dir;
  const std::string index = testing::write_fixture(dir.path(), held_out_shards(), kTokenizers);
  HeldOutPairs pairs(options(index));
  EXPECT_EQ(pairs.total_pairs(), 5);
  const std::vector<PairBatch> batches = read_all(pairs, 2);
  ASSERT_EQ(batches.size(), 3u);  // 2 + 2 + 1
  int64_t id = 0;
  for (const PairBatch& b : batches) {
    const int64_t B = b.winner.size(0);
    EXPECT_EQ(b.winner.sizes(), (std::vector<int64_t>{B, 3, kResolution, kResolution}));
    EXPECT_FALSE(b.caption_dropped.any().item<bool>());
    for (int64_t i = 0; i < B; ++i, ++id) {
      const int64_t number = kNumbers[static_cast<size_t>(id)];
      EXPECT_EQ(b.pair_ids[i].item<int64_t>(), id);
      EXPECT_EQ(b.keys[static_cast<size_t>(i)], testing::fixture_key(number));
      EXPECT_EQ(b.captions[static_cast<size_t>(i)], "caption " + std::to_string(number));
      EXPECT_EQ(b.input_ids[1][i][2].item<int64_t>(), testing::fixture_token(1, number, 2));
      // The winner is the preferred (bright) image whatever side it was stored on.
      EXPECT_NEAR(green(b.winner)[i].item<double>(), testing::kPreferredGreen, 3.0);
      EXPECT_NEAR(green(b.loser)[i].item<double>(), testing::kOtherGreen, 3.0);
      // Never flipped: the red ramp rises from left to right.
      const torch::Tensor red = b.winner[i][0].to(torch::kFloat64);
      EXPECT_LT(red.select(1, 0).mean().item<double>(), red.select(1, 7).mean().item<double>());
      // Original size and center-crop offsets of the winner, as SDXL's time ids record them.
      const int which = held_out_label(number) == 0.0 ? 1 : 0;
      const auto [h, w] = testing::fixture_size(number, which);
      EXPECT_EQ(b.winner_original_hw[i][0].item<int64_t>(), h);
      EXPECT_EQ(b.winner_original_hw[i][1].item<int64_t>(), w);
      const int short_side = std::min(h, w);
      const int rh = h == short_side ? 8 : 8 * h / short_side;
      const int rw = w == short_side ? 8 : 8 * w / short_side;
      EXPECT_EQ(b.winner_crop_tl[i][0].item<int64_t>(), center_crop_offset(rh, 8));
      EXPECT_EQ(b.winner_crop_tl[i][1].item<int64_t>(), center_crop_offset(rw, 8));
    }
  }
  EXPECT_EQ(id, 5);
  EXPECT_FALSE(pairs.next(2).has_value());
}

TEST(HeldOutPairs, RanksTakeDisjointSharesByIdWhateverTheBatch) {
  TempDir dir;
  const std::string index = testing::write_fixture(dir.path(), held_out_shards(), kTokenizers);
  std::set<int64_t> seen;
  for (int64_t rank = 0; rank < 2; ++rank) {
    HeldOutPairs pairs(options(index, rank, 2));
    EXPECT_EQ(pairs.total_pairs(), 5);
    for (const PairBatch& b : read_all(pairs, 3)) {
      for (int64_t i = 0; i < b.pair_ids.size(0); ++i) {
        const int64_t id = b.pair_ids[i].item<int64_t>();
        EXPECT_EQ(id % 2, rank);
        EXPECT_TRUE(seen.insert(id).second) << "pair " << id << " read twice";
      }
    }
  }
  EXPECT_EQ(seen, (std::set<int64_t>{0, 1, 2, 3, 4}));
}

TEST(HeldOutPairs, BadIndexIsAClearError) {
  TempDir dir;
  expect_error([&] { HeldOutPairs p(options(dir.file("missing/index.json"))); },
               {"held-out index not found", "missing/index.json", "data.eval_index"});
  const std::string index = testing::write_fixture(dir.path(), held_out_shards(), kTokenizers);
  HeldOutOptions other = options(index);
  other.expected_vocab_sha256 = {"sha_a", "sha_c"};
  expect_error([&] { HeldOutPairs p(other); },
               {"other tokenizers than the model's", "sha_c", "tok_b sha_b", "export_pickapic"});
  TempDir ties;
  const std::string only_ties = testing::write_fixture(ties.path(), {{{0.5}, {0.5}}}, kTokenizers);
  expect_error([&] { HeldOutPairs p(options(only_ties)); },
               {"held-out index holds no usable pair", ">= 1 pair that is not a tie"});
}

}  // namespace
}  // namespace dde::data
