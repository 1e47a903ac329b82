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

}  // namespace dde::data
