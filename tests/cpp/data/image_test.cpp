#include "dde/data/image.hpp"

#include <gtest/gtest.h>
#include <stb_image_write.h>

#include "data/shard_fixture.hpp"
#include "dde/data/data_error.hpp"
#include "dde/data/image_tensor.hpp"

namespace dde::data {
namespace {

using testing::expect_error;

Image make_image(int height, int width, std::vector<uint8_t> rgb) {
  Image image;
  image.height = height;
  image.width = width;
  image.rgb = std::move(rgb);
  return image;
}

// Pixel (y, x) = (y, x, 7): coordinates readable after crops and flips.
Image coordinate_image(int height, int width) {
  std::vector<uint8_t> rgb;
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      rgb.insert(rgb.end(), {static_cast<uint8_t>(y), static_cast<uint8_t>(x), 7});
    }
  }
  return make_image(height, width, rgb);
}

// np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8), and what Pillow 13.0.0
// returns for Image.fromarray(a).resize((w, h), Image.BILINEAR).
const std::vector<uint8_t> kPillowInput = {
    95,  130, 194, 217, 207, 235, 15,  163, 33,  215, 217, 130, 248, 189, 16,  69,  184, 232,
    205, 78,  169, 61,  125, 10,  29,  240, 66,  19,  182, 39,  59,  4,   59,  81,  222, 44,
    120, 122, 50,  208, 78,  28,  64,  166, 121, 89,  170, 233, 127, 178, 237, 128, 113, 123,
    76,  155, 69,  154, 130, 248, 95,  73,  192, 186, 191, 127, 220, 161, 231, 1,   43,  139,
    237, 191, 86,  143, 7,   232, 96,  239, 76,  55,  0,   71,  77,  199, 219, 208, 176, 144,
    190, 171, 104, 120, 179, 0,   240, 245, 230, 100, 191, 216, 126, 219, 31};
const std::vector<uint8_t> kPillow3x4 = {
    101, 170, 132, 77,  169, 79,  152, 172, 73,  155, 118, 124, 96,  171, 143, 98,  144, 156,
    113, 131, 113, 120, 102, 143, 162, 181, 177, 147, 146, 109, 170, 168, 162, 102, 163, 103};
const std::vector<uint8_t> kPillow2x7 = {78,  139, 99,  111, 210, 165, 41,  169, 87,  132, 105,
                                         97,  136, 187, 49,  110, 149, 154, 174, 73,  112, 118,
                                         185, 150, 178, 171, 196, 91,  121, 146, 167, 161, 66,
                                         156, 126, 186, 112, 194, 158, 94,  90,  84};
const std::vector<uint8_t> kPillow5x3 = {130, 170, 177, 167, 195, 93,  156, 147, 163, 38,  186, 40,
                                         57,  118, 51,  143, 128, 41,  88,  170, 194, 115, 143, 151,
                                         116, 115, 190, 161, 146, 174, 150, 114, 141, 91,  104, 108,
                                         157, 183, 162, 169, 193, 100, 139, 213, 153};

TEST(ResizeBilinear, MatchesPillowBitExactly) {
  const Image input = make_image(5, 7, kPillowInput);
  EXPECT_EQ(resize_bilinear(input, 3, 4).rgb, kPillow3x4);  // downscale both ways
  EXPECT_EQ(resize_bilinear(input, 2, 7).rgb, kPillow2x7);  // vertical pass only
  EXPECT_EQ(resize_bilinear(input, 5, 3).rgb, kPillow5x3);  // horizontal pass only
  const Image up = resize_bilinear(input, 8, 11);           // upscale
  EXPECT_EQ(up.height, 8);
  EXPECT_EQ(up.width, 11);
  // First row of Pillow's 8x11 result.
  const std::vector<uint8_t> first_row = {95,  130, 194, 150, 165, 213, 199, 203, 217, 70, 175,
                                          88,  88,  183, 68,  215, 217, 130, 236, 199, 57, 199,
                                          188, 75,  85,  184, 212, 143, 126, 198, 205, 78, 169};
  EXPECT_EQ(std::vector<uint8_t>(up.rgb.begin(), up.rgb.begin() + 33), first_row);
}

TEST(ResizeBilinear, MatchesPillowsVerticalFirstOrder) {
  // np.random.default_rng(0).integers(0, 256, (9, 5, 3)) -> (3, 4): the height shrinks by 6 rows,
  // more than twice the width's 1 column, so Pillow 13 runs the vertical pass first; the
  // horizontal-first order would differ in some pixels.
  std::vector<uint8_t> input = kPillowInput;
  const std::vector<uint8_t> tail = {149, 231, 141, 115, 16,  153, 8,  121, 211, 207,
                                     195, 7,   179, 202, 186, 166, 39, 185, 216, 73,
                                     196, 247, 44,  14,  127, 219, 22, 58,  75,  249};
  input.insert(input.end(), tail.begin(), tail.end());
  const std::vector<uint8_t> expected = {
      99,  133, 175, 128, 148, 112, 104, 162, 59,  110, 176, 78,  117, 113, 168, 142, 167, 131,
      104, 122, 143, 153, 161, 134, 157, 130, 145, 136, 107, 130, 139, 166, 115, 140, 179, 141};
  EXPECT_EQ(resize_bilinear(make_image(9, 5, input), 3, 4).rgb, expected);
}

TEST(ResizeBilinear, SameSizeIsIdentityAndConstantsStayConstant) {
  const Image input = make_image(5, 7, kPillowInput);
  EXPECT_EQ(resize_bilinear(input, 5, 7).rgb, input.rgb);
  const Image flat = make_image(6, 9, std::vector<uint8_t>(6 * 9 * 3, 77));
  for (const auto& [h, w] : std::vector<std::pair<int, int>>{{3, 4}, {13, 20}, {1, 1}, {6, 2}}) {
    const Image out = resize_bilinear(flat, h, w);
    EXPECT_EQ(out.rgb, std::vector<uint8_t>(static_cast<size_t>(h) * w * 3, 77)) << h << "x" << w;
  }
}

TEST(ResizeShorterSide, TorchvisionSizesTruncate) {
  // (H, W) -> expected (H, W) for size 4: int(4 * long / short).
  const std::vector<std::tuple<int, int, int, int>> cases = {
      {6, 8, 4, 5}, {8, 6, 5, 4}, {3, 7, 4, 9},  {9, 5, 7, 4},
      {4, 4, 4, 4}, {2, 3, 4, 6}, {4, 11, 4, 11}};
  for (const auto& [h, w, eh, ew] : cases) {
    const Image out = resize_shorter_side(coordinate_image(h, w), 4);
    EXPECT_EQ(out.height, eh) << h << "x" << w;
    EXPECT_EQ(out.width, ew) << h << "x" << w;
  }
  // 600x800 -> 512x682 (682.67 truncated), 333x1000 -> 512x1537.
  const Image wide =
      resize_shorter_side(make_image(600, 800, std::vector<uint8_t>(600 * 800 * 3, 1)), 512);
  EXPECT_EQ(wide.width, 682);
  const Image tall =
      resize_shorter_side(make_image(1000, 333, std::vector<uint8_t>(1000 * 333 * 3, 1)), 512);
  EXPECT_EQ(tall.height, 1537);
}

TEST(CenterCrop, OffsetsRoundHalfToEvenLikePython) {
  EXPECT_EQ(center_crop_offset(8, 4), 2);
  EXPECT_EQ(center_crop_offset(5, 4), 0);   // round(0.5) == 0
  EXPECT_EQ(center_crop_offset(7, 4), 2);   // round(1.5) == 2
  EXPECT_EQ(center_crop_offset(9, 4), 2);   // round(2.5) == 2
  EXPECT_EQ(center_crop_offset(11, 4), 4);  // round(3.5) == 4
  EXPECT_EQ(center_crop_offset(4, 4), 0);
  const Image out = center_crop(coordinate_image(7, 9), 4);
  EXPECT_EQ(out.height, 4);
  EXPECT_EQ(out.width, 4);
  EXPECT_EQ(out.rgb[0], 2);  // top-left pixel comes from (2, 2)
  EXPECT_EQ(out.rgb[1], 2);
}

TEST(Crop, CopiesTheWindowAndRejectsOutOfBounds) {
  const Image out = crop(coordinate_image(6, 8), 1, 3, 2, 4);
  ASSERT_EQ(out.rgb.size(), 2u * 4u * 3u);
  EXPECT_EQ(out.rgb[0], 1);
  EXPECT_EQ(out.rgb[1], 3);
  EXPECT_EQ(out.rgb[(1 * 4 + 3) * 3 + 0], 2);  // bottom-right = (2, 6)
  EXPECT_EQ(out.rgb[(1 * 4 + 3) * 3 + 1], 6);
  expect_error([] { crop(coordinate_image(6, 8), 5, 0, 2, 2); },
               {"crop outside the image", "top=5"});
  expect_error([] { center_crop(coordinate_image(3, 8), 4); }, {"crop outside the image"});
}

TEST(HFlip, MirrorsColumns) {
  const Image out = hflip(coordinate_image(2, 5));
  EXPECT_EQ(out.rgb[1], 4);
  EXPECT_EQ(out.rgb[4 * 3 + 1], 0);
  EXPECT_EQ(out.rgb[(5 + 1) * 3 + 0], 1);  // row 1 stays row 1
  EXPECT_EQ(out.rgb[(5 + 1) * 3 + 1], 3);
}

TEST(ToTensorPm1, ChannelsFirstScaledToMinusOneOne) {
  const Image image = make_image(1, 2, {0, 255, 128, 51, 0, 255});
  const torch::Tensor t = to_tensor_pm1(image);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{3, 1, 2}));
  EXPECT_EQ(t.dtype(), torch::kFloat32);
  EXPECT_FLOAT_EQ(t[0][0][0].item<float>(), -1.0f);
  EXPECT_FLOAT_EQ(t[1][0][0].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(t[2][0][0].item<float>(), 128.0f / 127.5f - 1.0f);
  EXPECT_FLOAT_EQ(t[0][0][1].item<float>(), 51.0f / 127.5f - 1.0f);
  // Bit-equal to torchvision's ToTensor + Normalize([0.5], [0.5]) in float32.
  const torch::Tensor ref = torch::tensor({0, 255, 128, 51, 0, 255}, torch::kUInt8)
                                .reshape({1, 2, 3})
                                .permute({2, 0, 1})
                                .to(torch::kFloat32)
                                .div(255)
                                .sub(0.5)
                                .div(0.5);
  EXPECT_TRUE(torch::equal(t, ref));
}

TEST(ToChwUint8, ChannelsFirstBytesUnchanged) {
  const Image image = make_image(1, 2, {0, 255, 128, 51, 0, 255});
  const torch::Tensor t = to_chw_uint8(image);
  ASSERT_EQ(t.sizes(), (std::vector<int64_t>{3, 1, 2}));
  EXPECT_EQ(t.dtype(), torch::kUInt8);
  EXPECT_TRUE(torch::equal(t.flatten(), torch::tensor({0, 51, 255, 0, 128, 255}, torch::kUInt8)));
}

// Every byte through the table equals torchvision's float32 arithmetic on the CPU (the host
// divides exactly; the table carries that to any device).
TEST(ToPm1, EveryByteAsTorchvision) {
  const torch::Tensor bytes = torch::arange(256, torch::kInt64).to(torch::kUInt8).view({4, 8, 8});
  const torch::Tensor ref = bytes.to(torch::kFloat32).div(255).sub(0.5).div(0.5);
  const torch::Tensor out = to_pm1(bytes, pm1_table());
  EXPECT_EQ(out.sizes(), bytes.sizes());
  EXPECT_TRUE(torch::equal(out, ref));
}

TEST(ToPm1, RefusesFloatsAndAnotherDevice) {
  const torch::Tensor images = torch::zeros({3, 2, 2}, torch::kUInt8);
  expect_error([&] { to_pm1(images.to(torch::kFloat32), pm1_table()); },
               {"bad images for to_pm1", "uint8 images", "Float"});
  expect_error([&] { to_pm1(images, pm1_table().to(torch::kFloat64)); }, {"table Double"});
  if (torch::cuda::is_available()) {
    expect_error([&] { to_pm1(images, pm1_table().to(torch::kCUDA)); }, {"on the same device"});
  }
}

// On a GPU: the uint8 batch goes over and is converted there, bit-equal to the host.
TEST(ToPm1, CudaEqualsHost) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  const torch::Tensor bytes = torch::arange(256, torch::kInt64).to(torch::kUInt8).view({1, 4, 64});
  const torch::Tensor host = to_pm1(bytes, pm1_table());
  const torch::Tensor device =
      to_pm1(bytes.pin_memory().to(torch::kCUDA, /*non_blocking=*/true), pm1_table().cuda());
  EXPECT_TRUE(torch::equal(device.cpu(), host));
}

// Runs `body` expecting a BadPairError of `reason` whose message holds every one of `parts`.
template <typename Body>
void expect_bad_pair(Body body, const std::string& reason, const std::vector<std::string>& parts) {
  try {
    body();
    ADD_FAILURE() << "expected BadPairError " << reason;
  } catch (const BadPairError& e) {
    EXPECT_EQ(e.reason(), reason) << e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "'" << part << "' not in: " << e.what();
    }
  }
}

std::string encode_png(const Image& image) {
  std::string out;
  stbi_write_png_to_func(
      [](void* context, void* data, int size) {
        static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                                   static_cast<size_t>(size));
      },
      &out, image.width, image.height, 3, image.rgb.data(), image.width * 3);
  return out;
}

// Noise, so that the entropy-coded data is long and a cut lands inside it.
Image noise_image(int height, int width) {
  Image image;
  image.height = height;
  image.width = width;
  uint32_t state = 12345;
  for (int i = 0; i < height * width * 3; ++i) {
    state = state * 1664525u + 1013904223u;
    image.rgb.push_back(static_cast<uint8_t>(state >> 24));
  }
  return image;
}

// The JPEG with its SOF0 frame header rewritten to claim height x width.
std::string with_jpeg_size(std::string jpeg, int height, int width) {
  for (size_t i = 2; i + 8 < jpeg.size(); ++i) {
    if (static_cast<uint8_t>(jpeg[i]) == 0xFF && static_cast<uint8_t>(jpeg[i + 1]) == 0xC0) {
      jpeg[i + 5] = static_cast<char>(height >> 8);
      jpeg[i + 6] = static_cast<char>(height & 0xFF);
      jpeg[i + 7] = static_cast<char>(width >> 8);
      jpeg[i + 8] = static_cast<char>(width & 0xFF);
      return jpeg;
    }
  }
  ADD_FAILURE() << "no SOF0 marker";
  return jpeg;
}

TEST(DecodeImage, DecodesJpegAndPngAndNamesBadInput) {
  const Image source = testing::ramp_image(12, 20, 90);
  const Image decoded = decode_image(testing::encode_jpeg(source, 95), "test.jpg");
  EXPECT_EQ(decoded.height, 12);
  EXPECT_EQ(decoded.width, 20);
  int max_diff = 0;
  for (size_t i = 0; i < source.rgb.size(); ++i) {
    max_diff = std::max(max_diff, std::abs(static_cast<int>(source.rgb[i]) - decoded.rgb[i]));
  }
  EXPECT_LE(max_diff, 12);
  const Image png = decode_image(encode_png(source), "test.png");  // lossless
  EXPECT_EQ(png.height, 12);
  EXPECT_EQ(png.rgb, source.rgb);
  expect_bad_pair([] { decode_image("definitely not an image", "shard-3.tar: key 42"); },
                  "unsupported_image_format",
                  {"unsupported image format", "shard-3.tar: key 42", "'definitely not a...'"});
  expect_bad_pair([] { decode_image(std::string("GIF89a\x01\x00\xff\x00", 10), "g.gif"); },
                  "unsupported_image_format", {"GIF89a\\x01\\x00\\xff\\x00"});
  expect_bad_pair([] { decode_image("", "empty.jpg"); }, "undecodable_image",
                  {"cannot decode image", "empty.jpg", "0 bytes"});
}

TEST(DecodeImage, HeaderBombsAreRefusedBeforeDecoding) {
  const std::string small = testing::encode_jpeg(testing::ramp_image(16, 16, 90));
  // A few hundred bytes claiming 26000 x 26000 (stb_image decoded this to zeros, 4.4 GB).
  const std::string bomb = with_jpeg_size(small, 26000, 26000);
  const ImageHeader header = read_image_header(bomb, "bomb.jpg");
  EXPECT_EQ(header.height, 26000);
  EXPECT_EQ(header.width, 26000);
  expect_bad_pair([&] { decode_image(bomb, "bomb.jpg"); }, "image_too_large",
                  {"bomb.jpg", "at most 89478485 pixels", "26000x26000 = 676000000 pixels"});
  // 65000 x 1: few pixels, but resizing its short side to 512 would need ~51 GB.
  expect_bad_pair([&] { decode_image(with_jpeg_size(small, 1, 65000), "thin.jpg"); },
                  "bad_aspect_ratio", {"thin.jpg", "longer side <= 20 x shorter side", "1x65000"});
  ImageLimits tight;
  tight.max_pixels = 255;
  expect_bad_pair([&] { decode_image(small, "small.jpg", tight); }, "image_too_large",
                  {"at most 255 pixels", "16x16 = 256"});
  EXPECT_EQ(decode_image(small, "small.jpg").height, 16);
}

TEST(DecodeImage, TruncatedOrCorruptDataIsAnErrorNotZeros) {
  const std::string jpeg = testing::encode_jpeg(noise_image(64, 64), 90);
  ASSERT_NO_THROW(decode_image(jpeg, "whole.jpg"));
  expect_bad_pair([&] { decode_image(jpeg.substr(0, jpeg.size() / 2), "half.jpg"); },
                  "undecodable_image", {"half.jpg", "truncated or corrupt"});
  expect_bad_pair([&] { decode_image(jpeg.substr(0, jpeg.size() - 2), "no-eoi.jpg"); },
                  "undecodable_image", {"no-eoi.jpg"});
  const std::string png = encode_png(noise_image(64, 64));
  ASSERT_NO_THROW(decode_image(png, "whole.png"));
  expect_bad_pair([&] { decode_image(png.substr(0, png.size() / 2), "half.png"); },
                  "undecodable_image", {"half.png"});
  expect_bad_pair([&] { decode_image(png.substr(0, 20), "header-only.png"); }, "undecodable_image",
                  {"header-only.png"});
}

// A chunk's length field is checked against the bytes that follow before stb_image sees it: stb
// grows its IDAT buffer to the claimed length first (a 308-byte file once allocated 2 GiB).
TEST(DecodeImage, APngChunkClaimingMoreThanTheFileHoldsIsRefusedByItsClaim) {
  const std::string png = encode_png(noise_image(16, 16));
  const size_t idat = png.find("IDAT");
  ASSERT_NE(idat, std::string::npos);
  const size_t field = idat - 4;
  const auto with_length = [&](uint32_t length) {
    std::string out = png;
    for (int i = 0; i < 4; ++i) out[field + i] = static_cast<char>((length >> (24 - 8 * i)) & 0xFF);
    return out;
  };
  const uint32_t actual = (uint32_t{static_cast<unsigned char>(png[field])} << 24) |
                          (uint32_t{static_cast<unsigned char>(png[field + 1])} << 16) |
                          (uint32_t{static_cast<unsigned char>(png[field + 2])} << 8) |
                          uint32_t{static_cast<unsigned char>(png[field + 3])};
  EXPECT_EQ(decode_image(with_length(actual), "exact.png").rgb, decode_image(png, "png").rgb);
  expect_bad_pair(
      [&] { decode_image(with_length(0x7FFFFFF0u), "claims-2gib.png"); }, "undecodable_image",
      {"claims-2gib.png", "runs past the end", "chunk 'IDAT'", "2147483632 bytes claimed"});
  // The boundary: one data byte more than the file holds (after the chunk's CRC) is refused here.
  const uint64_t rest = png.size() - field - 12;
  expect_bad_pair(
      [&] { decode_image(with_length(static_cast<uint32_t>(rest + 1)), "one-over.png"); },
      "undecodable_image", {"one-over.png", "runs past the end"});
}

}  // namespace
}  // namespace dde::data
