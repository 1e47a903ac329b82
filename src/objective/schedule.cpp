#include "dde/objective/schedule.hpp"

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

#include "dde/util/error.hpp"
#include "dde/util/transfer.hpp"
#include "tensor_checks.hpp"

namespace dde::objective {

NoiseSchedule NoiseSchedule::scaled_linear(int64_t num_timesteps, double beta_start,
                                           double beta_end) {
  const std::string where = "NoiseSchedule::scaled_linear";
  if (num_timesteps < 1) {
    throw Error({"bad noise schedule", where + ": num_timesteps", ">= 1",
                 std::to_string(num_timesteps), "SD1.5 and SDXL use 1000"});
  }
  const std::pair<const char*, double> args[] = {{"beta_start", beta_start},
                                                 {"beta_end", beta_end}};
  for (const auto& [name, value] : args) {
    if (!std::isfinite(value) || value <= 0.0 || value >= 1.0) {
      throw Error({"bad noise schedule", where + ": " + name, "in (0, 1)", std::to_string(value),
                   "SD1.5 and SDXL use 0.00085 and 0.012"});
    }
  }
  NoiseSchedule s;
  const auto T = static_cast<size_t>(num_timesteps);
  s.num_timesteps = num_timesteps;
  s.betas.resize(T);
  s.alphas.resize(T);
  s.alphas_cumprod.resize(T);
  s.single_shot.resize(T);
  s.stepwise.resize(T);
  const double root_start = std::sqrt(beta_start);
  const double root_end = std::sqrt(beta_end);
  double abar = 1.0;
  for (size_t t = 0; t < T; ++t) {
    // linspace(sqrt(b0), sqrt(b1), T)^2, as diffusers' DDPMScheduler(beta_schedule="scaled_linear")
    const double frac = T == 1 ? 0.0 : static_cast<double>(t) / static_cast<double>(T - 1);
    const double root = root_start + (root_end - root_start) * frac;
    s.betas[t] = root * root;
    s.alphas[t] = 1.0 - s.betas[t];
    abar *= s.alphas[t];
    s.alphas_cumprod[t] = abar;
    s.single_shot[t] = (1.0 - abar) / abar;
    s.stepwise[t] = s.betas[t] / (s.alphas[t] * (1.0 - abar));
  }
  return s;
}

torch::Tensor NoiseSchedule::table(const std::vector<double>& v) const {
  if (static_cast<int64_t>(v.size()) != num_timesteps) {
    throw Error({"bad schedule table", "NoiseSchedule::table",
                 "length T = " + std::to_string(num_timesteps), std::to_string(v.size()),
                 "pass one of the schedule's own tables"});
  }
  return torch::tensor(v, torch::TensorOptions().dtype(torch::kFloat64));
}

torch::Tensor gather_table(const NoiseSchedule& schedule, const std::vector<double>& table,
                           const torch::Tensor& t, const torch::Device& device) {
  detail::check_timesteps(t, "objective::gather_table: t", -1, schedule.num_timesteps);
  // Indexed on the host, then sent without blocking: with a host t this never syncs.
  return util::to_device_async(schedule.table(table).index_select(0, t.to(torch::kCPU)), device);
}

torch::Tensor add_noise(const NoiseSchedule& schedule, const torch::Tensor& x0,
                        const torch::Tensor& eps, const torch::Tensor& t) {
  const std::string where = "objective::add_noise";
  if (!x0.defined() || x0.dim() < 1 || !x0.is_floating_point()) {
    throw Error({"bad tensor argument", where + ": x0", "floating-point [B, ...]",
                 detail::describe(x0), ""});
  }
  if (!eps.defined() || eps.sizes() != x0.sizes() || eps.scalar_type() != x0.scalar_type() ||
      eps.device() != x0.device()) {
    throw Error({"bad tensor argument", where + ": eps", "same as x0: " + detail::describe(x0),
                 detail::describe(eps), "draw eps with torch::randn_like(x0)"});
  }
  detail::check_timesteps(t, where + ": t", x0.size(0), schedule.num_timesteps);
  std::vector<int64_t> shape(static_cast<size_t>(x0.dim()), 1);
  shape[0] = x0.size(0);  // [B, 1, 1, ...] broadcasts over the sample
  const auto abar = gather_table(schedule, schedule.alphas_cumprod, t, torch::kCPU);
  const auto signal = abar.sqrt().to(x0.options(), /*non_blocking=*/true).view(shape);
  const auto noise = (1.0 - abar).sqrt().to(x0.options(), /*non_blocking=*/true).view(shape);
  return signal * x0 + noise * eps;
}

std::vector<int64_t> ddim_timesteps(int64_t num_timesteps, int64_t steps) {
  const int64_t ratio = steps >= 1 ? num_timesteps / steps : 0;
  if (steps < 1 || ratio < 1 || (steps - 1) * ratio + 1 >= num_timesteps) {
    throw Error({"DDIM steps outside the schedule", "eval.sample.steps",
                 "1 <= steps, with (steps - 1) x (T / steps) + 1 < T = " +
                     std::to_string(num_timesteps) + " (at most T / 2 always works)",
                 std::to_string(steps), "use fewer sampling steps (20 to 50 is usual)"});
  }
  std::vector<int64_t> timesteps;
  for (int64_t i = steps - 1; i >= 0; --i) timesteps.push_back(i * ratio + 1);
  return timesteps;
}

torch::Tensor ddim_step(const NoiseSchedule& schedule, const torch::Tensor& x,
                        const torch::Tensor& eps, int64_t t, int64_t prev_t) {
  if (t < 0 || t >= schedule.num_timesteps || prev_t >= t) {
    throw Error({"DDIM step outside the schedule", "ddim_step",
                 "0 <= prev_t < t < " + std::to_string(schedule.num_timesteps),
                 "t " + std::to_string(t) + ", prev_t " + std::to_string(prev_t),
                 "internal error: timesteps come from ddim_timesteps"});
  }
  const double abar = schedule.alphas_cumprod[static_cast<size_t>(t)];
  const double abar_prev =
      schedule.alphas_cumprod[static_cast<size_t>(std::max<int64_t>(prev_t, 0))];
  const torch::Tensor x0 = (x - std::sqrt(1.0 - abar) * eps) / std::sqrt(abar);
  return std::sqrt(abar_prev) * x0 + std::sqrt(1.0 - abar_prev) * eps;
}

}  // namespace dde::objective
