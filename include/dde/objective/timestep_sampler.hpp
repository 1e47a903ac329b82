// Timestep distributions of the methods (docs/method.md §3, §7.3): uniform over [0, T), the
// dense-reward discount p(t) ∝ gamma^((T-1-t) K / T) (Yang, Chen, Zhou, ICML 2024), or
// p(t) ∝ c_t (uniform_ct), each restricted to a window [t_lo, t_hi).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace dde::objective {

enum class TimestepDistribution { kUniform, kDiscounted, kProportionalToCt };

struct TimestepSamplerOptions {
  TimestepDistribution distribution = TimestepDistribution::kUniform;
  int64_t num_timesteps = 1000;  // T
  double gamma = 0.9;            // discount per sampling step, in (0, 1]; discounted only
  int64_t sampler_steps = 50;    // K, steps of the sampler the discount counts in; > 0
  int64_t t_lo = 0;              // window [t_lo, t_hi), 0 <= t_lo < t_hi <= T
  int64_t t_hi = 1000;
  // kProportionalToCt only: c_t = (1 - abar_t) / abar_t, length T (NoiseSchedule::single_shot).
  std::vector<double> single_shot;
};

class TimestepSampler {
 public:
  // Throws dde::Error on an empty window, a window outside [0, T], gamma outside (0, 1] or K <= 0
  // (discounted), or a single_shot table that is not length T, finite and > 0 (kProportionalToCt).
  explicit TimestepSampler(TimestepSamplerOptions options);

  // n draws, [n] int64 on the CPU, all in [t_lo, t_hi). `gen` must be a CPU generator.
  torch::Tensor sample(int64_t n, at::Generator& gen) const;

  // p(t), length T: zero outside the window, sums to 1.
  const std::vector<double>& probabilities() const { return probabilities_; }
  const TimestepSamplerOptions& options() const { return options_; }

 private:
  TimestepSamplerOptions options_;
  std::vector<double> probabilities_;
  torch::Tensor window_cdf_;  // [t_hi - t_lo] float64, cumulative p over the window (non-uniform)
};

}  // namespace dde::objective
