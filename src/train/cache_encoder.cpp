#include "dde/train/cache_encoder.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <optional>
#include <utility>

#include "dde/data/data_error.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/dist/device.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"

namespace dde::train {
namespace {

namespace fs = std::filesystem;

struct EncodeContext {
  const data::ShardIndex* index = nullptr;
  models::LatentEncoder* vae = nullptr;
  models::TextConditioner* text = nullptr;
  data::ImagePrepOptions prep;  // center crop, no flip: the flipped copy is made here
  data::CacheShape shape;
  torch::ScalarType dtype = torch::kFloat32;
};

data::CacheModelFile model_file(const std::string& role, const std::string& path, bool hash) {
  std::error_code ec;
  const auto bytes = fs::file_size(path, ec);
  if (ec) {
    throw Error({"cannot read a model file", path, "a readable file", ec.message(),
                 "check model.manifest"});
  }
  return {role, fs::path(path).filename().string(), static_cast<int64_t>(bytes),
          hash ? data::file_sha256(path) : std::string()};
}

// The loader's check of the token ids (lengths, vocabulary): the text encoder must not see ids
// the loader would skip the pair for.
void check_ids(const data::PairRecord& r, const data::ShardIndex& index, const std::string& where) {
  bool ok = r.input_ids.size() == index.tokenizers.size();
  for (size_t t = 0; ok && t < r.input_ids.size(); ++t) {
    const data::TokenizerInfo& tok = index.tokenizers[t];
    ok = static_cast<int64_t>(r.input_ids[t].size()) == tok.max_length;
    for (const int64_t id : r.input_ids[t]) {
      ok = ok && id >= 0 && (tok.vocab_size == 0 || id < tok.vocab_size);
    }
  }
  if (!ok) {
    throw data::BadPairError("bad_input_ids",
                             {"pair has unusable input_ids", where,
                              "one list per tokenizer of index.json, of max_length ids in the "
                              "vocabulary",
                              "other lists", "the loader skips this pair too"});
  }
}

// Both images, unflipped and flipped, through the VAE; the caption through the text encoders.
data::CachedPair encode_pair(const data::PairRecord& r, const std::string& shard_path,
                             const EncodeContext& c) {
  const std::string where = fmt::format("{}: key {}", shard_path, data::escape_preview(r.key, 100));
  if (r.problem) throw *r.problem;
  check_ids(r, *c.index, where);
  data::CachedPair p;
  p.ok = true;
  p.geometry = torch::empty({2, 4}, torch::kInt64);
  std::vector<torch::Tensor> images;
  for (int which = 0; which < 2; ++which) {
    const data::CroppedImage im = data::prepare_training_image(
        which == 0 ? r.jpg_0 : r.jpg_1, fmt::format("{}, image {}", where, which), c.prep,
        /*flip=*/false, 0, 0);
    images.push_back(im.pixels);
    images.push_back(im.pixels.flip({-1}));  // = hflip (a permutation of the pixels)
    auto g = p.geometry.accessor<int64_t, 2>();
    g[which][0] = im.original_h;
    g[which][1] = im.original_w;
    g[which][2] = im.crop_top;
    g[which][3] = im.crop_left;
  }
  const torch::Tensor pixels = data::to_pm1(torch::stack(images), data::pm1_table());
  const auto [mean, logvar] = c.vae->moments(pixels);  // [4, C, h, w] each
  const int64_t C = c.shape.latent_channels, h = c.shape.latent_size;
  p.moments = torch::stack({mean, logvar}, 1).reshape({2, 2, 2, C, h, h});
  std::vector<torch::Tensor> ids;
  for (const std::vector<int64_t>& list : r.input_ids)
    ids.push_back(torch::tensor(list).view({1, -1}));
  const models::Conditioning cond = c.text->encode(ids);
  p.text = cond.text[0];
  if (cond.pooled.defined()) p.pooled = cond.pooled[0];
  return p;
}

data::LatentCacheShardInfo encode_shard(const data::ShardInfo& shard, const std::string& dir,
                                        const EncodeContext& c, CacheEncodeReport& report) {
  // The keys first (tar headers only): the cache shard's header is written before its rows.
  std::vector<std::string> keys;
  {
    data::ShardPairReader headers(shard.path, data::ShardPairReader::Images::kHeadersOnly);
    while (std::optional<data::PairRecord> r = headers.next()) keys.push_back(r->key);
  }
  if (static_cast<int64_t>(keys.size()) != shard.pairs) {
    throw Error({"shard does not match index.json", shard.path,
                 std::to_string(shard.pairs) + " pairs", std::to_string(keys.size()),
                 "re-export the shards"});
  }
  data::LatentCacheShardInfo info{fs::path(shard.file).stem().string() + ".latents.safetensors",
                                  shard.file, shard.sha256, shard.pairs, 0};
  data::LatentCacheShardWriter writer((fs::path(dir) / info.file).string(), c.shape, c.dtype, keys,
                                      {{"source", shard.file}});
  data::ShardPairReader reader(shard.path, data::ShardPairReader::Images::kRead);
  while (std::optional<data::PairRecord> r = reader.next()) {
    try {
      writer.write(r->position, encode_pair(*r, shard.path, c));
    } catch (const data::BadPairError& e) {
      ++report.bad_pairs;  // its row stays zero (ok = 0): the loader skips it as before
      log::warn("cache: bad pair left out ({}): {}", e.reason(), e.what());
    }
    ++report.pairs;
  }
  info.bytes = writer.finish();
  return info;
}

}  // namespace

std::vector<data::CacheModelFile> cache_model_files(const models::Manifest& manifest, bool hash) {
  std::vector<data::CacheModelFile> files{
      model_file("vae_encoder", manifest.vae_encoder_file, hash)};
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    files.push_back(model_file(e.name, e.file, hash));
  }
  return files;
}

data::CacheExpectation cache_expectation(const config::TrainConfig& cfg,
                                         const models::Manifest& manifest, int64_t resolution) {
  data::CacheExpectation e;
  e.family = models::family_name(manifest.family);
  e.resolution = resolution;
  e.latent_channels = manifest.latent_channels;
  e.latent_size = resolution / manifest.latent_downsample;
  e.text_dim = manifest.cross_attention_dim;
  e.pooled = manifest.pooled_from.has_value();
  e.compare_sha256 = cfg.data.verify;
  e.model_files = cache_model_files(manifest, cfg.data.verify);
  return e;
}

CacheEncodeReport encode_latent_cache(const config::TrainConfig& cfg,
                                      const CacheEncodeOptions& options) {
  const torch::ScalarType dtype = data::cache_dtype(options.dtype, "--dtype");
  if (options.out_dir.empty() || fs::exists(options.out_dir)) {
    throw Error({"cache folder exists", "--out " + options.out_dir, "a new folder",
                 options.out_dir.empty() ? "an empty path" : "an existing path",
                 "remove it or choose another --out"});
  }
  const models::Manifest manifest = models::load_manifest(cfg.model.manifest);
  const int64_t resolution = cfg.data.resolution > 0 ? cfg.data.resolution : manifest.resolution;
  if (resolution % manifest.latent_downsample != 0) {
    throw Error({"resolution not divisible by the VAE downsampling", "data.resolution",
                 "a multiple of " + std::to_string(manifest.latent_downsample),
                 std::to_string(resolution), ""});
  }
  if (cfg.data.random_crop)
    log::warn("cache: data.random_crop ignored, the cache holds center crops");
  const data::ShardIndex index = data::ShardIndex::load(cfg.data.index);
  data::check_shards(index, cfg.data.verify);
  const torch::Device device = dist::select_device(cfg.run.device, 0);
  const torch::ScalarType frozen =
      cfg.model.frozen_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat32;
  models::LatentEncoder vae(manifest, device, frozen);
  models::TextConditioner text(manifest, device, frozen);

  // The embedding of "" (caption dropout), which also gives the text shapes.
  std::vector<torch::Tensor> empty_ids;
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    empty_ids.push_back(torch::tensor(e.empty_prompt_ids).view({1, -1}));
  }
  const models::Conditioning empty = text.encode(empty_ids);
  EncodeContext c{
      &index,
      &vae,
      &text,
      data::ImagePrepOptions{resolution, false, false, cfg.data.max_image_pixels},
      data::CacheShape{manifest.latent_channels, resolution / manifest.latent_downsample,
                       empty.text.size(1), empty.text.size(2),
                       empty.pooled.defined() ? empty.pooled.size(1) : 0},
      dtype};

  // Written in a staging folder, renamed into place when complete.
  fs::path out = options.out_dir;
  if (!out.has_filename()) out = out.parent_path();  // "CACHE/"
  const fs::path staging = out.string() + ".staging";
  fs::remove_all(staging);
  fs::create_directories(staging);
  data::LatentCacheIndex cache;
  cache.family = models::family_name(manifest.family);
  cache.resolution = resolution;
  cache.dtype = options.dtype;
  cache.encoder_dtype = cfg.model.frozen_dtype;
  cache.shape = c.shape;
  cache.model_files = cache_model_files(manifest, /*hash=*/true);
  cache.bytes_per_pair = data::cache_bytes_per_pair(c.shape, dtype);
  data::save_empty_caption(
      (staging / cache.empty_caption).string(),
      {empty.text[0], empty.pooled.defined() ? empty.pooled[0] : torch::Tensor()});
  CacheEncodeReport report;
  for (const data::ShardInfo& shard : index.shards) {
    cache.shards.push_back(encode_shard(shard, staging.string(), c, report));
    report.bytes += cache.shards.back().bytes;
    log::info("cache: {} -> {} ({} pairs)", shard.file, cache.shards.back().file, shard.pairs);
  }
  cache.save((staging / "index.json").string());
  fs::rename(staging, out);
  report.shards = static_cast<int64_t>(cache.shards.size());
  report.bytes_per_pair = cache.bytes_per_pair;
  report.index_path = (fs::path(options.out_dir) / "index.json").string();
  return report;
}

}  // namespace dde::train
