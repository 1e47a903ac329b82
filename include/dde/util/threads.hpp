// How many threads a process runs. By default LibTorch's intra-op pool gets every CPU the process
// is given and the data decode workers run at a lower scheduling priority (nice
// +kDecodeWorkerNice): while the loader keeps up they take only what the compute leaves idle, and
// when it falls behind the step waits for data, the compute threads sleep and the workers get the
// CPUs. A fixed split (CPUs - workers for the compute) left the decode workers idle on whole cores
// while the UNet ran on one thread (bench/README.md, "The thread plan"). A user's run.threads or
// OMP_NUM_THREADS wins, and then the workers keep the normal priority (the user chose the split).
// Whatever the plan, the workers run their tensor operators serially
// (serial_operators_in_this_thread).
// Under the default plan the first steps of a run may move CPUs from the pool to the workers
// (thread_tuner.hpp), where their measured use makes the steps faster.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

namespace dde::util {

using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;

// How far the decode workers' niceness is raised under the default plan: at nice +10 a runnable
// worker gets about a tenth of a core beside a busy compute thread (CFS weights 110 vs 1024).
inline constexpr int kDecodeWorkerNice = 10;

struct ThreadBudget {
  int64_t cpus = 1;       // the CPUs this process may use
  std::string cpus_from;  // where that number came from (for the start-up log)
  int64_t intra_op = 1;   // LibTorch's intra-op threads
  std::string intra_op_from;
  int worker_nice = 0;  // added to the decode workers' niceness (0: same priority as compute)
  // The default plan with decode workers: the first steps may move CPUs from the intra-op pool to
  // the workers (util/thread_tuner.hpp).
  bool adaptive = false;
};

// cpus: the affinity mask's count (`affinity_cpus`), capped by SLURM_CPUS_PER_TASK; under torchrun
// without Slurm (LOCAL_WORLD_SIZE ranks that share the node's mask), that count / local ranks.
// intra_op: `requested` (run.threads) when > 0; else OMP_NUM_THREADS when the user set it (not
// torchrun, whose default 1 it is); else every CPU, with the decode workers (if any) at nice
// +kDecodeWorkerNice.
ThreadBudget plan_threads(int64_t requested, int64_t decode_workers, int64_t affinity_cpus,
                          const EnvLookup& env);
// The same from this process's affinity and environment, applied (at::set_num_threads).
ThreadBudget apply_thread_budget(int64_t requested, int64_t decode_workers);

// Raises the calling thread's niceness by `increment` (Linux: per thread). Returns false when the
// system refused (the thread then keeps its priority; nothing else changes).
bool lower_this_thread_priority(int increment);

// Makes LibTorch's operators run serially in the calling thread: its OpenMP team size (a per-thread
// setting) becomes 1, after ATen's per-thread initialisation, which would otherwise set it back to
// the intra-op count. The other threads' counts do not change. For helper threads (the decode
// workers) whose tensor work is small: without it each one that runs an operator over more than
// ATen's grain (32768 elements: one 128 px picture) starts its own OpenMP team of intra-op threads.
// libgomp then counts more threads than CPUs and makes every team's idle threads sleep at once
// instead of spinning, so each of the compute's parallel regions pays a futex wake-up
// (bench/README.md, "OpenMP teams in the decode workers"). Returns false where LibTorch was built
// without OpenMP (nothing to do) or the count did not take.
bool serial_operators_in_this_thread();

}  // namespace dde::util
