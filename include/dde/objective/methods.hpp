// The training objectives of docs/method.md §3, the control uniform_ct of §7.3 and the
// reference-free baseline mapo of §8.1: one small pure
// function per row of the method table. Inputs are per-pair errors e[model, side] ([B] each, any
// float dtype, any device); everything is computed in float64 and autograd flows back to the
// inputs. Losses are per pair; the trainer takes the mean.
#pragma once

#include <torch/torch.h>

#include <string>

#include "dde/objective/schedule.hpp"
#include "dde/objective/timestep_sampler.hpp"

namespace dde::objective {

// kUniformCt (§7.3): uniform's z with t drawn from p(t) ∝ c_t, a control for where the credit goes.
// kMapo (§8.1): margin-aware preference optimization, reference-free.
enum class Method { kSft, kUniform, kDiscounted, kDdeSingle, kDdeStep, kDde, kUniformCt, kMapo };

// "sft", "uniform", "discounted", "dde_single", "dde_step", "dde", "uniform_ct", "mapo"; anything
// else throws dde::Error.
Method parse_method(const std::string& name);
const char* method_name(Method method);
bool uses_reference(Method method);   // every method but sft and mapo
bool uses_correction(Method method);  // dde_step and dde read C_t
// discounted: kDiscounted, uniform_ct: kProportionalToCt, else kUniform.
TimestepDistribution method_distribution(Method method);

// e = mean over latent elements of (eps - eps_model)^2, one number per image, each [B].
// ref_w / ref_l may be undefined for sft and mapo (policy_l too for sft).
struct PairErrors {
  torch::Tensor policy_w, policy_l, ref_w, ref_l;
};

struct MethodParams {
  double beta = 5000.0;           // DPO temperature (Diffusion-DPO default)
  double correction_scale = 1.0;  // s, multiplies C_t in dde_step and dde
  double mapo_beta = 0.1;         // b, weight of mapo's margin term (method.mapo_beta)
  double mapo_snr = 0.5;          // s, scales the errors inside mapo's f (method.mapo_snr)
};

struct MethodOutput {
  torch::Tensor z;     // [B] float64, the argument of the sigmoid; undefined for sft
  torch::Tensor loss;  // [B] float64, softplus(-z) = -log sigmoid(z); e[policy,w] for sft,
                       // e[policy,w] + b softplus(-z) for mapo
};

// loss = e[policy,w]: plain denoising loss on winners, no reference model.
MethodOutput sft(const PairErrors& errors);
// f(x) = x / (exp(x) - 1), f(0) = 1, elementwise in float64 (autograd flows; the series
// 1 - x/2 + x^2/12 near 0, where the quotient is 0/0; x clamped at 700, f(700) = 7e-302).
torch::Tensor mapo_f(const torch::Tensor& x);
// MaPO (§8.1), no reference: z = T (f(s e[policy,w]) - f(s e[policy,l])) with T = num_timesteps,
// loss = e[policy,w] + b softplus(-z) = e[policy,w] - b log sigmoid(z). b, s: params.mapo_beta,
// params.mapo_snr.
MethodOutput mapo(const PairErrors& errors, const MethodParams& params, int64_t num_timesteps);
// Diffusion-DPO: z = -0.5 beta Delta. Also discounted and uniform_ct (only their sampling differs).
MethodOutput uniform(const PairErrors& errors, const MethodParams& params);
// z = -0.5 beta c_t Delta. c_t: [B].
MethodOutput dde_single(const PairErrors& errors, const torch::Tensor& c_t,
                        const MethodParams& params);
// z = -0.5 beta lambda_t Delta + beta s C_t. lambda_t, C_t: [B]; C_t is a constant (detached).
MethodOutput dde_step(const PairErrors& errors, const torch::Tensor& lambda_t,
                      const torch::Tensor& C_t, const MethodParams& params);
// z = -0.5 beta c_t Delta + beta s C_t. c_t, C_t: [B]; C_t is a constant (detached).
MethodOutput dde(const PairErrors& errors, const torch::Tensor& c_t, const torch::Tensor& C_t,
                 const MethodParams& params);

// Dispatcher: looks c_t / lambda_t up for t ([B] int64) in the schedule. C_t: [B] float64, read
// only by dde_step and dde (required there, zeros allowed; may be undefined for the others).
MethodOutput compute_method(Method method, const PairErrors& errors, const torch::Tensor& t,
                            const torch::Tensor& C_t, const MethodParams& params,
                            const NoiseSchedule& schedule);

// Delta = (e[policy,w] - e[ref,w]) - (e[policy,l] - e[ref,l]), [B] float64 (keeps autograd).
torch::Tensor delta(const PairErrors& errors);

// d_t = -0.5 lambda_t Delta, the stepwise per-transition estimate fed to CorrectionEma (section 4).
// [B] float64, detached, on the errors' device.
torch::Tensor transition_estimate(const PairErrors& errors, const torch::Tensor& t,
                                  const NoiseSchedule& schedule);

// Credit weight k_t sigmoid(-z) (section 5): dL/d e[policy,w] = 0.5 beta k_t sigmoid(-z), with k_t
// = 1 (uniform, discounted, uniform_ct), c_t (dde_single, dde), lambda_t (dde_step). For sft, where
// dL/d e[policy,w] = 1, the weight is 1; for mapo, sigmoid(-z), the weight of its margin term.
// [B] float64, detached.
torch::Tensor credit_weight(Method method, const MethodOutput& output, const torch::Tensor& t,
                            const NoiseSchedule& schedule);

// Calibrated temperature (§7.1, method.temperature: calibrated), for dde_single and dde only (the
// config refuses it for the other methods): beta / G, G = exp(mean over t in [t_lo, t_hi) of
// ln c_t), the geometric mean of c_t over the timesteps the sampler can draw, so that the
// trajectory's middle (c_t = G) runs at the configured beta. Pass the sampler's window (all T:
// [0, T)). Throws dde::Error on beta not finite > 0 or a window outside [0, T].
double calibrated_beta(double beta, const NoiseSchedule& schedule, int64_t t_lo, int64_t t_hi);
// G alone (e.g. for the start-up log); same window rules.
double single_shot_geometric_mean(const NoiseSchedule& schedule, int64_t t_lo, int64_t t_hi);

// Where the credit goes, per step (§7.4): per-pair diagnostics summed in equal bins of t. Sums,
// not means, so that the trainer can add them over micro-batches, all-reduce them and divide by
// the pair count once.
// Rows of t_bin_sums().
constexpr int64_t kTBinPairs = 0;      // number of pairs
constexpr int64_t kTBinMisranked = 1;  // pairs with Delta > 0 (ranked the wrong way)
constexpr int64_t kTBinCredit = 2;     // sum of the credit k_t sigmoid(-z)
constexpr int64_t kTBinZ = 3;          // sum of z
constexpr int64_t kTBinRows = 4;

// [4, bins] float64 on t's device, bin = floor(t * bins / T): bins equal bins of t over [0, T).
// t: [B] int64; delta, credit, z: [B] floating point, on t's device (detached here). delta and z
// may be undefined (sft has neither): their rows are then zero. No host sync: t's values are not
// checked (compute_method has done that); one out of [0, T) is counted in the nearest end bin.
// On CUDA the sums are atomic adds, so their last bits may vary from run to run.
torch::Tensor t_bin_sums(const torch::Tensor& t, const torch::Tensor& delta,
                         const torch::Tensor& credit, const torch::Tensor& z, int64_t num_timesteps,
                         int64_t bins = 10);

}  // namespace dde::objective
