// Shared by the C++ tests: how many threads this process has now (Linux: /proc/self/task).
#pragma once

#include <cstdint>
#include <filesystem>

inline int64_t process_threads() {
  int64_t n = 0;
  for ([[maybe_unused]] const auto& entry :
       std::filesystem::directory_iterator("/proc/self/task")) {
    ++n;
  }
  return n;
}
