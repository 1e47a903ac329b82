// Loading TorchScript components for training (libtorch-notes.md: graph-executor
// optimisation off so ops run through eager autograd; requires_grad set explicitly).
#pragma once

#include <torch/script.h>

#include <string>

namespace dde::models {

// Switches the graph executor's optimisation off, once per process.
void configure_jit_for_training();

// Loads a TorchScript file onto `device` with its floating-point weights in `dtype` (cast on
// the CPU first, so a bf16 model never occupies fp32 room on the GPU); a bad file is a
// dde::Error naming it.
torch::jit::Module load_component(const std::string& path, const torch::Device& device,
                                  const std::string& what,
                                  torch::ScalarType dtype = torch::kFloat32);

// Sets requires_grad on every parameter and switches train/eval mode.
void set_trainable(torch::jit::Module& module, bool trainable);

}  // namespace dde::models
