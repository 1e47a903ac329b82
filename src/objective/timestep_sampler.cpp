#include "dde/objective/timestep_sampler.hpp"

#include <cmath>
#include <string>
#include <utility>

#include "dde/util/error.hpp"

namespace dde::objective {

namespace {

void check_single_shot(const TimestepSamplerOptions& o) {
  const std::string where = "TimestepSampler: single_shot";
  if (static_cast<int64_t>(o.single_shot.size()) != o.num_timesteps) {
    throw Error({"bad timestep sampler option", where,
                 "c_t, length T = " + std::to_string(o.num_timesteps),
                 "length " + std::to_string(o.single_shot.size()),
                 "p(t) proportional to c_t needs the noise schedule's single_shot table"});
  }
  for (size_t t = 0; t < o.single_shot.size(); ++t) {
    const double c = o.single_shot[t];
    if (!std::isfinite(c) || c <= 0.0) {
      throw Error({"bad timestep sampler option", where + "[" + std::to_string(t) + "]",
                   "finite > 0", std::to_string(c),
                   "pass NoiseSchedule::single_shot, c_t = (1 - abar_t) / abar_t"});
    }
  }
}

void check_options(const TimestepSamplerOptions& o) {
  const std::string where = "TimestepSampler";
  if (o.num_timesteps < 1) {
    throw Error({"bad timestep sampler option", where + ": num_timesteps", ">= 1",
                 std::to_string(o.num_timesteps), ""});
  }
  if (o.t_lo < 0 || o.t_hi > o.num_timesteps || o.t_lo >= o.t_hi) {
    throw Error({"bad timestep window", where + ": [t_lo, t_hi)",
                 "0 <= t_lo < t_hi <= T = " + std::to_string(o.num_timesteps),
                 "[" + std::to_string(o.t_lo) + ", " + std::to_string(o.t_hi) + ")",
                 "set method.t_lo / method.t_hi to a non-empty window inside the schedule"});
  }
  if (o.distribution == TimestepDistribution::kDiscounted) {
    if (!(o.gamma > 0.0 && o.gamma <= 1.0)) {
      throw Error({"bad timestep sampler option", where + ": gamma", "in (0, 1]",
                   std::to_string(o.gamma), "the dense-reward paper uses 0.9"});
    }
    if (o.sampler_steps < 1) {
      throw Error({"bad timestep sampler option", where + ": sampler_steps", ">= 1",
                   std::to_string(o.sampler_steps), "the number of steps of the sampler, e.g. 50"});
    }
  }
  if (o.distribution == TimestepDistribution::kProportionalToCt) {
    check_single_shot(o);
  }
}

// Unnormalised p(t) for t in the window. Discounted: log p(t) = (T-1-t) (K/T) log gamma up to a
// constant, taken relative to t_hi - 1 (the window's largest weight) so nothing under/overflows.
double window_weight(const TimestepSamplerOptions& o, int64_t t) {
  switch (o.distribution) {
    case TimestepDistribution::kUniform:
      return 1.0;
    case TimestepDistribution::kDiscounted: {
      const double per_step =
          static_cast<double>(o.sampler_steps) / static_cast<double>(o.num_timesteps);
      return std::exp(static_cast<double>(o.t_hi - 1 - t) * per_step * std::log(o.gamma));
    }
    case TimestepDistribution::kProportionalToCt:
      return o.single_shot[static_cast<size_t>(t)];
  }
  throw Error({"unknown timestep distribution", "TimestepSampler", "uniform, discounted or c_t",
               "an invalid enum value", ""});
}

}  // namespace

TimestepSampler::TimestepSampler(TimestepSamplerOptions options) : options_(std::move(options)) {
  check_options(options_);
  const int64_t T = options_.num_timesteps;
  probabilities_.assign(static_cast<size_t>(T), 0.0);
  double total = 0.0;
  for (int64_t t = options_.t_lo; t < options_.t_hi; ++t) {
    const double w = window_weight(options_, t);
    probabilities_[static_cast<size_t>(t)] = w;
    total += w;
  }
  for (auto& p : probabilities_) {
    p /= total;
  }
  std::vector<double> cdf;
  cdf.reserve(static_cast<size_t>(options_.t_hi - options_.t_lo));
  double running = 0.0;
  for (int64_t t = options_.t_lo; t < options_.t_hi; ++t) {
    running += probabilities_[static_cast<size_t>(t)];
    cdf.push_back(running);
  }
  window_cdf_ = torch::tensor(cdf, torch::TensorOptions().dtype(torch::kFloat64));
}

torch::Tensor TimestepSampler::sample(int64_t n, at::Generator& gen) const {
  if (n < 0) {
    throw Error({"bad sample count", "TimestepSampler::sample: n", ">= 0", std::to_string(n), ""});
  }
  if (!gen.defined() || gen.device().type() != c10::DeviceType::CPU) {
    throw Error({"bad generator", "TimestepSampler::sample: gen", "a CPU generator",
                 gen.defined() ? gen.device().str() : std::string("undefined"),
                 "timesteps are drawn on the CPU; pass at::detail::createCPUGenerator(seed)"});
  }
  const auto long_cpu = torch::TensorOptions().dtype(torch::kInt64);
  if (options_.distribution == TimestepDistribution::kUniform) {
    return torch::randint(options_.t_lo, options_.t_hi, {n}, gen, long_cpu);
  }
  // Inverse CDF over the window; clamp guards against the last cdf entry rounding below 1.
  const auto u = torch::rand({n}, gen, torch::TensorOptions().dtype(torch::kFloat64));
  const auto index = torch::searchsorted(window_cdf_, u, /*out_int32=*/false, /*right=*/true);
  return index.clamp_max(window_cdf_.size(0) - 1) + options_.t_lo;
}

}  // namespace dde::objective
