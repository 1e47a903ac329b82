#include "dde/checkpoint/safetensors.hpp"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dde/util/error.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::checkpoint {
namespace {

using nlohmann::json;

struct DtypeName {
  torch::ScalarType type;
  const char* name;
};

constexpr DtypeName kDtypes[] = {
    {torch::kFloat32, "F32"},   {torch::kFloat64, "F64"}, {torch::kFloat16, "F16"},
    {torch::kBFloat16, "BF16"}, {torch::kInt64, "I64"},   {torch::kInt32, "I32"},
    {torch::kInt16, "I16"},     {torch::kInt8, "I8"},     {torch::kUInt8, "U8"},
    {torch::kBool, "BOOL"},
};

const char* dtype_name(torch::ScalarType type, const std::string& where) {
  for (const DtypeName& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  throw Error({"dtype not storable in safetensors", where,
               "one of F32 F64 F16 BF16 I64 I32 I16 I8 U8 BOOL", c10::toString(type), ""});
}

torch::ScalarType dtype_from_name(const std::string& name, const std::string& where) {
  for (const DtypeName& d : kDtypes) {
    if (name == d.name) return d.type;
  }
  throw Error({"unsupported safetensors dtype", where,
               "one of F32 F64 F16 BF16 I64 I32 I16 I8 U8 BOOL", name, ""});
}

// The 8-byte little-endian length, then the JSON header padded with spaces so that the data
// starts 8-byte aligned, as the reference writer does.
std::string header_prefix(const json& header) {
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + text;
}

// The JSON header's text, after its 8-byte little-endian length; `in` is open on a file of
// `file_size` bytes.
std::string read_safetensors_header_text(std::ifstream& in, const std::string& path,
                                         int64_t file_size) {
  in.seekg(0);
  unsigned char len[8];
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(len), 8)) {
    throw Error({"truncated safetensors file", path, ">= 8 bytes",
                 std::to_string(file_size) + " bytes", ""});
  }
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(len[i]) << (8 * i);
  if (header_len > static_cast<uint64_t>(util::kMaxSafetensorsHeaderBytes)) {
    throw Error({"safetensors header too large", path,
                 "a header of at most " + std::to_string(util::kMaxSafetensorsHeaderBytes) +
                     " bytes (dde/util/input_limits.hpp)",
                 "a length field of " + std::to_string(header_len) + " bytes",
                 "the file is damaged or not safetensors"});
  }
  if (header_len > static_cast<uint64_t>(file_size - 8)) {
    throw Error({"bad safetensors header length", path, "<= " + std::to_string(file_size - 8),
                 std::to_string(header_len), "the file is truncated or not safetensors"});
  }
  std::string text(header_len, '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_len));
  return text;
}

// One tensor of the header, its shape and data offsets checked against the file.
SafetensorsEntry safetensors_entry(const std::string& name, const json& info,
                                   const std::string& where, int64_t data_start,
                                   int64_t file_size) {
  SafetensorsEntry e;
  e.name = name;
  e.dtype = dtype_from_name(info.at("dtype").get<std::string>(), where);
  e.shape = info.at("shape").get<std::vector<int64_t>>();
  const auto offsets = info.at("data_offsets").get<std::vector<int64_t>>();
  int64_t numel = 1;
  for (const int64_t d : e.shape) {
    if (d < 0 || (d > 0 && numel > (int64_t{1} << 50) / d)) {
      throw Error({"bad tensor shape", where, "sizes >= 0", info.at("shape").dump(), ""});
    }
    numel *= d;
  }
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(e.dtype));
  if (offsets.size() != 2 || offsets[0] < 0 || offsets[1] - offsets[0] != bytes ||
      offsets[1] > file_size - data_start) {
    throw Error({"bad data offsets", where,
                 std::to_string(bytes) + " bytes inside " + std::to_string(file_size - data_start),
                 info.at("data_offsets").dump(), "the file is truncated or corrupt"});
  }
  e.begin = data_start + offsets[0];
  e.end = data_start + offsets[1];
  return e;
}

}  // namespace

void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> cpu;
  cpu.reserve(tensors.size());
  int64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (header.contains(name)) {
      throw Error({"duplicate tensor name", path + ": " + name, "unique names", "a repeat", ""});
    }
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    const int64_t bytes = static_cast<int64_t>(t.nbytes());
    header[name] = {{"dtype", dtype_name(t.scalar_type(), path + ": " + name)},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    cpu.push_back(std::move(t));
  }
  const std::string prefix = header_prefix(header);
  std::vector<std::pair<const void*, size_t>> parts{{prefix.data(), prefix.size()}};
  for (const torch::Tensor& t : cpu) parts.emplace_back(t.data_ptr(), t.nbytes());
  util::write_file(path, parts);  // names ENOSPC, EFBIG, ...
}

SafetensorsFile load_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error({"cannot open safetensors file", path, "a readable file", "", ""});
  const int64_t file_size = static_cast<int64_t>(in.tellg());
  const std::string text = read_safetensors_header_text(in, path, file_size);
  const uint64_t header_len = text.size();
  json header;
  try {
    header = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error({"safetensors header is not JSON", path, "JSON", e.what(), ""});
  }
  const int64_t data_start = 8 + static_cast<int64_t>(header_len);
  const int64_t data_size = file_size - data_start;
  SafetensorsFile result;
  std::vector<std::pair<int64_t, std::pair<std::string, torch::Tensor>>> entries;
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      for (const auto& [k, v] : info.items()) result.metadata[k] = v.get<std::string>();
      continue;
    }
    const std::string where = path + ": " + name;
    const torch::ScalarType type = dtype_from_name(info.at("dtype").get<std::string>(), where);
    const std::vector<int64_t> shape = info.at("shape").get<std::vector<int64_t>>();
    const auto offsets = info.at("data_offsets").get<std::vector<int64_t>>();
    torch::Tensor t = torch::empty(shape, torch::TensorOptions().dtype(type));
    if (offsets.size() != 2 || offsets[0] < 0 || offsets[1] > data_size ||
        offsets[1] - offsets[0] != static_cast<int64_t>(t.nbytes())) {
      throw Error({"bad data offsets", where,
                   std::to_string(t.nbytes()) + " bytes inside " + std::to_string(data_size),
                   info.at("data_offsets").dump(), "the file is truncated or corrupt"});
    }
    in.seekg(data_start + offsets[0]);
    if (!in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()))) {
      throw Error({"short read", where, std::to_string(t.nbytes()) + " bytes", "fewer", ""});
    }
    entries.push_back({offsets[0], {name, std::move(t)}});
  }
  std::sort(entries.begin(), entries.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  for (auto& e : entries) result.tensors.push_back(std::move(e.second));
  return result;
}

const SafetensorsEntry* SafetensorsHeader::find(const std::string& name) const {
  for (const SafetensorsEntry& e : entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

SafetensorsHeader read_safetensors_header(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error({"cannot open safetensors file", path, "a readable file", "", ""});
  SafetensorsHeader result;
  result.file_size = static_cast<int64_t>(in.tellg());
  const std::string text = read_safetensors_header_text(in, path, result.file_size);
  const int64_t data_start = 8 + static_cast<int64_t>(text.size());
  try {
    const json header = json::parse(text);
    for (const auto& [name, info] : header.items()) {
      if (name == "__metadata__") {
        for (const auto& [k, v] : info.items()) result.metadata[k] = v.get<std::string>();
        continue;
      }
      result.entries.push_back(
          safetensors_entry(name, info, path + ": " + name, data_start, result.file_size));
    }
  } catch (const json::exception& e) {
    throw Error({"bad safetensors header", path, "a JSON object of tensors", e.what(),
                 "the file is truncated or not safetensors"});
  }
  std::sort(result.entries.begin(), result.entries.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) { return a.begin < b.begin; });
  return result;
}

SafetensorsHeader create_safetensors(const std::string& path, const std::vector<TensorSpec>& specs,
                                     const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  int64_t offset = 0;
  for (const TensorSpec& spec : specs) {
    if (header.contains(spec.name)) {
      throw Error(
          {"duplicate tensor name", path + ": " + spec.name, "unique names", "a repeat", ""});
    }
    int64_t bytes = static_cast<int64_t>(c10::elementSize(spec.dtype));
    for (const int64_t d : spec.shape) bytes *= d;
    header[spec.name] = {{"dtype", dtype_name(spec.dtype, path + ": " + spec.name)},
                         {"shape", spec.shape},
                         {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  const std::string prefix = header_prefix(header);
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(prefix.data(), static_cast<std::streamsize>(prefix.size()));
    out.flush();
    if (!out) {
      throw Error({"cannot write", path, "a writable path", "", "check the directory and space"});
    }
  }
  std::error_code ec;
  std::filesystem::resize_file(path, prefix.size() + static_cast<uint64_t>(offset), ec);
  if (ec) {
    throw Error({"cannot size file", path, std::to_string(offset) + " data bytes", ec.message(),
                 "check free disk space"});
  }
  return read_safetensors_header(path);
}

}  // namespace dde::checkpoint
