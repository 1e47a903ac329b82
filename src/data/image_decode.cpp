// JPEG through libjpeg-turbo's TurboJPEG API (reports truncation, decodes CMYK, the same
// islow IDCT and fancy upsampling as Pillow's libjpeg-turbo), PNG through stb_image.
#include <fmt/format.h>
#include <stb_image.h>
#include <turbojpeg.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>

#include "dde/data/data_error.hpp"
#include "dde/data/image.hpp"

namespace dde::data {
namespace {

constexpr const char* kBadImageHint =
    "the exporter checks every image with Pillow: re-export this shard, or let the trainer "
    "skip the pair (data.max_bad_pairs)";

[[noreturn]] void fail(const char* reason, const std::string& what, const std::string& where,
                       const std::string& expected, const std::string& actual,
                       const std::string& hint = kBadImageHint) {
  throw BadPairError(reason, {what, where, expected, actual, hint});
}

bool starts_with(const std::string& bytes, const char* magic, size_t n) {
  return bytes.size() >= n && std::memcmp(bytes.data(), magic, n) == 0;
}

struct TjDeleter {
  void operator()(void* handle) const { tjDestroy(handle); }
};

// One decompressor per thread (the loader's workers), created on first use.
tjhandle jpeg_handle() {
  thread_local std::unique_ptr<void, TjDeleter> handle(tjInitDecompress());
  if (!handle) {
    throw Error({"cannot create a libjpeg-turbo decompressor", "tjInitDecompress", "a handle",
                 tjGetErrorStr2(nullptr), "out of memory?"});
  }
  return handle.get();
}

ImageHeader jpeg_header(const std::string& bytes, const std::string& where) {
  int width = 0, height = 0, subsampling = 0, colorspace = 0;
  if (tjDecompressHeader3(jpeg_handle(), reinterpret_cast<const unsigned char*>(bytes.data()),
                          static_cast<unsigned long>(bytes.size()), &width, &height, &subsampling,
                          &colorspace) != 0) {
    fail("undecodable_image", "cannot read JPEG header", where, "a valid JPEG header",
         escape_preview(tjGetErrorStr2(jpeg_handle()), 120));
  }
  return {ImageFormat::kJpeg, height, width};
}

// Every chunk's length field against the bytes that follow it. stb_image grows its IDAT buffer
// to a chunk's claimed length before it reads the data: a 300-byte file whose IDAT claims 2 GiB
// allocated 2 GiB (found by fuzz_image_decode). So a claim is checked before stb sees it.
void check_png_chunks(const std::string& bytes, const std::string& where) {
  const auto be32 = [&](size_t at) {
    return (uint32_t{static_cast<unsigned char>(bytes[at])} << 24) |
           (uint32_t{static_cast<unsigned char>(bytes[at + 1])} << 16) |
           (uint32_t{static_cast<unsigned char>(bytes[at + 2])} << 8) |
           uint32_t{static_cast<unsigned char>(bytes[at + 3])};
  };
  size_t at = 8;                       // after the signature
  while (at + 8 <= bytes.size()) {     // a truncated tail is stb's to report
    const uint64_t length = be32(at);  // a chunk: length, type, data, CRC
    const std::string type = escape_preview(bytes.substr(at + 4, 4), 8);
    const uint64_t remaining = bytes.size() - at;
    if (length + 12 > remaining) {
      fail("undecodable_image", "PNG chunk runs past the end of the image (truncated or corrupt)",
           where,
           fmt::format("chunk '{}' at byte {}: at most {} data bytes", type, at,
                       remaining >= 12 ? remaining - 12 : 0),
           fmt::format("{} bytes claimed", length));
    }
    if (type == "IEND") return;
    at += 12 + length;
  }
}

ImageHeader png_header(const std::string& bytes, const std::string& where) {
  check_png_chunks(bytes, where);
  int width = 0, height = 0, channels = 0;
  if (stbi_info_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()),
                            static_cast<int>(bytes.size()), &width, &height, &channels) == 0) {
    const char* reason = stbi_failure_reason();
    fail("undecodable_image", "cannot read PNG header", where, "a valid PNG header",
         reason ? reason : "unknown error");
  }
  return {ImageFormat::kPng, height, width};
}

// Pillow's convert("RGB") of a CMYK JPEG: its "CMYK;I" raw mode inverts the Adobe-style
// stored values, then Convert.c cmyk2rgb: nk = 255 - k; out = nk - MULDIV255(c, nk).
uint8_t cmyk_channel(uint8_t stored_c, uint8_t stored_k) {
  const int c = 255 - stored_c, nk = stored_k;  // 255 - (255 - stored_k)
  const int tmp = c * nk + 128;
  const int v = nk - (((tmp >> 8) + tmp) >> 8);
  return static_cast<uint8_t>(std::clamp(v, 0, 255));
}

void decode_jpeg_pixels(const std::string& bytes, const std::string& where, Image& image) {
  int width = 0, height = 0, subsampling = 0, colorspace = 0;
  tjhandle handle = jpeg_handle();
  const auto* data = reinterpret_cast<const unsigned char*>(bytes.data());
  const auto size = static_cast<unsigned long>(bytes.size());
  if (tjDecompressHeader3(handle, data, size, &width, &height, &subsampling, &colorspace) != 0) {
    fail("undecodable_image", "cannot read JPEG header", where, "a valid JPEG header",
         escape_preview(tjGetErrorStr2(handle), 120));
  }
  // STOPONWARNING: a truncated or corrupt stream is an error, not grey/zero pixels;
  // LIMITSCANS: a progressive JPEG with thousands of scans is refused (CPU bomb).
  const int flags = TJFLAG_STOPONWARNING | TJFLAG_LIMITSCANS;
  const bool cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
  std::vector<uint8_t> cmyk_pixels;
  if (cmyk) {
    cmyk_pixels.resize(static_cast<size_t>(width) * height * 4);
  }
  unsigned char* out = cmyk ? cmyk_pixels.data() : image.rgb.data();
  if (tjDecompress2(handle, data, size, out, width, /*pitch=*/0, height,
                    cmyk ? TJPF_CMYK : TJPF_RGB, flags) != 0) {
    fail("undecodable_image", "cannot decode JPEG data (truncated or corrupt)", where,
         "a complete JPEG stream", escape_preview(tjGetErrorStr2(handle), 120));
  }
  if (cmyk) {
    const size_t pixels = static_cast<size_t>(width) * height;
    for (size_t i = 0; i < pixels; ++i) {
      const uint8_t* p = &cmyk_pixels[i * 4];
      for (int ch = 0; ch < 3; ++ch) {
        image.rgb[i * 3 + ch] = cmyk_channel(p[ch], p[3]);
      }
    }
  }
}

void decode_png_pixels(const std::string& bytes, const std::string& where, Image& image) {
  int width = 0, height = 0, channels = 0;
  std::unique_ptr<stbi_uc, void (*)(void*)> pixels(
      stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()),
                            static_cast<int>(bytes.size()), &width, &height, &channels,
                            /*req_comp=*/3),
      stbi_image_free);
  if (!pixels) {
    const char* reason = stbi_failure_reason();
    fail("undecodable_image", "cannot decode PNG data (truncated or corrupt)", where,
         "a complete PNG stream", reason ? reason : "unknown error");
  }
  if (width != image.width || height != image.height) {
    fail("undecodable_image", "PNG data does not match its header", where,
         fmt::format("{}x{} (HxW)", image.height, image.width),
         fmt::format("{}x{}", height, width));
  }
  std::memcpy(image.rgb.data(), pixels.get(), image.rgb.size());
}

}  // namespace

ImageHeader read_image_header(const std::string& bytes, const std::string& where) {
  if (bytes.empty() || bytes.size() > static_cast<size_t>(INT_MAX)) {
    fail("undecodable_image", "cannot decode image", where, "image bytes (1 B to 2 GiB)",
         fmt::format("{} bytes", bytes.size()));
  }
  ImageHeader header;
  if (starts_with(bytes, "\xFF\xD8\xFF", 3)) {
    header = jpeg_header(bytes, where);
  } else if (starts_with(bytes, "\x89PNG\r\n\x1A\n", 8)) {
    header = png_header(bytes, where);
  } else {
    fail("unsupported_image_format", "unsupported image format", where,
         "JPEG (FF D8 FF) or PNG (89 'PNG' 0D 0A 1A 0A)",
         "bytes starting '" + escape_preview(bytes, 16) + "'",
         "the exporter writes JPEG and PNG only: re-export this shard");
  }
  if (header.width <= 0 || header.height <= 0) {
    fail("undecodable_image", "image header has an empty size", where, "width, height >= 1",
         fmt::format("{}x{} (HxW)", header.height, header.width));
  }
  return header;
}

Image decode_image(const std::string& bytes, const std::string& where, const ImageLimits& limits) {
  const ImageHeader header = read_image_header(bytes, where);
  const int64_t h = header.height, w = header.width;
  if (h * w > limits.max_pixels) {
    fail("image_too_large", "image too large (decompression bomb?)", where,
         fmt::format("at most {} pixels (data.max_image_pixels)", limits.max_pixels),
         fmt::format("{}x{} = {} pixels in the header", h, w, h * w));
  }
  if (std::max(h, w) > limits.max_aspect * std::min(h, w)) {
    fail("bad_aspect_ratio", "image aspect ratio too extreme", where,
         fmt::format("longer side <= {} x shorter side", limits.max_aspect),
         fmt::format("{}x{} (HxW) in the header", h, w));
  }
  Image image;
  image.height = header.height;
  image.width = header.width;
  image.rgb.resize(static_cast<size_t>(h * w * 3));
  if (header.format == ImageFormat::kJpeg) {
    decode_jpeg_pixels(bytes, where, image);
  } else {
    decode_png_pixels(bytes, where, image);
  }
  return image;
}

}  // namespace dde::data
