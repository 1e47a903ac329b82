#include "dde/train/adamw.hpp"

#include <ATen/ops/_fused_adamw.h>

#include <algorithm>
#include <cmath>

#include "dde/util/error.hpp"

namespace dde::train {

AdamW::AdamW(NamedTensors params, AdamWOptions options)
    : params_(std::move(params)), options_(options) {
  for (const auto& [name, p] : params_) {
    exp_avg_.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    exp_avg_sq_.push_back(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    steps_.push_back(
        torch::zeros({}, torch::TensorOptions().dtype(torch::kFloat32).device(p.device())));
  }
}

void AdamW::step(double lr) {
  std::vector<torch::Tensor> params, grads, exp_avg, exp_avg_sq, steps;
  for (size_t i = 0; i < params_.size(); ++i) {
    const torch::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    params.push_back(p);
    grads.push_back(p.grad());
    exp_avg.push_back(exp_avg_[i]);
    exp_avg_sq.push_back(exp_avg_sq_[i]);
    steps.push_back(steps_[i]);
  }
  if (params.empty()) return;
  torch::NoGradGuard no_grad;
  // torch.optim's fused path increments the step counters before the kernel.
  torch::_foreach_add_(steps, 1);
  at::_fused_adamw_(params, grads, exp_avg, exp_avg_sq, /*max_exp_avg_sqs=*/{}, steps, lr,
                    options_.beta1, options_.beta2, options_.weight_decay, options_.eps,
                    /*amsgrad=*/false, /*maximize=*/false);
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_) {
    if (p.grad().defined()) {
      p.mutable_grad() = torch::Tensor();
    }
  }
}

NamedTensors AdamW::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i)
    out.emplace_back("exp_avg." + params_[i].first, exp_avg_[i]);
  for (size_t i = 0; i < params_.size(); ++i)
    out.emplace_back("exp_avg_sq." + params_[i].first, exp_avg_sq_[i]);
  for (size_t i = 0; i < params_.size(); ++i)
    out.emplace_back("step." + params_[i].first, steps_[i]);
  return out;
}

void AdamW::load_state(const NamedTensors& state, const std::string& where) {
  const StateByName by_name(state.begin(), state.end());
  for (size_t i = 0; i < params_.size(); ++i) {
    load_state_entry(by_name, "exp_avg." + params_[i].first, exp_avg_[i], where);
    load_state_entry(by_name, "exp_avg_sq." + params_[i].first, exp_avg_sq_[i], where);
    load_state_entry(by_name, "step." + params_[i].first, steps_[i], where);
  }
}

int64_t AdamW::steps_taken() const {
  return steps_.empty() ? 0 : static_cast<int64_t>(steps_.front().item<float>());
}

double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  std::vector<torch::Tensor> grads;
  for (const torch::Tensor& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  if (grads.empty()) return 0.0;
  torch::NoGradGuard no_grad;
  const std::vector<torch::Tensor> norms = torch::_foreach_norm(grads, 2);
  const torch::Tensor total =
      torch::linalg_vector_norm(torch::stack(norms), 2, {}, false, torch::kFloat64);
  const double total_norm = total.item<double>();
  scale_to_max_norm(grads, total_norm, max_norm);
  return total_norm;
}

void scale_to_max_norm(const std::vector<torch::Tensor>& grads, double total_norm,
                       double max_norm) {
  if (grads.empty() || max_norm <= 0.0 || !std::isfinite(total_norm)) return;
  // torch.nn.utils.clip_grad_norm_: coef = max_norm / (total + 1e-6), clamped to 1.
  const double coef = std::min(1.0, max_norm / (total_norm + 1e-6));
  torch::NoGradGuard no_grad;
  if (coef < 1.0) torch::_foreach_mul_(grads, coef);
}

}  // namespace dde::train
