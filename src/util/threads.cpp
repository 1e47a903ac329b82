#include "dde/util/threads.hpp"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <thread>

namespace dde::util {
namespace {

std::optional<int64_t> positive(const std::optional<std::string>& text) {
  if (!text) return std::nullopt;
  try {
    size_t used = 0;
    const int64_t v = std::stoll(*text, &used);
    if (used == text->size() && v > 0) return v;
  } catch (const std::exception&) {
  }
  return std::nullopt;
}

int64_t affinity_count() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1U, std::thread::hardware_concurrency());
}

}  // namespace

ThreadBudget plan_threads(int64_t requested, int64_t decode_workers, int64_t affinity_cpus,
                          const EnvLookup& env) {
  ThreadBudget b;
  b.cpus = std::max<int64_t>(1, affinity_cpus);
  b.cpus_from = "the affinity mask";
  const bool torchrun = env("TORCHELASTIC_RUN_ID").has_value() || env("GROUP_RANK").has_value();
  if (const auto slurm = positive(env("SLURM_CPUS_PER_TASK")); slurm && *slurm < b.cpus) {
    b.cpus = *slurm;
    b.cpus_from = "SLURM_CPUS_PER_TASK";
  } else if (const auto local = positive(env("LOCAL_WORLD_SIZE"));
             local && *local > 1 && !env("SLURM_CPUS_PER_TASK")) {
    b.cpus = std::max<int64_t>(1, b.cpus / *local);
    b.cpus_from = "the affinity mask / LOCAL_WORLD_SIZE " + std::to_string(*local);
  }
  if (requested > 0) {
    b.intra_op = requested;
    b.intra_op_from = "run.threads";
  } else if (const auto omp = positive(env("OMP_NUM_THREADS")); omp && !torchrun) {
    b.intra_op = *omp;
    b.intra_op_from = "OMP_NUM_THREADS";
  } else {
    b.intra_op = b.cpus;
    b.intra_op_from = "every CPU";
    if (decode_workers > 0) {
      b.worker_nice = kDecodeWorkerNice;
      b.adaptive = b.cpus > 1;
      b.intra_op_from += "; decode workers at nice +" + std::to_string(kDecodeWorkerNice);
      if (b.adaptive) b.intra_op_from += "; tuned after the first steps";
    }
  }
  return b;
}

ThreadBudget apply_thread_budget(int64_t requested, int64_t decode_workers) {
  const EnvLookup env = [](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    return v == nullptr ? std::nullopt : std::optional<std::string>(v);
  };
  ThreadBudget b = plan_threads(requested, decode_workers, affinity_count(), env);
  at::set_num_threads(static_cast<int>(b.intra_op));
  return b;
}

bool lower_this_thread_priority(int increment) {
  if (increment <= 0) return true;
  const auto tid = static_cast<id_t>(syscall(SYS_gettid));
  errno = 0;
  const int now = getpriority(PRIO_PROCESS, tid);
  if (errno != 0) return false;
  return setpriority(PRIO_PROCESS, tid, std::min(19, now + increment)) == 0;
}

bool serial_operators_in_this_thread() {
  // ATen's first call in a thread sets that thread's OpenMP count to the intra-op count: run it
  // first, so that the count set below stays.
  (void)at::get_num_threads();
  // The OpenMP runtime is LibTorch's own (torch/lib/libgomp.so.1), already loaded with it: looked
  // up rather than linked, so that this build needs no OpenMP of its own and a LibTorch without
  // OpenMP simply has nothing to limit.
  using SetThreads = void (*)(int);
  static const auto set_threads =
      reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
  if (set_threads == nullptr) return false;
  set_threads(1);
  return at::get_num_threads() == 1;
}

}  // namespace dde::util
