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
#include "dde/models/manifest.hpp"
#include "dde/pairs/caption_tokenizers.hpp"
#include "dde/util/error.hpp"

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

// One export without --tokenizer serves both families: the loader tokenizes its captions with
// the model's tokenizer folders, and every batch equals the one from the shards that carry the
// Python tokenizer's ids (same rows, same order, same seed): ids, images, keys and captions.
TEST_P(ExportedShards, CaptionOnlyShardsGiveTheBatchesOfShardsWithIds) {
  const std::filesystem::path captions = fixtures_dir() / "shards" / "captions" / "index.json";
  const std::filesystem::path with_ids = fixtures_dir() / "shards" / GetParam() / "index.json";
  const std::filesystem::path manifest_path =
      fixtures_dir() / "export" / GetParam() / "manifest.json";
  if (!std::filesystem::exists(captions) || !std::filesystem::exists(manifest_path)) {
    FAIL() << "no exported fixtures under " << fixtures_dir() << " (run scripts/prepare_tiny.sh)";
  }
  const models::Manifest manifest = models::load_manifest(manifest_path.string());
  PairLoaderOptions o;
  o.resolution = manifest.resolution;
  o.batch_size = 4;
  o.workers = 2;
  o.caption_dropout = 0.3;  // dropped captions take the manifest's ids of "" either way
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    o.expected_vocab_sha256.push_back(e.vocab_sha256);
    o.empty_prompt_ids.push_back(e.empty_prompt_ids);
  }
  o.caption_tokenizers = pairs::caption_tokenizer_specs(manifest);
  PairLoaderOptions ids_options = o;
  ids_options.index_path = with_ids.string();
  ids_options.caption_tokenizers.clear();  // shards with ids never need them
  o.index_path = captions.string();
  PairLoader from_ids(ids_options);
  PairLoader from_captions(o);
  ASSERT_EQ(from_captions.pairs_per_epoch(), from_ids.pairs_per_epoch());
  int64_t compared = 0, tokenized = 0;
  while (compared < from_ids.pairs_per_epoch()) {
    const PairBatch a = from_ids.next();
    const PairBatch b = from_captions.next();
    ASSERT_EQ(a.keys, b.keys);
    ASSERT_EQ(a.captions, b.captions);
    ASSERT_EQ(a.input_ids.size(), manifest.text_encoders.size());
    ASSERT_EQ(b.input_ids.size(), a.input_ids.size());
    for (size_t t = 0; t < a.input_ids.size(); ++t) {
      ASSERT_TRUE(torch::equal(a.input_ids[t], b.input_ids[t])) << a.keys[0] << " encoder " << t;
    }
    EXPECT_TRUE(torch::equal(a.winner, b.winner));
    EXPECT_TRUE(torch::equal(a.caption_dropped, b.caption_dropped));
    for (const std::string& caption : a.captions) tokenized += caption.empty() ? 0 : 1;
    compared += static_cast<int64_t>(a.keys.size());
  }
  EXPECT_GT(tokenized, compared / 2);  // most captions were kept, so tokenized
  // Without the model's tokenizers, caption-only shards are an error that says what to do.
  PairLoaderOptions none = o;
  none.caption_tokenizers.clear();
  try {
    PairLoader loader(none);
    ADD_FAILURE() << "expected dde::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("captions without token ids"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("export_models"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Families, ExportedShards, ::testing::Values("sd15", "sdxl"));

}  // namespace
}  // namespace dde::data
