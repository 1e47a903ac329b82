// The clean-up and split of CLIPTokenizer._tokenize, on cases whose expected values are what
// ftfy 6.3.1 and transformers 4.57 give (checked in Python; tests/python/test_clip_tokenizer.py
// compares whole caption sets).
#include "dde/text/text_cleanup.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace {

using dde::text::clip_clean_text;
using dde::text::clip_split_words;
using dde::text::ftfy_fix_text;
using Words = std::vector<std::string>;

TEST(FtfyFixText, DocumentedExamples) {  // ftfy.fix_text's docstring
  EXPECT_EQ(ftfy_fix_text("Broken text&hellip; it&#x2019;s \xEF\xAC\x82ubberi\xEF\xAC\x81"
                          "c!"),
            "Broken text\xE2\x80\xA6 it's flubberific!");
  EXPECT_EQ(
      ftfy_fix_text("\xEF\xBC\xAC\xEF\xBC\xAF\xEF\xBC\xB5\xEF\xBC\xA4\xE3\x80\x80"
                    "\xEF\xBC\xAE\xEF\xBC\xAF\xEF\xBC\xA9\xEF\xBC\xB3\xEF\xBC\xA5\xEF\xBC\xB3"),
      "LOUD NOISES");  // fullwidth, and the ideographic space
  EXPECT_EQ(ftfy_fix_text("\xEF\xBD\xB6\xEF\xBE\x80\xEF\xBD\xB6\xEF\xBE\x85"),  // halfwidth kana
            "\xE3\x82\xAB\xE3\x82\xBF\xE3\x82\xAB\xE3\x83\x8A");
}

TEST(FtfyFixText, HtmlEntitiesUntilNothingChanges) {
  EXPECT_EQ(ftfy_fix_text("&amp;amp;"), "&");                   // fixed point: two passes
  EXPECT_EQ(ftfy_fix_text("&EACUTE; &SZLIG;"), "\xC3\x89 SS");  // ftfy's upper-case names
  EXPECT_EQ(ftfy_fix_text("&notanentity; &amp"), "&notanentity; &amp");
  EXPECT_EQ(ftfy_fix_text("&#128;"), "\xE2\x82\xAC");  // html.unescape: Windows-1252
  EXPECT_EQ(ftfy_fix_text("&#0; &#x110000;"), "\xEF\xBF\xBD \xEF\xBF\xBD");
  EXPECT_EQ(ftfy_fix_text("a&#1;b"), "ab");               // a dropped code point
  EXPECT_EQ(ftfy_fix_text("&#59;"), "&#59;");             // ';' would stay: kept
  EXPECT_EQ(ftfy_fix_text("&#65a; &#x41;"), "&#65a; A");  // only whole references
}

TEST(FtfyFixText, AnglesTurnUnescapingOffFromTheirLineOn) {
  EXPECT_EQ(ftfy_fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
  EXPECT_EQ(ftfy_fix_text("&amp;\n<b>&amp;\n&amp;"), "&\n<b>&amp;\n&amp;");
}

TEST(FtfyFixText, ControlsQuotesLigaturesAndNfc) {
  EXPECT_EQ(ftfy_fix_text("\x1B[31mred\x1B[0m"), "red");
  EXPECT_EQ(ftfy_fix_text("\xC2\x80\xC2\x81"), "\xE2\x82\xAC\xC2\x81");  // C1 as Windows-1252
  EXPECT_EQ(ftfy_fix_text(std::string("a\0b\x7F"
                                      "c\xEF\xBB\xBF"
                                      "d",
                                      9)),
            "abcd");
  EXPECT_EQ(ftfy_fix_text("e\xCC\x81"), "\xC3\xA9");  // NFC
  EXPECT_EQ(ftfy_fix_text("\xE2\x80\x9C\xEF\xAC\x81ne\xE2\x80\x9D"), "\"fine\"");
  EXPECT_EQ(ftfy_fix_text("\xC5\x89"), "'n");  // U+0149 -> U+02BC 'n' -> 'n
  EXPECT_EQ(ftfy_fix_text("a\r\nb\xE2\x80\xA8"
                          "c"),
            "a\nb\nc");
  EXPECT_EQ(ftfy_fix_text(""), "");
}

TEST(ClipCleanText, WhitespaceAndFullLowerCase) {
  EXPECT_EQ(clip_clean_text("  Hello\t\tWORLD  "), "hello world");
  EXPECT_EQ(clip_clean_text("\xE3\x80\x80x\xC2\xA0y"), "x y");
  // Final sigma: ΟΔΥΣΣΕΥΣ -> οδυσσευς.
  EXPECT_EQ(clip_clean_text("\xCE\x9F\xCE\x94\xCE\xA5\xCE\xA3\xCE\xA3\xCE\x95\xCE\xA5\xCE\xA3"),
            "\xCE\xBF\xCE\xB4\xCF\x85\xCF\x83\xCF\x83\xCE\xB5\xCF\x85\xCF\x82");
  EXPECT_EQ(clip_clean_text("\xC4\xB0"), "i\xCC\x87");  // İ -> i + combining dot (full mapping)
  EXPECT_EQ(clip_clean_text("\xC7\x85"), "d\xC5\xBE");  // ǅ -> Dž (ftfy) -> dž
  EXPECT_EQ(clip_clean_text(" \t "), "");
}

TEST(ClipSplitWords, ThePatternOfCLIPTokenizer) {
  EXPECT_EQ(clip_split_words("it's a cat's 123 !!?"),
            (Words{"it", "'s", "a", "cat", "'s", "1", "2", "3", "!!?"}));
  EXPECT_EQ(clip_split_words("<|endoftext|>hello"), (Words{"<|endoftext|>", "hello"}));
  EXPECT_EQ(clip_split_words("\xC3\xBC"
                             "ber-cool\xE6\x97\xA5\xE6\x9C\xAC"),
            (Words{"\xC3\xBC"
                   "ber",
                   "-", "cool\xE6\x97\xA5\xE6\x9C\xAC"}));
  EXPECT_EQ(clip_split_words(""), Words{});
}

TEST(ClipSplitWords, WhatIgnoringCaseChanges) {
  EXPECT_EQ(clip_split_words("'\xC5\xBFt"), (Words{"'\xC5\xBF", "t"}));  // 'ſ matches 's
  EXPECT_EQ(clip_split_words("<|\xC5\xBFtartoftext|>"), Words{"<|\xC5\xBFtartoftext|>"});
  EXPECT_EQ(clip_split_words("x\xCD\x85y"), (Words{"x", "y"}));  // U+0345 is skipped
}

TEST(PythonStrip, StripsPythonsWhitespace) {
  EXPECT_EQ(dde::text::python_strip(" \t a b \x1C", true, true), "a b");
  EXPECT_EQ(dde::text::python_strip("\xE3\x80\x80"
                                    "a ",
                                    true, false),
            "a ");
  EXPECT_EQ(dde::text::python_strip(" a\xC2\x85", false, true), " a");
  EXPECT_EQ(dde::text::python_strip("\xE2\x80\x8B"
                                    "a",
                                    true, true),
            "\xE2\x80\x8B"
            "a");  // ZWSP
}

}  // namespace
