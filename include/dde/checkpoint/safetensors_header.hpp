// The safetensors header without LibTorch (the one parser behind safetensors.hpp's readers, and
// what tests/fuzz/fuzz_safetensors_header.cpp fuzzes): the 8-byte little-endian header length,
// then the JSON header {"name": {"dtype", "shape", "data_offsets"}, "__metadata__": {...}},
// every length, shape and offset checked against the file size before anything is allocated.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dde::checkpoint {

// The dtypes dde stores, in the order of kSafetensorsDtypeNames.
enum class SafetensorsDtype { kF32, kF64, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

inline constexpr const char* kSafetensorsDtypeNames = "F32 F64 F16 BF16 I64 I32 I16 I8 U8 BOOL";

const char* safetensors_dtype_name(SafetensorsDtype dtype);        // "F32", ...
const char* safetensors_dtype_torch_name(SafetensorsDtype dtype);  // "Float", as c10::toString
int64_t safetensors_dtype_size(SafetensorsDtype dtype);            // bytes per element
// A dtype name of the header; anything else is an Error naming `where`.
SafetensorsDtype safetensors_dtype_from_name(const std::string& name, const std::string& where);

struct SafetensorsLayoutEntry {
  std::string name;
  SafetensorsDtype dtype = SafetensorsDtype::kF32;
  std::vector<int64_t> shape;  // sizes >= 0, at most 2^50 elements
  int64_t begin = 0, end = 0;  // absolute offsets in the file: end - begin = numel * dtype size
};

struct SafetensorsLayout {
  std::vector<SafetensorsLayoutEntry> entries;  // in file order (sorted by data offset)
  std::map<std::string, std::string> metadata;
  int64_t file_size = 0;
  int64_t data_start = 0;  // 8 + header length
};

// The header length from the file's first 8 bytes, checked against `file_size`.
uint64_t safetensors_header_length(const unsigned char (&prefix)[8], int64_t file_size,
                                   const std::string& path);
// The JSON header `text` of a file of `file_size` bytes; every malformed part is an Error naming
// the file (and tensor).
SafetensorsLayout parse_safetensors_header(const std::string& text, int64_t file_size,
                                           const std::string& path);
// Opens `path` and reads its header.
SafetensorsLayout read_safetensors_layout(const std::string& path);

}  // namespace dde::checkpoint
