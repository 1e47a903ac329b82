#include "dde/data/shard_index.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dde/util/error.hpp"

namespace dde::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kReexportHint =
    "re-export the shards with python -m dde_tools.export_pickapic";

std::string type_name(const json& value) { return value.type_name(); }

const json& require(const json& object, const std::string& key, json::value_t type,
                    const std::string& where, const std::string& expected) {
  const auto it = object.find(key);
  if (it == object.end()) {
    throw Error({"missing field in shard index", where + ": " + key, expected, "no such field",
                 kReexportHint});
  }
  const bool ok =
      type == json::value_t::number_integer
          ? it->is_number_integer()
          : (type == json::value_t::number_float ? it->is_number() : it->type() == type);
  if (!ok) {
    throw Error({"wrong field type in shard index", where + ": " + key, expected, type_name(*it),
                 kReexportHint});
  }
  return *it;
}

int64_t require_count(const json& object, const std::string& key, const std::string& where) {
  const int64_t value =
      require(object, key, json::value_t::number_integer, where, "an integer >= 0").get<int64_t>();
  if (value < 0) {
    throw Error({"negative count in shard index", where + ": " + key, ">= 0", std::to_string(value),
                 kReexportHint});
  }
  return value;
}

}  // namespace

ShardIndex ShardIndex::load(const std::string& index_path) {
  std::ifstream in(index_path);
  if (!in) {
    throw Error({"cannot open shard index", index_path,
                 "an index.json written by dde_tools.export_pickapic", "the file cannot be opened",
                 "check data.index in the config"});
  }
  std::stringstream buffer;
  buffer << in.rdbuf();
  json root;
  try {
    root = json::parse(buffer.str());
  } catch (const json::parse_error& e) {
    throw Error({"shard index is not valid JSON", index_path, "JSON", e.what(), kReexportHint});
  }
  if (!root.is_object()) {
    throw Error(
        {"shard index is not a JSON object", index_path, "object", type_name(root), kReexportHint});
  }

  const std::string format =
      require(root, "format", json::value_t::string, index_path, "a string").get<std::string>();
  if (format != kShardIndexFormat) {
    throw Error({"not a dde shard index", index_path + ": format", kShardIndexFormat, format,
                 kReexportHint});
  }
  const int64_t version =
      require(root, "version", json::value_t::number_integer, index_path, "an integer")
          .get<int64_t>();
  if (version != kShardIndexVersion) {
    throw Error({"unsupported shard index version", index_path + ": version",
                 std::to_string(kShardIndexVersion), std::to_string(version),
                 "re-export the shards with this version of dde_tools"});
  }

  ShardIndex index;
  index.path = index_path;
  const fs::path directory = fs::path(index_path).parent_path();
  const json& shards =
      require(root, "shards", json::value_t::array, index_path, "a list of shards");
  if (shards.empty()) {
    throw Error({"shard index lists no shards", index_path + ": shards", "at least one shard", "[]",
                 kReexportHint});
  }
  for (size_t i = 0; i < shards.size(); ++i) {
    const std::string where = fmt::format("{}: shards[{}]", index_path, i);
    if (!shards[i].is_object()) {
      throw Error(
          {"shard entry is not an object", where, "object", type_name(shards[i]), kReexportHint});
    }
    ShardInfo shard;
    shard.file =
        require(shards[i], "file", json::value_t::string, where, "a file name").get<std::string>();
    shard.pairs = require_count(shards[i], "pairs", where);
    shard.ties = require_count(shards[i], "ties", where);
    if (shard.ties > shard.pairs) {
      throw Error({"shard has more ties than pairs", where,
                   fmt::format("ties <= pairs ({})", shard.pairs), std::to_string(shard.ties),
                   kReexportHint});
    }
    const fs::path file(shard.file);
    shard.path = (file.is_absolute() ? file : directory / file).string();
    if (!fs::is_regular_file(shard.path)) {
      throw Error({"shard file missing", where + ": file", shard.path, "no such file",
                   "copy the whole export folder (index.json and every shard-*.tar) together"});
    }
    index.shards.push_back(std::move(shard));
  }

  if (root.contains("tokenizers")) {
    const json& tokenizers =
        require(root, "tokenizers", json::value_t::array, index_path, "a list");
    for (size_t i = 0; i < tokenizers.size(); ++i) {
      const std::string where = fmt::format("{}: tokenizers[{}]", index_path, i);
      if (!tokenizers[i].is_object()) {
        throw Error({"tokenizer entry is not an object", where, "object", type_name(tokenizers[i]),
                     kReexportHint});
      }
      TokenizerInfo tokenizer;
      tokenizer.name = require(tokenizers[i], "name", json::value_t::string, where, "a string")
                           .get<std::string>();
      tokenizer.vocab_sha256 =
          require(tokenizers[i], "vocab_sha256", json::value_t::string, where, "a string")
              .get<std::string>();
      tokenizer.max_length = require_count(tokenizers[i], "max_length", where);
      if (tokenizer.max_length == 0) {
        throw Error(
            {"tokenizer max_length is 0", where + ": max_length", "> 0", "0", kReexportHint});
      }
      index.tokenizers.push_back(std::move(tokenizer));
    }
  }
  return index;
}

int64_t ShardIndex::total_pairs() const {
  int64_t total = 0;
  for (const ShardInfo& shard : shards) {
    total += shard.pairs;
  }
  return total;
}

int64_t ShardIndex::total_ties() const {
  int64_t total = 0;
  for (const ShardInfo& shard : shards) {
    total += shard.ties;
  }
  return total;
}

}  // namespace dde::data
