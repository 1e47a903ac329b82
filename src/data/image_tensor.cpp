#include "dde/data/image_tensor.hpp"

#include <fmt/format.h>

#include "dde/util/error.hpp"

namespace dde::data {

torch::Tensor to_chw_uint8(const Image& image) {
  const int64_t size = static_cast<int64_t>(image.height) * image.width * 3;
  if (static_cast<int64_t>(image.rgb.size()) != size) {
    throw Error({"bad image buffer", "to_chw_uint8", std::to_string(size) + " bytes (H x W x 3)",
                 std::to_string(image.rgb.size()), "a bug: report it"});
  }
  // from_blob does not own the bytes: the contiguous permuted copy does.
  return torch::from_blob(const_cast<uint8_t*>(image.rgb.data()), {image.height, image.width, 3},
                          torch::kUInt8)
      .permute({2, 0, 1})
      .contiguous();
}

const torch::Tensor& pm1_table() {
  static const torch::Tensor table = [] {
    torch::Tensor t = torch::empty({256}, torch::kFloat32);
    float* v = t.data_ptr<float>();
    for (int i = 0; i < 256; ++i) {
      v[i] = (static_cast<float>(i) / 255.0f - 0.5f) / 0.5f;  // ToTensor then Normalize
    }
    return t;
  }();
  return table;
}

torch::Tensor to_pm1(const torch::Tensor& images, const torch::Tensor& table) {
  if (images.scalar_type() != torch::kUInt8 || table.scalar_type() != torch::kFloat32 ||
      table.numel() != 256 || images.device() != table.device()) {
    throw Error(
        {"bad images for to_pm1", "to_pm1",
         "uint8 images and a [256] float32 table on the same device",
         fmt::format("images {} on {}, table {} [{}] on {}", c10::toString(images.scalar_type()),
                     images.device().str(), c10::toString(table.scalar_type()), table.numel(),
                     table.device().str()),
         "a bug: report it"});
  }
  // A gather: no host sync, exact on every device.
  return table.index_select(0, images.reshape({-1}).to(torch::kInt32)).view(images.sizes());
}

torch::Tensor to_tensor_pm1(const Image& image) { return to_pm1(to_chw_uint8(image), pm1_table()); }

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
  out.pixels = to_chw_uint8(image);
  return out;
}

}  // namespace dde::data
