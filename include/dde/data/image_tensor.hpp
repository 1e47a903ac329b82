// The last preprocessing step: an RGB image as the tensor the models take.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "dde/data/image.hpp"

namespace dde::data {

// [3, H, W] float32 in [-1, 1], computed as torchvision does: (x / 255 - 0.5) / 0.5 in float32.
torch::Tensor to_tensor_pm1(const Image& image);

// The training preprocessing of one image (data.* keys of the same names).
struct ImagePrepOptions {
  int64_t resolution = 512;
  bool random_crop = false;
  bool random_flip = true;
  int64_t max_image_pixels = 89478485;
};

struct CroppedImage {
  torch::Tensor pixels;  // [3, R, R] float32 in [-1, 1]
  // Original size (before the resize) and crop offsets (resized coordinates, before the flip).
  int64_t original_h = 0, original_w = 0, crop_top = 0, crop_left = 0;
};

// decode -> resize shorter side -> random or center crop -> flip when random_flip && flip ->
// to_tensor_pm1. crop_y/crop_x: the pair's random draws (unused with a center crop). Throws
// BadPairError for an image that does not decode or breaks the limits.
CroppedImage prepare_training_image(const std::string& bytes, const std::string& where,
                                    const ImagePrepOptions& options, bool flip, uint64_t crop_y,
                                    uint64_t crop_x);

}  // namespace dde::data
