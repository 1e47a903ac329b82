// The correction term C_t of dde_step and dde and its delayed EMA update (docs/method.md
// §4). E[k] estimates the per-transition contribution d_k = -0.5 lambda_k Delta_k;
// C_t = sum_{k=t+1}^{T-1} E[k]. The loss of optimizer step n reads E as it stood after step n-1:
// accumulate() only collects, apply() folds the step's means in once every pair (all
// micro-batches, all ranks) has been seen. E and its suffix table are float64 on the CPU; the
// pending sums live on `pending_device` (the training device), so accumulate() needs no host sync
// and the all-reduce takes them where NCCL wants them; apply() copies them to the host once.
// With debias (§7.2, method.ema_debias), C_t sums Ê[k] = E[k] / (1 - mu^n[k]) (0 where n[k] = 0),
// n[k] the number of updates E[k] has received; E itself is updated the same either way.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace dde::objective {

class CorrectionEma {
 public:
  // num_timesteps >= 1, momentum mu in [0, 1). E and n start at zero.
  CorrectionEma(int64_t num_timesteps, double momentum,
                const torch::Device& pending_device = torch::kCPU, bool debias = false);

  // C_t for t: [B] int64 in [0, T); [B] float64 on t's device. O(B): reads a table of suffix sums
  // (of E, or of Ê with debias) recomputed at apply() and load_state().
  torch::Tensor correction(const torch::Tensor& t) const;

  // Adds detached d ([B]) into the pending per-t sum and count, for every micro-batch of a step.
  // t is checked on the host: pass the host copy of the timesteps (d may be on any device).
  void accumulate(const torch::Tensor& t, const torch::Tensor& d);

  // [T] float64 each, on pending_device; all-reduce (sum) both in place before apply().
  torch::Tensor& pending_sum() { return pending_sum_; }
  torch::Tensor& pending_count() { return pending_count_; }

  // E[t] <- mu E[t] + (1 - mu) sum[t] / count[t] and n[t] += 1 where count[t] > 0; clears the
  // pending sums and increments updates(). Throws dde::Error if the pending tensors were replaced
  // (not reduced in place) or hold non-finite values: skip a non-finite step with clear_pending()
  // instead.
  void apply();

  // Drops what was accumulated since the last apply() (e.g. for a skipped non-finite step).
  void clear_pending();

  const torch::Tensor& values() const { return E_; }  // E, [T] float64
  // n, [T] int64 on the CPU: how many apply() calls updated E[k] (for the checkpoint).
  const torch::Tensor& update_counts() const { return counts_; }
  int64_t updates() const { return updates_; }
  int64_t num_timesteps() const { return num_timesteps_; }
  double momentum() const { return momentum_; }
  bool debias() const { return debias_; }

  // Checkpoint state. load_state() checks that E has length T, is finite, that the momentum
  // matches this run's, updates >= 0 and 0 <= n[k] <= updates; it clears the pending sums. With
  // debias it refuses an E[k] != 0 with n[k] = 0 (counts missing or incomplete).
  struct State {
    std::vector<double> E;
    double momentum = 0.0;
    int64_t updates = 0;
    std::vector<int64_t> counts;  // n, length T; empty: all zero (checkpoints without counts)
  };
  State state() const;
  void load_state(const State& state);

 private:
  void recompute_suffix();

  int64_t num_timesteps_;
  double momentum_;
  torch::Device pending_device_;
  bool debias_;
  int64_t updates_ = 0;
  torch::Tensor E_;              // [T] float64
  torch::Tensor counts_;         // [T] int64, n[k]
  torch::Tensor suffix_;         // [T] float64, suffix_[t] = sum_{k>t} E[k] (Ê[k] with debias)
  torch::Tensor pending_sum_;    // [T] float64 on pending_device_
  torch::Tensor pending_count_;  // [T] float64 on pending_device_
};

}  // namespace dde::objective
