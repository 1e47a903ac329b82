#include "dde/data/latent_cache.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <utility>

#include "dde/checkpoint/safetensors.hpp"
#include "dde/data/data_error.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::data {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kRebuildHint =
    "rebuild the cache with dde_encode_cache from the current data.index and model.manifest";

struct FieldSpec {
  std::string name;
  torch::ScalarType dtype;
  std::vector<int64_t> row_shape;  // one pair's
};

std::vector<FieldSpec> field_specs(const CacheShape& s, torch::ScalarType dtype) {
  std::vector<FieldSpec> out{
      {"moments", dtype, {2, 2, 2, s.latent_channels, s.latent_size, s.latent_size}},
      {"text", dtype, {s.text_length, s.text_dim}}};
  if (s.pooled_dim > 0) out.push_back({"pooled", dtype, {s.pooled_dim}});
  out.push_back({"geometry", torch::kInt64, {2, 4}});
  out.push_back({"ok", torch::kUInt8, {}});
  return out;
}

int64_t row_bytes(const FieldSpec& f) {
  int64_t n = static_cast<int64_t>(c10::elementSize(f.dtype));
  for (const int64_t d : f.row_shape) n *= d;
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) { return json(shape).dump(); }

// A plain file name inside the cache folder: no separators, no "." or "..".
void check_file_name(const std::string& name, const std::string& where) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\\') != std::string::npos) {
    throw Error({"bad file name in the latent cache index", where,
                 "a plain file name in the cache folder", escape_preview(name, 100), kRebuildHint});
  }
}

[[noreturn]] void mismatch(const std::string& what, const std::string& where,
                           const std::string& expected, const std::string& actual) {
  throw Error({what, where, expected, actual, kRebuildHint});
}

}  // namespace

torch::ScalarType cache_dtype(const std::string& name, const std::string& where) {
  if (name == "fp32") return torch::kFloat32;
  if (name == "bf16") return torch::kBFloat16;
  if (name == "fp16") return torch::kFloat16;
  throw Error({"unknown latent cache dtype", where, "fp32 | bf16 | fp16", name, kRebuildHint});
}

int64_t cache_bytes_per_pair(const CacheShape& shape, torch::ScalarType dtype) {
  int64_t total = 0;
  for (const FieldSpec& f : field_specs(shape, dtype)) total += row_bytes(f);
  return total;
}

std::vector<std::string> cache_field_names(const CacheShape& shape) {
  std::vector<std::string> names;
  for (const FieldSpec& f : field_specs(shape, torch::kFloat32)) names.push_back(f.name);
  return names;
}

std::string LatentCacheIndex::file_path(const std::string& file) const {
  return (fs::path(path).parent_path() / file).string();
}

LatentCacheIndex LatentCacheIndex::load(const std::string& index_path) {
  std::error_code ec;
  if (!fs::is_regular_file(index_path, ec) || !std::ifstream(index_path)) {
    throw Error({"cannot read the latent cache index", index_path, "a readable index.json", "",
                 "check data.cache, or build the cache with dde_encode_cache"});
  }
  LatentCacheIndex c;
  c.path = index_path;
  try {
    const json j =
        json::parse(util::read_text_file(index_path, util::kMaxIndexBytes, "latent cache index"));
    if (j.at("format").get<std::string>() != kLatentCacheFormat ||
        j.at("version").get<int64_t>() != kLatentCacheVersion) {
      throw Error(
          {"not a latent cache index", index_path,
           fmt::format("format {} version {}", kLatentCacheFormat, kLatentCacheVersion),
           fmt::format("format {} version {}", j.at("format").dump(), j.at("version").dump()),
           kRebuildHint});
    }
    c.family = j.at("family").get<std::string>();
    c.resolution = j.at("resolution").get<int64_t>();
    c.dtype = j.at("dtype").get<std::string>();
    cache_dtype(c.dtype, index_path + ": dtype");
    c.encoder_dtype = j.at("encoder_dtype").get<std::string>();
    const json& s = j.at("shape");
    c.shape = {s.at("latent_channels").get<int64_t>(), s.at("latent_size").get<int64_t>(),
               s.at("text_length").get<int64_t>(), s.at("text_dim").get<int64_t>(),
               s.at("pooled_dim").get<int64_t>()};
    if (c.shape.latent_channels < 1 || c.shape.latent_size < 1 || c.shape.text_length < 1 ||
        c.shape.text_dim < 1 || c.shape.pooled_dim < 0) {
      mismatch("bad latent cache shape", index_path + ": shape", "positive sizes", s.dump());
    }
    for (const json& f : j.at("model_files")) {
      c.model_files.push_back({f.at("role").get<std::string>(), f.at("file").get<std::string>(),
                               f.at("bytes").get<int64_t>(), f.at("sha256").get<std::string>()});
    }
    for (const json& f : j.at("shards")) {
      LatentCacheShardInfo info{f.at("file").get<std::string>(), f.at("source").get<std::string>(),
                                f.at("source_sha256").get<std::string>(),
                                f.at("pairs").get<int64_t>(), f.at("bytes").get<int64_t>()};
      check_file_name(info.file, index_path + ": shards[].file");
      c.shards.push_back(std::move(info));
    }
    c.empty_caption = j.at("empty_caption").get<std::string>();
    check_file_name(c.empty_caption, index_path + ": empty_caption");
    c.bytes_per_pair = j.at("bytes_per_pair").get<int64_t>();
  } catch (const json::exception& e) {
    throw Error({"bad latent cache index", index_path, "the fields of docs/formats.md section 6",
                 e.what(), kRebuildHint});
  }
  return c;
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

void check_latent_cache(const LatentCacheIndex& cache, const ShardIndex& source,
                        const CacheExpectation& e) {
  const std::string& p = cache.path;
  if (cache.family != e.family)
    mismatch("cache of another model family", p + ": family", e.family, cache.family);
  if (cache.resolution != e.resolution) {
    mismatch("cache encoded at another resolution", p + ": resolution",
             std::to_string(e.resolution) + " (data.resolution)", std::to_string(cache.resolution));
  }
  const CacheShape& s = cache.shape;
  if (s.latent_channels != e.latent_channels || s.latent_size != e.latent_size ||
      s.text_dim != e.text_dim || (s.pooled_dim > 0) != e.pooled) {
    mismatch("cache shapes do not fit the model", p + ": shape",
             fmt::format("latents [{}, {}, {}], text dim {}, {}", e.latent_channels, e.latent_size,
                         e.latent_size, e.text_dim, e.pooled ? "pooled" : "no pooled"),
             fmt::format("latents [{}, {}, {}], text dim {}, pooled dim {}", s.latent_channels,
                         s.latent_size, s.latent_size, s.text_dim, s.pooled_dim));
  }
  if (cache.model_files.size() != e.model_files.size()) {
    mismatch("cache made with other encoders", p + ": model_files",
             std::to_string(e.model_files.size()) + " files",
             std::to_string(cache.model_files.size()));
  }
  for (size_t i = 0; i < e.model_files.size(); ++i) {
    const CacheModelFile& want = e.model_files[i];
    const CacheModelFile& got = cache.model_files[i];
    if (want.role != got.role || want.file != got.file || want.bytes != got.bytes ||
        (e.compare_sha256 && want.sha256 != got.sha256)) {
      mismatch("cache made with other encoder weights", p + ": model_files[" + want.role + "]",
               fmt::format("{} ({} bytes{})", want.file, want.bytes,
                           e.compare_sha256 ? ", sha256 " + want.sha256 : ""),
               fmt::format("{} ({} bytes{})", got.file, got.bytes,
                           e.compare_sha256 ? ", sha256 " + got.sha256 : ""));
    }
  }
  if (cache.shards.size() != source.shards.size()) {
    mismatch("cache of other shards", p + ": shards",
             fmt::format("{} shards (as {})", source.shards.size(), source.path),
             std::to_string(cache.shards.size()));
  }
  for (size_t i = 0; i < source.shards.size(); ++i) {
    const ShardInfo& want = source.shards[i];
    const LatentCacheShardInfo& got = cache.shards[i];
    if (got.source != want.file || got.source_sha256 != want.sha256 || got.pairs != want.pairs) {
      mismatch("cache is stale: the shards changed since it was built",
               fmt::format("{}: shards[{}]", p, i),
               fmt::format("{} sha256 {} with {} pairs (as {})", want.file, want.sha256, want.pairs,
                           source.path),
               fmt::format("{} sha256 {} with {} pairs", got.source, got.source_sha256, got.pairs));
    }
    std::error_code ec;
    const auto size = fs::file_size(cache.file_path(got.file), ec);
    if (ec || static_cast<int64_t>(size) != got.bytes) {
      mismatch("cache shard missing or of another size", cache.file_path(got.file),
               std::to_string(got.bytes) + " bytes",
               ec ? ec.message() : std::to_string(size) + " bytes");
    }
  }
}

LatentCacheShard::LatentCacheShard(const LatentCacheIndex& cache, size_t shard)
    : path_(cache.file_path(cache.shards.at(shard).file)) {
  const LatentCacheShardInfo& info = cache.shards[shard];
  const checkpoint::SafetensorsHeader header = checkpoint::read_safetensors_header(path_);
  const auto meta = [&](const std::string& key) {
    const auto it = header.metadata.find(key);
    return it == header.metadata.end() ? std::string() : it->second;
  };
  if (meta("format") != kLatentCacheShardFormat || meta("source") != info.source) {
    mismatch("not the cache shard of its source", path_,
             fmt::format("format {} of source {}", kLatentCacheShardFormat, info.source),
             fmt::format("format '{}' of source '{}'", meta("format"), meta("source")));
  }
  try {
    keys_ = json::parse(meta("keys")).get<std::vector<std::string>>();
  } catch (const json::exception& e) {
    mismatch("cache shard has no key list", path_ + ": __metadata__.keys",
             "a JSON list of the pairs' keys", e.what());
  }
  if (static_cast<int64_t>(keys_.size()) != info.pairs) {
    mismatch("cache shard has the wrong number of pairs", path_ + ": __metadata__.keys",
             std::to_string(info.pairs), std::to_string(keys_.size()));
  }
  for (const FieldSpec& spec : field_specs(cache.shape, cache_dtype(cache.dtype, cache.path))) {
    std::vector<int64_t> shape{info.pairs};
    shape.insert(shape.end(), spec.row_shape.begin(), spec.row_shape.end());
    const checkpoint::SafetensorsEntry* e = header.find(spec.name);
    if (e == nullptr) {
      mismatch("cache shard lacks a tensor", path_ + ": " + spec.name,
               fmt::format("{} {}", c10::toString(spec.dtype), shape_text(shape)), "absent");
    }
    if (e->dtype != spec.dtype || e->shape != shape) {
      mismatch("cache tensor has the wrong dtype or shape", path_ + ": " + spec.name,
               fmt::format("{} {}", c10::toString(spec.dtype), shape_text(shape)),
               fmt::format("{} {}", c10::toString(e->dtype), shape_text(e->shape)));
    }
    fields_[spec.name] = Field{e->begin, row_bytes(spec), spec.dtype, spec.row_shape};
  }
}

torch::Tensor LatentCacheShard::read_row(std::ifstream& file, const Field& field,
                                         int64_t position) const {
  torch::Tensor row = torch::empty(field.row_shape, torch::TensorOptions().dtype(field.dtype));
  file.clear();
  file.seekg(field.begin + position * field.row_bytes);
  if (!file.read(static_cast<char*>(row.data_ptr()), field.row_bytes)) {
    throw Error({"short read", fmt::format("{}: row {}", path_, position),
                 std::to_string(field.row_bytes) + " bytes", "fewer",
                 "was the cache changed while training? " + std::string(kRebuildHint)});
  }
  return row;
}

CachedPair LatentCacheShard::read(std::ifstream& file, int64_t position,
                                  const std::string& key) const {
  if (position < 0 || position >= static_cast<int64_t>(keys_.size()) ||
      keys_[static_cast<size_t>(position)] != key) {
    mismatch("cache shard does not match its source shard",
             fmt::format("{}: row {}", path_, position), "key " + escape_preview(key, 100),
             position >= 0 && position < static_cast<int64_t>(keys_.size())
                 ? "key " + escape_preview(keys_[static_cast<size_t>(position)], 100)
                 : std::string("no such row"));
  }
  CachedPair out;
  out.ok = read_row(file, fields_.at("ok"), position).item<uint8_t>() != 0;
  if (!out.ok) return out;
  out.moments = read_row(file, fields_.at("moments"), position).to(torch::kFloat32);
  out.text = read_row(file, fields_.at("text"), position).to(torch::kFloat32);
  if (fields_.count("pooled") != 0) {
    out.pooled = read_row(file, fields_.at("pooled"), position).to(torch::kFloat32);
  }
  out.geometry = read_row(file, fields_.at("geometry"), position);
  return out;
}

LatentCacheShardWriter::LatentCacheShardWriter(const std::string& path, const CacheShape& shape,
                                               torch::ScalarType dtype,
                                               const std::vector<std::string>& keys,
                                               const std::map<std::string, std::string>& metadata)
    : path_(path), dtype_(dtype) {
  std::vector<checkpoint::TensorSpec> specs;
  const auto n = static_cast<int64_t>(keys.size());
  for (const FieldSpec& f : field_specs(shape, dtype)) {
    std::vector<int64_t> full{n};
    full.insert(full.end(), f.row_shape.begin(), f.row_shape.end());
    specs.push_back({f.name, f.dtype, full});
  }
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = kLatentCacheShardFormat;
  meta["version"] = std::to_string(kLatentCacheVersion);
  meta["keys"] = json(keys).dump();
  const checkpoint::SafetensorsHeader header = checkpoint::create_safetensors(path, specs, meta);
  for (const FieldSpec& f : field_specs(shape, dtype)) {
    fields_[f.name] = {header.find(f.name)->begin, row_bytes(f)};
  }
  out_.open(path, std::ios::binary | std::ios::in | std::ios::out);
  if (!out_) throw Error({"cannot open for writing", path, "a writable file", "", ""});
}

void LatentCacheShardWriter::write_row(const std::string& name, int64_t position,
                                       const torch::Tensor& row) {
  const auto& [begin, bytes] = fields_.at(name);
  const torch::Tensor r = row.detach().to(torch::kCPU).contiguous();
  if (static_cast<int64_t>(r.nbytes()) != bytes) {
    throw Error({"cache row of the wrong size", fmt::format("{}: {} row {}", path_, name, position),
                 std::to_string(bytes) + " bytes", std::to_string(r.nbytes()) + " bytes",
                 "internal error: the encoder's output differs from the cache shape"});
  }
  out_.seekp(begin + position * bytes);
  out_.write(static_cast<const char*>(r.data_ptr()), bytes);
}

void LatentCacheShardWriter::write(int64_t position, const CachedPair& pair) {
  write_row("moments", position, pair.moments.to(dtype_));
  write_row("text", position, pair.text.to(dtype_));
  if (fields_.count("pooled") != 0) write_row("pooled", position, pair.pooled.to(dtype_));
  write_row("geometry", position, pair.geometry.to(torch::kInt64));
  write_row("ok", position, torch::ones({}, torch::kUInt8));
}

int64_t LatentCacheShardWriter::finish() {
  out_.flush();
  if (!out_) throw Error({"write failed", path_, "all bytes written", "", "check free space"});
  out_.close();
  return static_cast<int64_t>(fs::file_size(path_));
}

void save_empty_caption(const std::string& path, const EmptyCaption& caption) {
  checkpoint::NamedTensors tensors{{"text", caption.text}};
  if (caption.pooled.defined()) tensors.emplace_back("pooled", caption.pooled);
  checkpoint::save_safetensors(path, tensors, {{"format", "dde-latent-cache-empty-caption"}});
}

EmptyCaption load_empty_caption(const LatentCacheIndex& cache) {
  const std::string path = cache.file_path(cache.empty_caption);
  EmptyCaption out;
  const checkpoint::SafetensorsFile file = checkpoint::load_safetensors(path);
  for (const auto& [name, tensor] : file.tensors) {
    if (name == "text") out.text = tensor.to(torch::kFloat32);
    if (name == "pooled") out.pooled = tensor.to(torch::kFloat32);
  }
  const std::vector<int64_t> text{cache.shape.text_length, cache.shape.text_dim};
  const std::vector<int64_t> pooled{cache.shape.pooled_dim};
  if (!out.text.defined() || out.text.sizes().vec() != text ||
      out.pooled.defined() != (cache.shape.pooled_dim > 0) ||
      (out.pooled.defined() && out.pooled.sizes().vec() != pooled)) {
    mismatch("bad empty-caption embedding", path,
             fmt::format("text {}{}", shape_text(text),
                         cache.shape.pooled_dim > 0 ? ", pooled " + shape_text(pooled) : ""),
             fmt::format(
                 "text {}{}", out.text.defined() ? shape_text(out.text.sizes().vec()) : "absent",
                 out.pooled.defined() ? ", pooled " + shape_text(out.pooled.sizes().vec()) : ""));
  }
  // Every pair whose caption is dropped shares it: a NaN here would skip good pairs' steps.
  for (const auto& [name, tensor] : {std::pair{"text", out.text}, std::pair{"pooled", out.pooled}}) {
    if (!tensor.defined()) continue;
    const int64_t bad = (~torch::isfinite(tensor)).sum().item<int64_t>();
    if (bad != 0) {
      mismatch("non-finite values in the cached empty-caption embedding", path + ": " + name,
               "finite values", fmt::format("{} of {} values NaN or infinite", bad, tensor.numel()));
    }
  }
  return out;
}

}  // namespace dde::data
