#include "dde/pairs/cache_encoder.hpp"

#include <ATen/Parallel.h>
#include <fmt/format.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <optional>
#include <utility>

#include "cache_output.hpp"
#include "dde/data/caption_tokenizer.hpp"
#include "dde/data/data_error.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/dist/communicator.hpp"
#include "dde/dist/device.hpp"
#include "dde/dist/environment.hpp"
#include "dde/models/diffusion_models.hpp"
#include "dde/pairs/caption_tokenizers.hpp"
#include "dde/pairs/pair_path.hpp"
#include "dde/util/error.hpp"
#include "dde/util/log.hpp"
#include "dde/util/threads.hpp"

namespace dde::pairs {
namespace {

namespace fs = std::filesystem;

struct EncodeContext {
  const data::ShardIndex* index = nullptr;
  models::LatentEncoder* vae = nullptr;
  models::TextConditioner* text = nullptr;
  data::ImagePrepOptions prep;  // center crop, no flip: the flipped copy is made here
  data::CacheShape shape;
  torch::ScalarType dtype = torch::kFloat32;
  int64_t batch = 4;  // pairs per encoder call (4 images each)
  // Caption-only shards: the model's tokenizers give each pair its ids; else null.
  const data::CaptionTokenizer* captions = nullptr;
};

// The file's identity: its size, and its sha256 as the manifest recorded it at export, or as
// hashed now (`hash`, or a manifest exported before it recorded them).
data::CacheModelFile model_file(const std::string& role, const std::string& path,
                                const models::Manifest& manifest, bool hash) {
  std::error_code ec;
  const auto bytes = fs::file_size(path, ec);
  if (ec) {
    throw Error({"cannot read a model file", path, "a readable file", ec.message(),
                 "check model.manifest"});
  }
  const std::string name = fs::path(path).filename().string();
  const auto recorded = manifest.file_sha256.find(name);
  std::string sha256;
  if (hash || recorded == manifest.file_sha256.end()) {
    sha256 = data::file_sha256(path);
    if (recorded != manifest.file_sha256.end() && recorded->second != sha256) {
      throw Error({"model file changed since export", path,
                   "sha256 " + recorded->second + " (" + manifest.path + ")", "sha256 " + sha256,
                   "re-export the model with python -m dde_tools.export_models"});
    }
  } else {
    sha256 = recorded->second;
  }
  return {role, name, static_cast<int64_t>(bytes), sha256};
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

// One pair decoded for the encoders: both images, unflipped and flipped, or why it is bad.
struct PreparedPair {
  std::vector<torch::Tensor> images;  // 4 x [3, R, R] uint8: image 0, flipped, image 1, flipped
  torch::Tensor geometry;             // [2, 4] int64
  std::string bad_reason, bad_message;
};

// Runs on the decode threads: no torch op that could itself go parallel beyond a copy. A pair
// of caption-only shards gets its ids here.
PreparedPair prepare_pair(data::PairRecord& r, const std::string& shard_path,
                          const EncodeContext& c) {
  PreparedPair p;
  const std::string where = fmt::format("{}: key {}", shard_path, data::escape_preview(r.key, 100));
  try {
    if (r.problem) throw *r.problem;
    if (c.captions != nullptr && r.input_ids.empty()) {
      data::tokenize_record_caption(*c.captions, r.caption, where, r.input_ids);
    }
    check_ids(r, *c.index, where);
    p.geometry = torch::empty({2, 4}, torch::kInt64);
    auto g = p.geometry.accessor<int64_t, 2>();
    for (int which = 0; which < 2; ++which) {
      const data::CroppedImage im = data::prepare_training_image(
          which == 0 ? r.jpg_0 : r.jpg_1, fmt::format("{}, image {}", where, which), c.prep,
          /*flip=*/false, 0, 0);
      p.images.push_back(im.pixels);
      p.images.push_back(im.pixels.flip({-1}));  // = hflip (a permutation of the pixels)
      g[which][0] = im.original_h;
      g[which][1] = im.original_w;
      g[which][2] = im.crop_top;
      g[which][3] = im.crop_left;
    }
  } catch (const data::BadPairError& e) {
    p.images.clear();
    p.bad_reason = e.reason();
    p.bad_message = e.what();
  }
  return p;
}

// The good pairs of a batch through the VAE in one call and the text encoders in another.
std::vector<data::CachedPair> encode_batch(const std::vector<const data::PairRecord*>& records,
                                           const std::vector<PreparedPair*>& prepared,
                                           const EncodeContext& c) {
  const auto n = static_cast<int64_t>(records.size());
  std::vector<torch::Tensor> images;
  std::vector<std::vector<torch::Tensor>> ids(records.front()->input_ids.size());
  for (int64_t i = 0; i < n; ++i) {
    for (torch::Tensor& x : prepared[i]->images) images.push_back(std::move(x));
    for (size_t t = 0; t < ids.size(); ++t)
      ids[t].push_back(torch::tensor(records[i]->input_ids[t]));
  }
  const torch::Tensor pixels = data::to_pm1(torch::stack(images), data::pm1_table());
  const auto [mean, logvar] = c.vae->moments(pixels);  // [4n, C, h, w] each
  const int64_t C = c.shape.latent_channels, h = c.shape.latent_size;
  const torch::Tensor moments = torch::stack({mean, logvar}, 1).reshape({n, 2, 2, 2, C, h, h});
  std::vector<torch::Tensor> id_batches(ids.size());
  for (size_t t = 0; t < ids.size(); ++t) id_batches[t] = torch::stack(ids[t]);
  const models::Conditioning cond = c.text->encode(id_batches);
  std::vector<data::CachedPair> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    data::CachedPair& p = out[static_cast<size_t>(i)];
    p.ok = true;
    p.moments = moments[i];
    p.text = cond.text[i];
    if (cond.pooled.defined()) p.pooled = cond.pooled[i];
    p.geometry = prepared[i]->geometry;
  }
  return out;
}

// A batch of records: decoded on torch's intra-op threads, encoded, written; bad pairs counted.
void encode_records(std::vector<data::PairRecord>& records, const std::string& shard_path,
                    const EncodeContext& c, data::LatentCacheShardWriter& writer,
                    CacheEncodeReport& report) {
  std::vector<PreparedPair> prepared(records.size());
  at::parallel_for(0, static_cast<int64_t>(records.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      prepared[static_cast<size_t>(i)] =
          prepare_pair(records[static_cast<size_t>(i)], shard_path, c);
    }
  });
  std::vector<const data::PairRecord*> good;
  std::vector<PreparedPair*> good_prepared;
  for (size_t i = 0; i < records.size(); ++i) {
    ++report.pairs;
    if (prepared[i].bad_reason.empty()) {
      good.push_back(&records[i]);
      good_prepared.push_back(&prepared[i]);
    } else {
      ++report.bad_pairs;  // its row stays zero (ok = 0): the loader skips it as before
      log::warn("cache: bad pair left out ({}): {}", prepared[i].bad_reason,
                prepared[i].bad_message);
    }
  }
  if (good.empty()) return;
  const std::vector<data::CachedPair> encoded = encode_batch(good, good_prepared, c);
  for (size_t i = 0; i < good.size(); ++i) writer.write(good[i]->position, encoded[i]);
}

std::string cache_file_name(const data::ShardInfo& shard) {
  return fs::path(shard.file).stem().string() + ".latents.safetensors";
}

// A written cache shard's entry of index.json (whichever rank wrote it).
data::LatentCacheShardInfo shard_info(const data::ShardInfo& shard, const std::string& dir) {
  const std::string file = cache_file_name(shard);
  std::error_code ec;
  const auto bytes = fs::file_size(fs::path(dir) / file, ec);
  if (ec) {
    throw Error({"cache shard missing after encoding", (fs::path(dir) / file).string(),
                 "the file its rank wrote", ec.message(),
                 "every rank must see the same --out folder (a shared file system)"});
  }
  return {file, shard.file, shard.sha256, shard.pairs, static_cast<int64_t>(bytes)};
}

void encode_shard(const data::ShardInfo& shard, const std::string& dir, const EncodeContext& c,
                  CacheEncodeReport& report) {
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
  data::LatentCacheShardWriter writer((fs::path(dir) / cache_file_name(shard)).string(), c.shape,
                                      c.dtype, keys, {{"source", shard.file}});
  data::ShardPairReader reader(shard.path, data::ShardPairReader::Images::kRead);
  std::vector<data::PairRecord> batch;
  while (std::optional<data::PairRecord> r = reader.next()) {
    batch.push_back(std::move(*r));
    if (static_cast<int64_t>(batch.size()) == c.batch) {
      encode_records(batch, shard.path, c, writer, report);
      batch.clear();
    }
  }
  if (!batch.empty()) encode_records(batch, shard.path, c, writer, report);
  writer.finish();
}

}  // namespace

std::vector<data::CacheModelFile> cache_model_files(const models::Manifest& manifest, bool hash) {
  std::vector<data::CacheModelFile> files{
      model_file("vae_encoder", manifest.vae_encoder_file, manifest, hash)};
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    files.push_back(model_file(e.name, e.file, manifest, hash));
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
  // The encoders' identity is always compared: from the manifest's record (cheap), or hashed
  // (data.verify, or a manifest without the record).
  e.compare_sha256 = true;
  e.model_files = cache_model_files(manifest, cfg.data.verify);
  return e;
}

namespace {

void check_cache_options(const CacheEncodeOptions& options) {
  if (options.batch < 1 || options.batch > kMaxCacheBatch) {
    throw Error({"bad cache batch", "--batch", fmt::format("in [1, {}]", kMaxCacheBatch),
                 std::to_string(options.batch), "pairs per encoder call: 4 images each"});
  }
  if (options.out_dir.empty()) {
    throw Error({"no cache folder", "--out", "a new folder", "an empty path", "name a folder"});
  }
  check_new_output(cache_out_path(options.out_dir), "--out");
}

// Launched by torchrun or srun, each rank encodes every world_size-th shard on its own GPU.
struct EncoderProcess {
  dist::DistEnvironment env;
  torch::Device device = torch::kCPU;
  std::unique_ptr<dist::Communicator> comm;
};

EncoderProcess start_process(const config::TrainConfig& cfg) {
  EncoderProcess p;
  p.env = dist::detect_environment(cfg.dist.init_method);
  log::set_rank(static_cast<int>(p.env.rank));
  // Decoding runs on the intra-op threads here (no decode workers): all the CPUs given.
  const util::ThreadBudget threads = util::apply_thread_budget(cfg.run.threads, 0);
  log::info("threads: {} CPUs ({}), {} intra-op ({})", threads.cpus, threads.cpus_from,
            threads.intra_op, threads.intra_op_from);
  p.device = dist::select_device(cfg.run.device, p.env.local_rank);
  p.comm = dist::Communicator::create(p.env, cfg.dist.backend, p.device,
                                      std::chrono::seconds(cfg.dist.timeout_s),
                                      /*force_process_group=*/false);
  return p;
}

// The embedding of "" (caption dropout), which also gives the text shapes.
models::Conditioning empty_caption(models::TextConditioner& text,
                                   const models::Manifest& manifest) {
  std::vector<torch::Tensor> empty_ids;
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    empty_ids.push_back(torch::tensor(e.empty_prompt_ids).view({1, -1}));
  }
  return text.encode(empty_ids);
}

data::LatentCacheIndex new_cache_index(const config::TrainConfig& cfg,
                                       const models::Manifest& manifest,
                                       const CacheEncodeOptions& options, const EncodeContext& c,
                                       int64_t resolution) {
  data::LatentCacheIndex cache;
  cache.family = models::family_name(manifest.family);
  cache.resolution = resolution;
  cache.dtype = options.dtype;
  cache.encoder_dtype = cfg.model.frozen_dtype;
  cache.shape = c.shape;
  cache.model_files = cache_model_files(manifest, /*hash=*/true);
  cache.bytes_per_pair = data::cache_bytes_per_pair(c.shape, c.dtype);
  return cache;
}

// This rank's shards, then the counts of every rank (the collective also waits for them all).
CacheEncodeReport encode_shards(const data::ShardIndex& index, const std::string& staging,
                                const EncodeContext& c, EncoderProcess& p) {
  CacheEncodeReport report;
  const int64_t rank = p.comm->rank(), world = p.comm->world_size();
  for (auto i = static_cast<size_t>(rank); i < index.shards.size(); i += world) {
    const data::ShardInfo& shard = index.shards[i];
    encode_shard(shard, staging, c, report);
    log::info("cache: {} -> {} ({} pairs)", shard.file, cache_file_name(shard), shard.pairs);
  }
  std::vector<torch::Tensor> counts{
      torch::tensor({report.pairs, report.bad_pairs}, torch::dtype(torch::kInt64)).to(p.device)};
  p.comm->all_reduce_sum(counts, 1 << 20);
  const torch::Tensor total = counts[0].cpu();
  report.pairs = total[0].item<int64_t>();
  report.bad_pairs = total[1].item<int64_t>();
  return report;
}

}  // namespace

CacheEncodeReport encode_latent_cache(const config::TrainConfig& cfg,
                                      const CacheEncodeOptions& options) {
  const torch::ScalarType dtype = data::cache_dtype(options.dtype, "--dtype");
  check_cache_options(options);
  const models::Manifest manifest = models::load_manifest(cfg.model.manifest);
  const int64_t resolution = resolve_resolution(cfg.data.resolution, manifest);
  if (cfg.data.random_crop)
    log::warn("cache: data.random_crop ignored, the cache holds center crops");
  data::ShardIndex index = data::ShardIndex::load(cfg.data.index);
  data::check_shards(index, cfg.data.verify);
  std::unique_ptr<data::CaptionTokenizer> captions;
  if (index.tokenizers.empty()) {  // caption-only shards: tokenized here, as the loader would
    captions = std::make_unique<data::CaptionTokenizer>(caption_tokenizer_specs(manifest));
    index.tokenizers = captions->infos();
    log::info("cache: {} holds captions only: tokenized with the model's tokenizers",
              cfg.data.index);
  }
  EncoderProcess p = start_process(cfg);
  CacheOutput output(options.out_dir, *p.comm, p.device);  // locked from here on
  const torch::ScalarType frozen = frozen_dtype(cfg.model.frozen_dtype);
  models::LatentEncoder vae(manifest, p.device, frozen);
  models::TextConditioner text(manifest, p.device, frozen);
  const models::Conditioning empty = empty_caption(text, manifest);
  const EncodeContext c{
      &index,
      &vae,
      &text,
      data::ImagePrepOptions{resolution, false, false, cfg.data.max_image_pixels},
      data::CacheShape{manifest.latent_channels, resolution / manifest.latent_downsample,
                       empty.text.size(1), empty.text.size(2),
                       empty.pooled.defined() ? empty.pooled.size(1) : 0},
      dtype,
      options.batch,
      captions.get()};

  const fs::path staging = output.begin_staging();
  const bool rank0 = p.comm->rank() == 0;
  data::LatentCacheIndex cache = new_cache_index(cfg, manifest, options, c, resolution);
  if (rank0) {
    data::save_empty_caption(
        (staging / cache.empty_caption).string(),
        {empty.text[0], empty.pooled.defined() ? empty.pooled[0] : torch::Tensor()});
  }
  p.comm->barrier();
  CacheEncodeReport report = encode_shards(index, staging.string(), c, p);
  for (const data::ShardInfo& shard : index.shards) {
    cache.shards.push_back(shard_info(shard, staging.string()));
    report.bytes += cache.shards.back().bytes;
  }
  p.comm->barrier();  // every rank has read the sizes before rank 0 moves the folder
  if (rank0) {
    cache.save((staging / "index.json").string());
    output.publish();
  }
  p.comm->barrier();  // every rank returns once the cache is in place
  report.shards = static_cast<int64_t>(cache.shards.size());
  report.bytes_per_pair = cache.bytes_per_pair;
  report.index_path = (fs::path(options.out_dir) / "index.json").string();
  return report;
}

}  // namespace dde::pairs
