#include "dde/checkpoint/safetensors.hpp"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "dde/util/error.hpp"
#include "dde/util/file_write.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::checkpoint {
namespace {

using nlohmann::json;

constexpr std::pair<SafetensorsDtype, torch::ScalarType> kTorchDtypes[] = {
    {SafetensorsDtype::kF32, torch::kFloat32}, {SafetensorsDtype::kF64, torch::kFloat64},
    {SafetensorsDtype::kF16, torch::kFloat16}, {SafetensorsDtype::kBF16, torch::kBFloat16},
    {SafetensorsDtype::kI64, torch::kInt64},   {SafetensorsDtype::kI32, torch::kInt32},
    {SafetensorsDtype::kI16, torch::kInt16},   {SafetensorsDtype::kI8, torch::kInt8},
    {SafetensorsDtype::kU8, torch::kUInt8},    {SafetensorsDtype::kBool, torch::kBool},
};

const char* dtype_name(torch::ScalarType type, const std::string& where) {
  return safetensors_dtype_name(safetensors_dtype(type, where));
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

}  // namespace

torch::ScalarType torch_dtype(SafetensorsDtype dtype) {
  for (const auto& [stored, type] : kTorchDtypes) {
    if (stored == dtype) return type;
  }
  return torch::kFloat32;  // unreachable: every enumerator is in the table
}

SafetensorsDtype safetensors_dtype(torch::ScalarType type, const std::string& where) {
  for (const auto& [stored, t] : kTorchDtypes) {
    if (t == type) return stored;
  }
  throw Error({"dtype not storable in safetensors", where,
               std::string("one of ") + kSafetensorsDtypeNames, c10::toString(type), ""});
}

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
  const SafetensorsLayout layout = read_safetensors_layout(path);
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error({"cannot open safetensors file", path, "a readable file", "", ""});
  SafetensorsFile result;
  result.metadata = layout.metadata;
  for (const SafetensorsLayoutEntry& e : layout.entries) {
    // Allocated only now: the header parser checked the size against the file.
    torch::Tensor t = torch::empty(e.shape, torch::TensorOptions().dtype(torch_dtype(e.dtype)));
    in.seekg(e.begin);
    if (!in.read(static_cast<char*>(t.data_ptr()), e.end - e.begin)) {
      throw Error(
          {"short read", path + ": " + e.name, std::to_string(t.nbytes()) + " bytes", "fewer", ""});
    }
    result.tensors.emplace_back(e.name, std::move(t));
  }
  return result;
}

const SafetensorsEntry* SafetensorsHeader::find(const std::string& name) const {
  for (const SafetensorsEntry& e : entries) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

SafetensorsHeader read_safetensors_header(const std::string& path) {
  const SafetensorsLayout layout = read_safetensors_layout(path);
  SafetensorsHeader result;
  result.metadata = layout.metadata;
  result.file_size = layout.file_size;
  for (const SafetensorsLayoutEntry& e : layout.entries) {
    result.entries.push_back({e.name, torch_dtype(e.dtype), e.shape, e.begin, e.end});
  }
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
