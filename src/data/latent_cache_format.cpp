#include "dde/data/latent_cache_format.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "dde/data/data_error.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::data {
namespace {

namespace fs = std::filesystem;
using checkpoint::SafetensorsDtype;
using nlohmann::json;

// Elements of one pair's row of one tensor: far above any model's, and small enough that the
// rows' sizes in bytes cannot overflow.
constexpr int64_t kMaxCacheRowElements = int64_t{1} << 40;

// A plain file name inside the cache folder: no separators, no "." or "..".
void check_cache_file_name(const std::string& name, const std::string& where) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\\') != std::string::npos) {
    throw Error({"bad file name in the latent cache index", where,
                 "a plain file name in the cache folder", escape_preview(name, 100),
                 kLatentCacheRebuildHint});
  }
}

// obj[key] as an int64; nlohmann's get<int64_t>() would truncate 1.5, wrap 2^64 and overflow
// (UB) on 1e300. json::exception for a missing key, as the other fields.
int64_t index_integer(const json& obj, const char* key, const std::string& where) {
  const json& v = obj.at(key);
  const bool fits = v.is_number_unsigned()
                        ? v.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()}
                        : v.is_number_integer();
  if (!fits) {
    throw Error({"bad latent cache index", where + ": " + key, "an integer", v.dump(),
                 kLatentCacheRebuildHint});
  }
  return v.get<int64_t>();
}

CacheShape parse_cache_shape(const json& s, const std::string& where) {
  const CacheShape shape{
      index_integer(s, "latent_channels", where), index_integer(s, "latent_size", where),
      index_integer(s, "text_length", where), index_integer(s, "text_dim", where),
      index_integer(s, "pooled_dim", where)};
  if (shape.latent_channels < 1 || shape.latent_size < 1 || shape.text_length < 1 ||
      shape.text_dim < 1 || shape.pooled_dim < 0) {
    latent_cache_mismatch("bad latent cache shape", where, "positive sizes", s.dump());
  }
  for (const CacheFieldSpec& f : cache_field_specs(shape, SafetensorsDtype::kF32)) {
    int64_t n = 1;
    for (const int64_t d : f.row_shape) {
      if (n > kMaxCacheRowElements / d) {
        latent_cache_mismatch("bad latent cache shape", where,
                              "rows of at most 2^40 elements per pair", s.dump());
      }
      n *= d;
    }
  }
  return shape;
}

void parse_cache_files(const json& j, const std::string& path, LatentCacheIndex& c) {
  for (const json& f : j.at("model_files")) {
    c.model_files.push_back({f.at("role").get<std::string>(), f.at("file").get<std::string>(),
                             index_integer(f, "bytes", path + ": model_files[]"),
                             f.at("sha256").get<std::string>()});
  }
  for (const json& f : j.at("shards")) {
    const std::string where = path + ": shards[]";
    LatentCacheShardInfo info{f.at("file").get<std::string>(), f.at("source").get<std::string>(),
                              f.at("source_sha256").get<std::string>(),
                              index_integer(f, "pairs", where), index_integer(f, "bytes", where)};
    check_cache_file_name(info.file, path + ": shards[].file");
    c.shards.push_back(std::move(info));
  }
  c.empty_caption = j.at("empty_caption").get<std::string>();
  check_cache_file_name(c.empty_caption, path + ": empty_caption");
}

LatentCacheIndex parse_cache_index(const json& j, const std::string& path) {
  if (j.at("format").get<std::string>() != kLatentCacheFormat ||
      j.at("version") != kLatentCacheVersion) {
    throw Error({"not a latent cache index", path,
                 fmt::format("format {} version {}", kLatentCacheFormat, kLatentCacheVersion),
                 fmt::format("format {} version {}", j.at("format").dump(), j.at("version").dump()),
                 kLatentCacheRebuildHint});
  }
  LatentCacheIndex c;
  c.path = path;
  c.family = j.at("family").get<std::string>();
  c.resolution = index_integer(j, "resolution", path);
  c.dtype = j.at("dtype").get<std::string>();
  cache_stored_dtype(c.dtype, path + ": dtype");
  c.encoder_dtype = j.at("encoder_dtype").get<std::string>();
  c.shape = parse_cache_shape(j.at("shape"), path + ": shape");
  parse_cache_files(j, path, c);
  c.bytes_per_pair = index_integer(j, "bytes_per_pair", path);
  return c;
}

// A shard tensor's "Float [N, ...]" for messages.
std::string cache_tensor_text(SafetensorsDtype dtype, const std::vector<int64_t>& shape) {
  return fmt::format("{} {}", checkpoint::safetensors_dtype_torch_name(dtype), json(shape).dump());
}

}  // namespace

void latent_cache_mismatch(const std::string& what, const std::string& where,
                           const std::string& expected, const std::string& actual) {
  throw Error({what, where, expected, actual, kLatentCacheRebuildHint});
}

SafetensorsDtype cache_stored_dtype(const std::string& name, const std::string& where) {
  if (name == "fp32") return SafetensorsDtype::kF32;
  if (name == "bf16") return SafetensorsDtype::kBF16;
  if (name == "fp16") return SafetensorsDtype::kF16;
  throw Error(
      {"unknown latent cache dtype", where, "fp32 | bf16 | fp16", name, kLatentCacheRebuildHint});
}

std::vector<CacheFieldSpec> cache_field_specs(const CacheShape& s, SafetensorsDtype dtype) {
  std::vector<CacheFieldSpec> out{
      {"moments", dtype, {2, 2, 2, s.latent_channels, s.latent_size, s.latent_size}},
      {"text", dtype, {s.text_length, s.text_dim}}};
  if (s.pooled_dim > 0) out.push_back({"pooled", dtype, {s.pooled_dim}});
  out.push_back({"geometry", SafetensorsDtype::kI64, {2, 4}});
  out.push_back({"ok", SafetensorsDtype::kU8, {}});
  return out;
}

int64_t cache_row_bytes(const CacheFieldSpec& field) {
  int64_t n = checkpoint::safetensors_dtype_size(field.dtype);
  for (const int64_t d : field.row_shape) n *= d;
  return n;
}

std::string LatentCacheIndex::file_path(const std::string& file) const {
  return (fs::path(path).parent_path() / file).string();
}

LatentCacheIndex LatentCacheIndex::load(const std::string& index_path) {
  std::error_code ec;
  if (!fs::is_regular_file(index_path, ec) || !std::ifstream(index_path)) {
    throw Error({"cannot read the latent cache index", index_path, "a readable index.json",
                 ec ? ec.message() : "",
                 "check data.cache, or build the cache with dde_encode_cache"});
  }
  return parse(util::read_text_file(index_path, util::kMaxIndexBytes, "latent cache index"),
               index_path);
}

LatentCacheIndex LatentCacheIndex::parse(const std::string& text, const std::string& index_path) {
  try {
    return parse_cache_index(json::parse(text), index_path);
  } catch (const json::exception& e) {
    throw Error({"bad latent cache index", index_path, "the fields of docs/formats.md section 6",
                 e.what(), kLatentCacheRebuildHint});
  }
}

void LatentCacheIndex::save(const std::string& index_path) const {
  json files = json::array();
  for (const CacheModelFile& f : model_files) {
    files.push_back({{"role", f.role}, {"file", f.file}, {"bytes", f.bytes}, {"sha256", f.sha256}});
  }
  json shard_list = json::array();
  for (const LatentCacheShardInfo& s : shards) {
    shard_list.push_back({{"file", s.file},
                          {"source", s.source},
                          {"source_sha256", s.source_sha256},
                          {"pairs", s.pairs},
                          {"bytes", s.bytes}});
  }
  const json j = {{"format", kLatentCacheFormat},
                  {"version", kLatentCacheVersion},
                  {"family", family},
                  {"resolution", resolution},
                  {"dtype", dtype},
                  {"encoder_dtype", encoder_dtype},
                  {"shape",
                   {{"latent_channels", shape.latent_channels},
                    {"latent_size", shape.latent_size},
                    {"text_length", shape.text_length},
                    {"text_dim", shape.text_dim},
                    {"pooled_dim", shape.pooled_dim}}},
                  {"model_files", files},
                  {"empty_caption", empty_caption},
                  {"bytes_per_pair", bytes_per_pair},
                  {"shards", shard_list}};
  std::ofstream out(index_path, std::ios::trunc);
  out << j.dump(2) << "\n";
  out.flush();
  if (!out) throw Error({"cannot write", index_path, "a writable path", "", "check free space"});
}

LatentCacheShardLayout read_latent_cache_shard_layout(const LatentCacheIndex& cache, size_t shard,
                                                      const std::string& path) {
  const LatentCacheShardInfo& info = cache.shards.at(shard);
  const checkpoint::SafetensorsLayout header = checkpoint::read_safetensors_layout(path);
  const auto meta = [&](const std::string& key) {
    const auto it = header.metadata.find(key);
    return it == header.metadata.end() ? std::string() : it->second;
  };
  if (meta("format") != kLatentCacheShardFormat || meta("source") != info.source) {
    latent_cache_mismatch(
        "not the cache shard of its source", path,
        fmt::format("format {} of source {}", kLatentCacheShardFormat, info.source),
        fmt::format("format '{}' of source '{}'", meta("format"), meta("source")));
  }
  LatentCacheShardLayout out;
  try {
    out.keys = json::parse(meta("keys")).get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    latent_cache_mismatch("cache shard has no key list", path + ": __metadata__.keys",
                          "a JSON list of the pairs' keys", e.what());
  }
  if (static_cast<int64_t>(out.keys.size()) != info.pairs) {
    latent_cache_mismatch("cache shard has the wrong number of pairs", path + ": __metadata__.keys",
                          std::to_string(info.pairs), std::to_string(out.keys.size()));
  }
  for (const CacheFieldSpec& spec :
       cache_field_specs(cache.shape, cache_stored_dtype(cache.dtype, cache.path))) {
    std::vector<int64_t> shape{info.pairs};
    shape.insert(shape.end(), spec.row_shape.begin(), spec.row_shape.end());
    const auto e = std::find_if(header.entries.begin(), header.entries.end(),
                                [&](const auto& entry) { return entry.name == spec.name; });
    if (e == header.entries.end()) {
      latent_cache_mismatch("cache shard lacks a tensor", path + ": " + spec.name,
                            cache_tensor_text(spec.dtype, shape), "absent");
    }
    if (e->dtype != spec.dtype || e->shape != shape) {
      latent_cache_mismatch("cache tensor has the wrong dtype or shape", path + ": " + spec.name,
                            cache_tensor_text(spec.dtype, shape),
                            cache_tensor_text(e->dtype, e->shape));
    }
    out.fields[spec.name] = {e->begin, cache_row_bytes(spec), spec.dtype, spec.row_shape};
  }
  return out;
}

}  // namespace dde::data
