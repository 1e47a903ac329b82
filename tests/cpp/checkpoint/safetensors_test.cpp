#include "dde/checkpoint/safetensors.hpp"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "dde/util/error.hpp"

namespace {

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("dde_st_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

TEST(Safetensors, RoundTripKeepsValuesDtypesAndOrder) {
  const std::string path = temp_path("rt.safetensors");
  dde::checkpoint::NamedTensors in = {
      {"b.weight", torch::randn({3, 4})},
      {"a.bias", torch::arange(5, torch::kFloat64)},
      {"counter", torch::tensor(7, torch::kInt64)},
      {"rng", torch::randint(0, 255, {17}, torch::kUInt8)},
      {"half", torch::randn({2, 2}).to(torch::kBFloat16)},
  };
  dde::checkpoint::save_safetensors(path, in, {{"format", "pt"}});
  const auto out = dde::checkpoint::load_safetensors(path);
  ASSERT_EQ(out.tensors.size(), in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    EXPECT_EQ(out.tensors[i].first, in[i].first);
    EXPECT_EQ(out.tensors[i].second.scalar_type(), in[i].second.scalar_type());
    EXPECT_TRUE(torch::equal(out.tensors[i].second, in[i].second)) << in[i].first;
  }
  EXPECT_EQ(out.metadata.at("format"), "pt");
  std::filesystem::remove(path);
}

TEST(Safetensors, TruncatedFileIsAnErrorNamingTheTensor) {
  const std::string path = temp_path("trunc.safetensors");
  dde::checkpoint::save_safetensors(path, {{"w", torch::randn({64})}});
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 10);
  try {
    dde::checkpoint::load_safetensors(path);
    FAIL() << "expected an error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find(path + ": w"), std::string::npos) << e.what();
  }
  std::filesystem::remove(path);
}

TEST(Safetensors, GarbageIsAnError) {
  const std::string path = temp_path("garbage.safetensors");
  std::ofstream(path) << "this is not a safetensors file at all";
  EXPECT_THROW(dde::checkpoint::load_safetensors(path), dde::Error);
  std::filesystem::remove(path);
}

TEST(Safetensors, HeaderLengthOverTheLimitIsRefusedBeforeAllocating) {
  const std::string path = temp_path("huge_header.safetensors");
  std::string bytes(8, '\0');
  bytes[5] = 1;  // little-endian 2^40: a header length that would allocate 1 TiB
  std::ofstream(path, std::ios::binary) << bytes << "{}";
  std::filesystem::resize_file(path, (int64_t{1} << 40) + 16);  // sparse: the length fits the file
  for (const auto& read :
       {+[](const std::string& p) { dde::checkpoint::load_safetensors(p); },
        +[](const std::string& p) { dde::checkpoint::read_safetensors_header(p); }}) {
    try {
      read(path);
      FAIL() << "expected an error";
    } catch (const dde::Error& e) {
      const std::string message = e.what();
      for (const std::string part :
           {"safetensors header too large", path.c_str(), "100000000", "1099511627776 bytes"}) {
        EXPECT_NE(message.find(part), std::string::npos) << part << " not in: " << message;
      }
    }
  }
  std::filesystem::remove(path);
}

}  // namespace
