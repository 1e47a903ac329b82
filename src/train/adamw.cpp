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

void AdamW::zero_grad() { drop_grads(params_); }

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

}  // namespace dde::train
