#include "dde/data/tar_reader.hpp"

#include <gtest/gtest.h>

#include "data/shard_fixture.hpp"
#include "dde/util/error.hpp"

namespace dde::data {
namespace {

using testing::expect_error;
using testing::TempDir;
using testing::ustar_end;
using testing::ustar_header;
using testing::ustar_member;
using testing::write_file;

void read_all(TarReader& reader) {
  while (reader.next()) {
  }
}

TEST(TarReader, IteratesMembersWithDataAndOffsets) {
  TempDir dir;
  const std::string big(700, 'x');
  write_file(dir.file("a.tar"), ustar_member("one.json", "{}") + ustar_member("two.bin", big) +
                                    ustar_member("three", "") + ustar_end());
  TarReader reader(dir.file("a.tar"));
  auto m = reader.next();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->name, "one.json");
  EXPECT_EQ(m->index, 0);
  EXPECT_EQ(m->header_offset, 0);
  EXPECT_EQ(m->data_offset, 512);
  EXPECT_EQ(m->size, 2);
  EXPECT_EQ(reader.read_data(), "{}");
  m = reader.next();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->name, "two.bin");
  EXPECT_EQ(m->index, 1);
  EXPECT_EQ(m->header_offset, 1024);
  EXPECT_EQ(m->size, 700);
  EXPECT_EQ(reader.read_data(), big);
  m = reader.next();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->name, "three");
  EXPECT_EQ(m->header_offset, 1024 + 512 + 1024);
  EXPECT_EQ(m->size, 0);
  EXPECT_EQ(reader.read_data(), "");
  EXPECT_FALSE(reader.next());
}

TEST(TarReader, SkipsUnreadDataWithoutReadingIt) {
  TempDir dir;
  write_file(dir.file("a.tar"),
             ustar_member("a", std::string(1500, 'a')) + ustar_member("b", "bee") + ustar_end());
  TarReader reader(dir.file("a.tar"));
  ASSERT_TRUE(reader.next());
  reader.skip_data();
  auto b = reader.next();
  ASSERT_TRUE(b);
  EXPECT_EQ(b->name, "b");
  EXPECT_EQ(b->header_offset, 512 + 1536);
  EXPECT_EQ(reader.read_data(), "bee");

  TarReader implicit(dir.file("a.tar"));  // next() without read_data() skips too
  ASSERT_TRUE(implicit.next());
  ASSERT_TRUE(implicit.next());
  EXPECT_EQ(implicit.read_data(), "bee");
  std::ifstream file(dir.file("a.tar"), std::ios::binary);
  EXPECT_EQ(read_file_range(file, dir.file("a.tar"), b->data_offset, b->size), "bee");
}

TEST(TarReader, JoinsUstarPrefixAndName) {
  TempDir dir;
  std::string tar =
      ustar_header("file.txt", 1, '0', "some/dir") + "z" + std::string(511, '\0') + ustar_end();
  write_file(dir.file("a.tar"), tar);
  TarReader reader(dir.file("a.tar"));
  auto m = reader.next();
  ASSERT_TRUE(m);
  EXPECT_EQ(m->name, "some/dir/file.txt");
}

TEST(TarReader, EmptyArchiveHasNoMembers) {
  TempDir dir;
  write_file(dir.file("a.tar"), ustar_end());
  TarReader reader(dir.file("a.tar"));
  EXPECT_FALSE(reader.next());
}

TEST(TarReader, CorruptChecksumNamesMemberAndOffset) {
  TempDir dir;
  std::string second = ustar_member("second.jpg", "data");
  second[10] = 'Q';  // inside the name field, checksum no longer matches
  write_file(dir.file("a.tar"), ustar_member("first.json", "{}") + second + ustar_end());
  TarReader reader(dir.file("a.tar"));
  ASSERT_TRUE(reader.next());
  expect_error([&] { reader.next(); }, {"checksum", "a.tar", "member 1", "offset 1024"});
}

TEST(TarReader, TruncatedMemberDataReportsOffsets) {
  TempDir dir;
  const std::string full =
      ustar_member("a.json", "{}") + ustar_member("b.jpg", std::string(2000, 'b'));
  write_file(dir.file("a.tar"), full.substr(0, 1024 + 512 + 100));
  TarReader reader(dir.file("a.tar"));
  ASSERT_TRUE(reader.next());
  expect_error([&] { read_all(reader); },
               {"truncated", "b.jpg", "2000 data bytes from offset 1536", "1636"});
}

TEST(TarReader, TruncatedHeaderAndMissingEndMarkerAreErrors) {
  TempDir dir;
  const std::string one = ustar_member("a.json", "{}");
  write_file(dir.file("header.tar"), one + std::string(100, '\0'));
  TarReader header(dir.file("header.tar"));
  expect_error([&] { read_all(header); }, {"truncated inside a header", "offset 1024"});

  write_file(dir.file("nomarker.tar"), one);
  TarReader nomarker(dir.file("nomarker.tar"));
  expect_error([&] { read_all(nomarker); }, {"truncated", "offset 1024", "end-of-archive"});
}

TEST(TarReader, NonRegularMemberIsAnErrorNamingIt) {
  TempDir dir;
  write_file(dir.file("a.tar"), ustar_header("images/", 0, '5') + ustar_end());
  TarReader reader(dir.file("a.tar"));
  expect_error([&] { reader.next(); },
               {"not a regular file", "images/", "typeflag '5' (directory)"});

  write_file(dir.file("pax.tar"), ustar_header("PaxHeader/x", 0, 'x') + ustar_end());
  TarReader pax(dir.file("pax.tar"));
  expect_error([&] { pax.next(); }, {"pax extended header"});
}

TEST(TarReader, GnuMagicIsRejected) {
  TempDir dir;
  std::string header = ustar_header("a", 0);
  header.replace(257, 8, std::string("ustar  \0", 8));
  testing::set_ustar_checksum(header);  // only the magic is wrong
  write_file(dir.file("a.tar"), header + ustar_end());
  TarReader reader(dir.file("a.tar"));
  expect_error([&] { reader.next(); }, {"not a POSIX ustar header", "ustar  "});
}

TEST(TarReader, MissingFileIsAnError) {
  expect_error([] { TarReader reader("/nonexistent/dde/shard.tar"); },
               {"cannot open", "/nonexistent/dde/shard.tar"});
}

}  // namespace
}  // namespace dde::data
