// How many threads a process runs: LibTorch's intra-op pool and the data decode workers share the
// CPUs the process is given instead of each taking every core (on 2 cores, a second intra-op
// thread beside a decode worker made a training step slower, not faster).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace dde::util {

using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

struct ThreadBudget {
  int64_t cpus = 1;       // the CPUs this process may use
  std::string cpus_from;  // where that number came from (for the start-up log)
  int64_t intra_op = 1;   // LibTorch's intra-op threads
  std::string intra_op_from;
};

// cpus: the affinity mask's count (`affinity_cpus`), capped by SLURM_CPUS_PER_TASK; under torchrun
// without Slurm (LOCAL_WORLD_SIZE ranks that share the node's mask), that count / local ranks.
// intra_op: `requested` (run.threads) when > 0; else OMP_NUM_THREADS when the user set it (not
// torchrun, whose default 1 it is); else cpus - decode_workers, at least 1.
ThreadBudget plan_threads(int64_t requested, int64_t decode_workers, int64_t affinity_cpus,
                          const EnvLookup& env);
// The same from this process's affinity and environment, applied (at::set_num_threads).
ThreadBudget apply_thread_budget(int64_t requested, int64_t decode_workers);

}  // namespace dde::util
