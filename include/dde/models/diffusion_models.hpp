// The frozen encoders and the UNets of one Stable Diffusion family, behind small
// wrappers whose inputs and outputs are plain tensors with documented shapes.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dde/models/manifest.hpp"

namespace dde::models {

// What the UNet is conditioned on, per image.
struct Conditioning {
  torch::Tensor text;    // [B, L, D] encoder hidden states
  torch::Tensor pooled;  // [B, P]   sdxl only (undefined for sd15)
  torch::Tensor
      time_ids;  // [B, 6]   sdxl only: orig_h, orig_w, crop_top, crop_left, target_h, target_w

  // Rows [0, B) then [0, B) again, with other time ids: conditions [x_w; x_l] in one call.
  Conditioning repeat_for_pair(const torch::Tensor& loser_time_ids) const;
};

// Frozen text encoder(s): token ids -> Conditioning.text (+ pooled for sdxl).
class TextConditioner {
 public:
  TextConditioner(const Manifest& manifest, const torch::Device& device);
  // input_ids: one [B, L] int64 tensor per encoder, in manifest order.
  Conditioning encode(const std::vector<torch::Tensor>& input_ids);

 private:
  const Manifest* manifest_;
  torch::Device device_;
  std::vector<torch::jit::Module> encoders_;
};

// Frozen VAE encoder: images in [-1, 1] -> latents sampled from the posterior x scaling factor.
class LatentEncoder {
 public:
  LatentEncoder(const Manifest& manifest, const torch::Device& device);
  // images: [B, 3, H, W] on any device; noise: [B, C, h, w] standard normal (the caller draws it,
  // per pair, so a pair's latents do not depend on the batch it lands in).
  torch::Tensor encode(const torch::Tensor& images, const torch::Tensor& noise);

 private:
  double scaling_factor_;
  torch::Device device_;
  torch::jit::Module encoder_;
};

// A UNet from the manifest: the trainable policy or the frozen reference.
class UNet {
 public:
  UNet(const Manifest& manifest, const torch::Device& device, bool trainable);
  // x: [B, C, h, w], t: [B] int64 -> predicted eps [B, C, h, w]
  torch::Tensor predict_noise(const torch::Tensor& x, const torch::Tensor& t,
                              const Conditioning& cond);

  // Parameters under their diffusers names (the manifest's prefix stripped), in module order.
  const std::vector<std::pair<std::string, torch::Tensor>>& named_parameters() const {
    return params_;
  }
  std::vector<torch::Tensor> parameters() const;
  // Copies values in (shapes and dtypes checked); `where` names the source for errors.
  void load_parameters(const std::vector<std::pair<std::string, torch::Tensor>>& values,
                       const std::string& where);
  bool is_sdxl() const { return sdxl_; }

 private:
  bool sdxl_;
  torch::Device device_;
  torch::jit::Module module_;
  std::vector<std::pair<std::string, torch::Tensor>> params_;
};

}  // namespace dde::models
