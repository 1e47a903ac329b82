// AdamW over a fixed list of named parameters, one fused kernel call per step
// (at::_fused_adamw_, the kernel behind torch.optim.AdamW(fused=True)), with its state
// exposed as named tensors for checkpoints.
#pragma once

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dde/train/optimizer.hpp"

namespace dde::train {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

class AdamW final : public Optimizer {
 public:
  AdamW(NamedTensors params, AdamWOptions options);

  void step(double lr) override;
  void zero_grad() override;
  // "exp_avg.<name>", "exp_avg_sq.<name>" and "step.<name>" (float32 scalar, as torch.optim).
  NamedTensors state() const override;
  void load_state(const NamedTensors& state, const std::string& where) override;
  int64_t steps_taken() const;

 private:
  NamedTensors params_;
  AdamWOptions options_;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_, steps_;
};

}  // namespace dde::train
