// The one test seam of dde_train: every DDE_DEBUG_* variable is read here, once, when a run
// starts, and nowhere else. The tests set them to make a run fail or stop at a chosen point
// (tests/e2e/test_run_safety.py, test_numerical_faults.py, test_multiprocess.py, tests/slurm).
// Unset, nothing happens; a malformed value is an error naming the variable.
//   DDE_DEBUG_STOP_AT=S:M[:R]   raise SIGUSR1 just before micro-batch M (0-based) of step S
//                               (1-based), on rank R only if given
//   DDE_DEBUG_MICRO_BATCH_SLEEP_MS=N   sleep N ms before every micro-batch (a slow step, so that
//                               a signal sent from outside lands mid-step)
//   DDE_DEBUG_STOP_IN_EVAL=S:B[:R]   raise SIGUSR1 just before batch B (0-based) of the held-out
//                               evaluation after S steps, on rank R only if given
//   DDE_DEBUG_NONFINITE_STEPS=S1,S2,...   make the loss of those steps (1-based) NaN
#pragma once

#include <cstdint>
#include <set>

namespace dde::train {

class TestSeam {
 public:
  struct At {  // a point of the run: step, micro-batch or eval batch, rank (-1: every rank)
    int64_t step = -1, index = -1, rank = -1;
    bool matches(int64_t r, int64_t s, int64_t i) const {
      return s == step && i == index && (rank < 0 || r == rank);
    }
  };
  static TestSeam from_environment();
  void before_micro_batch(int64_t rank, int64_t step, int64_t micro) const;
  void before_eval_batch(int64_t rank, int64_t step, int64_t batch) const;
  bool poisons_loss(int64_t step) const { return nonfinite_steps_.count(step) != 0; }

 private:
  At stop_at_;       // DDE_DEBUG_STOP_AT
  At stop_in_eval_;  // DDE_DEBUG_STOP_IN_EVAL
  int64_t sleep_ms_ = 0;
  std::set<int64_t> nonfinite_steps_;  // DDE_DEBUG_NONFINITE_STEPS
};

}  // namespace dde::train
