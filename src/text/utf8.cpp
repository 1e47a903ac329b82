#include "dde/text/utf8.hpp"

#include <unicode/utf8.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>

namespace dde::text {

std::optional<std::size_t> find_invalid_utf8(std::string_view bytes) {
  if (bytes.size() > static_cast<std::size_t>(INT32_MAX)) {
    throw std::length_error("find_invalid_utf8: more than 2^31 - 1 bytes");  // ICU's int32 index
  }
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  const auto length = static_cast<int32_t>(bytes.size());
  int32_t i = 0;
  while (i < length) {
    const int32_t start = i;
    UChar32 c = 0;
    U8_NEXT(data, i, length, c);  // ICU: c < 0 for an ill-formed sequence (surrogates included)
    if (c < 0) return static_cast<std::size_t>(start);
  }
  return std::nullopt;
}

std::string hex_bytes(std::string_view bytes, std::size_t offset, std::size_t count) {
  std::string text;
  for (std::size_t i = offset; i < bytes.size() && i < offset + count; ++i) {
    char buffer[8];
    std::snprintf(buffer, sizeof(buffer), "0x%02X", static_cast<unsigned char>(bytes[i]));
    if (!text.empty()) text += ' ';
    text += buffer;
  }
  return text;
}

}  // namespace dde::text
