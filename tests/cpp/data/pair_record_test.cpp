#include "dde/data/pair_record.hpp"

#include <gtest/gtest.h>

#include "data/shard_fixture.hpp"

namespace dde::data {
namespace {

using testing::expect_error;
using testing::TempDir;
using testing::ustar_end;
using testing::ustar_member;
using testing::write_file;

std::string meta(double label_0, const std::string& caption = "a cat") {
  return nlohmann::json{{"caption", caption},       {"label_0", label_0},
                        {"label_1", 1.0 - label_0}, {"image_0_uid", "x"},
                        {"image_1_uid", "y"},       {"ranking_id", 3},
                        {"source", "a.parquet:7"},  {"input_ids", {{1, 2, 3}, {4, 5, 6}}}}
      .dump();
}

TEST(ShardPairReader, ParsesGroupsInAnyMemberOrder) {
  TempDir dir;
  write_file(dir.file("s.tar"),
             ustar_member("000000000.json", meta(1.0)) + ustar_member("000000000.0.jpg", "J0") +
                 ustar_member("000000000.1.jpg", "J1") + ustar_member("000000001.1.jpg", "K1") +
                 ustar_member("000000001.json", meta(0.5, "tie")) +
                 ustar_member("000000001.0.jpg", "K0") + ustar_end());
  ShardPairReader reader(dir.file("s.tar"));
  auto a = reader.next();
  ASSERT_TRUE(a);
  EXPECT_EQ(a->key, "000000000");
  EXPECT_EQ(a->caption, "a cat");
  EXPECT_EQ(a->source, "a.parquet:7");
  EXPECT_EQ(a->label_0, 1.0);
  EXPECT_EQ(a->label_1, 0.0);
  EXPECT_FALSE(a->is_tie());
  EXPECT_EQ(a->jpg_0, "J0");
  EXPECT_EQ(a->jpg_1, "J1");
  EXPECT_EQ(a->input_ids, (std::vector<std::vector<int64_t>>{{1, 2, 3}, {4, 5, 6}}));
  EXPECT_EQ(a->jpg_0_span.offset, 1024 + 512);
  EXPECT_EQ(a->jpg_0_span.size, 2);
  auto b = reader.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->key, "000000001");
  EXPECT_TRUE(b->is_tie());
  EXPECT_EQ(b->caption, "tie");
  EXPECT_EQ(b->jpg_0, "K0");
  EXPECT_EQ(b->jpg_1, "K1");
  EXPECT_FALSE(reader.next());
  EXPECT_EQ(reader.pairs_read(), 2);
}

TEST(ShardPairReader, SkipModeLeavesBytesButRecordsSpans) {
  TempDir dir;
  write_file(dir.file("s.tar"), ustar_member("k.json", meta(0.0)) +
                                    ustar_member("k.0.jpg", "zero") +
                                    ustar_member("k.1.jpg", "one!") + ustar_end());
  ShardPairReader reader(dir.file("s.tar"), ShardPairReader::Images::kSkip);
  auto a = reader.next();
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->jpg_0.empty());
  EXPECT_TRUE(a->jpg_1.empty());
  std::ifstream file(dir.file("s.tar"), std::ios::binary);
  EXPECT_EQ(read_file_range(file, dir.file("s.tar"), a->jpg_0_span.offset, a->jpg_0_span.size),
            "zero");
  EXPECT_EQ(read_file_range(file, dir.file("s.tar"), a->jpg_1_span.offset, a->jpg_1_span.size),
            "one!");
}

TEST(ShardPairReader, MissingMemberNamesShardAndKey) {
  TempDir dir;
  write_file(dir.file("s.tar"), ustar_member("000000004.json", meta(1.0)) +
                                    ustar_member("000000004.0.jpg", "J0") +
                                    ustar_member("000000005.json", meta(1.0)) + ustar_end());
  ShardPairReader reader(dir.file("s.tar"));
  expect_error([&] { reader.next(); },
               {"missing a member", "s.tar: key 000000004", "000000004.1.jpg", "000000005.json"});

  write_file(dir.file("end.tar"),
             ustar_member("7.json", meta(1.0)) + ustar_member("7.1.jpg", "J1") + ustar_end());
  ShardPairReader end(dir.file("end.tar"));
  expect_error([&] { end.next(); },
               {"missing a member", "end.tar: key 7", "7.0.jpg", "end of shard"});
}

TEST(ShardPairReader, DuplicateOrUnknownMembersAreErrors) {
  TempDir dir;
  write_file(dir.file("dup.tar"), ustar_member("k.json", meta(1.0)) + ustar_member("k.0.jpg", "a") +
                                      ustar_member("k.0.jpg", "b") + ustar_end());
  ShardPairReader dup(dir.file("dup.tar"));
  expect_error([&] { dup.next(); }, {"missing a member", "key k", "k.1.jpg"});

  write_file(dir.file("odd.tar"), ustar_member("k.png", "a") + ustar_end());
  ShardPairReader odd(dir.file("odd.tar"));
  expect_error([&] { odd.next(); }, {"unexpected shard member", "k.png"});
}

// Bad metadata does not stop the reader: the pair comes back with `problem` set (the loader
// skips it as a bad pair) and the next group is read normally.
void expect_problem(ShardPairReader& reader, const std::vector<std::string>& parts) {
  const std::optional<PairRecord> record = reader.next();
  ASSERT_TRUE(record.has_value());
  ASSERT_TRUE(record->problem.has_value()) << "no problem recorded";
  EXPECT_EQ(record->problem->reason(), "bad_metadata");
  EXPECT_EQ(record->key, "k");
  for (const std::string& part : parts) {
    EXPECT_NE(std::string(record->problem->what()).find(part), std::string::npos)
        << "'" << part << "' not in: " << record->problem->what();
  }
  EXPECT_FALSE(reader.next().has_value());
}

TEST(ShardPairReader, BadMetadataIsNamed) {
  TempDir dir;
  const std::string images = ustar_member("k.0.jpg", "a") + ustar_member("k.1.jpg", "b");
  write_file(dir.file("label.tar"), ustar_member("k.json", meta(0.3)) + images + ustar_end());
  ShardPairReader label(dir.file("label.tar"));
  expect_problem(label, {"bad preference labels", "label.tar: member 0 'k.json'", "label_0=0.3"});

  write_file(dir.file("json.tar"), ustar_member("k.json", "{not json") + images + ustar_end());
  ShardPairReader json(dir.file("json.tar"));
  expect_problem(json, {"not valid JSON", "k.json"});

  nlohmann::json no_caption = nlohmann::json::parse(meta(1.0));
  no_caption.erase("caption");
  write_file(dir.file("cap.tar"), ustar_member("k.json", no_caption.dump()) + images + ustar_end());
  ShardPairReader cap(dir.file("cap.tar"));
  expect_problem(cap, {"missing field", "k.json", "caption"});

  nlohmann::json bad_ids = nlohmann::json::parse(meta(1.0));
  bad_ids["input_ids"] = {{1, "x"}};
  write_file(dir.file("ids.tar"), ustar_member("k.json", bad_ids.dump()) + images + ustar_end());
  ShardPairReader ids(dir.file("ids.tar"));
  expect_problem(ids, {"token id", "input_ids[0]"});
}

TEST(ShardPairReader, InputIdsAreOptional) {
  TempDir dir;
  nlohmann::json m = nlohmann::json::parse(meta(1.0));
  m.erase("input_ids");
  write_file(dir.file("s.tar"), ustar_member("k.json", m.dump()) + ustar_member("k.0.jpg", "a") +
                                    ustar_member("k.1.jpg", "b") + ustar_end());
  ShardPairReader reader(dir.file("s.tar"));
  auto a = reader.next();
  ASSERT_TRUE(a);
  EXPECT_TRUE(a->input_ids.empty());
}

}  // namespace
}  // namespace dde::data
