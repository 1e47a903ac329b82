// Timestep distributions of the methods (docs/method.md §3): uniform over [0, T), or the
// dense-reward discount p(t) ∝ gamma^((T-1-t) K / T) (Yang, Chen, Zhou, ICML 2024), both
// restricted to a window [t_lo, t_hi).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace dde::objective {

enum class TimestepDistribution { kUniform, kDiscounted };

struct TimestepSamplerOptions {
  TimestepDistribution distribution = TimestepDistribution::kUniform;
  int64_t num_timesteps = 1000;  // T
  double gamma = 0.9;            // discount per sampling step, in (0, 1]; discounted only
  int64_t sampler_steps = 50;    // K, steps of the sampler the discount counts in; > 0
  int64_t t_lo = 0;              // window [t_lo, t_hi), 0 <= t_lo < t_hi <= T
  int64_t t_hi = 1000;
};

class TimestepSampler {
 public:
  // Throws dde::Error on an empty window, a window outside [0, T], gamma outside (0, 1] or K <= 0.
  explicit TimestepSampler(TimestepSamplerOptions options);

  // n draws, [n] int64 on the CPU, all in [t_lo, t_hi). `gen` must be a CPU generator.
  torch::Tensor sample(int64_t n, at::Generator& gen) const;

  // p(t), length T: zero outside the window, sums to 1.
  const std::vector<double>& probabilities() const { return probabilities_; }
  const TimestepSamplerOptions& options() const { return options_; }

 private:
  TimestepSamplerOptions options_;
  std::vector<double> probabilities_;
  torch::Tensor window_cdf_;  // [t_hi - t_lo] float64, cumulative p over the window (discounted)
};

}  // namespace dde::objective
