#include "dde/data/shard_index.hpp"

#include <gtest/gtest.h>

#include "data/shard_fixture.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::data {
namespace {

using testing::expect_error;
using testing::TempDir;
using testing::write_file;

constexpr const char* kSha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

// Size of a stand-in shard file with room for `pairs` pairs (load() reads no content).
int64_t shard_bytes(int64_t pairs) { return 1024 + 1536 * pairs; }

nlohmann::json valid_index() {
  return {{"format", "dde-pickapic-shards"},
          {"version", 2},
          {"shards",
           {{{"file", "shard-000000.tar"},
             {"bytes", shard_bytes(5)},
             {"sha256", kSha},
             {"pairs", 5},
             {"ties", 1}},
            {{"file", "shard-000001.tar"},
             {"bytes", shard_bytes(3)},
             {"sha256", kSha},
             {"pairs", 3},
             {"ties", 0}}}},
          {"tokenizers",
           {{{"name", "tokenizer"}, {"vocab_sha256", "abc"}, {"max_length", 77}},
            {{"name", "tokenizer_2"}, {"vocab_sha256", "def"}, {"max_length", 77}}}}};
}

void write_shards(const TempDir& dir) {
  write_file(dir.file("shard-000000.tar"), std::string(shard_bytes(5), '\0'));
  write_file(dir.file("shard-000001.tar"), std::string(shard_bytes(3), '\0'));
}

TEST(ShardIndex, LoadsShardsRelativeToTheIndexAndTokenizers) {
  TempDir dir;
  write_shards(dir);
  write_file(dir.file("index.json"), valid_index().dump());
  const ShardIndex index = ShardIndex::load(dir.file("index.json"));
  ASSERT_EQ(index.shards.size(), 2u);
  EXPECT_EQ(index.shards[0].file, "shard-000000.tar");
  EXPECT_EQ(index.shards[0].path, dir.file("shard-000000.tar"));
  EXPECT_EQ(index.shards[0].pairs, 5);
  EXPECT_EQ(index.shards[0].ties, 1);
  EXPECT_EQ(index.shards[1].path, dir.file("shard-000001.tar"));
  EXPECT_EQ(index.total_pairs(), 8);
  EXPECT_EQ(index.total_ties(), 1);
  ASSERT_EQ(index.tokenizers.size(), 2u);
  EXPECT_EQ(index.tokenizers[1].name, "tokenizer_2");
  EXPECT_EQ(index.tokenizers[1].vocab_sha256, "def");
  EXPECT_EQ(index.tokenizers[1].max_length, 77);
}

TEST(ShardIndex, NoTokenizersAndVocabSize) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index.erase("tokenizers");
  write_file(dir.file("index.json"), index.dump());
  EXPECT_TRUE(ShardIndex::load(dir.file("index.json")).tokenizers.empty());
  index = valid_index();
  index["tokenizers"][1]["vocab_size"] = 49408;
  write_file(dir.file("index.json"), index.dump());
  const ShardIndex loaded = ShardIndex::load(dir.file("index.json"));
  EXPECT_EQ(loaded.tokenizers[0].vocab_size, 0);  // not recorded
  EXPECT_EQ(loaded.tokenizers[1].vocab_size, 49408);
}

TEST(ShardIndex, ShardPathsMustStayInTheIndexFolder) {
  TempDir dir;
  write_shards(dir);
  std::filesystem::create_directories(dir.path() / "export");
  std::filesystem::create_directories(dir.path() / "export" / "sub");
  write_file(dir.file("export/sub/inner.tar"), std::string(shard_bytes(5), '\0'));
  for (const std::string& file :
       {std::string("../shard-000000.tar"), dir.file("shard-000000.tar"),
        std::string("sub/inner.tar"), std::string(".."), std::string("")}) {
    nlohmann::json index = valid_index();
    index["shards"][0]["file"] = file;
    write_file(dir.file("export/index.json"), index.dump());
    expect_error([&] { ShardIndex::load(dir.file("export/index.json")); },
                 {"shard path leaves the index's folder", "shards[0]: file", "a plain file name"});
  }
  // A symlink whose target lies outside the folder is refused; one inside is fine.
  std::filesystem::create_symlink(dir.file("shard-000000.tar"), dir.file("export/out.tar"));
  std::filesystem::create_symlink(dir.file("export/sub/inner.tar"), dir.file("export/in.tar"));
  nlohmann::json index = valid_index();
  index["shards"] = {index["shards"][0]};
  index["shards"][0]["file"] = "out.tar";
  write_file(dir.file("export/index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("export/index.json")); },
               {"shard path leaves the index's folder", "through a symlink"});
  index["shards"][0]["file"] = "in.tar";
  write_file(dir.file("export/index.json"), index.dump());
  EXPECT_EQ(ShardIndex::load(dir.file("export/index.json")).shards[0].path,
            dir.file("export/in.tar"));
}

TEST(ShardIndex, SizeMustMatchAndCountsMustFit) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index["shards"][1]["bytes"] = shard_bytes(3) + 512;
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"shard size does not match index.json", "shards[1]: bytes",
                std::to_string(shard_bytes(3) + 512) + " bytes",
                "got " + std::to_string(shard_bytes(3)) + " bytes"});
  index = valid_index();
  index["shards"][1]["pairs"] = 4;  // 4 pairs cannot fit in the bytes of 3
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"shard too small for its pair count", "shards[1]", "got 4"});
  index = valid_index();
  index["shards"][0]["sha256"] = "ABC";
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"bad sha256", "shards[0]: sha256", "64 lowercase hex digits", "'ABC'"});
}

TEST(ShardIndex, NumbersAndParseErrorsNameTheFileAndFieldWithoutRawBytes) {
  TempDir dir;
  write_shards(dir);
  std::string text = valid_index().dump();
  text.replace(text.find("\"pairs\":5"), 9, "\"pairs\":1e400");
  write_file(dir.file("index.json"), text);
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"not valid JSON", dir.file("index.json") + ": near field 'pairs'", "1e400"});
  nlohmann::json index = valid_index();
  index["shards"][0]["pairs"] = 18446744073709551615ULL;
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"count too large", "shards[0]: pairs"});
  write_file(dir.file("index.json"), std::string("{\"format\": \x7f\x45\x4c\x46\x02\x01", 17));
  try {
    ShardIndex::load(dir.file("index.json"));
    ADD_FAILURE() << "expected an error";
  } catch (const Error& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(dir.file("index.json")), std::string::npos) << message;
    for (const char c : message) {
      EXPECT_TRUE(c >= 32 && c < 127) << "raw byte " << static_cast<int>(c) << " in: " << message;
    }
  }
}

TEST(ShardIndex, MissingShardFileIsNamed) {
  TempDir dir;
  write_file(dir.file("shard-000000.tar"), std::string(shard_bytes(5), '\0'));
  write_file(dir.file("index.json"), valid_index().dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"shard file missing", "shards[1]", dir.file("shard-000001.tar")});
}

TEST(ShardIndex, WrongFormatOrVersionIsRefused) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index["format"] = "dde-manifest";
  write_file(dir.file("index.json"), index.dump());
  expect_error(
      [&] { ShardIndex::load(dir.file("index.json")); },
      {"not a dde shard index", "index.json: format", "dde-pickapic-shards", "dde-manifest"});

  index = valid_index();
  index["version"] = 1;
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"unsupported shard index version", "expected 2, got 1",
                "version 1 indexes carry no shard sizes or hashes",
                "re-export the shards with this version of dde_tools.export_pickapic"});
}

TEST(ShardIndex, BadFieldsAreNamed) {
  TempDir dir;
  write_shards(dir);
  nlohmann::json index = valid_index();
  index["shards"][1].erase("pairs");
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"missing field", "shards[1]: pairs"});

  index = valid_index();
  index["shards"][0]["ties"] = "one";
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"wrong field type", "shards[0]: ties", "string"});

  index = valid_index();
  index["shards"][0]["ties"] = 6;
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); },
               {"more ties than pairs", "shards[0]"});

  index = valid_index();
  index["tokenizers"][0].erase("vocab_sha256");
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); }, {"tokenizers[0]: vocab_sha256"});

  index = valid_index();
  index["shards"] = nlohmann::json::array();
  write_file(dir.file("index.json"), index.dump());
  expect_error([&] { ShardIndex::load(dir.file("index.json")); }, {"lists no shards"});
}

TEST(ShardIndex, UnreadableOrInvalidJson) {
  TempDir dir;
  expect_error([&] { ShardIndex::load(dir.file("missing.json")); },
               {"cannot open shard index", "missing.json"});
  write_file(dir.file("index.json"), "{\"format\": ");
  expect_error([&] { ShardIndex::load(dir.file("index.json")); }, {"not valid JSON", "index.json"});
}

}  // namespace
}  // namespace dde::data

namespace dde::data {
namespace {

TEST(CheckShards, CountsFromTarHeadersDuplicateKeysAndSha256) {
  testing::TempDir dir;
  const std::string path = testing::write_fixture(
      dir.path(), {{{1.0}, {0.0}, {0.5}}, {{1.0}, {0.0}}}, {{"tok", "sha", 3}});
  ShardIndex index = ShardIndex::load(path);
  const ShardCheckReport ok = check_shards(index, /*verify_sha256=*/true);
  EXPECT_EQ(ok.shards, 2);
  EXPECT_EQ(ok.pairs, 5);
  EXPECT_EQ(ok.bytes_hashed, index.shards[0].bytes + index.shards[1].bytes);
  EXPECT_EQ(check_shards(index, true, /*offset=*/1, /*stride=*/2).bytes_hashed,
            index.shards[1].bytes);

  ShardIndex wrong = index;
  wrong.shards[0].pairs = 2;
  expect_error([&] { check_shards(wrong, false); },
               {"shard pair count does not match index.json", "shards[0]", "2 pairs (index.json)",
                "got 3 pairs in the tar headers"});
  wrong = index;
  wrong.shards[1].sha256[0] = wrong.shards[1].sha256[0] == '0' ? '1' : '0';
  EXPECT_NO_THROW(check_shards(wrong, false));  // data.verify: false
  expect_error([&] { check_shards(wrong, true); },
               {"shard sha256 does not match index.json", "shards[1]", wrong.shards[1].sha256,
                index.shards[1].sha256});

  // The same shard listed twice: every key appears twice.
  ShardIndex twice = index;
  twice.shards[1] = index.shards[0];
  expect_error([&] { check_shards(twice, false); },
               {"duplicate pair key in the export", "shards[1]", "key '000000000'",
                "also pair 0 of shards[0]"});
}

TEST(CheckShards, Sha256OfAKnownFile) {
  testing::TempDir dir;
  testing::write_file(dir.file("abc"), "abc");  // FIPS 180-2 test vector
  EXPECT_EQ(file_sha256(dir.file("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(ShardIndex, OversizedIndexIsRefusedByItsSize) {
  TempDir dir;
  const std::string path = dir.file("index.json");
  write_file(path, "{}");
  std::filesystem::resize_file(path, util::kMaxIndexBytes + 1);  // sparse
  expect_error([&] { ShardIndex::load(path); },
               {"shard index too large", path, std::to_string(util::kMaxIndexBytes) + " bytes",
                std::to_string(util::kMaxIndexBytes + 1) + " bytes"});
}

}  // namespace
}  // namespace dde::data
