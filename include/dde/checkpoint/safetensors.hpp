// safetensors files (the format diffusers stores every component in): an 8-byte
// little-endian header length, a JSON header {"name": {"dtype", "shape", "data_offsets"},
// "__metadata__": {...}}, then the raw little-endian data.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "dde/checkpoint/safetensors_header.hpp"

namespace dde::checkpoint {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// The torch dtype of a stored one, and back (an Error naming `where` for one safetensors lacks).
torch::ScalarType torch_dtype(SafetensorsDtype dtype);
SafetensorsDtype safetensors_dtype(torch::ScalarType type, const std::string& where);

// Writes tensors (any device; copied to CPU contiguous) in the order given.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  NamedTensors tensors;  // in file order (sorted by data offset)
  std::map<std::string, std::string> metadata;
};

// Reads a whole file; every malformed part is a dde::Error naming the file and tensor.
SafetensorsFile load_safetensors(const std::string& path);

// Random access for files too large to load whole: the header alone, with every tensor's
// absolute byte range in the file, checked against the file size (read_safetensors_layout with
// torch dtypes).
struct SafetensorsEntry {
  std::string name;
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> shape;
  int64_t begin = 0, end = 0;  // absolute offsets in the file
};

struct SafetensorsHeader {
  std::vector<SafetensorsEntry> entries;  // in file order
  std::map<std::string, std::string> metadata;
  int64_t file_size = 0;
  const SafetensorsEntry* find(const std::string& name) const;  // nullptr when absent
};

SafetensorsHeader read_safetensors_header(const std::string& path);

struct TensorSpec {
  std::string name;
  torch::ScalarType dtype = torch::kFloat32;
  std::vector<int64_t> shape;
};

// Creates a file of the given tensors, zero-filled, in the order given, and returns its header:
// the caller then writes the data in place (e.g. row by row with std::fstream).
SafetensorsHeader create_safetensors(const std::string& path, const std::vector<TensorSpec>& specs,
                                     const std::map<std::string, std::string>& metadata = {});

}  // namespace dde::checkpoint
