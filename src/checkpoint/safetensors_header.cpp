#include "dde/checkpoint/safetensors_header.hpp"

#include <algorithm>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "dde/util/error.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::checkpoint {
namespace {

using nlohmann::json;

struct SafetensorsDtypeInfo {
  SafetensorsDtype dtype;
  const char* name;
  const char* torch_name;  // c10::toString of the matching torch::ScalarType
  int64_t size;
};

constexpr SafetensorsDtypeInfo kSafetensorsDtypes[] = {
    {SafetensorsDtype::kF32, "F32", "Float", 4}, {SafetensorsDtype::kF64, "F64", "Double", 8},
    {SafetensorsDtype::kF16, "F16", "Half", 2},  {SafetensorsDtype::kBF16, "BF16", "BFloat16", 2},
    {SafetensorsDtype::kI64, "I64", "Long", 8},  {SafetensorsDtype::kI32, "I32", "Int", 4},
    {SafetensorsDtype::kI16, "I16", "Short", 2}, {SafetensorsDtype::kI8, "I8", "Char", 1},
    {SafetensorsDtype::kU8, "U8", "Byte", 1},    {SafetensorsDtype::kBool, "BOOL", "Bool", 1},
};

const SafetensorsDtypeInfo& safetensors_dtype_info(SafetensorsDtype dtype) {
  for (const SafetensorsDtypeInfo& d : kSafetensorsDtypes) {
    if (d.dtype == dtype) return d;
  }
  return kSafetensorsDtypes[0];  // unreachable: every enumerator is in the table
}

// At most 2^50 elements per tensor, so that sizes in bytes never overflow int64.
constexpr int64_t kMaxTensorElements = int64_t{1} << 50;

// A list of int64 ("shape", "data_offsets"); false for anything else. nlohmann's
// get<std::vector<int64_t>>() would truncate 1.5, wrap 2^64 and overflow (UB) on 1e300.
bool safetensors_integers(const json& list, std::vector<int64_t>& out) {
  if (!list.is_array()) return false;
  for (const json& v : list) {
    const bool fits = v.is_number_unsigned()
                          ? v.get<uint64_t>() <= uint64_t{std::numeric_limits<int64_t>::max()}
                          : v.is_number_integer();
    if (!fits) return false;
    out.push_back(v.get<int64_t>());
  }
  return true;
}

// One tensor of the header, its shape and data offsets checked against the file.
SafetensorsLayoutEntry safetensors_layout_entry(const std::string& name, const json& info,
                                                const std::string& where, int64_t data_start,
                                                int64_t file_size) {
  SafetensorsLayoutEntry e;
  e.name = name;
  e.dtype = safetensors_dtype_from_name(info.at("dtype").get<std::string>(), where);
  int64_t numel = 1;
  bool shape_ok = safetensors_integers(info.at("shape"), e.shape);
  for (const int64_t d : e.shape) {
    shape_ok = shape_ok && d >= 0 && (d == 0 || numel <= kMaxTensorElements / d);
    if (shape_ok) numel *= d;
  }
  if (!shape_ok) {
    throw Error({"bad tensor shape", where, "sizes >= 0", info.at("shape").dump(), ""});
  }
  const int64_t bytes = numel * safetensors_dtype_size(e.dtype);
  const int64_t data_size = file_size - data_start;
  std::vector<int64_t> offsets;
  // offsets[0] <= offsets[1] first, so that their difference cannot overflow.
  if (!safetensors_integers(info.at("data_offsets"), offsets) || offsets.size() != 2 ||
      offsets[0] < 0 || offsets[0] > offsets[1] || offsets[1] > data_size ||
      offsets[1] - offsets[0] != bytes) {
    throw Error({"bad data offsets", where,
                 std::to_string(bytes) + " bytes inside " + std::to_string(data_size),
                 info.at("data_offsets").dump(), "the file is truncated or corrupt"});
  }
  e.begin = data_start + offsets[0];
  e.end = data_start + offsets[1];
  return e;
}

// The header's entries and metadata; json::exception for a malformed part.
void parse_safetensors_json(const json& header, const std::string& path, SafetensorsLayout& out) {
  if (!header.is_object()) {
    throw Error({"bad safetensors header", path, "a JSON object of tensors", header.type_name(),
                 "the file is truncated or not safetensors"});
  }
  for (const auto& [name, info] : header.items()) {
    if (name == "__metadata__") {
      for (const auto& [k, v] : info.get<json::object_t>()) out.metadata[k] = v.get<std::string>();
      continue;
    }
    out.entries.push_back(
        safetensors_layout_entry(name, info, path + ": " + name, out.data_start, out.file_size));
  }
}

}  // namespace

const char* safetensors_dtype_name(SafetensorsDtype dtype) {
  return safetensors_dtype_info(dtype).name;
}

const char* safetensors_dtype_torch_name(SafetensorsDtype dtype) {
  return safetensors_dtype_info(dtype).torch_name;
}

int64_t safetensors_dtype_size(SafetensorsDtype dtype) {
  return safetensors_dtype_info(dtype).size;
}

SafetensorsDtype safetensors_dtype_from_name(const std::string& name, const std::string& where) {
  for (const SafetensorsDtypeInfo& d : kSafetensorsDtypes) {
    if (name == d.name) return d.dtype;
  }
  throw Error({"unsupported safetensors dtype", where,
               std::string("one of ") + kSafetensorsDtypeNames, name, ""});
}

uint64_t safetensors_header_length(const unsigned char (&prefix)[8], int64_t file_size,
                                   const std::string& path) {
  uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<uint64_t>(prefix[i]) << (8 * i);
  if (header_len > static_cast<uint64_t>(util::kMaxSafetensorsHeaderBytes)) {
    throw Error({"safetensors header too large", path,
                 "a header of at most " + std::to_string(util::kMaxSafetensorsHeaderBytes) +
                     " bytes (dde/util/input_limits.hpp)",
                 "a length field of " + std::to_string(header_len) + " bytes",
                 "the file is damaged or not safetensors"});
  }
  if (file_size < 8 || header_len > static_cast<uint64_t>(file_size - 8)) {
    throw Error({"bad safetensors header length", path, "<= " + std::to_string(file_size - 8),
                 std::to_string(header_len), "the file is truncated or not safetensors"});
  }
  return header_len;
}

SafetensorsLayout parse_safetensors_header(const std::string& text, int64_t file_size,
                                           const std::string& path) {
  SafetensorsLayout out;
  out.file_size = file_size;
  out.data_start = 8 + static_cast<int64_t>(text.size());
  json header;
  try {
    header = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for 1e400
    throw Error({"safetensors header is not JSON", path, "JSON", e.what(), ""});
  }
  try {
    parse_safetensors_json(header, path, out);
  } catch (const json::exception& e) {
    throw Error({"bad safetensors header", path, "a JSON object of tensors", e.what(),
                 "the file is truncated or not safetensors"});
  }
  std::stable_sort(out.entries.begin(), out.entries.end(),
                   [](const SafetensorsLayoutEntry& a, const SafetensorsLayoutEntry& b) {
                     return a.begin < b.begin;
                   });
  return out;
}

SafetensorsLayout read_safetensors_layout(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error({"cannot open safetensors file", path, "a readable file", "", ""});
  const auto file_size = static_cast<int64_t>(in.tellg());
  in.seekg(0);
  unsigned char prefix[8];
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(prefix), 8)) {
    throw Error({"truncated safetensors file", path, ">= 8 bytes",
                 std::to_string(file_size) + " bytes", ""});
  }
  // Bounded by the file size, so a length of 2^63 allocates nothing.
  std::string text(safetensors_header_length(prefix, file_size, path), '\0');
  if (!in.read(text.data(), static_cast<std::streamsize>(text.size()))) {
    throw Error({"short read", path + ": header", std::to_string(text.size()) + " bytes", "fewer",
                 "the file is truncated or not safetensors"});
  }
  return parse_safetensors_header(text, file_size, path);
}

}  // namespace dde::checkpoint
