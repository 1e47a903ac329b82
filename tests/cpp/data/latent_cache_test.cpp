#include "dde/data/latent_cache.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "data/shard_fixture.hpp"
#include "dde/checkpoint/safetensors.hpp"
#include "dde/data/data_error.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/pair_loader.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::data {
namespace {

using testing::kEmptyPrompt;
using testing::kResolution;
using testing::kTokenizers;

namespace fs = std::filesystem;
using testing::expect_error;
using testing::FixturePair;
using testing::TempDir;

// An "identity" cache: the moments of an image are its pixels (mean) and minus them (logvar),
// the text embedding is tokenizer 0's ids ([4, 1]), the pooled one tokenizer 1's ([3]). A pair
// read from it must then equal the pair decoded from the images, flip and winner included.
CacheShape identity_shape() { return {3, kResolution, 4, 1, 3}; }

torch::Tensor ids_tensor(const std::vector<int64_t>& ids) {
  return torch::tensor(ids).to(torch::kFloat32);
}

CachedPair identity_row(const PairRecord& r) {
  const ImagePrepOptions prep{kResolution, false, false, 89478485};
  CachedPair p;
  p.ok = true;
  p.geometry = torch::empty({2, 4}, torch::kInt64);
  std::vector<torch::Tensor> images;
  for (int which = 0; which < 2; ++which) {
    const CroppedImage im =
        prepare_training_image(which == 0 ? r.jpg_0 : r.jpg_1, "test", prep, false, 0, 0);
    for (const torch::Tensor& x : {im.pixels, im.pixels.flip({-1})}) {
      const torch::Tensor f = x.to(torch::kFloat32);  // the uint8 levels, as floats
      images.push_back(torch::stack({f, -f}));
    }
    p.geometry[which] = torch::tensor({im.original_h, im.original_w, im.crop_top, im.crop_left});
  }
  p.moments = torch::stack(images).view({2, 2, 2, 3, kResolution, kResolution});
  p.text = ids_tensor(r.input_ids[0]).view({4, 1});
  p.pooled = ids_tensor(r.input_ids[1]);
  return p;
}

std::string write_identity_cache(const fs::path& dir, const std::string& index_path) {
  const ShardIndex index = ShardIndex::load(index_path);
  LatentCacheIndex cache;
  cache.family = "sd15";
  cache.resolution = kResolution;
  cache.shape = identity_shape();
  cache.bytes_per_pair = cache_bytes_per_pair(cache.shape, torch::kFloat32);
  fs::create_directories(dir);
  for (const ShardInfo& shard : index.shards) {
    std::vector<std::string> keys;
    ShardPairReader headers(shard.path, ShardPairReader::Images::kHeadersOnly);
    while (auto r = headers.next()) keys.push_back(r->key);
    const std::string file = shard.file + ".latents.safetensors";
    LatentCacheShardWriter writer((dir / file).string(), cache.shape, torch::kFloat32, keys,
                                  {{"source", shard.file}});
    ShardPairReader reader(shard.path);
    while (auto r = reader.next()) {
      try {
        if (!r->problem) writer.write(r->position, identity_row(*r));
      } catch (const BadPairError&) {  // left as a zero row (ok = 0)
      }
    }
    cache.shards.push_back({file, shard.file, shard.sha256, shard.pairs, writer.finish()});
  }
  save_empty_caption((dir / cache.empty_caption).string(),
                     {ids_tensor(kEmptyPrompt[0]).view({4, 1}), ids_tensor(kEmptyPrompt[1])});
  std::string path = (dir / "index.json").string();
  cache.save(path);
  return path;
}

CacheExpectation identity_expectation() {
  CacheExpectation e;
  e.family = "sd15";
  e.resolution = kResolution;
  e.latent_channels = 3;
  e.latent_size = kResolution;
  e.text_dim = 1;
  e.pooled = true;
  return e;
}

class LatentCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    shards_ = {{{1.0}, {0.0}, {0.5}, {1.0}, {0.0}},
               {{0.0}, {1.0, /*corrupt=*/true}, {1.0}, {0.0}},
               {{0.5}, {1.0}, {0.0}}};
    fs::create_directories(dir_.path() / "shards");
    index_ = testing::write_fixture(dir_.path() / "shards", shards_, kTokenizers);
    cache_ = write_identity_cache(dir_.path() / "cache", index_);
  }

  PairLoaderOptions options(bool cached) const {
    PairLoaderOptions o;
    o.index_path = index_;
    o.resolution = kResolution;
    o.shuffle_buffer = 4;
    o.workers = 2;
    o.prefetch_batches = 2;
    o.seed = 77;
    o.batch_size = 3;
    o.caption_dropout = 0.4;
    o.empty_prompt_ids = kEmptyPrompt;
    o.expected_vocab_sha256 = {"sha_a", "sha_b"};
    if (cached) {
      o.cache_index = cache_;
      o.cache_expected = identity_expectation();
    }
    return o;
  }

  TempDir dir_;
  std::vector<std::vector<FixturePair>> shards_;
  std::string index_, cache_;
};

TEST_F(LatentCacheTest, CachedBatchesEqualDecodedBatches) {
  PairLoader images(options(false));
  PairLoader cached(options(true));
  bool some_dropped = false;
  for (int step = 0; step < 8; ++step) {  // over two epochs
    const PairBatch a = images.next();
    const PairBatch b = cached.next();
    ASSERT_FALSE(b.winner.defined());
    EXPECT_EQ(a.keys, b.keys);
    EXPECT_TRUE(torch::equal(a.pair_ids, b.pair_ids));
    EXPECT_TRUE(torch::equal(a.caption_dropped, b.caption_dropped));
    const torch::Tensor winner = a.winner.to(torch::kFloat32), loser = a.loser.to(torch::kFloat32);
    EXPECT_TRUE(torch::equal(winner, b.winner_moments.select(1, 0)));
    EXPECT_TRUE(torch::equal(-winner, b.winner_moments.select(1, 1)));
    EXPECT_TRUE(torch::equal(loser, b.loser_moments.select(1, 0)));
    EXPECT_TRUE(torch::equal(a.input_ids[0].to(torch::kFloat32), b.text_hidden.squeeze(-1)));
    EXPECT_TRUE(torch::equal(a.input_ids[1].to(torch::kFloat32), b.text_pooled));
    EXPECT_TRUE(torch::equal(a.winner_original_hw, b.winner_original_hw));
    EXPECT_TRUE(torch::equal(a.winner_crop_tl, b.winner_crop_tl));
    EXPECT_TRUE(torch::equal(a.loser_original_hw, b.loser_original_hw));
    EXPECT_TRUE(torch::equal(a.loser_crop_tl, b.loser_crop_tl));
    some_dropped = some_dropped || a.caption_dropped.any().item<bool>();
    const auto bad_a = images.take_bad_pairs();
    const auto bad_b = cached.take_bad_pairs();
    ASSERT_EQ(bad_a.size(), bad_b.size());
    for (size_t i = 0; i < bad_a.size(); ++i) {
      EXPECT_EQ(bad_a[i].reason, bad_b[i].reason);
      EXPECT_EQ(bad_a[i].key, bad_b[i].key);
    }
  }
  EXPECT_TRUE(some_dropped);
  EXPECT_GE(cached.counters().bad_pairs, 2);  // the corrupt pair, once per epoch
  EXPECT_EQ(images.counters().bad_pairs, cached.counters().bad_pairs);
}

TEST_F(LatentCacheTest, IndexRoundTrips) {
  const LatentCacheIndex c = LatentCacheIndex::load(cache_);
  EXPECT_EQ(c.shards.size(), 3U);
  EXPECT_EQ(c.shards[1].pairs, 4);
  EXPECT_EQ(c.shape.pooled_dim, 3);
  // moments 2*2*2*3*8*8 + text 4*1 + pooled 3 floats, geometry 8 int64, ok 1 byte.
  EXPECT_EQ(c.bytes_per_pair, (1536 + 4 + 3) * 4 + 64 + 1);
}

TEST_F(LatentCacheTest, StaleCacheIsAnErrorNamingTheShard) {
  testing::write_fixture(dir_.path() / "shards", {{{1.0}, {0.0}}, {{0.0}}, {{1.0}}}, kTokenizers);
  expect_error([&] { PairLoader loader(options(true)); },
               {"cache is stale", "shards[0]", "shard-000000.tar", "2 pairs", "5 pairs",
                "rebuild the cache"});
}

TEST_F(LatentCacheTest, ModelAndResolutionMismatchesAreErrors) {
  PairLoaderOptions o = options(true);
  o.cache_expected.resolution = 16;
  expect_error([&] { PairLoader loader(o); }, {"another resolution", "16", "8"});
  o = options(true);
  o.cache_expected.model_files = {{"vae_encoder", "vae_encoder.pt", 10, ""}};
  expect_error([&] { PairLoader loader(o); }, {"other encoders", "model_files"});
  o = options(true);
  o.cache_expected.text_dim = 768;
  expect_error([&] { PairLoader loader(o); }, {"shapes do not fit", "text dim 768"});
}

TEST_F(LatentCacheTest, RandomCropWithACacheIsAnError) {
  PairLoaderOptions o = options(true);
  o.random_crop = true;
  expect_error([&] { PairLoader loader(o); }, {"random crop", "random_crop"});
}

TEST_F(LatentCacheTest, MissingTensorAndWrongShapeAreErrors) {
  const LatentCacheIndex c = LatentCacheIndex::load(cache_);
  const std::string shard = c.file_path(c.shards[0].file);
  checkpoint::create_safetensors(
      shard, {{"moments", torch::kFloat32, {5, 2, 2, 2, 3, 8, 8}}},
      {{"format", kLatentCacheShardFormat},
       {"source", "shard-000000.tar"},
       {"keys", nlohmann::json(std::vector<std::string>(5, "k")).dump()}});
  expect_error([&] { LatentCacheShard s(c, 0); }, {"lacks a tensor", "text", "absent"});
  checkpoint::create_safetensors(
      shard, {{"moments", torch::kFloat32, {5, 2, 2, 2, 3, 4, 4}}},
      {{"format", kLatentCacheShardFormat},
       {"source", "shard-000000.tar"},
       {"keys", nlohmann::json(std::vector<std::string>(5, "k")).dump()}});
  expect_error([&] { LatentCacheShard s(c, 0); },
               {"wrong dtype or shape", "moments", "[5,2,2,2,3,8,8]", "[5,2,2,2,3,4,4]"});
  checkpoint::create_safetensors(
      shard, {},
      {{"format", kLatentCacheShardFormat}, {"source", "shard-000000.tar"}, {"keys", "[]"}});
  expect_error([&] { LatentCacheShard s(c, 0); }, {"wrong number of pairs", "5", "0"});
  // The size recorded in index.json no longer matches either.
  expect_error([&] { check_latent_cache(c, ShardIndex::load(index_), identity_expectation()); },
               {"missing or of another size", shard});
}

TEST_F(LatentCacheTest, RowOfAnotherKeyIsAnError) {
  const LatentCacheIndex c = LatentCacheIndex::load(cache_);
  const LatentCacheShard shard(c, 0);
  std::ifstream file(shard.path(), std::ios::binary);
  EXPECT_TRUE(shard.read(file, 1, testing::fixture_key(1)).ok);
  expect_error([&] { shard.read(file, 1, testing::fixture_key(2)); },
               {"does not match its source shard", "row 1", "000000002", "000000001"});
  expect_error([&] { shard.read(file, 5, "x"); }, {"no such row"});
}

TEST_F(LatentCacheTest, BadIndexIsAnError) {
  nlohmann::json j = nlohmann::json::parse(testing::read_file(cache_));
  j["shards"][0]["file"] = "../escape.safetensors";
  testing::write_file(cache_, j.dump());
  expect_error([&] { LatentCacheIndex::load(cache_); }, {"bad file name", "shards[].file"});
  j.erase("shape");
  testing::write_file(cache_, j.dump());
  expect_error([&] { LatentCacheIndex::load(cache_); }, {"bad latent cache index", "shape"});
  j["format"] = "other";
  testing::write_file(cache_, j.dump());
  expect_error([&] { LatentCacheIndex::load(cache_); }, {"not a latent cache index"});
}

TEST(LatentCacheIndexFile, OversizedIndexIsRefusedByItsSize) {
  TempDir dir;
  const std::string path = dir.file("index.json");
  testing::write_file(path, "{}");
  fs::resize_file(path, util::kMaxIndexBytes + 1);  // sparse
  expect_error(
      [&] { LatentCacheIndex::load(path); },
      {"latent cache index too large", path, std::to_string(util::kMaxIndexBytes) + " bytes",
       std::to_string(util::kMaxIndexBytes + 1) + " bytes"});
}

}  // namespace
}  // namespace dde::data
