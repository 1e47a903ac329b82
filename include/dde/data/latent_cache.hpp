// The latent cache (docs/formats.md section 6): the shards encoded once by the frozen VAE and
// text encoders, so that `data.cache` trains without loading them. One cache shard per source
// shard, a safetensors file whose tensors have one row per pair of the source shard, in shard
// order; index.json ties the cache to the source index (shard files, sha256, pair counts), the
// encoder files and the resolution. The source shards stay the source of the pair order and the
// per-pair choices (their KEY.json members are still read); only the images and captions come
// from the cache.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dde/data/latent_cache_format.hpp"
#include "dde/data/shard_index.hpp"

namespace dde::data {

// "fp32" | "bf16" | "fp16"; anything else is an Error naming `where`.
torch::ScalarType cache_dtype(const std::string& name, const std::string& where);
// Bytes of one pair's rows (all tensors of a cache shard) at the stored dtype.
int64_t cache_bytes_per_pair(const CacheShape& shape, torch::ScalarType dtype);

// What the trainer needs of a cache; compare_sha256 also compares the encoder files' hashes.
struct CacheExpectation {
  std::string family;
  int64_t resolution = 0, latent_channels = 0, latent_size = 0, text_dim = 0;
  bool pooled = false;
  std::vector<CacheModelFile> model_files;
  bool compare_sha256 = false;
};

// Throws an Error (naming the cache, the field, expected and actual, and "rebuild the cache")
// when the cache was not made from these shards (files, sha256, pair counts), these encoders,
// this resolution, or when a cache shard is missing or of another size.
void check_latent_cache(const LatentCacheIndex& cache, const ShardIndex& source,
                        const CacheExpectation& expected);

// One pair's rows, as float32 (int64 geometry).
struct CachedPair {
  bool ok = false;
  torch::Tensor moments;   // [2, 2, 2, C, h, h]
  torch::Tensor text;      // [L, D]
  torch::Tensor pooled;    // [P]; undefined without
  torch::Tensor geometry;  // [2, 4] int64
};

// Reads rows of one cache shard; the header is read and checked once, by the constructor.
class LatentCacheShard {
 public:
  LatentCacheShard(const LatentCacheIndex& cache, size_t shard);
  // Row `position` (0-based, shard order); `key` must be the key recorded for it.
  CachedPair read(std::ifstream& file, int64_t position, const std::string& key) const;
  const std::string& path() const { return path_; }

 private:
  torch::Tensor read_row(std::ifstream& file, const CacheShardField& field, int64_t position) const;

  std::string path_;
  LatentCacheShardLayout layout_;
};

// Writes one cache shard row by row (any order); rows not written stay zero (ok = 0).
class LatentCacheShardWriter {
 public:
  LatentCacheShardWriter(const std::string& path, const CacheShape& shape, torch::ScalarType dtype,
                         const std::vector<std::string>& keys,
                         const std::map<std::string, std::string>& metadata);
  void write(int64_t position, const CachedPair& pair);
  int64_t finish();  // flushes; returns the file size

 private:
  void write_row(const std::string& name, int64_t position, const torch::Tensor& row);

  std::string path_;
  torch::ScalarType dtype_;
  std::map<std::string, std::pair<int64_t, int64_t>> fields_;  // name -> (begin, row bytes)
  std::fstream out_;
};

// The tensors of one pair's shard file: checked shapes, the order they are stored in.
std::vector<std::string> cache_field_names(const CacheShape& shape);

struct EmptyCaption {
  torch::Tensor text;    // [L, D] float32
  torch::Tensor pooled;  // [P] float32; undefined without
};
void save_empty_caption(const std::string& path, const EmptyCaption& caption);
EmptyCaption load_empty_caption(const LatentCacheIndex& cache);

}  // namespace dde::data
