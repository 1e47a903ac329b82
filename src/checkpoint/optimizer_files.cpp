#include "dde/checkpoint/optimizer_files.hpp"

#include <fmt/format.h>

#include <filesystem>

namespace dde::checkpoint {

std::string training_state_path(const std::string& dir) {
  return (std::filesystem::path(dir) / "training_state.safetensors").string();
}

std::string optimizer_shard_path(const std::string& dir, int64_t rank) {
  return (std::filesystem::path(dir) / fmt::format("optimizer-rank-{:05d}.safetensors", rank))
      .string();
}

std::vector<std::string> optimizer_state_files(const std::string& dir, bool saved_sharded,
                                               int64_t saved_world, bool now_sharded,
                                               int64_t rank) {
  if (!saved_sharded) return {training_state_path(dir)};
  if (now_sharded) return {optimizer_shard_path(dir, rank)};
  std::vector<std::string> files;
  for (int64_t r = 0; r < saved_world; ++r) files.push_back(optimizer_shard_path(dir, r));
  return files;
}

NamedTensors read_tensors(const std::vector<std::string>& files) {
  NamedTensors all;
  for (const std::string& f : files) {
    SafetensorsFile file = load_safetensors(f);
    for (auto& entry : file.tensors) all.push_back(std::move(entry));
  }
  return all;
}

}  // namespace dde::checkpoint
