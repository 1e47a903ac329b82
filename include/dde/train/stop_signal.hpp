// Preemption: SIGTERM (SLURM's kill at the time limit, torchrun on shutdown) and SIGUSR1
// (SLURM's `--signal` warning before it) only raise a flag; the trainer checks it after every
// optimizer step, agrees with the other ranks, checkpoints and exits with kExitRequeue.
#pragma once

namespace dde::train {

constexpr int kExitRequeue = 3;  // scripts/slurm/dde_train.sbatch requeues the job on it

void install_stop_signal_handlers();
bool stop_requested();
int stop_signal();  // the signal that asked, 0 if none

}  // namespace dde::train
