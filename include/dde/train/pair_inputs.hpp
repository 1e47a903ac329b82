// Two small pieces of a pair's forward shared by the training step and the held-out evaluator.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace dde::train {

// Per-image mean squared error over latent elements: [N, C, h, w] -> [N] (float32).
inline torch::Tensor per_image_mse(const torch::Tensor& prediction, const torch::Tensor& target) {
  return (prediction.to(torch::kFloat32) - target).pow(2).flatten(1).mean(1);
}

// SDXL add_time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image, from the
// loader's [N, 2] original sizes and crop offsets: [N, 6] float32 (docs/method.md §9, SDXL).
inline torch::Tensor sdxl_time_ids(const torch::Tensor& original_hw, const torch::Tensor& crop_tl,
                                   int64_t resolution) {
  const torch::Tensor target = torch::full({original_hw.size(0), 2}, resolution, torch::kLong);
  return torch::cat({original_hw, crop_tl, target}, 1).to(torch::kFloat32);
}

}  // namespace dde::train
