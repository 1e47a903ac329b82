// Start-up verification of the shards against index.json (ShardIndex::load already checked
// paths and sizes): pair counts and member grouping from the tar headers, unique keys, and
// optionally the sha256 of the bytes.
#include <fmt/format.h>
#include <openssl/evp.h>

#include <fstream>
#include <memory>
#include <unordered_map>
#include <vector>

#include "dde/data/data_error.hpp"
#include "dde/data/pair_record.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"

namespace dde::data {
namespace {

struct KeyOrigin {
  size_t shard = 0;
  int64_t pair = 0;
};

}  // namespace

std::string file_sha256(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw Error({"cannot open file to hash", path, "", "open failed", "check the path"});
  }
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    throw Error({"cannot start sha256", path, "", "OpenSSL EVP failed", ""});
  }
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    if (in.gcount() > 0) {
      EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(in.gcount()));
    }
  }
  if (in.bad()) {
    throw Error({"read error while hashing", path, "", "I/O error", "check the disk"});
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &length);
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) {
    hex += fmt::format("{:02x}", digest[i]);
  }
  return hex;
}

std::string sha256_hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr) != 1) {
    throw Error({"cannot compute sha256", "sha256_hex", "", "OpenSSL EVP failed", ""});
  }
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

ShardCheckReport check_shards(const ShardIndex& index, bool verify_sha256, int64_t offset,
                              int64_t stride) {
  ShardCheckReport report;
  std::unordered_map<std::string, KeyOrigin> keys;
  keys.reserve(static_cast<size_t>(index.total_pairs()));
  for (size_t s = 0; s < index.shards.size(); ++s) {
    const ShardInfo& shard = index.shards[s];
    const std::string where = fmt::format("{}: shards[{}] ({})", index.path, s, shard.path);
    if (verify_sha256 && static_cast<int64_t>(s) % stride == offset) {
      const std::string actual = file_sha256(shard.path);
      if (actual != shard.sha256) {
        throw Error({"shard sha256 does not match index.json", where, shard.sha256, actual,
                     "the shard is corrupt: copy it again from the export, or re-export"});
      }
      report.bytes_hashed += shard.bytes;
    }
    ShardPairReader reader(shard.path, ShardPairReader::Images::kHeadersOnly);
    while (std::optional<PairRecord> record = reader.next()) {
      const auto [it, inserted] = keys.emplace(record->key, KeyOrigin{s, reader.pairs_read() - 1});
      if (!inserted) {
        throw Error({"duplicate pair key in the export",
                     fmt::format("{}: key '{}'", where, record->key),
                     "every key once over all shards",
                     fmt::format("also pair {} of shards[{}] ({})", it->second.pair,
                                 it->second.shard, index.shards[it->second.shard].path),
                     kReexportHint});
      }
    }
    if (reader.pairs_read() != shard.pairs) {
      throw Error({"shard pair count does not match index.json", where + ": pairs",
                   fmt::format("{} pairs (index.json)", shard.pairs),
                   fmt::format("{} pairs in the tar headers", reader.pairs_read()), kReexportHint});
    }
    report.pairs += shard.pairs;
    ++report.shards;
  }
  return report;
}

}  // namespace dde::data
