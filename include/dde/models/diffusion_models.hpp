// The frozen encoders and the UNets of one Stable Diffusion family, behind small
// wrappers whose inputs and outputs are plain tensors with documented shapes. Frozen models
// may hold bf16 weights (model.frozen_dtype); they then run under bf16 autocast and still
// return fp32.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dde/models/conditioning.hpp"
#include "dde/models/manifest.hpp"
#include "dde/models/unet.hpp"

namespace dde::models {

// Frozen text encoder(s): token ids -> Conditioning.text (+ pooled for sdxl).
class TextConditioner {
 public:
  TextConditioner(const Manifest& manifest, const torch::Device& device,
                  torch::ScalarType dtype = torch::kFloat32);
  // input_ids: one [B, L] int64 tensor per encoder, in manifest order.
  Conditioning encode(const std::vector<torch::Tensor>& input_ids);

 private:
  const Manifest* manifest_;
  torch::Device device_;
  bool bf16_;
  std::vector<torch::jit::Module> encoders_;
};

// Frozen VAE encoder: images in [-1, 1] -> latents sampled from the posterior x scaling factor.
class LatentEncoder {
 public:
  LatentEncoder(const Manifest& manifest, const torch::Device& device,
                torch::ScalarType dtype = torch::kFloat32);
  // images: [B, 3, H, W] on any device; noise: [B, C, h, w] standard normal (the caller draws it,
  // per pair, so a pair's latents do not depend on the batch it lands in).
  torch::Tensor encode(const torch::Tensor& images, const torch::Tensor& noise);
  // The posterior itself: images [B, 3, H, W] -> (mean, logvar), each [B, C, h, w] float32.
  std::pair<torch::Tensor, torch::Tensor> moments(const torch::Tensor& images);
  double scaling_factor() const { return scaling_factor_; }

 private:
  double scaling_factor_;
  torch::Device device_;
  bool bf16_;
  torch::jit::Module encoder_;
};

// Frozen VAE decoder: latents (x scaling factor, as the UNet sees them) -> images in [-1, 1].
class LatentDecoder {
 public:
  LatentDecoder(const Manifest& manifest, const torch::Device& device,
                torch::ScalarType dtype = torch::kFloat32);
  // latents: [B, C, h, w] on any device -> [B, 3, H, W] float32 on the decoder's device.
  torch::Tensor decode(const torch::Tensor& latents);

 private:
  double scaling_factor_;
  torch::Device device_;
  bool bf16_;
  torch::jit::Module decoder_;
};

// diffusers DiagonalGaussianDistribution.sample() x scaling factor: (mean + exp(logvar / 2) x
// noise) x scaling_factor; noise [B, C, h, w] goes to the moments' device.
torch::Tensor sample_latents(const torch::Tensor& mean, const torch::Tensor& logvar,
                             const torch::Tensor& noise, double scaling_factor);

}  // namespace dde::models
