// 8-bit RGB images and the Diffusion-DPO preprocessing steps, matching the Python reference
// (PIL.Image.open(...).convert("RGB") -> torchvision Resize(size, BILINEAR) ->
// CenterCrop / RandomCrop -> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5])).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace dde::data {

struct Image {
  int height = 0, width = 0;
  std::vector<uint8_t> rgb;  // [height, width, 3], row-major
};

// Decodes JPEG (or any format stb_image reads) to RGB; `where` names the image in errors.
Image decode_jpeg(const std::string& bytes, const std::string& where);

// Pillow's Image.resize(size, Image.BILINEAR) with reducing_gap=None: a separable triangle
// filter whose support grows with the downscale factor, pixel centres at i + 0.5, Pillow's
// 22-bit fixed-point coefficients, rounding and pass order (libImaging/Resample.c of the
// pinned Pillow 13.0.0). Bit-exact.
Image resize_bilinear(const Image& image, int out_height, int out_width);

// torchvision Resize(size) on a PIL image: the shorter side becomes `size`, the longer
// int(size * long / short) (truncated); unchanged when that is the current size.
Image resize_shorter_side(const Image& image, int size);

// torchvision CenterCrop(size): top = int(round((h - size) / 2.0)) with Python's
// round-half-to-even, left likewise. The image must be at least size x size.
Image center_crop(const Image& image, int size);
int center_crop_offset(int length, int size);

Image crop(const Image& image, int top, int left, int height, int width);
Image hflip(const Image& image);

// [3, H, W] float32 in [-1, 1], computed as torchvision does: (x / 255 - 0.5) / 0.5 in float32.
torch::Tensor to_tensor_pm1(const Image& image);

}  // namespace dde::data
