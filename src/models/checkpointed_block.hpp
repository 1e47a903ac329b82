// Running one traced UNet block, plainly or with activation checkpointing (libtorch-notes.md:
// there is no C++ torch.utils.checkpoint; this is a port of its reentrant CheckpointFunction).
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <functional>
#include <vector>

namespace dde::models::detail {

// prepare(true) runs before a block's forward and again before its recomputation in backward,
// each time with that pass's grad mode, and prepare(false) after each: LoRA sets its adapted
// layers' effective weights and puts the base weights back (unet.cpp). It must outlive the
// backward pass.
using BlockPrepare = std::function<void(bool)>;

// (*prepare)(true) for its lifetime and (*prepare)(false) however the scope ends; null: nothing.
class PrepareScope {
 public:
  explicit PrepareScope(const BlockPrepare* prepare) : prepare_(prepare) {
    if (prepare_ != nullptr) (*prepare_)(true);
  }
  ~PrepareScope() {
    if (prepare_ != nullptr) (*prepare_)(false);
  }
  PrepareScope(const PrepareScope&) = delete;
  PrepareScope& operator=(const PrepareScope&) = delete;

 private:
  const BlockPrepare* prepare_;
};

// module.forward(inputs) as a list of tensors (a tuple output is flattened).
std::vector<torch::Tensor> forward_tensors(torch::jit::Module& module,
                                           const std::vector<torch::Tensor>& inputs);

// The same outputs, but no activation inside the block is kept for backward: backward re-runs
// the block with grad on (RNG and autocast state restored as they were in forward) and
// back-propagates through the recomputation. `params` are the tensors that get gradients (the
// module's trainable parameters, or LoRA's adapters), passed as explicit inputs so that they get
// gradients even when no input requires grad (noisy latents do not; pytorch #7617). `prepare`
// (null: none) runs before the forward and before the recomputation.
std::vector<torch::Tensor> forward_checkpointed(torch::jit::Module& module,
                                                const std::vector<torch::Tensor>& inputs,
                                                const std::vector<torch::Tensor>& params,
                                                const BlockPrepare* prepare = nullptr);

}  // namespace dde::models::detail
