// The default thread plan's one adjustment, from what the first steps of a run measure.
//
// The default plan (threads.hpp) gives LibTorch's intra-op pool every CPU and runs the decode
// workers at a lower priority. Where decoding is heavy that can lose: a running decode worker
// takes a core from one OpenMP thread and the team waits for it at the next barrier
// (bench/README.md, "The thread plan", "The thread tuner" and "OpenMP teams in the decode
// workers"). So after kWarmupSteps steps the tuner measures kProbeSteps
// steps at every CPU, with the decode workers' CPU time over the same wall time (their demand, in
// cores). Where the demand reaches kDemandFloor, it tries the same number of steps with
// ceil(demand) CPUs left to the workers, and keeps the split whose mean step was shorter (the fewer
// threads only when shorter by kMargin). Where the demand is below the floor nothing changes.
//
// The decision is made once per run and saved in each rank's checkpoint state; a resumed run
// uses it from its first step. It depends on timing, so two runs may decide differently: a CPU
// run that must be bit-identical across reruns sets run.threads (the sum order of LibTorch's
// CPU kernels depends on the thread count). The tuner is pure logic: the trainer measures and
// applies.
#pragma once

#include <cstdint>
#include <string>

namespace dde::util {

class ThreadTuner {
 public:
  static constexpr int64_t kWarmupSteps = 3;  // not measured: the prefetch fills, first allocations
  static constexpr int64_t kProbeSteps = 4;   // measured per split
  static constexpr double kDemandFloor = 0.05;  // cores of decoding below which nothing is tried
  static constexpr double kMargin = 0.03;       // the fewer threads must be this much faster

  // `cpus`: the plan's intra-op threads (every CPU); `enabled`: the plan is the default one and
  // there are decode workers (a user's run.threads or OMP_NUM_THREADS is never changed).
  ThreadTuner(int64_t cpus, bool enabled);

  // A decision saved by an earlier run of this rank (> 0): used as is, nothing is measured.
  void restore(int64_t threads);

  // After each step of this process: its wall seconds and the decode workers' CPU seconds in it.
  // Returns the intra-op thread count to use from the next step on.
  int64_t after_step(double seconds, double worker_cpu_seconds);

  int64_t threads() const { return threads_; }
  bool decided() const { return phase_ == Phase::kDecided; }
  // What a checkpoint records: the count this tuner chose (or restored); 0 while it measures, or
  // where it does not tune.
  int64_t decision() const { return enabled_ && decided() ? threads_ : 0; }
  bool changed_last_step() const { return changed_; }
  // One line for the log: what was measured and what was kept (empty until decided).
  const std::string& summary() const { return summary_; }

 private:
  enum class Phase { kWarmup, kAll, kSettle, kFewer, kDecided };
  void decide(int64_t threads, std::string why);

  int64_t cpus_;
  bool enabled_;
  int64_t threads_;
  Phase phase_;
  int64_t count_ = 0;
  double all_seconds_ = 0, all_cpu_ = 0, fewer_seconds_ = 0;
  int64_t fewer_threads_ = 0;
  bool changed_ = false;
  std::string summary_;
};

}  // namespace dde::util
