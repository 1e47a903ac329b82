// dde_encode_cache: the shards of data.index encoded once by the frozen VAE and text encoders
// of model.manifest into a latent cache (data/latent_cache.hpp, docs/formats.md section 6), with
// the trainer's own image preprocessing (center crop at data.resolution) and encoders.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/data/latent_cache.hpp"
#include "dde/models/manifest.hpp"

namespace dde::pairs {

struct CacheEncodeOptions {
  std::string out_dir;         // created; must not exist
  std::string dtype = "fp32";  // fp32 | bf16 | fp16: stored moments and embeddings
  // Pairs per encoder call (4 images each: both sides, unflipped and flipped), decoded in parallel
  // on torch's intra-op threads. The VAE's activations grow with it: at 512 px about 0.5 GB per
  // image in fp32 at the first block.
  int64_t batch = 4;
};

constexpr int64_t kMaxCacheBatch = 256;

struct CacheEncodeReport {
  int64_t shards = 0, pairs = 0, bad_pairs = 0, bytes = 0, bytes_per_pair = 0;
  std::string index_path;
};

CacheEncodeReport encode_latent_cache(const config::TrainConfig& cfg,
                                      const CacheEncodeOptions& options);

// The frozen encoder files of a manifest (VAE encoder, text encoders) with their sha256: the
// manifest's record of it, or hashed from the file when `hash` (then also checked against the
// record) or when the manifest has none.
std::vector<data::CacheModelFile> cache_model_files(const models::Manifest& manifest, bool hash);

// What a training run with this config and manifest needs of a cache.
data::CacheExpectation cache_expectation(const config::TrainConfig& cfg,
                                         const models::Manifest& manifest, int64_t resolution);

}  // namespace dde::pairs
