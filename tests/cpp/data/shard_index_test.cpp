#include "dde/data/shard_index.hpp"

#include <gtest/gtest.h>

#include "data/shard_fixture.hpp"

namespace dde::data {
namespace {

using testing::expect_error;
using testing::TempDir;
using testing::write_file;

nlohmann::json valid_index() {
  return {{"format", "dde-pickapic-shards"},
          {"version", 1},
          {"shards",
           {{{"file", "shard-000000.tar"}, {"pairs", 5}, {"ties", 1}},
            {{"file", "shard-000001.tar"}, {"pairs", 3}, {"ties", 0}}}},
          {"tokenizers",
           {{{"name", "tokenizer"}, {"vocab_sha256", "abc"}, {"max_length", 77}},
            {{"name", "tokenizer_2"}, {"vocab_sha256", "def"}, {"max_length", 77}}}}};
}

void write_shards(const TempDir& dir) {
  write_file(dir.file("shard-000000.tar"), testing::ustar_end());
  write_file(dir.file("shard-000001.tar"), testing::ustar_end());
}

TEST(ShardIndex, LoadsShardsRelativeToTheIndexAndTokenizers) {
  TempDir dir;
  write_shards(dir);
  write_file(dir.file("index.json"), valid_index().dump());
  const ShardIndex index = ShardIndex::load(dir.file("index.json"));
  ASSERT_EQ(index.shards.size(), 2u);
  EXPECT_EQ(index.shards[0].file, "shard-000000.tar");
  EXPECT_EQ(index.shards[0].path, dir.file("shard-000000.tar"));
  EXPECT_EQ(index.shards[0].pairs, 5);
  EXPECT_EQ(index.shards[0].ties, 1);
  EXPECT_EQ(index.shards[1].path, dir.file("shard-000001.tar"));
  EXPECT_EQ(index.total_pairs(), 8);
  EXPECT_EQ(index.total_ties(), 1);
  ASSERT_EQ(index.tokenizers.size(), 2u);
  EXPECT_EQ(index.tokenizers[1].name, "tokenizer_2");
  EXPECT_EQ(index.tokenizers[1].vocab_sha256, "def");
  EXPECT_EQ(index.tokenizers[1].max_length, 77);
}

TEST(ShardIndex, AbsoluteShardPathsAndNoTokenizers) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index["shards"] = {{{"file", dir.file("shard-000001.tar")}, {"pairs", 3}, {"ties", 0}}};
  index.erase("tokenizers");
  std::filesystem::create_directories(dir.path() / "elsewhere");
  write_file(dir.file("elsewhere/index.json"), index.dump());
  const ShardIndex loaded = ShardIndex::load(dir.file("elsewhere/index.json"));
  EXPECT_EQ(loaded.shards[0].path, dir.file("shard-000001.tar"));
  EXPECT_TRUE(loaded.tokenizers.empty());
}

TEST(ShardIndex, MissingShardFileIsNamed) {
  TempDir dir;
  write_file(dir.file("shard-000000.tar"), testing::ustar_end());
  write_file(dir.file("index.json"), valid_index().dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"shard file missing", "shards[1]", dir.file("shard-000001.tar")});
}

TEST(ShardIndex, WrongFormatOrVersionIsRefused) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index["format"] = "dde-manifest";
  write_file(dir.file("index.json"), index.dump());
  expect_error(
      [&] { ShardIndex::load(dir.file("index.json")); },
      {"not a dde shard index", "index.json: format", "dde-pickapic-shards", "dde-manifest"});

  index = valid_index();
  index["version"] = 2;
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"unsupported shard index version", "expected 1, got 2"});
}

TEST(ShardIndex, BadFieldsAreNamed) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index["shards"][1].erase("pairs");
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"missing field", "shards[1]: pairs"});

  index = valid_index();
  index["shards"][0]["ties"] = "one";
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"wrong field type", "shards[0]: ties", "string"});

  index = valid_index();
  index["shards"][0]["ties"] = 6;
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"more ties than pairs", "shards[0]"});

  index = valid_index();
  index["tokenizers"][0].erase("vocab_sha256");
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); }, {"tokenizers[0]: vocab_sha256"});

  index = valid_index();
  index["shards"] = nlohmann::json::array();
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); }, {"lists no shards"});
}

TEST(ShardIndex, UnreadableOrInvalidJson) {
  TempDir dir;
  expect_error([&] { ShardIndex::load(dir.file("missing.json")); },
               {"cannot open shard index", "missing.json"});
  write_file(dir.file("index.json"), "{\"format\": ");
  expect_error([&] { ShardIndex::load(dir.file("index.json")); }, {"not valid JSON", "index.json"});
}

}  // namespace
}  // namespace dde::data
