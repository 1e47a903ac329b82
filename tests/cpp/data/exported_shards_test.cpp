// The loader on shards written by the real Python exporter (scripts/prepare_tiny.sh makes
// them under $DDE_FIXTURES_DIR, default <repo>/fixtures); skipped when they are not there.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "dde/data/pair_loader.hpp"
#include "dde/data/shard_index.hpp"

namespace dde::data {
namespace {

std::filesystem::path fixtures_dir() {
  const char* env = std::getenv("DDE_FIXTURES_DIR");
  return env ? std::filesystem::path(env) : std::filesystem::path(DDE_SOURCE_DIR) / "fixtures";
}

class ExportedShards : public ::testing::TestWithParam<std::string> {};

TEST_P(ExportedShards, OneEpochCoversEveryPairOnce) {
  const std::filesystem::path shards = fixtures_dir() / "shards" / GetParam();
  const std::filesystem::path manifest_path =
      fixtures_dir() / "export" / GetParam() / "manifest.json";
  if (!std::filesystem::exists(shards / "index.json") || !std::filesystem::exists(manifest_path)) {
    FAIL() << "no exported fixtures under " << fixtures_dir()
           << " (run scripts/prepare_tiny.sh, or set DDE_FIXTURES_DIR)";
  }
  std::ifstream manifest_file(manifest_path);
  const nlohmann::json manifest = nlohmann::json::parse(manifest_file);
  std::ifstream index_file(shards / "index.json");
  const nlohmann::json index = nlohmann::json::parse(index_file);

  PairLoaderOptions o;
  o.index_path = (shards / "index.json").string();
  o.resolution = manifest.at("resolution").get<int64_t>();
  o.batch_size = 2;
  o.workers = 2;
  o.random_crop = true;
  for (const nlohmann::json& encoder : manifest.at("text_encoders")) {
    o.expected_vocab_sha256.push_back(encoder.at("vocab_sha256").get<std::string>());
    o.empty_prompt_ids.push_back(encoder.at("empty_prompt_ids").get<std::vector<int64_t>>());
  }
  PairLoader loader(o);
  const int64_t pairs = index.at("pairs_written").get<int64_t>();
  ASSERT_EQ(loader.pairs_per_epoch(), pairs);
  std::set<std::string> keys;
  int64_t seen = 0;
  while (seen < pairs) {
    const PairBatch batch = loader.next();
    EXPECT_EQ(batch.winner.sizes(), (std::vector<int64_t>{2, 3, o.resolution, o.resolution}));
    EXPECT_EQ(batch.loser.dtype(), torch::kUInt8);
    ASSERT_EQ(batch.input_ids.size(), o.empty_prompt_ids.size());
    for (const std::string& key : batch.keys) {
      if (seen++ < pairs) {
        EXPECT_TRUE(keys.insert(key).second) << key;
      }
    }
  }
  EXPECT_EQ(static_cast<int64_t>(keys.size()), pairs);
}

INSTANTIATE_TEST_SUITE_P(Families, ExportedShards, ::testing::Values("sd15", "sdxl"));

}  // namespace
}  // namespace dde::data
