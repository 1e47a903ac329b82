#include "dde/train/optimizer.hpp"

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

}  // namespace dde::train
