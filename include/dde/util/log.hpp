// Logging front end. Messages are formatted here with {fmt} (the copy LibTorch ships,
// header-only) and handed to one spdlog sink compiled in a torch-free translation unit:
// Debian's spdlog is built against fmt 9, torch's headers carry fmt 12 under the same
// include name, and the two must never meet in one translation unit.
#pragma once

#include <fmt/format.h>

#include <string>
#include <utility>

namespace dde::log {

enum class Level { kDebug, kInfo, kWarn, kError };

// Sink side (src/util/log_sink.cpp).
void emit(Level level, const std::string& message);
void set_rank(int rank);  // ranks other than 0 only log warnings and errors
void set_level(Level level);
void add_file(const std::string& path);  // also write to a file (append)
void flush();

template <typename... Args>
void debug(fmt::format_string<Args...> format, Args&&... args) {
  emit(Level::kDebug, fmt::format(format, std::forward<Args>(args)...));
}
template <typename... Args>
void info(fmt::format_string<Args...> format, Args&&... args) {
  emit(Level::kInfo, fmt::format(format, std::forward<Args>(args)...));
}
template <typename... Args>
void warn(fmt::format_string<Args...> format, Args&&... args) {
  emit(Level::kWarn, fmt::format(format, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> format, Args&&... args) {
  emit(Level::kError, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace dde::log
