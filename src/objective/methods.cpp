#include "dde/objective/methods.hpp"

#include <array>
#include <cmath>
#include <string>
#include <utility>

#include "dde/util/error.hpp"
#include "tensor_checks.hpp"

namespace dde::objective {

namespace {

constexpr std::array<std::pair<Method, const char*>, 8> kMethodNames = {{
    {Method::kSft, "sft"},
    {Method::kUniform, "uniform"},
    {Method::kDiscounted, "discounted"},
    {Method::kDdeSingle, "dde_single"},
    {Method::kDdeStep, "dde_step"},
    {Method::kDde, "dde"},
    {Method::kUniformCt, "uniform_ct"},
    {Method::kMapo, "mapo"},
}};

// softplus(x) = log(1 + e^x) switches to x above the threshold; at 40 the dropped term e^-40 is
// below float64 resolution, so the result is exact, finite for any finite z, and its gradient is
// sigmoid(x) (a hand-written max(x,0) + log1p(e^-|x|) would give gradient 0 at x = 0).
constexpr double kSoftplusThreshold = 40.0;

torch::Tensor neg_log_sigmoid(const torch::Tensor& z) {
  return torch::softplus(-z, /*beta=*/1.0, /*threshold=*/kSoftplusThreshold);
}

// Checks the errors a method needs and returns B.
int64_t check_errors(const PairErrors& e, bool need_reference, const std::string& where) {
  detail::check_vector(e.policy_w, where + ": errors.policy_w", -1);
  const int64_t batch = e.policy_w.size(0);
  if (!need_reference) {
    return batch;
  }
  const std::pair<const char*, const torch::Tensor*> others[] = {
      {"errors.policy_l", &e.policy_l}, {"errors.ref_w", &e.ref_w}, {"errors.ref_l", &e.ref_l}};
  for (const auto& [name, tensor] : others) {
    detail::check_vector(*tensor, where + ": " + name, batch);
    if (tensor->device() != e.policy_w.device()) {
      throw Error({"tensors on different devices", where + ": " + name,
                   e.policy_w.device().str() + " (as errors.policy_w)", tensor->device().str(),
                   "compute all four errors on one device"});
    }
  }
  return batch;
}

// A per-pair coefficient ([B], any float dtype/device) as float64 on `device`.
torch::Tensor coefficient(const torch::Tensor& x, int64_t batch, const torch::Device& device,
                          const std::string& where) {
  detail::check_vector(x, where, batch);
  return x.to(device, torch::kFloat64);
}

void check_params(const MethodParams& params, const std::string& where) {
  if (!(params.beta > 0.0) || !std::isfinite(params.beta)) {
    throw Error({"bad method parameter", where + ": beta", "finite > 0",
                 std::to_string(params.beta), "Diffusion-DPO uses 5000"});
  }
  if (!std::isfinite(params.correction_scale)) {
    throw Error({"bad method parameter", where + ": correction_scale", "finite",
                 std::to_string(params.correction_scale), ""});
  }
}

void check_mapo_params(const MethodParams& params, const std::string& where) {
  const std::pair<const char*, double> values[] = {{"mapo_beta", params.mapo_beta},
                                                   {"mapo_snr", params.mapo_snr}};
  for (const auto& [name, value] : values) {
    if (!(value > 0.0) || !std::isfinite(value)) {
      throw Error({"bad method parameter", where + ": " + name, "finite > 0", std::to_string(value),
                   "MaPO's defaults: mapo_beta 0.1, mapo_snr 0.5"});
    }
  }
}

// Below this |x|, f(x) = x / expm1(x) is taken from its series 1 - x/2 + x^2/12 (the next term,
// x^4/720, is under 2e-19 there); above kMapoFMax, x is clamped (f(700) = 7e-302, and 0 gradient
// beyond) so that neither f nor its gradient overflows.
constexpr double kMapoSeriesBelow = 1e-4;
constexpr double kMapoFMax = 700.0;

torch::Tensor delta_unchecked(const PairErrors& e) {
  const auto f64 = [](const torch::Tensor& x) { return x.to(torch::kFloat64); };
  return (f64(e.policy_w) - f64(e.ref_w)) - (f64(e.policy_l) - f64(e.ref_l));
}

MethodOutput from_z(torch::Tensor z) {
  auto loss = neg_log_sigmoid(z);
  return {std::move(z), std::move(loss)};
}

// z = -0.5 beta k_t Delta + beta s C_t, the common form of every DPO row of the method table.
MethodOutput dpo(const PairErrors& e, const torch::Tensor* k_t, const torch::Tensor* C_t,
                 const MethodParams& params, const std::string& where) {
  check_params(params, where);
  const int64_t batch = check_errors(e, /*need_reference=*/true, where);
  const auto device = e.policy_w.device();
  auto z = -0.5 * params.beta * delta_unchecked(e);
  if (k_t != nullptr) {
    z = z * coefficient(*k_t, batch, device, where + ": coefficient");
  }
  if (C_t != nullptr) {
    const auto correction = coefficient(*C_t, batch, device, where + ": C_t").detach();
    z = z + params.beta * params.correction_scale * correction;
  }
  return from_z(std::move(z));
}

}  // namespace

Method parse_method(const std::string& name) {
  std::string allowed;
  for (const auto& [method, text] : kMethodNames) {
    if (name == text) {
      return method;
    }
    allowed += (allowed.empty() ? "" : ", ") + std::string(text);
  }
  throw Error({"unknown method", "method.name", "one of " + allowed, "'" + name + "'",
               "see docs/method.md, section 3"});
}

const char* method_name(Method method) {
  for (const auto& [m, text] : kMethodNames) {
    if (m == method) {
      return text;
    }
  }
  return "unknown";
}

bool uses_reference(Method method) { return method != Method::kSft && method != Method::kMapo; }

bool uses_correction(Method method) { return method == Method::kDdeStep || method == Method::kDde; }

TimestepDistribution method_distribution(Method method) {
  switch (method) {
    case Method::kDiscounted:
      return TimestepDistribution::kDiscounted;
    case Method::kUniformCt:
      return TimestepDistribution::kProportionalToCt;
    default:
      return TimestepDistribution::kUniform;
  }
}

torch::Tensor delta(const PairErrors& errors) {
  check_errors(errors, /*need_reference=*/true, "objective::delta");
  return delta_unchecked(errors);
}

MethodOutput sft(const PairErrors& errors) {
  check_errors(errors, /*need_reference=*/false, "objective::sft");
  return {torch::Tensor(), errors.policy_w.to(torch::kFloat64)};
}

torch::Tensor mapo_f(const torch::Tensor& x) {
  const auto x64 = x.to(torch::kFloat64);
  const auto small = x64.abs() < kMapoSeriesBelow;
  const auto safe = torch::where(small, torch::ones_like(x64), x64.clamp_max(kMapoFMax));
  const auto series = 1.0 - x64 / 2.0 + x64 * x64 / 12.0;
  return torch::where(small, series, safe / torch::expm1(safe));
}

MethodOutput mapo(const PairErrors& errors, const MethodParams& params, int64_t num_timesteps) {
  const std::string where = "objective::mapo";
  check_mapo_params(params, where);
  const int64_t batch = check_errors(errors, /*need_reference=*/false, where);
  detail::check_vector(errors.policy_l, where + ": errors.policy_l", batch);
  if (errors.policy_l.device() != errors.policy_w.device()) {
    throw Error({"tensors on different devices", where + ": errors.policy_l",
                 errors.policy_w.device().str() + " (as errors.policy_w)",
                 errors.policy_l.device().str(), "compute both errors on one device"});
  }
  if (num_timesteps < 1) {
    throw Error({"bad schedule length", where + ": num_timesteps", ">= 1",
                 std::to_string(num_timesteps), "pass the noise schedule's T"});
  }
  const auto e_w = errors.policy_w.to(torch::kFloat64);
  const auto e_l = errors.policy_l.to(torch::kFloat64);
  const double s = params.mapo_snr;
  auto z = static_cast<double>(num_timesteps) * (mapo_f(s * e_w) - mapo_f(s * e_l));
  auto loss = e_w + params.mapo_beta * neg_log_sigmoid(z);
  return {std::move(z), std::move(loss)};
}

MethodOutput uniform(const PairErrors& errors, const MethodParams& params) {
  return dpo(errors, nullptr, nullptr, params, "objective::uniform");
}

MethodOutput dde_single(const PairErrors& errors, const torch::Tensor& c_t,
                        const MethodParams& params) {
  return dpo(errors, &c_t, nullptr, params, "objective::dde_single");
}

MethodOutput dde_step(const PairErrors& errors, const torch::Tensor& lambda_t,
                      const torch::Tensor& C_t, const MethodParams& params) {
  return dpo(errors, &lambda_t, &C_t, params, "objective::dde_step");
}

MethodOutput dde(const PairErrors& errors, const torch::Tensor& c_t, const torch::Tensor& C_t,
                 const MethodParams& params) {
  return dpo(errors, &c_t, &C_t, params, "objective::dde");
}

MethodOutput compute_method(Method method, const PairErrors& errors, const torch::Tensor& t,
                            const torch::Tensor& C_t, const MethodParams& params,
                            const NoiseSchedule& schedule) {
  const std::string where = std::string("objective::compute_method(") + method_name(method) + ")";
  const int64_t batch = check_errors(errors, uses_reference(method), where);
  detail::check_timesteps(t, where + ": t", batch, schedule.num_timesteps);
  if (uses_correction(method) && !C_t.defined()) {
    throw Error({"missing correction", where + ": C_t", "[B] float64 (zeros allowed)", "undefined",
                 "pass CorrectionEma::correction(t)"});
  }
  const auto device = errors.policy_w.device();
  switch (method) {
    case Method::kSft:
      return sft(errors);
    case Method::kUniform:
    case Method::kDiscounted:
    case Method::kUniformCt:
      return uniform(errors, params);
    case Method::kDdeSingle:
      return dde_single(errors, gather_table(schedule, schedule.single_shot, t, device), params);
    case Method::kDdeStep:
      return dde_step(errors, gather_table(schedule, schedule.stepwise, t, device), C_t, params);
    case Method::kDde:
      return dde(errors, gather_table(schedule, schedule.single_shot, t, device), C_t, params);
    case Method::kMapo:
      return mapo(errors, params, schedule.num_timesteps);
  }
  throw Error({"unknown method", where, "one of the eight methods", "an invalid enum value", ""});
}

torch::Tensor transition_estimate(const PairErrors& errors, const torch::Tensor& t,
                                  const NoiseSchedule& schedule) {
  const std::string where = "objective::transition_estimate";
  const int64_t batch = check_errors(errors, /*need_reference=*/true, where);
  detail::check_timesteps(t, where + ": t", batch, schedule.num_timesteps);
  torch::NoGradGuard no_grad;
  const auto lambda_t = gather_table(schedule, schedule.stepwise, t, errors.policy_w.device());
  return (-0.5 * lambda_t * delta_unchecked(errors)).detach();
}

torch::Tensor credit_weight(Method method, const MethodOutput& output, const torch::Tensor& t,
                            const NoiseSchedule& schedule) {
  const std::string where = std::string("objective::credit_weight(") + method_name(method) + ")";
  torch::NoGradGuard no_grad;
  if (method == Method::kSft) {
    detail::check_vector(output.loss, where + ": output.loss", -1);
    return torch::ones_like(output.loss, torch::kFloat64).detach();
  }
  detail::check_vector(output.z, where + ": output.z", -1);
  const auto z = output.z.detach().to(torch::kFloat64);
  detail::check_timesteps(t, where + ": t", z.size(0), schedule.num_timesteps);
  auto weight = torch::sigmoid(-z);
  if (method == Method::kDdeSingle || method == Method::kDde) {
    weight = weight * gather_table(schedule, schedule.single_shot, t, z.device());
  } else if (method == Method::kDdeStep) {
    weight = weight * gather_table(schedule, schedule.stepwise, t, z.device());
  }
  return weight;
}

double single_shot_geometric_mean(const NoiseSchedule& schedule, int64_t t_lo, int64_t t_hi) {
  const std::string where = "objective::single_shot_geometric_mean";
  const int64_t T = schedule.num_timesteps;
  if (t_lo < 0 || t_hi > T || t_lo >= t_hi) {
    throw Error({"bad timestep window", where + ": [t_lo, t_hi)",
                 "0 <= t_lo < t_hi <= T = " + std::to_string(T),
                 "[" + std::to_string(t_lo) + ", " + std::to_string(t_hi) + ")",
                 "pass the timestep sampler's window (method.t_lo / method.t_hi)"});
  }
  if (static_cast<int64_t>(schedule.single_shot.size()) != T) {
    throw Error({"bad noise schedule", where + ": schedule.single_shot",
                 "length T = " + std::to_string(T), std::to_string(schedule.single_shot.size()),
                 "build the schedule with NoiseSchedule::scaled_linear"});
  }
  // Mean of ln c_t in float64; c_t > 0 for every t of a valid schedule.
  double sum_log = 0.0;
  for (int64_t t = t_lo; t < t_hi; ++t) {
    sum_log += std::log(schedule.single_shot[static_cast<size_t>(t)]);
  }
  return std::exp(sum_log / static_cast<double>(t_hi - t_lo));
}

double calibrated_beta(double beta, const NoiseSchedule& schedule, int64_t t_lo, int64_t t_hi) {
  check_params({beta, 0.0}, "objective::calibrated_beta");
  return beta / single_shot_geometric_mean(schedule, t_lo, t_hi);
}

// ---- §7.4: per-t-bin diagnostic sums ----
namespace {

// An optional per-pair vector ([B] floating point on `device`), or zeros where undefined.
torch::Tensor row_values(const torch::Tensor& x, int64_t batch, const torch::Device& device,
                         const std::string& where) {
  if (!x.defined()) {
    return torch::zeros({batch}, torch::TensorOptions().dtype(torch::kFloat64).device(device));
  }
  detail::check_vector(x, where, batch);
  if (x.device() != device) {
    throw Error({"tensors on different devices", where, device.str() + " (as t)", x.device().str(),
                 "pass the step's per-pair tensors as computed, on one device"});
  }
  return x.detach().to(torch::kFloat64);
}

}  // namespace

torch::Tensor t_bin_sums(const torch::Tensor& t, const torch::Tensor& delta,
                         const torch::Tensor& credit, const torch::Tensor& z, int64_t num_timesteps,
                         int64_t bins) {
  const std::string where = "objective::t_bin_sums";
  if (num_timesteps < 1 || bins < 1) {
    throw Error({"bad t-bin arguments", where + ": num_timesteps, bins", ">= 1 each",
                 std::to_string(num_timesteps) + ", " + std::to_string(bins), "10 bins of T"});
  }
  if (!t.defined() || t.dim() != 1 || t.scalar_type() != torch::kInt64) {
    throw Error({"bad timestep tensor", where + ": t", "int64 1-D tensor [B]", detail::describe(t),
                 "pass the step's timesteps, one per pair"});
  }
  torch::NoGradGuard no_grad;
  const int64_t batch = t.size(0);
  const auto device = t.device();
  detail::check_vector(credit, where + ": credit", batch);  // required; delta and z are not
  const auto misranked = row_values(delta, batch, device, where + ": delta").gt(0.0);
  const auto values =
      torch::stack({torch::ones_like(misranked, torch::kFloat64), misranked.to(torch::kFloat64),
                    row_values(credit, batch, device, where + ": credit"),
                    row_values(z, batch, device, where + ": z")});  // [4, B]
  // bin = floor(t * bins / T), computed on t's device; clamped instead of checked (no sync).
  const auto bin = torch::div(t * bins, num_timesteps, "floor").clamp(0, bins - 1);
  auto sums = torch::zeros({kTBinRows, bins}, values.options());
  sums.index_add_(1, bin, values);
  return sums;
}

}  // namespace dde::objective
