#include "dde/models/torchscript.hpp"

#include <torch/csrc/jit/runtime/graph_executor.h>

#include <mutex>
#include <string>
#include <vector>

#include "dde/util/error.hpp"

namespace dde::models {

void configure_jit_for_training() {
  static std::once_flag once;
  std::call_once(once, [] {
    torch::jit::getProfilingMode() = false;
    torch::jit::setGraphExecutorOptimize(false);
  });
}

namespace {

// Once per load: every floating-point parameter and buffer finite (one host read for all of them).
// A NaN weight in an export would make every loss NaN, reported far from its cause.
void require_finite(const torch::jit::Module& module, const std::string& path,
                    const std::string& what) {
  torch::NoGradGuard no_grad;
  std::vector<std::string> names;
  std::vector<torch::Tensor> flags;
  const auto add = [&](const std::string& name, const torch::Tensor& t) {
    if (!t.is_floating_point() || t.numel() == 0) return;
    names.push_back(name);
    flags.push_back(torch::isfinite(t).all());
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) add(p.name, p.value);
  for (const auto& b : module.named_buffers(/*recurse=*/true)) add(b.name, b.value);
  if (flags.empty()) return;
  const torch::Tensor ok = torch::stack(flags).to(torch::kCPU);
  for (size_t i = 0; i < names.size(); ++i) {
    if (ok[static_cast<int64_t>(i)].item<bool>()) continue;
    throw Error({"non-finite weights in an exported model", path + ": " + names[i],
                 "finite values in every parameter and buffer of the " + what, "NaN or Inf values",
                 "re-export the model from a healthy pipeline (dde_tools.export_models)"});
  }
}

torch::jit::Module load_archive(const std::string& path, const torch::Device& device,
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

}  // namespace

torch::jit::Module load_component(const std::string& path, const torch::Device& device,
                                  const std::string& what, torch::ScalarType dtype) {
  torch::jit::Module module = load_archive(path, device, what, dtype);
  require_finite(module, path, what);
  return module;
}

void set_trainable(torch::jit::Module& module, bool trainable) {
  for (torch::Tensor p : module.parameters(/*recurse=*/true)) {
    p.set_requires_grad(trainable);
  }
  module.train(trainable);
}

}  // namespace dde::models
