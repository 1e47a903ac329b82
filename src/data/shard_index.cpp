#include "dde/data/shard_index.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "dde/data/data_error.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

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
  const json& value = require(object, key, json::value_t::number_integer, where, "an integer >= 0");
  if (value.is_number_unsigned() &&
      value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    throw Error({"count too large in shard index", where + ": " + key, "an integer < 2^63",
                 std::to_string(value.get<uint64_t>()), kReexportHint});
  }
  const auto count = value.get<int64_t>();
  if (count < 0) {
    throw Error({"negative count in shard index", where + ": " + key, ">= 0", std::to_string(count),
                 kReexportHint});
  }
  return count;
}

// Parses with the last object key seen, so a number overflow ("1e400") names its field.
json parse_json(const std::string& text, const std::string& path) {
  std::string last_key;
  const json::parser_callback_t track = [&](int, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && parsed.is_string()) {
      last_key = parsed.get<std::string>();
    }
    return true;
  };
  try {
    return json::parse(text, track);
  } catch (const json::exception& e) {
    throw Error({"shard index is not valid JSON",
                 last_key.empty()
                     ? path
                     : fmt::format("{}: near field '{}'", path, escape_preview(last_key, 80)),
                 "JSON as written by dde_tools.export_pickapic", escape_preview(e.what(), 160),
                 kReexportHint});
  }
}

bool is_sha256_hex(const std::string& s) {
  return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string::npos;
}

// A plain file name inside `directory` that resolves (symlinks followed) to a regular file
// still inside it.
std::string resolve_shard(const fs::path& directory, const std::string& file,
                          const std::string& where) {
  if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
      file.find('\\') != std::string::npos || file.find('\0') != std::string::npos) {
    throw Error({"shard path leaves the index's folder", where + ": file",
                 "a plain file name such as shard-000000.tar (no '/', '..' or absolute path)",
                 "'" + escape_preview(file, 80) + "'",
                 "keep the shards next to index.json and list them by name; " +
                     std::string(kReexportHint)});
  }
  const fs::path path = directory / file;
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    throw Error({"shard file missing", where + ": file", path.string(),
                 fs::exists(fs::symlink_status(path, ec)) ? "not a regular file" : "no such file",
                 "copy the whole export folder (index.json and every shard-*.tar) together"});
  }
  const fs::path real_dir = fs::canonical(directory.empty() ? fs::path(".") : directory, ec);
  const fs::path real = fs::canonical(path, ec);
  const fs::path relative = real.lexically_relative(real_dir);
  if (ec || relative.empty() || relative.begin()->string() == "..") {
    throw Error({"shard path leaves the index's folder", where + ": file",
                 "a file inside " + real_dir.string(), real.string() + " (through a symlink)",
                 "copy the shard into the export folder instead of linking outside it"});
  }
  return path.string();
}

ShardInfo parse_shard(const json& entry, const fs::path& directory, const std::string& where) {
  if (!entry.is_object()) {
    throw Error({"shard entry is not an object", where, "object", type_name(entry), kReexportHint});
  }
  ShardInfo shard;
  shard.file =
      require(entry, "file", json::value_t::string, where, "a file name").get<std::string>();
  shard.bytes = require_count(entry, "bytes", where);
  shard.sha256 = require(entry, "sha256", json::value_t::string, where, "64 lowercase hex digits")
                     .get<std::string>();
  if (!is_sha256_hex(shard.sha256)) {
    throw Error({"bad sha256 in shard index", where + ": sha256", "64 lowercase hex digits",
                 "'" + escape_preview(shard.sha256, 80) + "'", kReexportHint});
  }
  shard.pairs = require_count(entry, "pairs", where);
  shard.ties = require_count(entry, "ties", where);
  if (shard.ties > shard.pairs) {
    throw Error({"shard has more ties than pairs", where,
                 fmt::format("ties <= pairs ({})", shard.pairs), std::to_string(shard.ties),
                 kReexportHint});
  }
  // Every pair is three members of at least one 512-byte header each, plus the end marker.
  if (shard.pairs > std::max<int64_t>(0, shard.bytes - 1024) / 1536) {
    throw Error({"shard too small for its pair count", where,
                 fmt::format("<= {} pairs in {} bytes (3 tar headers per pair)",
                             std::max<int64_t>(0, shard.bytes - 1024) / 1536, shard.bytes),
                 std::to_string(shard.pairs), kReexportHint});
  }
  shard.path = resolve_shard(directory, shard.file, where);
  std::error_code ec;
  const auto size = static_cast<int64_t>(fs::file_size(shard.path, ec));
  if (ec || size != shard.bytes) {
    throw Error({"shard size does not match index.json", where + ": bytes (" + shard.path + ")",
                 fmt::format("{} bytes", shard.bytes),
                 ec ? ec.message() : fmt::format("{} bytes", size),
                 "the shard is truncated or was replaced: copy it again from the export, or "
                 "re-export"});
  }
  return shard;
}

TokenizerInfo parse_tokenizer(const json& entry, const std::string& where) {
  if (!entry.is_object()) {
    throw Error(
        {"tokenizer entry is not an object", where, "object", type_name(entry), kReexportHint});
  }
  TokenizerInfo tokenizer;
  tokenizer.name =
      require(entry, "name", json::value_t::string, where, "a string").get<std::string>();
  tokenizer.vocab_sha256 =
      require(entry, "vocab_sha256", json::value_t::string, where, "a string").get<std::string>();
  tokenizer.max_length = require_count(entry, "max_length", where);
  if (tokenizer.max_length == 0) {
    throw Error({"tokenizer max_length is 0", where + ": max_length", "> 0", "0", kReexportHint});
  }
  if (entry.contains("vocab_size")) {
    tokenizer.vocab_size = require_count(entry, "vocab_size", where);
  }
  return tokenizer;
}

}  // namespace

ShardIndex ShardIndex::load(const std::string& index_path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(index_path, ec) || !std::ifstream(index_path)) {
    throw Error({"cannot open shard index", index_path,
                 "an index.json written by dde_tools.export_pickapic", "the file cannot be opened",
                 "check data.index in the config"});
  }
  return parse(util::read_text_file(index_path, util::kMaxIndexBytes, "shard index"), index_path);
}

ShardIndex ShardIndex::parse(const std::string& text, const std::string& index_path) {
  const json root = parse_json(text, index_path);
  if (!root.is_object()) {
    throw Error(
        {"shard index is not a JSON object", index_path, "object", type_name(root), kReexportHint});
  }
  const std::string format =
      require(root, "format", json::value_t::string, index_path, "a string").get<std::string>();
  if (format != kShardIndexFormat) {
    throw Error({"not a dde shard index", index_path + ": format", kShardIndexFormat,
                 "'" + escape_preview(format, 60) + "'", kReexportHint});
  }
  const json& version_field =
      require(root, "version", json::value_t::number_integer, index_path, "an integer");
  // nlohmann reads non-negative literals as unsigned: only values past int64 are mapped to -1.
  const bool huge =
      version_field.is_number_unsigned() &&
      version_field.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
  const int64_t version = huge ? -1 : version_field.get<int64_t>();
  if (version != kShardIndexVersion) {
    throw Error({"unsupported shard index version", index_path + ": version",
                 std::to_string(kShardIndexVersion), version_field.dump(),
                 version == 1 ? "version 1 indexes carry no shard sizes or hashes: re-export the "
                                "shards with this version of dde_tools.export_pickapic"
                              : "re-export the shards with this version of dde_tools"});
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
    index.shards.push_back(
        parse_shard(shards[i], directory, fmt::format("{}: shards[{}]", index_path, i)));
  }
  if (root.contains("tokenizers")) {
    const json& tokenizers =
        require(root, "tokenizers", json::value_t::array, index_path, "a list");
    for (size_t i = 0; i < tokenizers.size(); ++i) {
      index.tokenizers.push_back(
          parse_tokenizer(tokenizers[i], fmt::format("{}: tokenizers[{}]", index_path, i)));
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
