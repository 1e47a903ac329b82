#include "dde/util/file_read.hpp"

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "dde/util/error.hpp"

namespace dde::util {

namespace {

// "2097152 bytes (2.0 MiB)"
std::string bytes_text(int64_t n) {
  const char* units[] = {"KiB", "MiB", "GiB", "TiB"};
  std::string text = std::to_string(n) + " bytes";
  double scaled = static_cast<double>(n);
  int unit = -1;
  while (scaled >= 1024.0 && unit < 3) {
    scaled /= 1024.0;
    ++unit;
  }
  if (unit >= 0) {
    char buffer[32];
    std::snprintf(buffer, sizeof(buffer), " (%.1f %s)", scaled, units[unit]);
    text += buffer;
  }
  return text;
}

}  // namespace

void check_size(int64_t size, int64_t max_bytes, const std::string& what, const std::string& where,
                const std::string& hint) {
  if (size > max_bytes) {
    throw Error({what + " too large", where, "at most " + bytes_text(max_bytes), bytes_text(size),
                 hint.empty() ? "the file is damaged or not one dde wrote" : hint});
  }
}

std::string read_text_file(const std::string& path, int64_t max_bytes, const std::string& what,
                           const std::string& hint) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::is_regular_file(status)) {
    throw Error({"cannot read " + what, path, "a readable file",
                 ec ? ec.message() : "not a regular file", ""});
  }
  const auto size = std::filesystem::file_size(path, ec);
  if (ec) throw Error({"cannot read " + what, path, "a readable file", ec.message(), ""});
  check_size(static_cast<int64_t>(size), max_bytes, what, path, hint);
  std::ifstream in(path, std::ios::binary);
  std::string text(size, '\0');
  if (!in || !in.read(text.data(), static_cast<std::streamsize>(size))) {
    throw Error({"cannot read " + what, path, std::to_string(size) + " bytes",
                 in ? "fewer" : "the file cannot be opened", "check its permissions"});
  }
  return text;
}

bool read_line(std::istream& in, std::string& line, int64_t max_bytes, const std::string& where) {
  line.clear();
  char ch = 0;
  bool any = false;
  while (in.get(ch)) {
    any = true;
    if (ch == '\n') return true;
    if (static_cast<int64_t>(line.size()) >= max_bytes) {
      throw Error({"line too long", where, "at most " + bytes_text(max_bytes),
                   "more than " + bytes_text(max_bytes),
                   "the file is damaged or not one dde wrote"});
    }
    line.push_back(ch);
  }
  return any;
}

}  // namespace dde::util
