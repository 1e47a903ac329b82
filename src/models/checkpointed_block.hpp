// Running one traced UNet block, plainly or with activation checkpointing (libtorch-notes.md:
// there is no C++ torch.utils.checkpoint; this is a port of its reentrant CheckpointFunction).
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <vector>

namespace dde::models::detail {

// module.forward(inputs) as a list of tensors (a tuple output is flattened).
std::vector<torch::Tensor> forward_tensors(torch::jit::Module& module,
                                           const std::vector<torch::Tensor>& inputs);

// The same outputs, but no activation inside the block is kept for backward: backward re-runs
// the block with grad on (RNG and autocast state restored as they were in forward) and
// back-propagates through the recomputation. `params` are the module's trainable parameters,
// passed as explicit inputs so that they get gradients even when no input requires grad
// (noisy latents do not; pytorch #7617).
std::vector<torch::Tensor> forward_checkpointed(torch::jit::Module& module,
                                                const std::vector<torch::Tensor>& inputs,
                                                const std::vector<torch::Tensor>& params);

}  // namespace dde::models::detail
