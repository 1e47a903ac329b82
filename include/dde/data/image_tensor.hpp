// The last preprocessing step: an RGB image as the tensor the models take.
#pragma once

#include <torch/torch.h>

#include "dde/data/image.hpp"

namespace dde::data {

// [3, H, W] float32 in [-1, 1], computed as torchvision does: (x / 255 - 0.5) / 0.5 in float32.
torch::Tensor to_tensor_pm1(const Image& image);

}  // namespace dde::data
