// ClipTokenizer on a hand-made folder (BPE worked by hand), on the tiny fixtures' tokenizers
// (scripts/prepare_tiny.sh; the ids are those transformers' CLIPTokenizer gives), and on broken
// folders: every bad file names itself.
#include "dde/text/clip_tokenizer.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "util/expect_error.hpp"

namespace {

namespace fs = std::filesystem;
using dde::text::ClipTokenizer;
using Ids = std::vector<int32_t>;
using Tokens = std::vector<std::string>;

fs::path fixtures_dir() {
  const char* env = std::getenv("DDE_FIXTURES_DIR");
  return env ? fs::path(env) : fs::path(DDE_SOURCE_DIR) / "fixtures";
}

ClipTokenizer fixture_tokenizer(const std::string& folder) {
  const fs::path dir = fixtures_dir() / "source" / folder;
  if (!fs::is_directory(dir)) {
    ADD_FAILURE() << dir << " is missing: run scripts/prepare_tiny.sh (or set DDE_FIXTURES_DIR)";
  }
  return ClipTokenizer::load(dir.string());
}

// The `n` ids after `ids`, padded with `pad` to 77.
Ids padded(Ids ids, int32_t pad) {
  ids.resize(77, pad);
  return ids;
}

void write(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

// A folder with a vocabulary of 11 tokens and three merges, in the pipelines' format.
class HandMadeTokenizer : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dde_clip_tokenizer_test_" +
            std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    write(dir_ / "vocab.json",
          R"({"c": 0, "a": 1, "t</w>": 2, "ca": 3, "cat</w>": 4, "a</w>": 5, "aa": 6,
              "<|startoftext|>": 7, "<|endoftext|>": 8, "t": 9, "!": 10})");
    write(dir_ / "merges.txt", "#version: 0.2\nc a\nca t</w>\na a\n");
    write(dir_ / "tokenizer_config.json",
          R"({"model_max_length": 8, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>"})");
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
};

TEST_F(HandMadeTokenizer, BpeMergesByRankLeftToRight) {
  const ClipTokenizer tokenizer = ClipTokenizer::load(dir_.string());
  // c a t</w> -> (c a, rank 0) ca t</w> -> (ca t</w>, rank 1) cat</w>
  EXPECT_EQ(tokenizer.tokenize("cat"), Tokens{"cat</w>"});
  // a a a</w>: the pair (a a) merges left to right once; (a a</w>) is no merge.
  EXPECT_EQ(tokenizer.tokenize("aaa"), (Tokens{"aa", "a</w>"}));
  EXPECT_EQ(tokenizer.tokenize("TA"), (Tokens{"t", "a</w>"}));  // lower-cased first
  EXPECT_EQ(tokenizer.tokenize("a cat!"), (Tokens{"a</w>", "cat</w>", "!</w>"}));
  // BOS, cat</w>, EOS, padded with EOS to model_max_length 8; "!</w>" and "z</w>" are unknown.
  EXPECT_EQ(tokenizer.encode("Cat"), (Ids{7, 4, 8, 8, 8, 8, 8, 8}));
  EXPECT_EQ(tokenizer.encode("z!"), (Ids{7, 8, 8, 8, 8, 8, 8, 8}));
  EXPECT_EQ(tokenizer.encode("ta ta ta ta", 6), (Ids{7, 9, 5, 9, 5, 8}));  // truncated, EOS kept
  EXPECT_EQ(tokenizer.encode(""), (Ids{7, 8, 8, 8, 8, 8, 8, 8}));
  EXPECT_EQ(tokenizer.max_length(), 8);
}

TEST_F(HandMadeTokenizer, SpecialTokensMapOverridesAnOldConfig) {
  // The older format (no added_tokens_decoder): special_tokens_map.json's tokens win.
  write(dir_ / "special_tokens_map.json",
        R"({"pad_token": {"content": "!", "lstrip": false, "rstrip": true}})");
  const ClipTokenizer tokenizer = ClipTokenizer::load(dir_.string());
  EXPECT_EQ(tokenizer.pad_id(), 10);
  // "!" is now an added token: cut out before the clean-up, eating the space on its right.
  EXPECT_EQ(tokenizer.tokenize("cat! ! cat"), (Tokens{"cat</w>", "!", "!", "cat</w>"}));
  EXPECT_EQ(tokenizer.encode("cat!"), (Ids{7, 4, 10, 8, 10, 10, 10, 10}));
}

TEST(ClipTokenizerFixtures, Sd15PadsWithEos) {
  const ClipTokenizer tokenizer = fixture_tokenizer("sd15/tokenizer");
  EXPECT_EQ(tokenizer.bos_id(), 912);
  EXPECT_EQ(tokenizer.eos_id(), 913);
  EXPECT_EQ(tokenizer.pad_id(), 913);
  EXPECT_EQ(tokenizer.max_length(), 77);
  EXPECT_EQ(tokenizer.vocab_size(), 914U);
  // a</w> pho t o</w> o f</w> a</w> cat</w>
  const Ids cat = padded({912, 320, 648, 83, 334, 78, 325, 320, 884, 913}, 913);
  EXPECT_EQ(tokenizer.encode("a photo of a cat"), cat);
  EXPECT_EQ(tokenizer.encode("A  Photo\tOF a CAT"), cat);
  EXPECT_EQ(tokenizer.encode("wow!!"), padded({912, 86, 78, 342, 0, 256, 913}, 913));
  EXPECT_EQ(tokenizer.encode(""), padded({912, 913}, 913));  // the unconditional prompt
  // "<|endoftext|>" typed as HTML: unescaped by the clean-up, then matched by the pattern.
  EXPECT_EQ(tokenizer.encode("&lt;|endoftext|&gt;"), padded({912, 913, 913}, 913));
}

TEST(ClipTokenizerFixtures, SdxlTokenizer2PadsWithExclamationMark) {
  const ClipTokenizer tokenizer = fixture_tokenizer("sdxl/tokenizer_2");
  EXPECT_EQ(tokenizer.pad_id(), 0);
  // "!" is an added token here: each one is cut out alone, so "!!" is two "!" (id 0), not
  // "!" + "!</w>" as in SD1.5's tokenizer.
  EXPECT_EQ(tokenizer.tokenize("wow!!"), (Tokens{"w", "o", "w</w>", "!", "!"}));
  EXPECT_EQ(tokenizer.encode("wow!!"), padded({912, 86, 78, 342, 0, 0, 913}, 0));
  EXPECT_EQ(tokenizer.encode(""), padded({912, 913}, 0));
}

TEST(ClipTokenizerFixtures, TruncatesTo77KeepingEos) {
  const ClipTokenizer tokenizer = fixture_tokenizer("sd15/tokenizer");
  std::string caption;
  for (int i = 0; i < 100; ++i) caption += "cat ";
  const Ids ids = tokenizer.encode(caption);
  ASSERT_EQ(ids.size(), 77U);
  EXPECT_EQ(ids.front(), 912);
  EXPECT_EQ(ids[75], 884);
  EXPECT_EQ(ids.back(), 913);
}

TEST(ClipTokenizerFixtures, InvalidUtf8IsATypedErrorWithItsOffset) {
  const ClipTokenizer tokenizer = fixture_tokenizer("sd15/tokenizer");
  try {
    tokenizer.encode("a cat\xFF\xFE");
    FAIL() << "expected InvalidUtf8Error";
  } catch (const dde::text::InvalidUtf8Error& e) {
    EXPECT_EQ(e.byte_offset(), 5U);
    EXPECT_NE(std::string(e.what()).find("byte 5 of 7"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("0xFF 0xFE"), std::string::npos) << e.what();
  }
}

TEST(ClipTokenizerFixtures, ThreadsShareOneTokenizer) {
  const ClipTokenizer tokenizer = fixture_tokenizer("sdxl/tokenizer_2");
  const std::vector<std::string> captions = {"a cat", "wow!!", "&amp; caf\xC3\xA9", ""};
  std::vector<Ids> serial;
  serial.reserve(captions.size());
  for (const auto& caption : captions) serial.push_back(tokenizer.encode(caption));
  std::vector<std::vector<Ids>> results(4);
  std::vector<std::thread> threads;
  threads.reserve(results.size());
  for (auto& result : results) {
    threads.emplace_back([&tokenizer, &captions, &result] {
      for (int repeat = 0; repeat < 50; ++repeat) {
        for (const auto& caption : captions) result.push_back(tokenizer.encode(caption));
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (const auto& result : results) {
    for (std::size_t i = 0; i < result.size(); ++i) EXPECT_EQ(result[i], serial[i % 4]);
  }
}

// Broken folders: a copy of the hand-made one with one file damaged.
class BrokenTokenizer : public HandMadeTokenizer {
 protected:
  void expect_load_error(const std::vector<std::string>& parts) {
    expect_error_mentions([this] { ClipTokenizer::load(dir_.string()); }, parts);
  }
};

TEST_F(BrokenTokenizer, MissingFolderOrFiles) {
  expect_error_mentions([this] { ClipTokenizer::load((dir_ / "nope").string()); },
                        {"not a tokenizer folder", "nope"});
  fs::remove(dir_ / "merges.txt");
  expect_load_error({"merges.txt", (dir_ / "merges.txt").string()});
  fs::remove(dir_ / "vocab.json");
  expect_load_error({"vocab.json", (dir_ / "vocab.json").string()});
}

TEST_F(BrokenTokenizer, CorruptVocab) {
  write(dir_ / "vocab.json", R"({"c": 0, "a": )");  // cut short
  expect_load_error({"vocab.json is not valid JSON", (dir_ / "vocab.json").string()});
  write(dir_ / "vocab.json", "[1, 2]");
  expect_load_error({"vocab.json is not a vocabulary", "array"});
  write(dir_ / "vocab.json", R"({"c": 0, "a": "one"})");
  expect_load_error({"vocab.json has a bad id", "\"a\"", "\"one\""});
  write(dir_ / "vocab.json", "{\"c\xFF\": 0}");
  expect_load_error({"vocab.json is not UTF-8", "vocab.json:1 (byte 3)", "0xFF"});
}

TEST_F(BrokenTokenizer, CorruptMergesNameTheLine) {
  write(dir_ / "merges.txt", "#version: 0.2\nc a\nca t</w> x\n");
  expect_load_error(
      {"merges.txt has a line that is not a merge", "merges.txt:3", "\"ca t</w> x\""});
  write(dir_ / "merges.txt", "#version: 0.2\r\nc a\r\nca t\r\n");  // "cat" is not in vocab.json
  expect_load_error({"merges.txt and vocab.json are not a pair", "merges.txt:3", "\"cat\""});
  write(dir_ / "merges.txt", "#version: 0.2\nc a\n\xC3(\n");
  expect_load_error({"merges.txt is not UTF-8", "merges.txt:3"});
  write(dir_ / "merges.txt", "\n \n");
  expect_load_error({"merges.txt is empty", "merges.txt"});
}

TEST_F(BrokenTokenizer, CorruptConfigs) {
  write(dir_ / "tokenizer_config.json", "{\"model_max_length\": 77,");
  expect_load_error({"tokenizer_config.json is not valid JSON", "tokenizer_config.json"});
  write(dir_ / "tokenizer_config.json", R"({"pad_token": null})");
  expect_load_error({"no pad_token", "tokenizer_config.json: pad_token"});
  write(dir_ / "tokenizer_config.json", R"({"pad_token": "<pad>"})");
  expect_load_error(
      {"special token not in vocab.json", "tokenizer_config.json: pad_token", "\"<pad>\""});
  write(dir_ / "tokenizer_config.json", R"({"added_tokens_decoder": {"x": {"content": "!"}}})");
  expect_load_error({"bad added token id", "added_tokens_decoder", "\"x\""});
  write(dir_ / "tokenizer_config.json", R"({"model_max_length": "77"})");
  expect_load_error({"bad model_max_length", "\"77\""});
}

}  // namespace
