#include "dde/checkpoint/safetensors_header.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "dde/checkpoint/safetensors.hpp"
#include "util/expect_error.hpp"

namespace dde::checkpoint {
namespace {

// A file of the 8-byte length `length`, then `header`, then `data_bytes` zero bytes.
std::string write_raw(const std::string& name, uint64_t length, const std::string& header,
                      size_t data_bytes) {
  std::string path = (std::filesystem::temp_directory_path() /
                      ("dde_sth_" + std::to_string(::getpid()) + "_" + name))
                         .string();
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((length >> (8 * i)) & 0xFF);
  bytes += header + std::string(data_bytes, '\0');
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

std::string write_header(const std::string& name, const std::string& header, size_t data_bytes) {
  return write_raw(name, header.size(), header, data_bytes);
}

TEST(SafetensorsHeader, ReadsEntriesInFileOrderWithAbsoluteOffsets) {
  const std::string path = write_header(
      "ok",
      R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"__metadata__":{"k":"v"}})",
      16);
  const SafetensorsLayout layout = read_safetensors_layout(path);
  ASSERT_EQ(layout.entries.size(), 2U);
  EXPECT_EQ(layout.entries[0].name, "a");
  EXPECT_EQ(layout.entries[0].dtype, SafetensorsDtype::kI64);
  EXPECT_EQ(layout.entries[1].begin, layout.data_start + 8);
  EXPECT_EQ(layout.entries[1].end, layout.file_size);
  EXPECT_EQ(layout.metadata.at("k"), "v");
  std::filesystem::remove(path);
}

// Every length and offset is checked against the file before anything is allocated.
TEST(SafetensorsHeader, HeaderLengthOf2To63IsAnErrorNotAnAllocation) {
  // Over the header limit (dde/util/input_limits.hpp) before anything else is looked at.
  const std::string path = write_raw("len63", uint64_t{1} << 63, "{}", 0);
  expect_error_mentions([&] { read_safetensors_layout(path); },
                        {"safetensors header too large", "9223372036854775808", "100000000"});
  expect_error_mentions([&] { load_safetensors(path); }, {"safetensors header too large"});
  std::filesystem::remove(path);
  // Within the limit but past the end of the file.
  const std::string past = write_raw("len_past", uint64_t{1} << 20, "{}", 0);
  expect_error_mentions([&] { read_safetensors_layout(past); },
                        {"bad safetensors header length", "1048576", "<= 2"});
  expect_error_mentions([&] { load_safetensors(past); }, {"bad safetensors header length"});
  std::filesystem::remove(past);
}

TEST(SafetensorsHeader, OffsetsPastTheFileAreAnError) {
  const std::string path =
      write_header("past", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8);
  expect_error_mentions([&] { read_safetensors_layout(path); },
                        {"bad data offsets", path + ": w", "16 bytes inside 8", "[0,16]"});
  expect_error_mentions([&] { load_safetensors(path); }, {"bad data offsets", path + ": w"});
  std::filesystem::remove(path);
}

// offsets[1] - offsets[0] overflowed (UB) before begin <= end was checked
// (fuzz_safetensors_header).
TEST(SafetensorsHeader, OffsetsThatWouldOverflowAreAnError) {
  const std::string path = write_header(
      "overflow", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,-9223372036854775808]}})",
      8);
  expect_error_mentions([&] { read_safetensors_layout(path); }, {"bad data offsets", "w"});
  std::filesystem::remove(path);
}

// load_safetensors allocated torch::empty(shape) before checking the offsets.
TEST(SafetensorsHeader, ShapeWhoseProductOverflowsIsAnErrorBeforeAllocating) {
  const std::string path = write_header(
      "shape", R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}})",
      0);
  expect_error_mentions([&] { read_safetensors_layout(path); }, {"bad tensor shape", "w"});
  expect_error_mentions([&] { load_safetensors(path); }, {"bad tensor shape", "w"});
  const std::string big = write_header(
      "big", R"({"w":{"dtype":"F32","shape":[65536,65536],"data_offsets":[0,17179869184]}})", 0);
  expect_error_mentions([&] { load_safetensors(big); }, {"bad data offsets", "17179869184"});
  std::filesystem::remove(path);
  std::filesystem::remove(big);
}

// nlohmann's get<int64_t>() truncated 1.5 and overflowed (UB) on 1e300.
TEST(SafetensorsHeader, NonIntegerSizesAndOffsetsAreErrors) {
  const std::string path =
      write_header("float", R"({"w":{"dtype":"F32","shape":[1e300],"data_offsets":[0,4]}})", 4);
  expect_error_mentions([&] { read_safetensors_layout(path); }, {"bad tensor shape", "1e+300"});
  const std::string half =
      write_header("half", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4.5]}})", 4);
  expect_error_mentions([&] { read_safetensors_layout(half); }, {"bad data offsets", "4.5"});
  std::filesystem::remove(path);
  std::filesystem::remove(half);
}

// load_safetensors caught only json::parse_error, so 1e400 (out_of_range) ended the process
// (fuzz_safetensors_header; tests/fuzz/regressions/fuzz_safetensors_header/number-overflow-1e400).
TEST(SafetensorsHeader, NumberOutOfRangeIsAnError) {
  const std::string path =
      write_header("1e400", R"({"w":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}})", 4);
  expect_error_mentions([&] { read_safetensors_layout(path); },
                        {"safetensors header is not JSON", path, "number overflow"});
  expect_error_mentions([&] { load_safetensors(path); }, {"safetensors header is not JSON"});
  std::filesystem::remove(path);
}

// load_safetensors let nlohmann's exceptions out for these.
TEST(SafetensorsHeader, MalformedHeadersAreErrorsFromBothReaders) {
  for (const std::string header :
       {R"([1,2])", R"({"w":5})", R"({"__metadata__":{"k":1}})", R"({"w":{"dtype":"X"}})",
        R"({"w":{"dtype":"F32","shape":[1]}})", R"({"__metadata__":"text"})", R"({"w")"}) {
    const std::string path = write_header("malformed", header, 0);
    EXPECT_THROW(read_safetensors_layout(path), Error) << header;
    EXPECT_THROW(load_safetensors(path), Error) << header;
    std::filesystem::remove(path);
  }
}

}  // namespace
}  // namespace dde::checkpoint
