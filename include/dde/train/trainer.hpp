// The training loop: one optimizer step = `accumulation` micro-batches of pairs, each
//   encode (frozen VAE, text) -> one t and one eps per pair -> policy and reference UNets
//   on [x_t^w; x_t^l] -> per-pair errors -> method -> backward,
// then non-finite guard -> clip -> optimizer -> delayed CorrectionEma update -> metrics ->
// checkpoint. Everything stateful is saved in checkpoints, so --resume continues exactly.
// A stop signal (stop_signal.hpp) is polled before every micro-batch: the ranks drop the partial
// step, checkpoint the last complete one (with the data position at its end) and return
// preempted.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "dde/config/config.hpp"

namespace dde::train {

struct TrainOutcome {
  int64_t steps_done = 0;
  int64_t skipped_steps = 0;
  std::string last_checkpoint;
  bool preempted = false;  // stopped by SIGTERM/SIGUSR1 after a checkpoint: exit kExitRequeue
};

// How a run starts in run.output_dir.
struct StartOptions {
  bool resume = false;     // from the newest complete checkpoint (from step 0 if there is none)
  bool overwrite = false;  // a fresh run that first deletes checkpoints/ and metrics.jsonl
};

// A fresh run (neither resume nor overwrite) into a folder that holds a complete checkpoint is a
// dde::Error naming the folder: it would replace the checkpoints and truncate metrics.jsonl.
// Read-only, so every rank can call it before the models load.
void check_output_dir(const config::TrainConfig& config, const StartOptions& start);

class Trainer {
 public:
  Trainer(config::TrainConfig config, StartOptions start);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainOutcome run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dde::train
