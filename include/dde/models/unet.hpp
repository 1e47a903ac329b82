// The UNet of a manifest, run unit by unit in diffusers' order (docs/formats.md §1):
//   input -> down units (push skips) -> mid -> up units (pop skips) -> output,
// one unit per resnet (+ attention) and per sampler, as diffusers' own gradient checkpointing.
// The trainable policy can recompute each block in backward (gradient checkpointing); a frozen
// reference can be held in bf16 and then runs under bf16 autocast.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dde/models/conditioning.hpp"
#include "dde/models/manifest.hpp"

namespace dde::models {

struct UNetOptions {
  bool trainable = false;
  bool gradient_checkpointing = false;        // recompute each block in backward (trainable only)
  torch::ScalarType dtype = torch::kFloat32;  // weights; kBFloat16 for a frozen model only
  // An fp32 model's output head runs without autocast (fp32 noise prediction under bf16).
  bool fp32_output_head = true;
};

class UNet {
 public:
  UNet(const Manifest& manifest, const torch::Device& device, UNetOptions options);
  // x: [B, C, h, w], t: [B] int64 -> predicted eps [B, C, h, w]
  torch::Tensor predict_noise(const torch::Tensor& x, const torch::Tensor& t,
                              const Conditioning& cond);

  // Parameters under their diffusers names, in block order.
  const std::vector<std::pair<std::string, torch::Tensor>>& named_parameters() const {
    return params_;
  }
  std::vector<torch::Tensor> parameters() const;
  // Copies values in (shapes and dtypes checked); `where` names the source for errors.
  void load_parameters(const std::vector<std::pair<std::string, torch::Tensor>>& values,
                       const std::string& where);
  bool is_sdxl() const { return sdxl_; }

 private:
  struct Block {
    UNetBlockInfo info;
    torch::jit::Module module;
    std::vector<torch::Tensor> params;  // those that require grad
  };
  torch::Tensor run_output_head(Block& block, const torch::Tensor& h);
  std::vector<torch::Tensor> run(Block& block, const std::vector<torch::Tensor>& inputs,
                                 size_t expected_outputs);

  bool sdxl_;
  torch::Device device_;
  UNetOptions options_;
  std::vector<Block> blocks_;
  std::vector<std::pair<std::string, torch::Tensor>> params_;
};

}  // namespace dde::models
