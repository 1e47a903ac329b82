// A checkpoint's JSON files without LibTorch (docs/formats.md section 3): trainer_state.json and
// rank-NNNNN.json as plain structs, read strictly (a file that does not parse, 1e400, a count
// that is fractional or negative, a missing key: a dde::Error naming the file and key).
// training_checkpoint.hpp fills them from and into its states; tests/fuzz/fuzz_checkpoint_json
// fuzzes the parsers.
#pragma once

#include <cstdint>
#include <string>

#include "dde/util/error.hpp"

namespace dde::checkpoint {

constexpr int64_t kCheckpointVersion = 1;

// trainer_state.json: the scalars of training_checkpoint.hpp's SharedState.
struct TrainerStateFile {
  int64_t step = 0;
  int64_t skipped_steps = 0;
  int64_t nonfinite_in_row = 0;
  int64_t world_size = 1;
  std::string method;
  std::string optimizer_name = "adamw";  // absent in older checkpoints: adamw, unsharded
  bool optimizer_sharded = false;
  double correction_momentum = 0.0;
  int64_t correction_updates = 0;
};

// rank-NNNNN.json: one rank's data position.
struct RankStateFile {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t epoch = 0;
  int64_t pairs_consumed = 0;
  int64_t bad_pairs = 0;         // absent in older checkpoints: 0
  int64_t intra_op_threads = 0;  // the thread tuner's decision; 0 (or absent): none yet
};

std::string trainer_state_json(const TrainerStateFile& state);
// `path` names the file in errors.
TrainerStateFile parse_trainer_state(const std::string& text, const std::string& path);

std::string rank_state_json(const RankStateFile& state);
// The rank is the caller's (the file name's); the file's own "rank" is not read.
RankStateFile parse_rank_state(const std::string& text, const std::string& path);

// The Error of a damaged checkpoint file, with the hint to resume from the previous one.
Error damaged_checkpoint_file(const std::string& where, const std::string& expected,
                              const std::string& got);

}  // namespace dde::checkpoint
