#include "dde/models/torchscript.hpp"

#include <torch/csrc/jit/runtime/graph_executor.h>

#include <mutex>

#include "dde/util/error.hpp"

namespace dde::models {

void configure_jit_for_training() {
  static std::once_flag once;
  std::call_once(once, [] {
    torch::jit::getProfilingMode() = false;
    torch::jit::setGraphExecutorOptimize(false);
  });
}

torch::jit::Module load_component(const std::string& path, const torch::Device& device,
                                  const std::string& what, torch::ScalarType dtype) {
  configure_jit_for_training();
  try {
    if (dtype == torch::kFloat32) return torch::jit::load(path, device);
    torch::jit::Module module = torch::jit::load(path, torch::kCPU);
    // Only floating-point tensors change dtype (Module::to would also cast integer buffers such
    // as CLIP's position_ids, which index an embedding).
    torch::NoGradGuard no_grad;
    for (const auto& p : module.named_parameters(/*recurse=*/true)) {
      if (p.value.is_floating_point()) p.value.set_data(p.value.to(dtype));
    }
    for (const auto& b : module.named_buffers(/*recurse=*/true)) {
      if (b.value.is_floating_point()) b.value.set_data(b.value.to(dtype));
    }
    module.to(device);
    return module;
  } catch (const c10::Error& e) {
    throw Error({"cannot load TorchScript " + what, path,
                 "a TorchScript archive from export_models", e.what_without_backtrace(),
                 "re-export the model with the pinned torch (requirements.txt)"});
  }
}

void set_trainable(torch::jit::Module& module, bool trainable) {
  for (torch::Tensor p : module.parameters(/*recurse=*/true)) {
    p.set_requires_grad(trainable);
  }
  module.train(trainable);
}

}  // namespace dde::models
