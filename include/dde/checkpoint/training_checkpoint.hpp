// The layout of one checkpoint directory (docs/formats.md, section 3): which file holds what,
// written from and read into plain structs, so the trainer only fills and applies them.
//   rank 0:     unet/ (diffusers config.json + weights; with LoRA lora/ instead: lora.json and
//               adapter_model.safetensors), training_state.safetensors (correction.E
//               and the whole optimizer state unless sharded), trainer_state.json,
//               correction_ema.json, config.yaml
//   every rank: rank-NNNNN.json (data position), optimizer-rank-NNNNN.safetensors (when sharded)
// Staging, the COMPLETE marker and rotation are CheckpointStore's (checkpoint_store.hpp).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dde/checkpoint/checkpoint_json.hpp"
#include "dde/checkpoint/safetensors.hpp"
#include "dde/config/config.hpp"

namespace dde::checkpoint {

// What rank 0 writes: the state every rank shares.
struct SharedState {
  int64_t step = 0;  // optimizer steps attempted (skipped ones included)
  int64_t skipped_steps = 0;
  int64_t nonfinite_in_row = 0;
  int64_t world_size = 1;
  std::string method;
  std::string optimizer_name = "adamw";
  bool optimizer_sharded = false;
  NamedTensors optimizer;    // the whole optimizer state; empty when sharded
  torch::Tensor correction;  // E, float64 [T]
  // n, int64 [T]: updates each E[k] received ("correction.n"; undefined in older checkpoints)
  torch::Tensor correction_counts;
  double correction_momentum = 0.0;
  int64_t correction_updates = 0;
  std::string unet_config_json;
  NamedTensors unet;  // diffusers names: the UNet's weights, or with LoRA its adapters
  // LoRA: lora/lora.json (rank, alpha, targets, the base's identity); "" for a full UNet. The
  // adapters are then written to lora/adapter_model.safetensors instead of unet/.
  std::string lora_json;
  std::string config_yaml;
};

// What each rank writes: its own position and, when sharded, its optimizer shard.
struct RankState {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t epoch = 0;
  int64_t pairs_consumed = 0;    // in this epoch, by this rank
  int64_t bad_pairs = 0;         // bad pairs this rank skipped since the start of the run
  int64_t intra_op_threads = 0;  // the thread tuner's decision for this rank (0: none yet)
  NamedTensors optimizer_shard;  // empty unless the optimizer state is sharded
};

void write_shared_state(const std::string& dir, const SharedState& state);
void write_rank_state(const std::string& dir, const RankState& state);

// Reads rank 0's files; a file that is not a dde checkpoint of this version is a dde::Error.
SharedState read_shared_state(const std::string& dir);
// Reads rank `rank`'s position, and its optimizer shard when `saved` is sharded.
RankState read_rank_state(const std::string& dir, int64_t rank, const SharedState& saved);

// What the resuming run is; check_resumable throws a dde::Error naming what differs.
struct ResumingRun {
  std::string method;
  std::string optimizer_name;
  int64_t world_size = 1;
};
void check_resumable(const std::string& dir, const SharedState& saved, const ResumingRun& run);

// Compares the resuming run's config with the checkpoint's config.yaml (read with the same
// loader). A change to a key that fixes the data position or the pairs' random choices
// (kPositionKeys) is a dde::Error naming them; every other change is returned for the log.
// train.micro_batch may change (the loader counts pairs, and the global batch and world size are
// held), though the sums then add up in another order.
extern const std::vector<std::string> kPositionKeys;
std::vector<config::ConfigChange> check_resume_config(const std::string& dir,
                                                      const std::string& saved_yaml,
                                                      const config::TrainConfig& now);

// The optimizer state a resuming rank loads: the shared file's (written unsharded), its own shard
// (sharded, resumed sharded), or every rank's shard (sharded, resumed unsharded). Entries are keyed
// by parameter name, so the optimizer takes the ones it owns.
NamedTensors optimizer_state_for(const std::string& dir, const SharedState& saved,
                                 const RankState& own, bool now_sharded);

}  // namespace dde::checkpoint
