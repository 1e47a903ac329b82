// Adafactor (Shazeer & Stern 2018), ported from transformers' `Adafactor.step`
// (transformers/optimization.py, 4.57) with the settings of the Diffusion-DPO SDXL launcher:
// lr external (scale_parameter=False, relative_step=False, warmup_init=False), beta1 None (no
// first moment), clip_threshold 1.0, decay_rate -0.8, eps (1e-30, 1e-3). Parameters with >= 2
// dimensions keep a factored second moment (row and column means over the last two dims), the
// others a full one.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include "dde/train/optimizer.hpp"

namespace dde::train {

struct AdafactorOptions {
  double eps1 = 1e-30;  // eps[0]: added to grad^2
  double clip_threshold = 1.0;
  double decay_rate = -0.8;  // beta2_t = 1 - step^decay_rate
  double weight_decay = 0.0;
};

class Adafactor final : public Optimizer {
 public:
  Adafactor(NamedTensors params, AdafactorOptions options);

  void step(double lr) override;
  void zero_grad() override;
  // "exp_avg_sq_row.<name>" and "exp_avg_sq_col.<name>" (factored) or "exp_avg_sq.<name>",
  // and "step.<name>" (int64 scalar: transformers' state["step"]).
  NamedTensors state() const override;
  void load_state(const NamedTensors& state, const std::string& where) override;

 private:
  struct ParamState {
    bool factored = false;
    torch::Tensor row, col;  // factored: shape[:-1] and shape[:-2] + shape[-1:]
    torch::Tensor full;      // not factored: shape
    torch::Tensor step;      // int64 scalar (CPU)
  };
  void update(torch::Tensor& p, const torch::Tensor& grad, ParamState& s, double lr) const;

  NamedTensors params_;
  AdafactorOptions options_;
  std::vector<ParamState> state_;
};

}  // namespace dde::train
