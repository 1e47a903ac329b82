#include "dde/data/latent_cache_format.hpp"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>

#include "util/expect_error.hpp"

namespace dde::data {
namespace {

// index.json as dde_encode_cache writes it (docs/formats.md section 6).
nlohmann::json index_json() {
  return nlohmann::json::parse(R"({"format": "dde-latent-cache", "version": 1, "family": "sd15",
    "resolution": 16, "dtype": "fp32", "encoder_dtype": "fp32",
    "shape": {"latent_channels": 4, "latent_size": 2, "text_length": 3, "text_dim": 4,
              "pooled_dim": 0},
    "model_files": [{"role": "vae_encoder", "file": "vae.pt", "bytes": 10, "sha256": "ab"}],
    "empty_caption": "empty_caption.safetensors", "bytes_per_pair": 201,
    "shards": [{"file": "s.latents.safetensors", "source": "s.tar", "source_sha256": "cd",
                "pairs": 2, "bytes": 900}]})");
}

TEST(LatentCacheFormat, ParsesTheIndex) {
  const LatentCacheIndex c = LatentCacheIndex::parse(index_json().dump(), "/c/index.json");
  EXPECT_EQ(c.shape.latent_channels, 4);
  ASSERT_EQ(c.shards.size(), 1U);
  EXPECT_EQ(c.shards[0].pairs, 2);
  EXPECT_EQ(c.file_path(c.shards[0].file), "/c/s.latents.safetensors");
}

// A shard of 0 pairs passed any row shape through the safetensors check (0 elements), and the
// row sizes in bytes then overflowed: the index bounds them.
TEST(LatentCacheFormat, ShapeWhoseRowBytesWouldOverflowIsAnError) {
  nlohmann::json j = index_json();
  j["shape"]["latent_channels"] = int64_t{1} << 40;
  j["shape"]["latent_size"] = int64_t{1} << 20;
  expect_error_mentions([&] { LatentCacheIndex::parse(j.dump(), "/c/index.json"); },
                        {"bad latent cache shape", "/c/index.json: shape", "2^40"});
  j = index_json();
  j["shape"]["text_dim"] = int64_t{1} << 41;
  expect_error_mentions([&] { LatentCacheIndex::parse(j.dump(), "/c/index.json"); },
                        {"bad latent cache shape"});
}

// nlohmann's get<int64_t>() truncated 2.5 and overflowed (UB) on 1e300.
TEST(LatentCacheFormat, NonIntegerCountsAreErrors) {
  nlohmann::json j = index_json();
  j["shards"][0]["pairs"] = 2.5;
  expect_error_mentions([&] { LatentCacheIndex::parse(j.dump(), "/c/index.json"); },
                        {"bad latent cache index", "shards[]: pairs", "an integer", "2.5"});
  j = index_json();
  j["shape"]["text_dim"] = 1e300;
  expect_error_mentions([&] { LatentCacheIndex::parse(j.dump(), "/c/index.json"); },
                        {"bad latent cache index", "shape: text_dim", "1e+300"});
  j = index_json();
  j["version"] = 1.5;
  expect_error_mentions([&] { LatentCacheIndex::parse(j.dump(), "/c/index.json"); },
                        {"not a latent cache index", "version 1.5"});
}

TEST(LatentCacheFormat, MalformedIndexIsAnError) {
  for (const std::string text : {"", "[]", "{", R"({"format": 1})", "null"}) {
    EXPECT_THROW(LatentCacheIndex::parse(text, "/c/index.json"), Error) << text;
  }
}

TEST(LatentCacheFormat, FieldSpecsAndRowBytes) {
  const CacheShape shape{4, 2, 3, 4, 5};
  const auto specs = cache_field_specs(shape, checkpoint::SafetensorsDtype::kF16);
  ASSERT_EQ(specs.size(), 5U);
  EXPECT_EQ(specs[0].name, "moments");
  EXPECT_EQ(cache_row_bytes(specs[0]), 2 * 2 * 2 * 4 * 2 * 2 * 2);
  EXPECT_EQ(cache_row_bytes(specs[3]), 2 * 4 * 8);  // geometry, int64
  EXPECT_EQ(cache_row_bytes(specs[4]), 1);          // ok, uint8
}

}  // namespace
}  // namespace dde::data
