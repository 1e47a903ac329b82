#include "dde/train/tensorboard_writer.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace {

TEST(TensorBoardWriter, Crc32cIsCastagnolis) {
  EXPECT_EQ(dde::train::crc32c("123456789"), 0xE3069283U);  // the standard check value
  EXPECT_EQ(dde::train::crc32c(""), 0U);
}

TEST(TensorBoardWriter, RecordsAreFramedWithTheirLengthsAndChecksums) {
  const std::string dir = ::testing::TempDir() + "/tb_writer";
  std::filesystem::remove_all(dir);
  std::string path;
  {
    dde::train::TensorBoardWriter w(dir);
    w.add_scalar("train/loss", 0.5, 7);
    w.flush();
    path = w.path();
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string bytes = ss.str();
  size_t at = 0;
  int records = 0;
  while (at < bytes.size()) {
    ASSERT_LE(at + 12, bytes.size());
    uint64_t length = 0;
    std::memcpy(&length, bytes.data() + at, 8);
    uint32_t length_crc = 0;
    std::memcpy(&length_crc, bytes.data() + at + 8, 4);
    EXPECT_EQ(length_crc, dde::train::masked_crc32c(bytes.substr(at, 8)));
    const std::string event = bytes.substr(at + 12, length);
    uint32_t data_crc = 0;
    std::memcpy(&data_crc, bytes.data() + at + 12 + length, 4);
    EXPECT_EQ(data_crc, dde::train::masked_crc32c(event));
    if (records == 1) {
      EXPECT_NE(event.find("train/loss"), std::string::npos);
    }
    at += 12 + length + 4;
    ++records;
  }
  EXPECT_EQ(records, 2);  // the file version, then the scalar
}

}  // namespace
