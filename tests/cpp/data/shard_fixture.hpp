// Test helpers for the data tests: a minimal ustar writer, JPEG encoding with
// stb_image_write, and a tiny Pick-a-Pic shard export (index.json + shard-*.tar).
#pragma once

#include <gtest/gtest.h>
#include <stb_image_write.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "dde/data/image.hpp"
#include "dde/data/shard_index.hpp"
#include "dde/util/error.hpp"

namespace dde::data::testing {

// Runs `body` expecting a dde::Error whose message contains every one of `parts`.
template <typename Body>
void expect_error(Body body, const std::vector<std::string>& parts) {
  try {
    body();
    ADD_FAILURE() << "expected dde::Error";
  } catch (const Error& e) {
    for (const std::string& part : parts) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos)
          << "'" << part << "' not in: " << e.what();
    }
  }
}

// A fresh directory under the system temp dir, removed at scope exit.
class TempDir {
 public:
  TempDir() {
    static int counter = 0;
    std::random_device device;
    path_ = std::filesystem::temp_directory_path() /
            ("dde_data_test_" + std::to_string(device()) + "_" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(0, std::ios::end);
  std::string bytes(static_cast<size_t>(in.tellg()), '\0');
  in.seekg(0);
  in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return bytes;
}

// Writes the checksum field of a 512-byte header: 6 octal digits, NUL, space.
inline void set_ustar_checksum(std::string& header) {
  header.replace(148, 8, std::string(8, ' '));
  int64_t sum = 0;
  for (const char c : header) {
    sum += static_cast<unsigned char>(c);
  }
  char digits[32];
  std::snprintf(digits, sizeof digits, "%06llo", static_cast<unsigned long long>(sum));
  header.replace(148, 6, std::string(digits, 6));
  header[154] = '\0';
}

// POSIX ustar header as Python's tarfile (format=USTAR_FORMAT) writes it.
inline std::string ustar_header(const std::string& name, int64_t size, char typeflag = '0',
                                const std::string& prefix = "") {
  std::string h(512, '\0');
  const auto put = [&](size_t offset, const std::string& value) {
    h.replace(offset, value.size(), value);
  };
  const auto octal = [](int64_t value, int width) {
    char buffer[32];
    std::snprintf(buffer, sizeof buffer, "%0*llo", width, static_cast<unsigned long long>(value));
    return std::string(buffer);
  };
  put(0, name.substr(0, 100));
  put(100, octal(0644, 7));
  put(108, octal(0, 7));
  put(116, octal(0, 7));
  put(124, octal(size, 11));
  put(136, octal(0, 11));
  put(148, std::string(8, ' '));
  h[156] = typeflag;
  put(257, std::string("ustar\0"
                       "00",
                       8));
  put(345, prefix.substr(0, 155));
  set_ustar_checksum(h);
  return h;
}

inline std::string ustar_member(const std::string& name, const std::string& data) {
  std::string out = ustar_header(name, static_cast<int64_t>(data.size())) + data;
  out.append((512 - data.size() % 512) % 512, '\0');
  return out;
}

inline std::string ustar_end() { return std::string(1024, '\0'); }

inline std::string encode_jpeg(const Image& image, int quality = 95) {
  std::string out;
  stbi_write_jpg_to_func(
      [](void* context, void* data, int size) {
        static_cast<std::string*>(context)->append(static_cast<const char*>(data),
                                                   static_cast<size_t>(size));
      },
      &out, image.width, image.height, 3, image.rgb.data(), quality);
  return out;
}

// R: left-to-right ramp (shows flips), G: constant `green`, B: constant 128.
inline Image ramp_image(int height, int width, uint8_t green) {
  Image image;
  image.height = height;
  image.width = width;
  image.rgb.resize(static_cast<size_t>(height) * width * 3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      uint8_t* p = &image.rgb[(static_cast<size_t>(y) * width + x) * 3];
      p[0] = static_cast<uint8_t>(20 + 210 * x / (width - 1));
      p[1] = green;
      p[2] = 128;
    }
  }
  return image;
}

// Green levels of the fixture images: the preferred image is bright, the other dark; a tie
// has a mid-bright image 0 and a mid-dark image 1.
inline constexpr uint8_t kPreferredGreen = 200, kOtherGreen = 40, kTie0Green = 150, kTie1Green = 90;

struct FixturePair {
  FixturePair(double label = 1.0, bool corrupt = false)  // NOLINT(google-explicit-constructor)
      : label_0(label), corrupt_jpg_0(corrupt) {}
  double label_0 = 1.0;
  bool corrupt_jpg_0 = false;
  std::string image_0_bytes;           // non-empty: KEY.0.jpg holds these bytes instead
  std::string json_text;               // non-empty: KEY.json holds this text instead
  std::optional<int64_t> first_token;  // replaces input_ids[0][0]
};

struct FixtureTokenizer {
  FixtureTokenizer(std::string name_, std::string sha_, int64_t max_length_,
                   int64_t vocab_size_ = 0)
      : name(std::move(name_)),
        sha(std::move(sha_)),
        max_length(max_length_),
        vocab_size(vocab_size_) {}
  std::string name, sha;
  int64_t max_length;
  int64_t vocab_size = 0;  // 0: not written to index.json
};

// Image sizes cycle through this table, so resize/crop paths vary (H, W).
inline const std::vector<std::pair<int, int>> kFixtureSizes = {
    {16, 24}, {20, 16}, {16, 16}, {24, 20}, {18, 30}};

inline std::string fixture_key(int64_t number) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%09lld", static_cast<long long>(number));
  return buffer;
}

inline std::pair<int, int> fixture_size(int64_t number, int which) {
  return kFixtureSizes[static_cast<size_t>(number * 2 + which) % kFixtureSizes.size()];
}

inline int64_t fixture_token(size_t tokenizer, int64_t number, int64_t position) {
  return 1000 * static_cast<int64_t>(tokenizer) + 10 * number + position;
}

// Writes shard-NNNNNN.tar files and index.json into `dir`; returns the index path.
// Pairs are numbered over the whole export; member order inside a group is json, 0, 1.
inline std::string write_fixture(const std::filesystem::path& dir,
                                 const std::vector<std::vector<FixturePair>>& shards,
                                 const std::vector<FixtureTokenizer>& tokenizers) {
  nlohmann::json index = {
      {"format", "dde-pickapic-shards"}, {"version", 2}, {"sources", {"synthetic"}}};
  index["shards"] = nlohmann::json::array();
  int64_t number = 0;
  for (size_t s = 0; s < shards.size(); ++s) {
    std::string tar;
    int64_t ties = 0;
    for (const FixturePair& pair : shards[s]) {
      const std::string key = fixture_key(number);
      nlohmann::json meta = {{"caption", "caption " + std::to_string(number)},
                             {"label_0", pair.label_0},
                             {"label_1", 1.0 - pair.label_0},
                             {"image_0_uid", "u0"},
                             {"image_1_uid", "u1"},
                             {"ranking_id", number},
                             {"source", "synthetic.parquet:" + std::to_string(number)}};
      if (!tokenizers.empty()) {
        meta["input_ids"] = nlohmann::json::array();
        for (size_t t = 0; t < tokenizers.size(); ++t) {
          std::vector<int64_t> ids;
          for (int64_t j = 0; j < tokenizers[t].max_length; ++j) {
            ids.push_back(fixture_token(t, number, j));
          }
          meta["input_ids"].push_back(ids);
        }
        if (pair.first_token) {
          meta["input_ids"][0][0] = *pair.first_token;
        }
      }
      const bool tie = pair.label_0 == 0.5;
      ties += tie ? 1 : 0;
      const uint8_t green_0 =
          tie ? kTie0Green : (pair.label_0 == 1.0 ? kPreferredGreen : kOtherGreen);
      const uint8_t green_1 =
          tie ? kTie1Green : (pair.label_0 == 1.0 ? kOtherGreen : kPreferredGreen);
      const auto [h0, w0] = fixture_size(number, 0);
      const auto [h1, w1] = fixture_size(number, 1);
      tar += ustar_member(key + ".json", pair.json_text.empty() ? meta.dump() : pair.json_text);
      std::string image_0 = encode_jpeg(ramp_image(h0, w0, green_0));
      if (pair.corrupt_jpg_0) {
        image_0 = "not a jpeg";
      } else if (!pair.image_0_bytes.empty()) {
        image_0 = pair.image_0_bytes;
      }
      tar += ustar_member(key + ".0.jpg", image_0);
      tar += ustar_member(key + ".1.jpg", encode_jpeg(ramp_image(h1, w1, green_1)));
      ++number;
    }
    tar += ustar_end();
    char name[32];
    std::snprintf(name, sizeof name, "shard-%06zu.tar", s);
    write_file((dir / name).string(), tar);
    index["shards"].push_back({{"file", name},
                               {"bytes", static_cast<int64_t>(tar.size())},
                               {"sha256", file_sha256((dir / name).string())},
                               {"pairs", static_cast<int64_t>(shards[s].size())},
                               {"ties", ties}});
  }
  index["tokenizers"] = nlohmann::json::array();
  for (const FixtureTokenizer& t : tokenizers) {
    index["tokenizers"].push_back(
        {{"name", t.name}, {"vocab_sha256", t.sha}, {"max_length", t.max_length}});
    if (t.vocab_size > 0) {
      index["tokenizers"].back()["vocab_size"] = t.vocab_size;
    }
  }
  std::string path = (dir / "index.json").string();
  write_file(path, index.dump(2));
  return path;
}

// The two tokenizers, empty prompt and resolution of the data tests' shards.
inline const std::vector<FixtureTokenizer> kTokenizers = {{"tok_a", "sha_a", 4},
                                                          {"tok_b", "sha_b", 3}};
inline const std::vector<std::vector<int64_t>> kEmptyPrompt = {{1, 2, 2, 2}, {5, 6, 6}};
inline constexpr int64_t kResolution = 8;

}  // namespace dde::data::testing
