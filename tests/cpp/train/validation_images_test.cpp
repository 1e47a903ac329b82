#include "dde/train/validation_images.hpp"

#include <gtest/gtest.h>
#include <stb_image.h>

#include <string>

#include "dde/util/error.hpp"

namespace dde::train {
namespace {

torch::Tensor numbered_images(int64_t n, int64_t h, int64_t w) {
  // Image i is filled with i + 1 (every pixel, every channel), so a cell shows whose it is.
  return (torch::arange(1, n + 1, torch::kLong).view({n, 1, 1, 1}) *
          torch::ones({n, h, w, 3}, torch::kLong))
      .to(torch::kUInt8);
}

TEST(ImageGrid, RowMajorCellsAndBlackAfterTheLast) {
  const torch::Tensor grid = image_grid(numbered_images(5, 2, 3), 4);
  ASSERT_EQ(grid.sizes(), (torch::IntArrayRef{4, 12, 3}));
  for (int64_t i = 0; i < 8; ++i) {
    const torch::Tensor cell = grid.narrow(0, (i / 4) * 2, 2).narrow(1, (i % 4) * 3, 3);
    EXPECT_TRUE(cell.eq(i < 5 ? i + 1 : 0).all().item<bool>()) << "cell " << i;
  }
  // Fewer images than a row: one row of exactly them.
  EXPECT_EQ(image_grid(numbered_images(3, 2, 3), 4).sizes(), (torch::IntArrayRef{2, 9, 3}));
  EXPECT_THROW(image_grid(torch::zeros({2, 2, 3}, torch::kUInt8), 4), Error);
  EXPECT_THROW(image_grid(torch::zeros({1, 2, 2, 3}, torch::kFloat32), 4), Error);
}

TEST(EncodePng, DecodesBackToTheSamePixels) {
  const torch::Tensor rgb =
      torch::randint(0, 256, {5, 7, 3}, torch::TensorOptions().dtype(torch::kUInt8));
  const std::string png = encode_png(rgb);
  ASSERT_EQ(png.substr(1, 3), "PNG");
  int w = 0, h = 0, channels = 0;
  unsigned char* pixels = stbi_load_from_memory(reinterpret_cast<const unsigned char*>(png.data()),
                                                static_cast<int>(png.size()), &w, &h, &channels, 3);
  ASSERT_NE(pixels, nullptr);
  EXPECT_EQ(w, 7);
  EXPECT_EQ(h, 5);
  const torch::Tensor back = torch::from_blob(pixels, {5, 7, 3}, torch::kUInt8).clone();
  stbi_image_free(pixels);
  EXPECT_TRUE(back.equal(rgb));
  EXPECT_THROW(encode_png(torch::zeros({5, 7}, torch::kUInt8)), Error);
}

}  // namespace
}  // namespace dde::train
