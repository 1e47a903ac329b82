#include "dde/data/image.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "dde/util/error.hpp"

namespace dde::data {
namespace {

// Pillow's fixed-point resampling (libImaging/Resample.c): coefficients scaled by 2^22,
// accumulators start at half a unit, results clipped to [0, 255].
constexpr int kPrecisionBits = 32 - 8 - 2;

struct ResampleCoeffs {
  int ksize = 0;
  std::vector<int> bounds;  // [out, 2]: first input index, number of taps
  std::vector<int32_t> kk;  // [out, ksize] fixed-point weights
};

double bilinear_filter(double x) {
  x = std::fabs(x);
  return x < 1.0 ? 1.0 - x : 0.0;
}

// precompute_coeffs + normalize_coeffs_8bpc with the BILINEAR filter (support 1) and the
// box (0, in_size). Pixel centres sit at i + 0.5.
ResampleCoeffs precompute_coeffs(int in_size, int out_size) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = 1.0 * filterscale;
  ResampleCoeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(static_cast<size_t>(out_size) * 2);
  c.kk.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(static_cast<size_t>(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    // Pillow's truncating (int)(x + 0.5) rounding, kept on purpose for bit parity.
    int xmin = static_cast<int>(center - support + 0.5);  // NOLINT(bugprone-incorrect-roundings)
    if (xmin < 0) {
      xmin = 0;
    }
    int xmax = static_cast<int>(center + support + 0.5);  // NOLINT(bugprone-incorrect-roundings)
    if (xmax > in_size) {
      xmax = in_size;
    }
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = bilinear_filter((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double w = ww != 0.0 ? k[x] / ww : k[x];
      c.kk[static_cast<size_t>(xx) * c.ksize + x] =
          w < 0 ? static_cast<int32_t>(-0.5 + w * (1 << kPrecisionBits))
                : static_cast<int32_t>(
                      0.5 + w * (1 << kPrecisionBits));  // NOLINT(bugprone-incorrect-roundings)
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t accumulator) {
  const int32_t v = accumulator >> kPrecisionBits;  // arithmetic shift, as Pillow's lookup index
  return static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
}

// Rows [row_offset, row_offset + out.height) of `in`, resampled along x.
void resample_horizontal(const Image& in, Image& out, int row_offset, const ResampleCoeffs& c) {
  for (int yy = 0; yy < out.height; ++yy) {
    const uint8_t* src = in.rgb.data() + static_cast<size_t>(yy + row_offset) * in.width * 3;
    uint8_t* dst = out.rgb.data() + static_cast<size_t>(yy) * out.width * 3;
    for (int xx = 0; xx < out.width; ++xx) {
      const int xmin = c.bounds[xx * 2];
      const int xmax = c.bounds[xx * 2 + 1];
      const int32_t* k = c.kk.data() + static_cast<size_t>(xx) * c.ksize;
      int32_t ss0 = 1 << (kPrecisionBits - 1), ss1 = ss0, ss2 = ss0;
      const uint8_t* p = src + static_cast<size_t>(xmin) * 3;
      for (int x = 0; x < xmax; ++x, p += 3) {
        ss0 += p[0] * k[x];
        ss1 += p[1] * k[x];
        ss2 += p[2] * k[x];
      }
      dst[xx * 3 + 0] = clip8(ss0);
      dst[xx * 3 + 1] = clip8(ss1);
      dst[xx * 3 + 2] = clip8(ss2);
    }
  }
}

void resample_vertical(const Image& in, Image& out, const std::vector<int>& bounds,
                       const ResampleCoeffs& c) {
  const size_t row = static_cast<size_t>(in.width) * 3;
  for (int yy = 0; yy < out.height; ++yy) {
    const int ymin = bounds[yy * 2];
    const int ymax = bounds[yy * 2 + 1];
    const int32_t* k = c.kk.data() + static_cast<size_t>(yy) * c.ksize;
    uint8_t* dst = out.rgb.data() + static_cast<size_t>(yy) * row;
    for (size_t i = 0; i < row; ++i) {
      int32_t ss = 1 << (kPrecisionBits - 1);
      const uint8_t* p = in.rgb.data() + static_cast<size_t>(ymin) * row + i;
      for (int y = 0; y < ymax; ++y, p += row) {
        ss += *p * k[y];
      }
      dst[i] = clip8(ss);
    }
  }
}

Image blank(int height, int width) {
  Image image;
  image.height = height;
  image.width = width;
  image.rgb.resize(static_cast<size_t>(height) * width * 3);
  return image;
}

}  // namespace

Image resize_bilinear(const Image& image, int out_height, int out_width) {
  if (out_height <= 0 || out_width <= 0 || image.height <= 0 || image.width <= 0) {
    throw Error(
        {"bad resize size",
         fmt::format("{}x{} -> {}x{} (HxW)", image.height, image.width, out_height, out_width),
         "positive sizes", "", ""});
  }
  // ImagingResampleInner: two 1-D passes with an 8-bit intermediate. Pillow 13 (pinned in
  // requirements.txt; python-pillow/Pillow#9549) runs the vertical pass first when the height
  // shrinks by more than twice as many pixels as the width, else the horizontal pass first
  // (older Pillow always does); the order changes some results by one level.
  const bool need_horizontal = out_width != image.width;
  const bool need_vertical = out_height != image.height;
  ResampleCoeffs vertical = precompute_coeffs(image.height, out_height);
  if (need_horizontal && need_vertical && out_height < image.height &&
      image.height - out_height > 2 * (image.width - out_width)) {
    Image tall = blank(out_height, image.width);
    resample_vertical(image, tall, vertical.bounds, vertical);
    Image out = blank(out_height, out_width);
    resample_horizontal(tall, out, /*row_offset=*/0, precompute_coeffs(image.width, out_width));
    return out;
  }

  // Horizontal pass only over the rows the vertical pass reads.
  const int ybox_first = vertical.bounds[0];
  const int ybox_last = vertical.bounds[out_height * 2 - 2] + vertical.bounds[out_height * 2 - 1];
  Image horizontal;
  const Image* source = &image;
  if (need_horizontal) {
    for (int i = 0; i < out_height; ++i) {
      vertical.bounds[i * 2] -= ybox_first;
    }
    horizontal = blank(ybox_last - ybox_first, out_width);
    resample_horizontal(image, horizontal, ybox_first, precompute_coeffs(image.width, out_width));
    source = &horizontal;
  }
  if (!need_vertical) {
    return need_horizontal ? horizontal : image;
  }
  Image out = blank(out_height, source->width);
  resample_vertical(*source, out, vertical.bounds, vertical);
  return out;
}

Image resize_shorter_side(const Image& image, int size) {
  if (size <= 0) {
    throw Error({"bad resize size", "resize_shorter_side", "> 0", std::to_string(size), ""});
  }
  const int64_t h = image.height, w = image.width;
  const int64_t short_side = std::min(h, w), long_side = std::max(h, w);
  // Python: int(size * long / short), a true division of two ints, truncated.
  const auto new_long =
      static_cast<int>(static_cast<double>(size * long_side) / static_cast<double>(short_side));
  const int new_w = w <= h ? size : new_long;
  const int new_h = w <= h ? new_long : size;
  if (new_h == image.height && new_w == image.width) {
    return image;
  }
  return resize_bilinear(image, new_h, new_w);
}

int center_crop_offset(int length, int size) {
  // int(round((length - size) / 2.0)): halves round to the even neighbour.
  const int d = length - size;
  const int half = d / 2;
  if (d % 2 == 0) {
    return half;
  }
  return half % 2 == 0 ? half : half + 1;
}

Image center_crop(const Image& image, int size) {
  return crop(image, center_crop_offset(image.height, size), center_crop_offset(image.width, size),
              size, size);
}

Image crop(const Image& image, int top, int left, int height, int width) {
  if (top < 0 || left < 0 || height <= 0 || width <= 0 || top + height > image.height ||
      left + width > image.width) {
    throw Error({"crop outside the image",
                 fmt::format("image {}x{} (HxW)", image.height, image.width),
                 "0 <= top, left and top + h <= H, left + w <= W",
                 fmt::format("top={} left={} h={} w={}", top, left, height, width), ""});
  }
  Image out = blank(height, width);
  const size_t row = static_cast<size_t>(width) * 3;
  for (int y = 0; y < height; ++y) {
    std::memcpy(out.rgb.data() + y * row,
                image.rgb.data() + (static_cast<size_t>(top + y) * image.width + left) * 3, row);
  }
  return out;
}

Image hflip(const Image& image) {
  Image out = blank(image.height, image.width);
  for (int y = 0; y < image.height; ++y) {
    const uint8_t* src = image.rgb.data() + static_cast<size_t>(y) * image.width * 3;
    uint8_t* dst = out.rgb.data() + static_cast<size_t>(y) * image.width * 3;
    for (int x = 0; x < image.width; ++x) {
      std::memcpy(dst + x * 3, src + (image.width - 1 - x) * 3, 3);
    }
  }
  return out;
}

}  // namespace dde::data
