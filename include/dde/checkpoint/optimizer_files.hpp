// Where a checkpoint directory keeps the optimizer state (docs/formats.md, section 3):
// replicated runs in `training_state.safetensors` (rank 0), sharded runs (dist.shard_optimizer)
// in one `optimizer-rank-NNNNN.safetensors` per rank, each holding its own parameters' entries.
// Entries are keyed by parameter name either way, so a run may switch sharding on or off at
// resume (same world size): it reads the files that hold the entries it needs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dde/checkpoint/safetensors.hpp"

namespace dde::checkpoint {

std::string training_state_path(const std::string& dir);
std::string optimizer_shard_path(const std::string& dir, int64_t rank);

// The files rank `rank` reads: its own shard (sharded -> sharded), every shard of the
// `saved_world` ranks (sharded -> replicated), or training_state.safetensors (written replicated).
std::vector<std::string> optimizer_state_files(const std::string& dir, bool saved_sharded,
                                               int64_t saved_world, bool now_sharded, int64_t rank);

// Every tensor of `files`, concatenated in order (each file checked by load_safetensors).
NamedTensors read_tensors(const std::vector<std::string>& files);

}  // namespace dde::checkpoint
