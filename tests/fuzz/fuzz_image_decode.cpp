// libFuzzer target: decode_image (JPEG via libjpeg-turbo, PNG via stb_image, header checks)
// and the resize/crop steps on whatever decodes. The pixel budget is lowered so that one
// input cannot take seconds; the checks it exercises are the same.
#include <cstddef>
#include <cstdint>
#include <string>

#include "dde/data/data_error.hpp"
#include "dde/data/image.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  dde::data::ImageLimits limits;
  limits.max_pixels = 1 << 20;
  try {
    dde::data::Image image = dde::data::decode_image(bytes, "fuzz", limits);
    if (image.rgb.size() != static_cast<size_t>(image.height) * image.width * 3) {
      __builtin_trap();
    }
    image = dde::data::resize_shorter_side(image, 16);
    image = dde::data::center_crop(image, 16);
    (void)dde::data::hflip(image);
  } catch (const dde::data::BadPairError&) {
  }
  return 0;
}
