// find_invalid_utf8 rejects what Python's strict UTF-8 decoder rejects, at the first bad byte.
#include "dde/text/utf8.hpp"

#include <gtest/gtest.h>

#include <string>

namespace {

using dde::text::find_invalid_utf8;

TEST(Utf8, AcceptsEveryLengthOfSequence) {
  EXPECT_EQ(find_invalid_utf8(""), std::nullopt);
  EXPECT_EQ(find_invalid_utf8("a cat"), std::nullopt);
  EXPECT_EQ(find_invalid_utf8("caf\xC3\xA9 \xE6\x97\xA5 \xF0\x9F\x90\xB1"), std::nullopt);
  EXPECT_EQ(find_invalid_utf8(std::string("a\0b", 3)), std::nullopt);  // NUL is UTF-8
  EXPECT_EQ(find_invalid_utf8("\xF4\x8F\xBF\xBF"), std::nullopt);      // U+10FFFF
}

TEST(Utf8, NamesTheFirstBadByte) {
  EXPECT_EQ(find_invalid_utf8("ab\xFF"), 2U);
  EXPECT_EQ(find_invalid_utf8("a\x80"), 1U);             // a continuation byte alone
  EXPECT_EQ(find_invalid_utf8("caf\xC3"), 3U);           // cut short at the end
  EXPECT_EQ(find_invalid_utf8("\xC3(x"), 0U);            // lead byte, then ASCII
  EXPECT_EQ(find_invalid_utf8("x\xC0\xAF"), 1U);         // overlong '/'
  EXPECT_EQ(find_invalid_utf8("\xE0\x80\xAF"), 0U);      // overlong, three bytes
  EXPECT_EQ(find_invalid_utf8("ok \xED\xA0\x80"), 3U);   // a surrogate (U+D800)
  EXPECT_EQ(find_invalid_utf8("\xF4\x90\x80\x80"), 0U);  // past U+10FFFF
  EXPECT_EQ(find_invalid_utf8("\xC3\xA9\xFE\xFF"), 2U);
}

TEST(Utf8, HexBytesShowsTheBadBytes) {
  EXPECT_EQ(dde::text::hex_bytes("ab\xFF\xFEz", 2), "0xFF 0xFE 0x7A");
  EXPECT_EQ(dde::text::hex_bytes("ab", 2), "");
  EXPECT_EQ(dde::text::hex_bytes("abcdef", 0, 2), "0x61 0x62");
}

}  // namespace
