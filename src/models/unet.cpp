#include "dde/models/unet.hpp"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <algorithm>
#include <cmath>
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

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The index of the first target that names `module` (the whole name or its last dotted parts,
// as peft's target_modules), or -1.
int matching_target(const std::string& module, const std::vector<std::string>& targets) {
  for (size_t i = 0; i < targets.size(); ++i) {
    if (module == targets[i] || ends_with(module, "." + targets[i])) return static_cast<int>(i);
  }
  return -1;
}

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

struct UNet::Lora {
  struct Adapter {
    std::string module;        // the adapted layer's diffusers module name
    torch::jit::Module owner;  // the traced submodule whose `weight` is patched
    torch::Tensor base;        // W0 [out, in], frozen: the attribute's value at rest
    torch::Tensor a, b;        // [r, in] and [out, r], float32, trained
  };
  double scale = 1.0;  // alpha / rank
  std::vector<Adapter> adapters;

  // The layers `which` get W0 + scale B A (on) or W0 back (off). The sum is formed in fp32 with
  // autocast off (an autocast matmul would round B A to bf16); the layer's own op then casts
  // it as it casts any weight. With B = 0 the sum is W0 exactly.
  void set(const std::vector<size_t>& which, bool on) const {
    for (const size_t i : which) {
      const Adapter& adapter = adapters[i];
      torch::jit::Module owner = adapter.owner;
      if (!on) {
        owner.setattr("weight", adapter.base);
        continue;
      }
      const AutocastOff off(adapter.base.device().type());
      owner.setattr("weight", torch::addmm(adapter.base, adapter.b, adapter.a, 1.0, scale));
    }
  }
};

UNet::UNet(const Manifest& manifest, const torch::Device& device, UNetOptions options)
    : sdxl_(manifest.added_cond.has_value()), device_(device), options_(options) {
  if (options_.trainable && options_.dtype != torch::kFloat32) {
    throw Error({"a trainable UNet must hold fp32 weights", "UNet", "fp32",
                 c10::toString(options_.dtype), "internal error: only frozen models are cast"});
  }
  std::set<std::string> seen;
  for (const UNetBlockInfo& info : manifest.unet_blocks) {
    Block block{info,
                load_component(info.file, device, "UNet block " + info.name, options_.dtype),
                {},
                nullptr};
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
  if (options_.lora.rank > 0) {
    if (!options_.trainable || options_.dtype != torch::kFloat32) {
      throw Error({"LoRA on a frozen or low-precision UNet", "UNet", "a trainable fp32 UNet",
                   "frozen or " + std::string(c10::toString(options_.dtype)),
                   "internal error: adapters are for the policy"});
    }
    add_adapters(manifest);
  }
}

void UNet::add_adapters(const Manifest& manifest) {
  const LoraOptions& o = options_.lora;
  lora_ = std::make_shared<Lora>();
  lora_->scale =
      (o.alpha > 0 ? o.alpha : static_cast<double>(o.rank)) / static_cast<double>(o.rank);
  std::vector<bool> used(o.targets.size(), false);
  at::Generator generator = at::detail::createCPUGenerator(o.seed);
  params_.clear();
  for (Block& block : blocks_) {
    set_trainable(block.module, false);
    block.params.clear();
    std::vector<size_t> indices;
    for (const auto& item : block.module.named_parameters(/*recurse=*/true)) {
      const std::string name = diffusers_name(block.info, item.name);
      if (!ends_with(name, ".weight")) continue;
      const std::string module = name.substr(0, name.size() - 7);
      const int target = matching_target(module, o.targets);
      if (target < 0) continue;
      used[static_cast<size_t>(target)] = true;
      if (item.value.dim() != 2) {
        throw Error({"a LoRA target is not a linear layer",
                     "model.lora.targets: '" + o.targets[static_cast<size_t>(target)] +
                         "' matches " + module + " (" + manifest.path + ")",
                     "linear layers only (2-D weights), e.g. to_q, to_k, to_v, to_out.0",
                     c10::str(item.value.dim(), "-D weight ", item.value.sizes()),
                     "drop it from model.lora.targets, or name the layer more fully"});
      }
      torch::jit::Module owner = block.module;
      const std::string traced = item.name.substr(0, item.name.size() - 7);
      for (size_t start = 0; !traced.empty() && start <= traced.size();) {  // a.b.0 -> a, b, 0
        const size_t dot = std::min(traced.find('.', start), traced.size());
        owner = owner.attr(traced.substr(start, dot - start)).toModule();
        start = dot + 1;
      }
      const int64_t out = item.value.size(0), in = item.value.size(1);
      // peft's init: A kaiming-uniform with a = sqrt(5) (bound 1 / sqrt(in)), B zero.
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      torch::Tensor a = torch::empty({o.rank, in}, torch::kFloat32)
                            .uniform_(-bound, bound, generator)
                            .to(device_)
                            .requires_grad_(true);
      torch::Tensor b = torch::zeros({out, o.rank}, torch::dtype(torch::kFloat32).device(device_))
                            .requires_grad_(true);
      lora_->adapters.push_back({module, owner, item.value, a, b});
      indices.push_back(lora_->adapters.size() - 1);
      params_.emplace_back(module + ".lora_A.weight", a);
      params_.emplace_back(module + ".lora_B.weight", b);
      block.params.push_back(a);
      block.params.push_back(b);
    }
    if (!indices.empty()) {
      block.prepare = std::make_shared<std::function<void(bool)>>(
          [lora = lora_, indices](bool on) { lora->set(indices, on); });
    }
  }
  for (size_t i = 0; i < o.targets.size(); ++i) {
    if (used[i]) continue;
    throw Error({"a LoRA target matches no layer of the UNet",
                 "model.lora.targets: '" + o.targets[i] + "' (" + manifest.path + ")",
                 "the end of a linear layer's diffusers name, e.g. to_q, to_k, to_v, to_out.0, "
                 "proj_in, ff.net.2",
                 "no such layer", "check the spelling: the names are peft's target_modules"});
  }
  adapters_on_ = true;
}

std::unique_ptr<UNet> UNet::base_view() const {
  if (lora_ == nullptr) {
    throw Error({"base view of a UNet without adapters", "UNet::base_view", "model.lora.rank > 0",
                 "no adapters", "internal error"});
  }
  std::unique_ptr<UNet> view(new UNet());
  view->sdxl_ = sdxl_;
  view->device_ = device_;
  view->options_ = options_;
  view->options_.trainable = false;
  view->options_.gradient_checkpointing = false;
  view->options_.lora = LoraOptions{};
  view->blocks_ = blocks_;  // the same modules (handles), run without their prepare
  for (Block& block : view->blocks_) block.params.clear();
  view->lora_ = lora_;
  view->adapters_on_ = false;
  return view;
}

std::vector<std::string> UNet::adapted_modules() const {
  std::vector<std::string> names;
  if (lora_ == nullptr) return names;
  for (const Lora::Adapter& adapter : lora_->adapters) names.push_back(adapter.module);
  return names;
}

std::vector<torch::Tensor> UNet::run(Block& block, const std::vector<torch::Tensor>& inputs,
                                     size_t expected_outputs) {
  const bool recompute =
      options_.gradient_checkpointing && options_.trainable && torch::GradMode::is_enabled();
  const detail::BlockPrepare* prepare = adapters_on_ ? block.prepare.get() : nullptr;
  std::vector<torch::Tensor> out;
  if (recompute) {
    out = detail::forward_checkpointed(block.module, inputs, block.params, prepare);
  } else {
    const detail::PrepareScope prepared(prepare);
    out = detail::forward_tensors(block.module, inputs);
  }
  if (out.size() != expected_outputs) {
    throw Error({"UNet block returned an unexpected number of tensors", block.info.file,
                 std::to_string(expected_outputs), std::to_string(out.size()),
                 "re-export the model with python -m dde_tools.export_models"});
  }
  return out;
}

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
