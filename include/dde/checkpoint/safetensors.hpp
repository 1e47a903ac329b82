// safetensors files (the format diffusers stores every component in): an 8-byte
// little-endian header length, a JSON header {"name": {"dtype", "shape", "data_offsets"},
// "__metadata__": {...}}, then the raw little-endian data.
#pragma once

#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dde::checkpoint {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes tensors (any device; copied to CPU contiguous) in the order given.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

struct SafetensorsFile {
  NamedTensors tensors;  // in file order (sorted by data offset)
  std::map<std::string, std::string> metadata;
};

// Reads a whole file; every malformed part is a dde::Error naming the file and tensor.
SafetensorsFile load_safetensors(const std::string& path);

}  // namespace dde::checkpoint
