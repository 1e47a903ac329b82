// The training loop: one optimizer step = `accumulation` micro-batches of pairs, each
//   encode (frozen VAE, text) -> one t and one eps per pair -> policy and reference UNets
//   on [x_t^w; x_t^l] -> per-pair errors -> method -> backward,
// then non-finite guard -> clip -> optimizer -> delayed CorrectionEma update -> metrics ->
// checkpoint. Everything stateful is saved in checkpoints, so --resume continues exactly.
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

class Trainer {
 public:
  Trainer(config::TrainConfig config, bool resume);
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  TrainOutcome run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dde::train
