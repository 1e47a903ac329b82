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

std::string shape_text(const std::vector<int64_t>& shape) { return json(shape).dump(); }

[[noreturn]] void mismatch(const std::string& what, const std::string& where,
                           const std::string& expected, const std::string& actual) {
  latent_cache_mismatch(what, where, expected, actual);
}

}  // namespace

torch::ScalarType cache_dtype(const std::string& name, const std::string& where) {
  return checkpoint::torch_dtype(cache_stored_dtype(name, where));
}

int64_t cache_bytes_per_pair(const CacheShape& shape, torch::ScalarType dtype) {
  int64_t total = 0;
  for (const CacheFieldSpec& f :
       cache_field_specs(shape, checkpoint::safetensors_dtype(dtype, ""))) {
    total += cache_row_bytes(f);
  }
  return total;
}

std::vector<std::string> cache_field_names(const CacheShape& shape) {
  std::vector<std::string> names;
  for (const CacheFieldSpec& f : cache_field_specs(shape, checkpoint::SafetensorsDtype::kF32)) {
    names.push_back(f.name);
  }
  return names;
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
    : path_(cache.file_path(cache.shards.at(shard).file)),
      layout_(read_latent_cache_shard_layout(cache, shard, path_)) {}

torch::Tensor LatentCacheShard::read_row(std::ifstream& file, const CacheShardField& field,
                                         int64_t position) const {
  torch::Tensor row = torch::empty(
      field.row_shape, torch::TensorOptions().dtype(checkpoint::torch_dtype(field.dtype)));
  file.clear();
  file.seekg(field.begin + position * field.row_bytes);
  if (!file.read(static_cast<char*>(row.data_ptr()), field.row_bytes)) {
    throw Error({"short read", fmt::format("{}: row {}", path_, position),
                 std::to_string(field.row_bytes) + " bytes", "fewer",
                 "was the cache changed while training? " + std::string(kLatentCacheRebuildHint)});
  }
  return row;
}

CachedPair LatentCacheShard::read(std::ifstream& file, int64_t position,
                                  const std::string& key) const {
  if (position < 0 || position >= static_cast<int64_t>(layout_.keys.size()) ||
      layout_.keys[static_cast<size_t>(position)] != key) {
    mismatch("cache shard does not match its source shard",
             fmt::format("{}: row {}", path_, position), "key " + escape_preview(key, 100),
             position >= 0 && position < static_cast<int64_t>(layout_.keys.size())
                 ? "key " + escape_preview(layout_.keys[static_cast<size_t>(position)], 100)
                 : std::string("no such row"));
  }
  CachedPair out;
  out.ok = read_row(file, layout_.fields.at("ok"), position).item<uint8_t>() != 0;
  if (!out.ok) return out;
  out.moments = read_row(file, layout_.fields.at("moments"), position).to(torch::kFloat32);
  out.text = read_row(file, layout_.fields.at("text"), position).to(torch::kFloat32);
  if (layout_.fields.count("pooled") != 0) {
    out.pooled = read_row(file, layout_.fields.at("pooled"), position).to(torch::kFloat32);
  }
  out.geometry = read_row(file, layout_.fields.at("geometry"), position);
  return out;
}

LatentCacheShardWriter::LatentCacheShardWriter(const std::string& path, const CacheShape& shape,
                                               torch::ScalarType dtype,
                                               const std::vector<std::string>& keys,
                                               const std::map<std::string, std::string>& metadata)
    : path_(path), dtype_(dtype) {
  std::vector<checkpoint::TensorSpec> specs;
  const auto n = static_cast<int64_t>(keys.size());
  const checkpoint::SafetensorsDtype stored = checkpoint::safetensors_dtype(dtype, path);
  for (const CacheFieldSpec& f : cache_field_specs(shape, stored)) {
    std::vector<int64_t> full{n};
    full.insert(full.end(), f.row_shape.begin(), f.row_shape.end());
    specs.push_back({f.name, checkpoint::torch_dtype(f.dtype), full});
  }
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = kLatentCacheShardFormat;
  meta["version"] = std::to_string(kLatentCacheVersion);
  meta["keys"] = json(keys).dump();
  const checkpoint::SafetensorsHeader header = checkpoint::create_safetensors(path, specs, meta);
  for (const CacheFieldSpec& f : cache_field_specs(shape, stored)) {
    fields_[f.name] = {header.find(f.name)->begin, cache_row_bytes(f)};
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
  for (const auto& [name, tensor] :
       {std::pair{"text", out.text}, std::pair{"pooled", out.pooled}}) {
    if (!tensor.defined()) continue;
    const int64_t bad = (~torch::isfinite(tensor)).sum().item<int64_t>();
    if (bad != 0) {
      mismatch("non-finite values in the cached empty-caption embedding", path + ": " + name,
               "finite values",
               fmt::format("{} of {} values NaN or infinite", bad, tensor.numel()));
    }
  }
  return out;
}

}  // namespace dde::data
