// 8-bit RGB images and the Diffusion-DPO preprocessing steps, matching the Python reference
// (PIL.Image.open(...).convert("RGB") -> torchvision Resize(size, BILINEAR) ->
// CenterCrop / RandomCrop -> RandomHorizontalFlip -> ToTensor -> Normalize([0.5], [0.5])).
// Torch-free (the fuzz targets compile it with clang alone); to_tensor_pm1 is in
// image_tensor.hpp.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace dde::data {

struct Image {
  int height = 0, width = 0;
  std::vector<uint8_t> rgb;  // [height, width, 3], row-major
};

// The one image contract of the shards: JPEG (libjpeg-turbo) or PNG (stb_image), nothing else.
enum class ImageFormat { kJpeg, kPng };

struct ImageHeader {
  ImageFormat format = ImageFormat::kJpeg;
  int height = 0, width = 0;
};

// Checked on the header, before any pixel memory is allocated.
struct ImageLimits {
  int64_t max_pixels = 89478485;  // Pillow's Image.MAX_IMAGE_PIXELS (data.max_image_pixels)
  int64_t max_aspect = 20;        // longer side / shorter side
};

// Format and size from the header alone. Throws BadPairError (data_error.hpp) with reason
// "unsupported_image_format" or "undecodable_image"; `where` names the image in errors.
ImageHeader read_image_header(const std::string& bytes, const std::string& where);

// Header, then the limits (reasons "image_too_large", "bad_aspect_ratio"), then the pixels:
// RGB as Pillow's convert("RGB") gives them (grayscale expanded, alpha dropped, CMYK by
// Pillow's formula). Truncated or corrupt data is an error ("undecodable_image"), never
// zero-filled pixels.
Image decode_image(const std::string& bytes, const std::string& where,
                   const ImageLimits& limits = {});

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

}  // namespace dde::data
