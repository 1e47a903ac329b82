#include "dde/train/adafactor.hpp"

#include <cmath>

namespace dde::train {
namespace {

// transformers Adafactor._rms: tensor.norm(2) / numel ** 0.5 (a 0-dim tensor).
torch::Tensor rms(const torch::Tensor& t) {
  return t.norm(2) / std::pow(static_cast<double>(t.numel()), 0.5);
}

}  // namespace

Adafactor::Adafactor(NamedTensors params, AdafactorOptions options)
    : params_(std::move(params)), options_(options) {
  for (const auto& [name, p] : params_) {
    const auto f32 = p.options().dtype(torch::kFloat32);  // transformers keeps state in fp32
    ParamState s;
    s.factored = p.dim() >= 2;
    if (s.factored) {
      std::vector<int64_t> col_shape(p.sizes().begin(), p.sizes().end() - 2);
      col_shape.push_back(p.size(-1));
      s.row = torch::zeros(p.sizes().slice(0, p.dim() - 1), f32);
      s.col = torch::zeros(col_shape, f32);
    } else {
      s.full = torch::zeros(p.sizes(), f32);
    }
    s.step = torch::zeros({}, torch::kInt64);
    state_.push_back(std::move(s));
  }
}

void Adafactor::step(double lr) {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    torch::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    update(p, p.grad(), state_[i], lr);
  }
}

// transformers Adafactor.step for one parameter, line by line (beta1 None, lr external).
void Adafactor::update(torch::Tensor& p, const torch::Tensor& grad_in, ParamState& s,
                       double lr) const {
  const bool low_precision = p.scalar_type() != torch::kFloat32;
  const torch::Tensor grad = grad_in.to(torch::kFloat32);
  torch::Tensor p32 = low_precision ? p.to(torch::kFloat32) : p;

  s.step += 1;
  const double beta2t =
      1.0 - std::pow(static_cast<double>(s.step.item<int64_t>()), options_.decay_rate);
  torch::Tensor update = grad.pow(2) + options_.eps1;
  if (s.factored) {
    s.row.mul_(beta2t).add_(update.mean({-1}), 1.0 - beta2t);
    s.col.mul_(beta2t).add_(update.mean({-2}), 1.0 - beta2t);
    // _approx_sq_grad: rsqrt(row / mean(row)) [..., R, 1] x rsqrt(col) [..., 1, C].
    const torch::Tensor r_factor =
        (s.row / s.row.mean({-1}, /*keepdim=*/true)).rsqrt_().unsqueeze(-1);
    const torch::Tensor c_factor = s.col.unsqueeze(-2).rsqrt();
    update = torch::mul(r_factor, c_factor);
    update.mul_(grad);
  } else {
    s.full.mul_(beta2t).add_(update, 1.0 - beta2t);
    update = s.full.rsqrt().mul_(grad);
  }
  update.div_((rms(update) / options_.clip_threshold).clamp_(1.0));
  update.mul_(lr);
  if (options_.weight_decay != 0.0) p32.add_(p32, -options_.weight_decay * lr);
  p32.add_(-update);
  if (low_precision) p.copy_(p32);
}

void Adafactor::zero_grad() { drop_grads(params_); }

NamedTensors Adafactor::state() const {
  NamedTensors out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    const ParamState& s = state_[i];
    if (s.factored) {
      out.emplace_back("exp_avg_sq_row." + name, s.row);
      out.emplace_back("exp_avg_sq_col." + name, s.col);
    } else {
      out.emplace_back("exp_avg_sq." + name, s.full);
    }
    out.emplace_back("step." + name, s.step);
  }
  return out;
}

void Adafactor::load_state(const NamedTensors& state, const std::string& where) {
  const StateByName by_name(state.begin(), state.end());
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].first;
    ParamState& s = state_[i];
    if (s.factored) {
      load_state_entry(by_name, "exp_avg_sq_row." + name, s.row, where);
      load_state_entry(by_name, "exp_avg_sq_col." + name, s.col, where);
    } else {
      load_state_entry(by_name, "exp_avg_sq." + name, s.full, where);
    }
    load_state_entry(by_name, "step." + name, s.step, where);
  }
}

}  // namespace dde::train
