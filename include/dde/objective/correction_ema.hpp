// The correction term C_t of dde_step and dde and its delayed EMA update (docs/method.md
// §4). E[k] estimates the per-transition contribution d_k = -0.5 lambda_k Delta_k;
// C_t = sum_{k=t+1}^{T-1} E[k]. The loss of optimizer step n reads E as it stood after step n-1:
// accumulate() only collects, apply() folds the step's means in once every pair (all
// micro-batches, all ranks) has been seen. E and its suffix table are float64 on the CPU; the
// pending sums live on `pending_device` (the training device), so accumulate() needs no host sync
// and the all-reduce takes them where NCCL wants them; apply() copies them to the host once.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace dde::objective {

class CorrectionEma {
 public:
  // num_timesteps >= 1, momentum mu in [0, 1). E starts at zero.
  CorrectionEma(int64_t num_timesteps, double momentum,
                const torch::Device& pending_device = torch::kCPU);

  // C_t for t: [B] int64 in [0, T); [B] float64 on t's device. O(B): reads a table of suffix sums
  // recomputed at apply() and load_state().
  torch::Tensor correction(const torch::Tensor& t) const;

  // Adds detached d ([B]) into the pending per-t sum and count, for every micro-batch of a step.
  // t is checked on the host: pass the host copy of the timesteps (d may be on any device).
  void accumulate(const torch::Tensor& t, const torch::Tensor& d);

  // [T] float64 each, on pending_device; all-reduce (sum) both in place before apply().
  torch::Tensor& pending_sum() { return pending_sum_; }
  torch::Tensor& pending_count() { return pending_count_; }

  // E[t] <- mu E[t] + (1 - mu) sum[t] / count[t] where count[t] > 0; clears the pending sums and
  // increments updates(). Throws dde::Error if the pending tensors were replaced (not reduced in
  // place) or hold non-finite values: skip a non-finite step with clear_pending() instead.
  void apply();

  // Drops what was accumulated since the last apply() (e.g. for a skipped non-finite step).
  void clear_pending();

  const torch::Tensor& values() const { return E_; }  // E, [T] float64
  int64_t updates() const { return updates_; }
  int64_t num_timesteps() const { return num_timesteps_; }
  double momentum() const { return momentum_; }

  // Checkpoint state. load_state() checks that E has length T, is finite, that the momentum
  // matches this run's and updates >= 0; it clears the pending sums.
  struct State {
    std::vector<double> E;
    double momentum = 0.0;
    int64_t updates = 0;
  };
  State state() const;
  void load_state(const State& state);

 private:
  void recompute_suffix();

  int64_t num_timesteps_;
  double momentum_;
  torch::Device pending_device_;
  int64_t updates_ = 0;
  torch::Tensor E_;              // [T] float64
  torch::Tensor suffix_;         // [T] float64, suffix_[t] = sum_{k>t} E[k]
  torch::Tensor pending_sum_;    // [T] float64 on pending_device_
  torch::Tensor pending_count_;  // [T] float64 on pending_device_
};

}  // namespace dde::objective
