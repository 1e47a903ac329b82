#include "dde/models/unet.hpp"

#include <ATen/autocast_mode.h>

#include <map>
#include <set>

#include "checkpointed_block.hpp"
#include "dde/models/autocast.hpp"
#include "dde/models/torchscript.hpp"
#include "dde/util/error.hpp"

namespace dde::models {
namespace {

// The diffusers state-dict name of a traced parameter, by the unit's first matching prefix rule.
std::string diffusers_name(const UNetBlockInfo& info, const std::string& traced) {
  for (const auto& [prefix, diffusers] : info.params) {
    if (traced.rfind(prefix, 0) == 0) return diffusers + traced.substr(prefix.size());
  }
  throw Error({"UNet parameter matches no prefix rule of its unit", info.file + ": " + traced,
               "a name starting with one of the manifest's unet.blocks[].params prefixes", traced,
               "re-export the model with python -m dde_tools.export_models"});
}

}  // namespace

UNet::UNet(const Manifest& manifest, const torch::Device& device, UNetOptions options)
    : sdxl_(manifest.added_cond.has_value()), device_(device), options_(options) {
  if (options_.trainable && options_.dtype != torch::kFloat32) {
    throw Error({"a trainable UNet must hold fp32 weights", "UNet", "fp32",
                 c10::toString(options_.dtype), "internal error: only frozen models are cast"});
  }
  std::set<std::string> seen;
  for (const UNetBlockInfo& info : manifest.unet_blocks) {
    Block block{
        info, load_component(info.file, device, "UNet block " + info.name, options_.dtype), {}};
    set_trainable(block.module, options_.trainable);
    for (const auto& item : block.module.named_parameters(/*recurse=*/true)) {
      std::string name = diffusers_name(info, item.name);
      if (!seen.insert(name).second) {
        throw Error({"UNet parameter in two blocks", info.file + ": " + name, "each once", "twice",
                     "re-export the model with python -m dde_tools.export_models"});
      }
      params_.emplace_back(std::move(name), item.value);
      if (options_.trainable) block.params.push_back(item.value);
    }
    blocks_.push_back(std::move(block));
  }
}

std::vector<torch::Tensor> UNet::run(Block& block, const std::vector<torch::Tensor>& inputs,
                                     size_t expected_outputs) {
  const bool recompute =
      options_.gradient_checkpointing && options_.trainable && torch::GradMode::is_enabled();
  std::vector<torch::Tensor> out =
      recompute ? detail::forward_checkpointed(block.module, inputs, block.params)
                : detail::forward_tensors(block.module, inputs);
  if (out.size() != expected_outputs) {
    throw Error({"UNet block returned an unexpected number of tensors", block.info.file,
                 std::to_string(expected_outputs), std::to_string(out.size()),
                 "re-export the model with python -m dde_tools.export_models"});
  }
  return out;
}

namespace {
// Autocast off for one device type within a scope (restored after).
class AutocastOff {
 public:
  explicit AutocastOff(c10::DeviceType type)
      : type_(type), previous_(at::autocast::is_autocast_enabled(type)) {
    at::autocast::set_autocast_enabled(type_, false);
  }
  ~AutocastOff() { at::autocast::set_autocast_enabled(type_, previous_); }
  AutocastOff(const AutocastOff&) = delete;
  AutocastOff& operator=(const AutocastOff&) = delete;

 private:
  c10::DeviceType type_;
  bool previous_;
};
}  // namespace

// conv_out makes the noise prediction whose squared error against eps forms Delta: a difference
// of near-equal errors that beta amplifies. Under bf16 autocast an fp32 model runs it in fp32, so
// bf16 rounding (~4e-3 relative) does not enter Delta; the cost is one conv at the output size.
torch::Tensor UNet::run_output_head(Block& block, const torch::Tensor& h) {
  if (!options_.fp32_output_head || options_.dtype != torch::kFloat32 ||
      !at::autocast::is_autocast_enabled(device_.type())) {
    return run(block, {h}, 1)[0];
  }
  const AutocastOff fp32(device_.type());
  return run(block, {h.to(torch::kFloat32)}, 1)[0];
}

torch::Tensor UNet::predict_noise(const torch::Tensor& x, const torch::Tensor& t,
                                  const Conditioning& cond) {
  // A bf16 frozen UNet needs autocast whatever train.precision says: its traced graph mixes
  // fp32 constants (the time embedding) with its bf16 weights.
  const AutocastScope frozen_autocast(device_.type(), options_.dtype == torch::kBFloat16);
  std::vector<torch::Tensor> input_args{x, t.to(device_, torch::kLong, /*non_blocking=*/true)};
  if (sdxl_) {
    if (!cond.pooled.defined() || !cond.time_ids.defined()) {
      throw Error({"sdxl UNet needs pooled text embeddings and time ids", "UNet::predict_noise",
                   "both defined", "missing", ""});
    }
    input_args.push_back(cond.pooled);
    input_args.push_back(cond.time_ids.to(device_, torch::kFloat32, /*non_blocking=*/true));
  }
  std::vector<torch::Tensor> skips;  // pushed by the input and down units, popped by the up units
  torch::Tensor h;
  torch::Tensor emb;
  for (Block& block : blocks_) {
    const UNetBlockInfo& info = block.info;
    if (info.kind == UNetBlockKind::kInput) {
      const auto out = run(block, input_args, 2);
      h = out[0];
      emb = out[1];
    } else if (info.kind == UNetBlockKind::kOutput) {
      h = run_output_head(block, h);
    } else {
      std::vector<torch::Tensor> args{h, emb, cond.text};
      args.insert(args.end(), skips.end() - info.pops, skips.end());
      skips.resize(skips.size() - static_cast<size_t>(info.pops));
      if (info.takes_size) args.push_back(skips.back());  // upsample to the next skip's size
      h = run(block, args, 1)[0];
    }
    if (info.push_output) skips.push_back(h);
  }
  return h;
}

std::vector<torch::Tensor> UNet::parameters() const {
  std::vector<torch::Tensor> out;
  out.reserve(params_.size());
  for (const auto& [name, p] : params_) out.push_back(p);
  return out;
}

void UNet::load_parameters(const std::vector<std::pair<std::string, torch::Tensor>>& values,
                           const std::string& where) {
  std::map<std::string, torch::Tensor> by_name(values.begin(), values.end());
  if (by_name.size() != params_.size()) {
    throw Error({"parameter count mismatch", where,
                 std::to_string(params_.size()) + " UNet tensors", std::to_string(by_name.size()),
                 "was the checkpoint made from another model?"});
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, p] : params_) {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      throw Error({"parameter missing", where + ": " + name, "present", "absent",
                   "was the checkpoint made from another model?"});
    }
    if (it->second.sizes() != p.sizes() || it->second.scalar_type() != p.scalar_type()) {
      throw Error({"parameter shape or dtype mismatch", where + ": " + name,
                   c10::str(p.sizes(), " ", p.scalar_type()),
                   c10::str(it->second.sizes(), " ", it->second.scalar_type()), ""});
    }
    p.copy_(it->second);
  }
}

}  // namespace dde::models
