// libFuzzer target: a checkpoint's JSON readers (parse_trainer_state for trainer_state.json,
// parse_rank_state for rank-NNNNN.json), both over every input. Anything malformed must be a
// dde::Error; what they accept must hold counts >= 0, a finite momentum, and be written back
// and read again unchanged.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "dde/checkpoint/checkpoint_json.hpp"
#include "dde/util/error.hpp"

using dde::checkpoint::RankStateFile;
using dde::checkpoint::TrainerStateFile;

namespace {

void check_trainer_state(const std::string& text) {
  TrainerStateFile s;
  try {
    s = dde::checkpoint::parse_trainer_state(text, "trainer_state.json");
  } catch (const dde::Error&) {
    return;
  }
  if (s.step < 0 || s.skipped_steps < 0 || s.nonfinite_in_row < 0 || s.world_size < 0 ||
      s.correction_updates < 0 || !std::isfinite(s.correction_momentum)) {
    std::abort();
  }
  const TrainerStateFile again = dde::checkpoint::parse_trainer_state(
      dde::checkpoint::trainer_state_json(s), "trainer_state.json");
  if (again.step != s.step || again.method != s.method ||
      again.optimizer_name != s.optimizer_name ||
      again.correction_momentum != s.correction_momentum) {
    std::abort();
  }
}

void check_rank_state(const std::string& text) {
  RankStateFile s;
  try {
    s = dde::checkpoint::parse_rank_state(text, "rank-00000.json");
  } catch (const dde::Error&) {
    return;
  }
  if (s.world_size < 0 || s.epoch < 0 || s.pairs_consumed < 0 || s.bad_pairs < 0) std::abort();
  const RankStateFile again =
      dde::checkpoint::parse_rank_state(dde::checkpoint::rank_state_json(s), "rank-00000.json");
  if (again.epoch != s.epoch || again.pairs_consumed != s.pairs_consumed ||
      again.bad_pairs != s.bad_pairs || again.world_size != s.world_size) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  check_trainer_state(text);
  check_rank_state(text);
  return 0;
}
