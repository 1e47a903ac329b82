// The UNet of a manifest, run unit by unit in diffusers' order (docs/formats.md §1):
//   input -> down units (push skips) -> mid -> up units (pop skips) -> output,
// one unit per resnet (+ attention) and per sampler, as diffusers' own gradient checkpointing.
// The trainable policy can recompute each block in backward (gradient checkpointing); a frozen
// reference can be held in bf16 and then runs under bf16 autocast.
//
// LoRA (docs/method.md §8.2): a traced graph cannot be given new layers, so the adapters live
// here. Each adapted linear layer's weight W0 stays the module's parameter at rest; a policy
// with adapters sets it to W0 + (alpha / r) B A for the duration of each block's forward (and of
// its recomputation under gradient checkpointing), and puts W0 back after. Only A and B train.
// base_view() is the same modules without the adapters: the reference, with no second copy.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "dde/models/conditioning.hpp"
#include "dde/models/manifest.hpp"

namespace dde::models {

struct LoraOptions {
  int64_t rank = 0;  // 0: no adapters (a trainable UNet trains every weight)
  double alpha = 0;  // scale alpha / rank; 0 = rank
  // Linear layers adapted: those whose diffusers module name ends with one of these.
  std::vector<std::string> targets;
  uint64_t seed = 0;  // draws A (kaiming-uniform, as peft); B starts at 0
};

struct UNetOptions {
  bool trainable = false;
  bool gradient_checkpointing = false;        // recompute each block in backward (trainable only)
  torch::ScalarType dtype = torch::kFloat32;  // weights; kBFloat16 for a frozen model only
  // An fp32 model's output head runs without autocast (fp32 noise prediction under bf16).
  bool fp32_output_head = true;
  LoraOptions lora;  // trainable only: rank > 0 trains adapters instead of the weights
};

class UNet {
 public:
  UNet(const Manifest& manifest, const torch::Device& device, UNetOptions options);
  // x: [B, C, h, w], t: [B] int64 -> predicted eps [B, C, h, w]
  torch::Tensor predict_noise(const torch::Tensor& x, const torch::Tensor& t,
                              const Conditioning& cond);

  // The trained tensors under their diffusers names, in block order: the UNet's parameters, or
  // with LoRA the adapters ("<module>.lora_A.weight" [r, in], "<module>.lora_B.weight" [out, r]).
  const std::vector<std::pair<std::string, torch::Tensor>>& named_parameters() const {
    return params_;
  }
  std::vector<torch::Tensor> parameters() const;
  // Copies values in (shapes and dtypes checked); `where` names the source for errors.
  void load_parameters(const std::vector<std::pair<std::string, torch::Tensor>>& values,
                       const std::string& where);
  bool is_sdxl() const { return sdxl_; }

  // LoRA: whether this UNet has adapters, and the reference that shares its modules and runs
  // them without (frozen). The view must not outlive this UNet.
  bool has_adapters() const { return lora_ != nullptr && adapters_on_; }
  std::unique_ptr<UNet> base_view() const;
  // The adapted layers' diffusers module names, in block order (empty without LoRA).
  std::vector<std::string> adapted_modules() const;

 private:
  struct Lora;  // the adapters and the base weights they patch (unet.cpp)
  struct Block {
    UNetBlockInfo info;
    torch::jit::Module module;
    std::vector<torch::Tensor> params;  // those that get gradients (weights, or adapters)
    std::shared_ptr<std::function<void(bool)>> prepare;  // LoRA: patch (true) / restore (false)
  };
  UNet() = default;
  void add_adapters(const Manifest& manifest);
  torch::Tensor run_output_head(Block& block, const torch::Tensor& h);
  std::vector<torch::Tensor> run(Block& block, const std::vector<torch::Tensor>& inputs,
                                 size_t expected_outputs);

  bool sdxl_ = false;
  torch::Device device_ = torch::kCPU;
  UNetOptions options_;
  std::vector<Block> blocks_;
  std::vector<std::pair<std::string, torch::Tensor>> params_;
  std::shared_ptr<Lora> lora_;  // shared with base views
  bool adapters_on_ = false;
};

}  // namespace dde::models
