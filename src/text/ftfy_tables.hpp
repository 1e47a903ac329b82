// The data of ftfy.fix_text that is not a Unicode property, generated from the pinned ftfy and
// Python (scripts/dde_tools/ftfy_tables.py writes ftfy_tables.cpp). Private to src/text.
#pragma once

#include <cstddef>
#include <string_view>

namespace dde::text::ftfy_tables {

// ftfy.chardata.HTML_ENTITIES: "&amp;" -> "&" (UTF-8), sorted by name (byte order).
struct NamedEntity {
  std::string_view name;
  std::string_view text;
};
extern const NamedEntity kNamedEntities[];
extern const std::size_t kNamedEntityCount;

// html._invalid_charrefs: `&#NNN;` numbers that decode to another character (sorted).
struct CharrefReplacement {
  char32_t number;
  char32_t replacement;
};
extern const CharrefReplacement kCharrefReplacements[];
extern const std::size_t kCharrefReplacementCount;

// html._invalid_codepoints: `&#NNN;` numbers that decode to nothing (sorted).
extern const char32_t kCharrefDropped[];
extern const std::size_t kCharrefDroppedCount;

// Bytes 0x80..0x9F decoded as sloppy-windows-1252 (ftfy.fixes.fix_c1_controls).
extern const char32_t kC1AsWindows1252[32];

// ftfy.chardata.LIGATURES: a ligature and the letters it is made of (sorted).
struct Ligature {
  char32_t ligature;
  std::u32string_view letters;
};
extern const Ligature kLatinLigatures[];
extern const std::size_t kLatinLigatureCount;

// ftfy.chardata.CONTROL_CHARS: the characters remove_control_chars deletes (sorted).
extern const char32_t kRemovedControls[];
extern const std::size_t kRemovedControlCount;

// The characters of SINGLE_QUOTE_RE and DOUBLE_QUOTE_RE (uncurl_quotes; sorted).
extern const char32_t kSingleQuotes[];
extern const std::size_t kSingleQuoteCount;
extern const char32_t kDoubleQuotes[];
extern const std::size_t kDoubleQuoteCount;

}  // namespace dde::text::ftfy_tables
