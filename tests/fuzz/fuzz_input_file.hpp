// The fuzz input as a file (the tar and pair readers take a path): an in-memory memfd,
// rewritten for every input and named by its /proc/self/fd path.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace dde::fuzz {

inline const std::string& write_input_file(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("dde-fuzz-input", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0 || ftruncate(fd, 0) != 0 ||
      (size > 0 && pwrite(fd, data, size, 0) != static_cast<ssize_t>(size))) {
    std::abort();  // the harness itself failed, not the code under test
  }
  return path;
}

}  // namespace dde::fuzz
