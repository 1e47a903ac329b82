#include "dde/data/data_error.hpp"

#include <cstdio>

namespace dde::data {

std::string escape_preview(const std::string& bytes, size_t max_bytes) {
  std::string out;
  const size_t n = bytes.size() < max_bytes ? bytes.size() : max_bytes;
  for (size_t i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    if (c >= 32 && c < 127 && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char hex[8];
      std::snprintf(hex, sizeof hex, "\\x%02x", c);
      out += hex;
    }
  }
  if (n < bytes.size()) {
    out += "...";
  }
  return out;
}

}  // namespace dde::data
