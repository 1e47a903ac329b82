// The last preprocessing step: an RGB image as the tensor the models take. The loader hands
// images over as uint8 (4x less host memory and host->device traffic than float32); the trainer
// turns them into [-1, 1] floats on its device with to_pm1.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>

#include "dde/data/image.hpp"

namespace dde::data {

// [3, H, W] uint8, channels first.
torch::Tensor to_chw_uint8(const Image& image);

// [256] float32 on the CPU: entry v is (v / 255 - 0.5) / 0.5 computed in float32, as torchvision's
// ToTensor + Normalize([0.5], [0.5]) computes it. A table, not arithmetic on the device: CUDA
// divides by a scalar as a multiply by its reciprocal, which can differ in the last bit.
const torch::Tensor& pm1_table();

// uint8 images of any shape -> float32 in [-1, 1], on their device. `table` is pm1_table() moved
// to that device (once, by the caller). Throws dde::Error on another dtype or device.
torch::Tensor to_pm1(const torch::Tensor& images, const torch::Tensor& table);

// to_pm1(to_chw_uint8(image), pm1_table()): [3, H, W] float32 in [-1, 1] on the CPU.
torch::Tensor to_tensor_pm1(const Image& image);

// The training preprocessing of one image (data.* keys of the same names).
struct ImagePrepOptions {
  int64_t resolution = 512;
  bool random_crop = false;
  bool random_flip = true;
  int64_t max_image_pixels = 89478485;
};

struct CroppedImage {
  torch::Tensor pixels;  // [3, R, R] uint8
  // Original size (before the resize) and crop offsets (resized coordinates, before the flip).
  int64_t original_h = 0, original_w = 0, crop_top = 0, crop_left = 0;
};

// decode -> resize shorter side -> random or center crop -> flip when random_flip && flip ->
// to_chw_uint8. crop_y/crop_x: the pair's random draws (unused with a center crop). Throws
// BadPairError for an image that does not decode or breaks the limits.
CroppedImage prepare_training_image(const std::string& bytes, const std::string& where,
                                    const ImagePrepOptions& options, bool flip, uint64_t crop_y,
                                    uint64_t crop_x);

}  // namespace dde::data
