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

}  // namespace dde::train
