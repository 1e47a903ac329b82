#include "dde/train/optimizer.hpp"

#include <algorithm>
#include <cmath>

#include "dde/train/adafactor.hpp"
#include "dde/train/adamw.hpp"
#include "dde/util/error.hpp"

namespace dde::train {

std::unique_ptr<Optimizer> make_optimizer(const config::OptimConfig& optim, NamedTensors params) {
  if (optim.name == "adamw") {
    AdamWOptions o;
    o.beta1 = optim.beta1;
    o.beta2 = optim.beta2;
    o.eps = optim.eps;
    o.weight_decay = optim.weight_decay;
    return std::make_unique<AdamW>(std::move(params), o);
  }
  if (optim.name == "adafactor") {
    AdafactorOptions o;
    o.weight_decay = optim.weight_decay;
    return std::make_unique<Adafactor>(std::move(params), o);
  }
  throw Error({"unknown optimizer", "optim.name", "adamw or adafactor", optim.name, ""});
}

void load_state_entry(const StateByName& by_name, const std::string& key, torch::Tensor& into,
                      const std::string& where) {
  const auto it = by_name.find(key);
  if (it == by_name.end()) {
    throw Error({"optimizer state missing", where + ": " + key, "present", "absent",
                 "the checkpoint belongs to another model or optimizer, or is damaged"});
  }
  if (it->second.sizes() != into.sizes() || it->second.scalar_type() != into.scalar_type()) {
    throw Error({"optimizer state shape or dtype mismatch", where + ": " + key,
                 c10::str(into.scalar_type(), into.sizes()),
                 c10::str(it->second.scalar_type(), it->second.sizes()),
                 "the checkpoint belongs to another model or optimizer"});
  }
  torch::NoGradGuard no_grad;
  into.copy_(it->second);
}

void drop_grads(NamedTensors& params) {
  for (auto& [name, p] : params) {
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }
}

torch::Tensor grad_norm_squared(const std::vector<torch::Tensor>& grads,
                                const torch::TensorOptions& options) {
  torch::NoGradGuard no_grad;
  if (grads.empty()) return torch::zeros({1}, options.dtype(torch::kFloat64));
  const std::vector<torch::Tensor> norms = torch::_foreach_norm(grads, 2);
  return torch::linalg_vector_norm(torch::stack(norms), 2, {}, false, torch::kFloat64)
      .pow(2)
      .reshape({1});
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
