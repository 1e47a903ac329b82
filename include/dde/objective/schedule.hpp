// Noise schedule tables of Stable Diffusion 1.5 / SDXL (docs/method.md §1) and the two
// per-timestep coefficient tables of the DDE objective (section 2). Everything is float64.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace dde::objective {

struct NoiseSchedule {
  int64_t num_timesteps = 0;           // T; timesteps are t = 0 .. T-1 (t = 0 least noisy)
  std::vector<double> betas;           // beta_t
  std::vector<double> alphas;          // alpha_t = 1 - beta_t
  std::vector<double> alphas_cumprod;  // abar_t = prod_{i<=t} alpha_i
  std::vector<double> single_shot;     // c_t = (1 - abar_t) / abar_t
  std::vector<double> stepwise;        // lambda_t = beta_t / (alpha_t (1 - abar_t))

  // diffusers' "scaled_linear": beta_t = (sqrt(b0) + (sqrt(b1) - sqrt(b0)) t/(T-1))^2, computed in
  // float64 (diffusers computes in float32; the difference is below 1e-6 relative).
  // Requires T >= 1 and 0 < beta_start, beta_end < 1.
  static NoiseSchedule scaled_linear(int64_t num_timesteps, double beta_start, double beta_end);

  // A copy of one of the tables above as a float64 CPU tensor [T]. Throws if v is not length T.
  torch::Tensor table(const std::vector<double>& v) const;
};

// Forward noising: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
// x0, eps: [B, ...] same shape; t: [B] int64 in [0, T). Returns x0's dtype and device.
torch::Tensor add_noise(const NoiseSchedule& schedule, const torch::Tensor& x0,
                        const torch::Tensor& eps, const torch::Tensor& t);

// table[t] as a float64 tensor [B] on `device`; t: [B] int64 in [0, T) on any device (a host t
// keeps this free of host syncs: checked and indexed on the host, copied without blocking).
// Throws dde::Error if t is not 1-D int64 or a value is outside [0, T).
torch::Tensor gather_table(const NoiseSchedule& schedule, const std::vector<double>& table,
                           const torch::Tensor& t, const torch::Device& device);

// Sampling (validation images, eval.sample): diffusers' DDIMScheduler as Stable Diffusion's
// pipelines configure it (timestep_spacing "leading", steps_offset 1, set_alpha_to_one false,
// epsilon prediction, no clipping, eta 0).
// The timesteps, first to last: (n-1) r + 1, ..., r + 1, 1 with r = T / n (integer division).
// Throws dde::Error unless 1 <= n and the first lies below T (n <= T / 2 always does).
std::vector<int64_t> ddim_timesteps(int64_t num_timesteps, int64_t steps);
// One step from t to prev_t = t - r: x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), then
// sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with abar_prev = abar_0 when prev_t < 0.
torch::Tensor ddim_step(const NoiseSchedule& schedule, const torch::Tensor& x,
                        const torch::Tensor& eps, int64_t t, int64_t prev_t);

}  // namespace dde::objective
