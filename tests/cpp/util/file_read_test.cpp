#include "dde/util/file_read.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "util/expect_error.hpp"

namespace dde::util {
namespace {

namespace fs = std::filesystem;

std::string scratch_file(const std::string& name) {
  return (fs::temp_directory_path() / ("dde_file_read_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

TEST(FileRead, ReadsAFileWithinTheLimit) {
  const std::string path = scratch_file("small");
  std::ofstream(path, std::ios::binary) << "abc\n";
  EXPECT_EQ(read_text_file(path, 4, "test file"), "abc\n");
  fs::remove(path);
}

TEST(FileRead, RefusesAFileOverTheLimitFromItsSize) {
  const std::string path = scratch_file("sparse");
  std::ofstream(path, std::ios::binary).close();
  fs::resize_file(path, int64_t{1} << 40);  // sparse: 1 TiB that reading would try to allocate
  expect_error_mentions(
      [&] { read_text_file(path, 1000, "test file"); },
      {"test file too large", path, "at most 1000 bytes", "got 1099511627776 bytes (1.0 TiB)"});
  fs::remove(path);
}

TEST(FileRead, ReadLineRefusesALineOverTheLimit) {
  std::istringstream in("short\n" + std::string(100, 'x') + "\n");
  std::string line;
  ASSERT_TRUE(read_line(in, line, 10, "log.jsonl"));
  EXPECT_EQ(line, "short");
  expect_error_mentions([&] { read_line(in, line, 10, "log.jsonl"); },
                        {"line too long", "log.jsonl", "at most 10 bytes"});
}

}  // namespace
}  // namespace dde::util
