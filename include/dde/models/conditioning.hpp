// What the UNet is conditioned on, per image.
#pragma once

#include <torch/torch.h>

namespace dde::models {

struct Conditioning {
  torch::Tensor text;    // [B, L, D] encoder hidden states
  torch::Tensor pooled;  // [B, P]   sdxl only (undefined for sd15)
  torch::Tensor
      time_ids;  // [B, 6]   sdxl only: orig_h, orig_w, crop_top, crop_left, target_h, target_w

  // Rows [0, B) then [0, B) again, with other time ids: conditions [x_w; x_l] in one call.
  Conditioning repeat_for_pair(const torch::Tensor& loser_time_ids) const;
};

}  // namespace dde::models
