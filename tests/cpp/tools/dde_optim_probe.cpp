// Runs one of our optimizers over a recorded gradient sequence, for
// tests/python/test_adafactor_parity.py: reads `param.<name>` (initial values), `grad.<k>.<name>`
// (the gradient of step k) and `lr` (float64 [steps]) from --input, steps the optimizer chosen by
// --optimizer (make_optimizer, as the trainer builds it), writes the final `param.<name>` and the
// optimizer state to --output.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <iostream>
#include <map>

#include "dde/checkpoint/safetensors.hpp"
#include "dde/train/optimizer.hpp"
#include "dde/util/error.hpp"

namespace {

using dde::checkpoint::NamedTensors;

NamedTensors with_prefix(const NamedTensors& all, const std::string& prefix) {
  NamedTensors out;
  for (const auto& [name, t] : all) {
    if (name.rfind(prefix, 0) == 0) out.emplace_back(name.substr(prefix.size()), t);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dde optimizer probe"};
  std::string input, output;
  dde::config::OptimConfig optim;
  app.add_option("--input", input, "safetensors with param.*, grad.<k>.*, lr")->required();
  app.add_option("--output", output, "safetensors: final param.* and the optimizer state")
      ->required();
  app.add_option("--optimizer", optim.name, "adamw | adafactor");
  app.add_option("--weight-decay", optim.weight_decay, "optim.weight_decay");
  CLI11_PARSE(app, argc, argv);

  try {
    const NamedTensors all = dde::checkpoint::load_safetensors(input).tensors;
    NamedTensors params = with_prefix(all, "param.");
    for (auto& [name, p] : params) p = p.clone().requires_grad_(true);
    const auto lr_it =
        std::find_if(all.begin(), all.end(), [](const auto& e) { return e.first == "lr"; });
    if (params.empty() || lr_it == all.end()) {
      throw dde::Error({"probe input incomplete", input, "param.* and lr", "missing", ""});
    }
    const torch::Tensor lr = lr_it->second.to(torch::kFloat64);
    std::unique_ptr<dde::train::Optimizer> optimizer = dde::train::make_optimizer(optim, params);
    for (int64_t k = 0; k < lr.numel(); ++k) {
      const NamedTensors grads = with_prefix(all, "grad." + std::to_string(k) + ".");
      const std::map<std::string, torch::Tensor> by_name(grads.begin(), grads.end());
      for (auto& [name, p] : params) p.mutable_grad() = by_name.at(name).clone();
      optimizer->step(lr[k].item<double>());
      optimizer->zero_grad();
    }
    NamedTensors out;
    for (const auto& [name, p] : params) out.emplace_back("param." + name, p.detach());
    for (const auto& [name, t] : optimizer->state()) out.emplace_back("state." + name, t);
    dde::checkpoint::save_safetensors(output, out);
  } catch (const std::exception& e) {
    std::cerr << "dde_optim_probe: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
