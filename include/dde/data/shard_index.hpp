// index.json of a Pick-a-Pic shard export (docs/formats.md section 2): the list of shards
// with their size, sha256, pair and tie counts, and the tokenizers the input ids were made
// with. Torch-free (fuzzed by tests/fuzz/fuzz_shard_index.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dde::data {

inline constexpr const char* kShardIndexFormat = "dde-pickapic-shards";
inline constexpr int64_t kShardIndexVersion = 2;

struct ShardInfo {
  std::string file;    // as written in index.json: a plain file name in the index's folder
  std::string path;    // resolved against the index's directory
  int64_t bytes = 0;   // size of the tar file
  std::string sha256;  // 64 lowercase hex digits of the whole tar file
  int64_t pairs = 0;   // pairs in the shard, ties included
  int64_t ties = 0;    // pairs with label_0 == 0.5 (kept by --keep-ties)
};

struct TokenizerInfo {
  std::string name;
  std::string vocab_sha256;
  int64_t max_length = 0;
  int64_t vocab_size = 0;  // ids must lie in [0, vocab_size); 0 = not recorded by the export
};

struct ShardIndex {
  std::string path;  // of index.json
  std::vector<ShardInfo> shards;
  std::vector<TokenizerInfo> tokenizers;  // order of the input_ids lists in every pair

  // Parses and validates index.json: every shard must be a regular file inside the index's
  // folder (no '/', '..', absolute paths or symlinks leading out) of the recorded size.
  static ShardIndex load(const std::string& index_path);
  // The same checks on index.json's text (`index_path` names it and locates the shards).
  static ShardIndex parse(const std::string& text, const std::string& index_path);

  int64_t total_pairs() const;
  int64_t total_ties() const;
};

// Start-up check of the shards against their index (docs/formats.md section 2): the pair
// count of every shard from its tar headers (no payload is read), the member grouping,
// keys unique over the whole export, and with `verify_sha256` the sha256 of every shard
// whose position i satisfies i % stride == offset (ranks split the hashing). Throws
// dde::Error naming the shard, expected and actual.
struct ShardCheckReport {
  int64_t shards = 0, pairs = 0, bytes_hashed = 0;
};
ShardCheckReport check_shards(const ShardIndex& index, bool verify_sha256, int64_t offset = 0,
                              int64_t stride = 1);

// sha256 of a whole file, lowercase hex.
std::string file_sha256(const std::string& path);
// sha256 of `bytes`, lowercase hex.
std::string sha256_hex(const std::string& bytes);

}  // namespace dde::data
