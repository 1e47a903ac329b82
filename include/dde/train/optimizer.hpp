// The optimizer interface the trainer steps through, and the factory that picks one by
// `optim.name`: adamw (fused, torch.optim.AdamW) or adafactor (transformers' Adafactor as the
// Diffusion-DPO SDXL launcher configures it). State is exposed as named tensors, keyed by
// parameter name, so checkpoints (and optimizer-state shards) can be written and read by name.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dde/config/config.hpp"

namespace dde::train {

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One update at learning rate `lr` from the current .grad() of every parameter; parameters
  // without a gradient are left alone (their state does not advance).
  virtual void step(double lr) = 0;
  // Drops every gradient (set to undefined, as zero_grad(set_to_none=True)).
  virtual void zero_grad() = 0;
  // Every state tensor, named "<kind>.<parameter name>".
  virtual NamedTensors state() const = 0;
  // Copies the entries this optimizer needs from `state` (extra entries are ignored); a missing
  // or misshapen entry is a dde::Error naming `where`.
  virtual void load_state(const NamedTensors& state, const std::string& where) = 0;
};

// optim.name -> AdamW (beta1, beta2, eps, weight_decay) or Adafactor (weight_decay; see
// adafactor.hpp for the fixed settings) over `params`.
std::unique_ptr<Optimizer> make_optimizer(const config::OptimConfig& optim, NamedTensors params);

// Helper of load_state(): copies by_name[key] into `into` (same shape), or throws a dde::Error
// naming `where` and `key`.
using StateByName = std::map<std::string, torch::Tensor>;
void load_state_entry(const StateByName& by_name, const std::string& key, torch::Tensor& into,
                      const std::string& where);

// Drops the gradient of every parameter (set to undefined: zero_grad(set_to_none=True)).
void drop_grads(NamedTensors& params);

// The squared global 2-norm of `grads` as a float64 tensor [1] (zero for none): one fused
// reduction (_foreach_norm), on the gradients' device.
torch::Tensor grad_norm_squared(const std::vector<torch::Tensor>& grads,
                                const torch::TensorOptions& options);

// torch.nn.utils.clip_grad_norm_: returns the total 2-norm before clipping (float64);
// max_norm <= 0 only measures.
double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm);
// Its second half: scales `grads` by max_norm / (total_norm + 1e-6) when that is below 1
// (and total_norm is finite, max_norm > 0).
void scale_to_max_norm(const std::vector<torch::Tensor>& grads, double total_norm, double max_norm);

}  // namespace dde::train
