#include "dde/data/image_tensor.hpp"

#include <array>

namespace dde::data {

torch::Tensor to_tensor_pm1(const Image& image) {
  static const std::array<float, 256> kLut = [] {
    std::array<float, 256> lut{};
    for (int v = 0; v < 256; ++v) {
      lut[v] =
          (static_cast<float>(v) / 255.0f - 0.5f) / 0.5f;  // ToTensor then Normalize([0.5], [0.5])
    }
    return lut;
  }();
  const int64_t plane = static_cast<int64_t>(image.height) * image.width;
  torch::Tensor out = torch::empty({3, image.height, image.width}, torch::kFloat32);
  float* dst = out.data_ptr<float>();
  const uint8_t* src = image.rgb.data();
  for (int64_t i = 0; i < plane; ++i) {
    dst[i] = kLut[src[i * 3 + 0]];
    dst[plane + i] = kLut[src[i * 3 + 1]];
    dst[2 * plane + i] = kLut[src[i * 3 + 2]];
  }
  return out;
}

CroppedImage prepare_training_image(const std::string& bytes, const std::string& where,
                                    const ImagePrepOptions& options, bool flip, uint64_t crop_y,
                                    uint64_t crop_x) {
  const int res = static_cast<int>(options.resolution);
  Image image = decode_image(bytes, where, ImageLimits{options.max_image_pixels, 20});
  CroppedImage out;
  out.original_h = image.height;
  out.original_w = image.width;
  image = resize_shorter_side(image, res);
  // RandomCrop draws top in [0, h - res] and left in [0, w - res]; CenterCrop rounds.
  const int top = options.random_crop
                      ? static_cast<int>(crop_y % static_cast<uint64_t>(image.height - res + 1))
                      : center_crop_offset(image.height, res);
  const int left = options.random_crop
                       ? static_cast<int>(crop_x % static_cast<uint64_t>(image.width - res + 1))
                       : center_crop_offset(image.width, res);
  image = crop(image, top, left, res, res);
  if (options.random_flip && flip) {
    image = hflip(image);
  }
  out.crop_top = top;
  out.crop_left = left;
  out.pixels = to_tensor_pm1(image);
  return out;
}

}  // namespace dde::data
