// index.json of a Pick-a-Pic shard export (docs/formats.md section 2): the list of shards
// with their pair and tie counts and the tokenizers the input ids were made with.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dde::data {

inline constexpr const char* kShardIndexFormat = "dde-pickapic-shards";
inline constexpr int64_t kShardIndexVersion = 1;

struct ShardInfo {
  std::string file;   // as written in index.json
  std::string path;   // resolved against the index's directory
  int64_t pairs = 0;  // pairs in the shard, ties included
  int64_t ties = 0;   // pairs with label_0 == 0.5 (kept by --keep-ties)
};

struct TokenizerInfo {
  std::string name;
  std::string vocab_sha256;
  int64_t max_length = 0;
};

struct ShardIndex {
  std::string path;  // of index.json
  std::vector<ShardInfo> shards;
  std::vector<TokenizerInfo> tokenizers;  // order of the input_ids lists in every pair

  // Parses and validates index.json; every shard file must exist.
  static ShardIndex load(const std::string& index_path);

  int64_t total_pairs() const;
  int64_t total_ties() const;
};

}  // namespace dde::data
