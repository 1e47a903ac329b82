// Runs the data pipeline's image steps on one file, for tests/python/test_image_parity.py:
// decode (JPEG or PNG) or raw RGB input -> resize -> crop -> flip, written as raw uint8 HWC.
// Prints "HEIGHT WIDTH" of the result; with --repeat N also the throughput of the steps
// (decode included, plus the [-1, 1] tensor conversion).
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>

#include "dde/data/image.hpp"
#include "dde/data/image_tensor.hpp"
#include "dde/util/error.hpp"

namespace {

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    throw dde::Error({"cannot open input", path, "", "", ""});
  }
  in.seekg(0, std::ios::end);
  std::string bytes(static_cast<size_t>(in.tellg()), '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dde image pipeline probe"};
  std::string input, output;
  std::vector<int> raw_hw, resize_hw, crop_box;
  int resize_shorter = 0, center_crop = 0, repeat = 0;
  bool flip = false;
  app.add_option("--input", input, "JPEG file, or raw RGB with --raw")->required();
  app.add_option("--raw", raw_hw, "input is raw uint8 HWC of this H W")->expected(2);
  app.add_option("--resize", resize_hw, "resize_bilinear to H W")->expected(2);
  app.add_option("--resize-shorter", resize_shorter, "resize_shorter_side(size)");
  app.add_option("--center-crop", center_crop, "center_crop(size)");
  app.add_option("--crop", crop_box, "crop TOP LEFT H W")->expected(4);
  app.add_flag("--hflip", flip, "flip horizontally");
  app.add_option("--output", output, "raw uint8 HWC result");
  app.add_option("--repeat", repeat, "time N runs of the whole pipeline");
  CLI11_PARSE(app, argc, argv);

  try {
    const std::string bytes = read_bytes(input);
    const auto run = [&] {
      dde::data::Image image;
      if (!raw_hw.empty()) {
        image.height = raw_hw[0];
        image.width = raw_hw[1];
        if (bytes.size() != static_cast<size_t>(image.height) * image.width * 3) {
          throw dde::Error({"raw input has the wrong size", input,
                            std::to_string(image.height * image.width * 3),
                            std::to_string(bytes.size()), ""});
        }
        image.rgb.assign(bytes.begin(), bytes.end());
      } else {
        image = dde::data::decode_image(bytes, input);
      }
      if (!resize_hw.empty()) {
        image = dde::data::resize_bilinear(image, resize_hw[0], resize_hw[1]);
      }
      if (resize_shorter > 0) {
        image = dde::data::resize_shorter_side(image, resize_shorter);
      }
      if (center_crop > 0) {
        image = dde::data::center_crop(image, center_crop);
      }
      if (!crop_box.empty()) {
        image = dde::data::crop(image, crop_box[0], crop_box[1], crop_box[2], crop_box[3]);
      }
      if (flip) {
        image = dde::data::hflip(image);
      }
      return image;
    };

    const dde::data::Image result = run();
    if (!output.empty()) {
      std::ofstream out(output, std::ios::binary);
      out.write(reinterpret_cast<const char*>(result.rgb.data()),
                static_cast<std::streamsize>(result.rgb.size()));
    }
    std::cout << result.height << " " << result.width << "\n";
    if (repeat > 0) {
      const auto begin = std::chrono::steady_clock::now();
      double checksum = 0.0;
      for (int i = 0; i < repeat; ++i) {
        checksum += dde::data::to_tensor_pm1(run()).sum().item<double>();
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
      std::printf("images_per_second %.1f ms_per_image %.2f (checksum %.3f)\n", repeat / seconds,
                  1000.0 * seconds / repeat, checksum);
    }
  } catch (const std::exception& e) {
    std::cerr << "dde_image_probe: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
