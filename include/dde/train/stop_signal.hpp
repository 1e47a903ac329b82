// Preemption: SIGTERM (SLURM's kill at the time limit, torchrun on shutdown), SIGUSR1 (SLURM's
// `--signal` warning before it) and SIGINT (Ctrl-C) only raise a flag. The trainer polls it before
// every micro-batch (an atomic load: no host sync, no collective), agrees with the other ranks once
// per step, checkpoints the last complete step and exits with kExitRequeue. A second SIGINT
// (Ctrl-C twice) kills the process at once.
#pragma once

#include <cstdint>

namespace dde::train {

constexpr int kExitRequeue = 3;  // scripts/slurm/dde_train.sbatch requeues the job on it

void install_stop_signal_handlers();
bool stop_requested();
int stop_signal();  // the signal that asked, 0 if none

// Test hooks of the preemption tests (tests/e2e/test_run_safety.py), read from the environment:
//   DDE_DEBUG_STOP_AT=S:M[:R]   raise SIGUSR1 just before micro-batch M (0-based) of step S
//                               (1-based), on rank R only if given
//   DDE_DEBUG_MICRO_BATCH_SLEEP_MS=N   sleep N ms before every micro-batch (a slow step, so that
//                               a signal sent from outside lands mid-step)
//   DDE_DEBUG_STOP_IN_EVAL=S:B[:R]   raise SIGUSR1 just before batch B (0-based) of the held-out
//                               evaluation after S steps, on rank R only if given
class StopTestHooks {
 public:
  struct At {  // a point of the run: step, micro-batch or eval batch, rank (-1: every rank)
    int64_t step = -1, index = -1, rank = -1;
    bool matches(int64_t r, int64_t s, int64_t i) const {
      return s == step && i == index && (rank < 0 || r == rank);
    }
  };
  static StopTestHooks from_environment();
  void before_micro_batch(int64_t rank, int64_t step, int64_t micro) const;
  void before_eval_batch(int64_t rank, int64_t step, int64_t batch) const;

 private:
  At stop_at_;       // DDE_DEBUG_STOP_AT
  At stop_in_eval_;  // DDE_DEBUG_STOP_IN_EVAL
  int64_t sleep_ms_ = 0;
};

}  // namespace dde::train
