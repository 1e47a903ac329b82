// What the UNet is conditioned on, per image.
#pragma once

#include <torch/torch.h>

#include <cstdint>

namespace dde::models {

struct Conditioning {
  torch::Tensor text;    // [B, L, D] encoder hidden states
  torch::Tensor pooled;  // [B, P]   sdxl only (undefined for sd15)
  torch::Tensor
      time_ids;  // [B, 6]   sdxl only: orig_h, orig_w, crop_top, crop_left, target_h, target_w

  // Rows [0, B) then [0, B) again, with other time ids: conditions [x_w; x_l] in one call.
  Conditioning repeat_for_pair(const torch::Tensor& loser_time_ids) const;
};

// SDXL add_time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per image, from
// [N, 2] original sizes and crop offsets: [N, 6] float32 (docs/method.md §9, SDXL).
inline torch::Tensor sdxl_time_ids(const torch::Tensor& original_hw, const torch::Tensor& crop_tl,
                                   int64_t resolution) {
  const torch::Tensor target = torch::full({original_hw.size(0), 2}, resolution, torch::kLong);
  return torch::cat({original_hw, crop_tl, target}, 1).to(torch::kFloat32);
}

}  // namespace dde::models
