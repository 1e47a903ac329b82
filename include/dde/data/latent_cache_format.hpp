// The latent cache's files without LibTorch (docs/formats.md section 6): index.json parsed into
// plain structs, and a cache shard's safetensors header checked against the index into the byte
// layout of its rows. latent_cache.hpp reads the rows into tensors; tests/fuzz/fuzz_latent_cache
// fuzzes both parsers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "dde/checkpoint/safetensors_header.hpp"

namespace dde::data {

inline constexpr const char* kLatentCacheFormat = "dde-latent-cache";
inline constexpr const char* kLatentCacheShardFormat = "dde-latent-cache-shard";
inline constexpr int64_t kLatentCacheVersion = 1;
inline constexpr const char* kLatentCacheRebuildHint =
    "rebuild the cache with dde_encode_cache from the current data.index and model.manifest";

// A frozen encoder file the cache was made with ("vae_encoder", "text_encoder", ...).
struct CacheModelFile {
  std::string role;
  std::string file;  // file name (the manifest's folder may move)
  int64_t bytes = 0;
  std::string sha256;  // of the whole file
};

// Per pair: moments [2 images, 2 (unflipped, flipped), 2 (mean, logvar), C, h, h],
// text [L, D], pooled [P] (pooled_dim 0: none, sd15), geometry [2 images, 4] int64
// (original h, w, crop top, left), ok [] uint8 (0: a bad pair, its rows are zeros).
struct CacheShape {
  int64_t latent_channels = 0, latent_size = 0;
  int64_t text_length = 0, text_dim = 0;
  int64_t pooled_dim = 0;
};

struct LatentCacheShardInfo {
  std::string file;           // cache shard, a plain file name in the cache folder
  std::string source;         // the source shard's file name in the source index.json
  std::string source_sha256;  // the source index's sha256 of that shard
  int64_t pairs = 0;
  int64_t bytes = 0;  // size of the cache shard
};

struct LatentCacheIndex {
  std::string path;  // of index.json
  std::string family;
  int64_t resolution = 0;
  std::string dtype = "fp32";          // stored: fp32 | bf16 | fp16
  std::string encoder_dtype = "fp32";  // model.frozen_dtype the encoders ran in
  CacheShape shape;
  std::vector<CacheModelFile> model_files;
  std::vector<LatentCacheShardInfo> shards;
  std::string empty_caption = "empty_caption.safetensors";  // text (+ pooled) of ""
  int64_t bytes_per_pair = 0;

  // Parses and validates (format, version, fields, plain file names inside the folder).
  static LatentCacheIndex load(const std::string& index_path);
  // The same from index.json's text.
  static LatentCacheIndex parse(const std::string& text, const std::string& index_path);
  void save(const std::string& index_path) const;
  std::string file_path(const std::string& file) const;  // resolved against the folder
};

// The Error of a cache that does not fit: what, where, expected, actual, "rebuild the cache".
[[noreturn]] void latent_cache_mismatch(const std::string& what, const std::string& where,
                                        const std::string& expected, const std::string& actual);

// "fp32" | "bf16" | "fp16" as stored; anything else is an Error naming `where`.
checkpoint::SafetensorsDtype cache_stored_dtype(const std::string& name, const std::string& where);

// One tensor of a cache shard, in the order they are stored: its dtype and one pair's row shape.
struct CacheFieldSpec {
  std::string name;
  checkpoint::SafetensorsDtype dtype = checkpoint::SafetensorsDtype::kF32;
  std::vector<int64_t> row_shape;
};
std::vector<CacheFieldSpec> cache_field_specs(const CacheShape& shape,
                                              checkpoint::SafetensorsDtype dtype);
int64_t cache_row_bytes(const CacheFieldSpec& field);

// One tensor of a checked cache shard: row r is the bytes [begin + r * row_bytes, + row_bytes),
// inside the file.
struct CacheShardField {
  int64_t begin = 0, row_bytes = 0;
  checkpoint::SafetensorsDtype dtype = checkpoint::SafetensorsDtype::kF32;
  std::vector<int64_t> row_shape;
};

struct LatentCacheShardLayout {
  std::vector<std::string> keys;  // one per pair, in shard order
  std::map<std::string, CacheShardField> fields;
};

// Reads the header of the index's shard `shard` from `path` and checks it against the index:
// format and source, one key per pair, every tensor present with its dtype and shape.
LatentCacheShardLayout read_latent_cache_shard_layout(const LatentCacheIndex& cache, size_t shard,
                                                      const std::string& path);

}  // namespace dde::data
