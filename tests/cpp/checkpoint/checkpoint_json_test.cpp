#include "dde/checkpoint/checkpoint_json.hpp"

#include <gtest/gtest.h>

#include "util/expect_error.hpp"

namespace dde::checkpoint {
namespace {

TEST(CheckpointJson, TrainerAndRankStateRoundTrip) {
  const TrainerStateFile t{12, 1, 0, 2, "dde", "adafactor", true, 0.99, 11};
  const TrainerStateFile t2 = parse_trainer_state(trainer_state_json(t), "trainer_state.json");
  EXPECT_EQ(t2.step, 12);
  EXPECT_EQ(t2.optimizer_name, "adafactor");
  EXPECT_TRUE(t2.optimizer_sharded);
  EXPECT_EQ(t2.correction_momentum, 0.99);
  const RankStateFile r{1, 2, 3, 40, 5, 7};
  const RankStateFile r2 = parse_rank_state(rank_state_json(r), "rank-00001.json");
  EXPECT_EQ(r2.epoch, 3);
  EXPECT_EQ(r2.pairs_consumed, 40);
  EXPECT_EQ(r2.bad_pairs, 5);
  EXPECT_EQ(r2.intra_op_threads, 7);
}

TEST(CheckpointJson, OlderFilesTakeTheDocumentedDefaults) {
  const TrainerStateFile t = parse_trainer_state(
      R"({"format": "dde-checkpoint", "version": 1, "step": 3, "skipped_steps": 0,
          "nonfinite_in_row": 0, "world_size": 1, "method": "dde",
          "correction": {"momentum": 0.9, "updates": 3}})",
      "trainer_state.json");
  EXPECT_EQ(t.optimizer_name, "adamw");
  EXPECT_FALSE(t.optimizer_sharded);
  const RankStateFile r = parse_rank_state(
      R"({"rank": 0, "world_size": 1, "loader": {"epoch": 0, "pairs_consumed": 7}})", "rank.json");
  EXPECT_EQ(r.bad_pairs, 0);
  EXPECT_EQ(r.intra_op_threads, 0);  // before the thread tuner: nothing decided
}

TEST(CheckpointJson, MalformedFilesAreErrorsNamingFileAndKey) {
  expect_error_mentions([] { parse_rank_state(R"({"world_size": 1, "loader": 5})", "r.json"); },
                        {"damaged checkpoint file", "r.json: loader: epoch", "absent"});
  expect_error_mentions([] { parse_rank_state(R"({"world_size": 1e400})", "r.json"); },
                        {"damaged checkpoint file", "r.json"});
  expect_error_mentions(
      [] { parse_rank_state(R"({"world_size": 18446744073709551615})", "r.json"); },
      {"r.json: world_size", "an integer >= 0", "18446744073709551615"});
  expect_error_mentions(
      [] {
        parse_rank_state(R"({"world_size": 1, "loader": {"epoch": 0, "pairs_consumed": 0},
                             "intra_op_threads": -2})",
                         "r.json");
      },
      {"r.json: intra_op_threads", "an integer >= 0", "-2"});
  expect_error_mentions([] { parse_trainer_state("[]", "t.json"); },
                        {"damaged checkpoint file", "t.json", "a JSON object", "array"});
}

}  // namespace
}  // namespace dde::checkpoint
