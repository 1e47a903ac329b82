#include "dde/text/text_cleanup.hpp"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/regex.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "ftfy_tables.hpp"

namespace dde::text {

namespace {

using icu::UnicodeString;
namespace tables = ftfy_tables;

// ftfy.TextFixerConfig.max_decode_length: fix_text cuts longer lines into pieces of this many
// code points.
constexpr int32_t kMaxDecodeLength = 1'000'000;

void check_icu(UErrorCode status, const char* what) {
  if (U_FAILURE(status)) {
    throw std::runtime_error(std::string("ICU: ") + what + ": " + u_errorName(status));
  }
}

std::unique_ptr<icu::RegexPattern> compile(const char* pattern) {
  UErrorCode status = U_ZERO_ERROR;
  UParseError where{};
  std::unique_ptr<icu::RegexPattern> compiled(
      icu::RegexPattern::compile(UnicodeString::fromUTF8(pattern), 0, where, status));
  check_icu(status, pattern);
  return compiled;
}

// What ICU builds once; const afterwards, so shared by every thread.
struct UnicodeData {
  const icu::Normalizer2* nfc = nullptr;
  // ftfy.fixes.ANSI_RE ("\033\[((?:\d|;)*)([a-zA-Z])"; Python's \d is \p{Nd}, as ICU's).
  std::unique_ptr<icu::RegexPattern> terminal_escape;
  // CLIPTokenizer.pat, compiled with re.IGNORECASE by Python's `regex` module and matched on
  // lower-cased text. Ignoring case changes what it matches in two places only (the rest is
  // spelled out as in tokenization_clip.py): 'ſ' (U+017F) folds to 's', so "'ſ" and
  // "<|ſtartoftext|>" match; and U+0345 (a combining mark that folds to the letter iota) is
  // neither a letter nor "other", so no alternative matches it and findall skips it.
  std::unique_ptr<icu::RegexPattern> clip_words;
  // ftfy.chardata.WIDTH_MAP: U+3000 -> ' ', and U+FF01..U+FFEF -> their NFKC form where it differs.
  std::unordered_map<UChar32, UnicodeString> width;
};

UnicodeData make_unicode_data() {
  UnicodeData data;
  UErrorCode status = U_ZERO_ERROR;
  data.nfc = icu::Normalizer2::getNFCInstance(status);
  check_icu(status, "NFC");
  const icu::Normalizer2* nfkc = icu::Normalizer2::getNFKCInstance(status);
  check_icu(status, "NFKC");
  data.terminal_escape = compile(R"(\x{1B}\[(?:\d|;)*[a-zA-Z])");
  data.clip_words = compile(
      R"(<\|[s\x{17F}]tartoftext\|>|<\|endoftext\|>|'[s\x{17F}]|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N})"
      R"(|[^\p{White_Space}\p{L}\p{N}\x{345}]+)");
  data.width.emplace(0x3000, UnicodeString(static_cast<UChar32>(' ')));
  for (UChar32 c = 0xFF01; c < 0xFFF0; ++c) {
    const UnicodeString one(c);
    UnicodeString folded = nfkc->normalize(one, status);
    check_icu(status, "NFKC of a width form");
    if (folded != one) data.width.emplace(c, std::move(folded));
  }
  return data;
}

const UnicodeData& unicode_data() {
  static const UnicodeData data = make_unicode_data();
  return data;
}

template <typename T>
bool contains(const T* sorted, std::size_t count, T value) {
  return std::binary_search(sorted, sorted + count, value);
}

// `text` with each code point for which replace(c, out) returns false copied unchanged.
template <typename Replace>
UnicodeString map_code_points(const UnicodeString& text, Replace&& replace) {
  UnicodeString out;
  for (int32_t i = 0; i < text.length(); i += U16_LENGTH(text.char32At(i))) {
    const UChar32 c = text.char32At(i);
    if (!replace(c, out)) out.append(c);
  }
  return out;
}

bool is_ascii_alnum(char16_t c) {
  return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

// html.unescape of a whole `&#...;` match (Python's html._replace_charref), or nothing when it
// does not decode all of it: ftfy then keeps the match (its result would still hold the ';').
std::optional<UnicodeString> decode_charref(const std::string& match) {
  std::string_view body(match);
  body = body.substr(2, body.size() - 3);  // between "&#" and ";"
  const bool hex = body[0] == 'x' || body[0] == 'X';
  if (hex) body.remove_prefix(1);
  if (body.empty()) return std::nullopt;
  uint32_t number = 0;  // saturates past U+10FFFF: all such numbers decode alike
  for (char c : body) {
    int digit = -1;
    if (c >= '0' && c <= '9') digit = c - '0';
    if (hex && c >= 'a' && c <= 'f') digit = c - 'a' + 10;
    if (hex && c >= 'A' && c <= 'F') digit = c - 'A' + 10;
    if (digit < 0) return std::nullopt;
    number = std::min<uint32_t>(number * (hex ? 16 : 10) + digit, 0x110000);
  }
  const auto* end = tables::kCharrefReplacements + tables::kCharrefReplacementCount;
  const auto* found = std::lower_bound(
      tables::kCharrefReplacements, end, number,
      [](const tables::CharrefReplacement& r, uint32_t n) { return r.number < n; });
  if (found != end && found->number == number) {
    return UnicodeString(static_cast<UChar32>(found->replacement));
  }
  if ((number >= 0xD800 && number <= 0xDFFF) || number > 0x10FFFF) {
    return UnicodeString(static_cast<UChar32>(0xFFFD));
  }
  if (contains(tables::kCharrefDropped, tables::kCharrefDroppedCount,
               static_cast<char32_t>(number))) {
    return UnicodeString();
  }
  if (number == ';') return std::nullopt;
  return UnicodeString(static_cast<UChar32>(number));
}

// ftfy.fixes.unescape_html: each match of r"&#?[0-9A-Za-z]{1,24};" that is one of
// ftfy.chardata.HTML_ENTITIES or a decodable character reference is replaced (one pass).
UnicodeString unescape_html(const UnicodeString& text) {
  UnicodeString out;
  const int32_t n = text.length();
  int32_t i = 0;
  while (i < n) {
    if (text[i] == u'&') {
      const int32_t body = (i + 1 < n && text[i + 1] == u'#') ? i + 2 : i + 1;
      int32_t end = body;
      while (end < n && end - body <= 24 && is_ascii_alnum(text[end])) ++end;
      if (end > body && end - body <= 24 && end < n && text[end] == u';') {
        std::string match;
        text.tempSubStringBetween(i, end + 1).toUTF8String(match);
        const auto* entities_end = tables::kNamedEntities + tables::kNamedEntityCount;
        const auto* found = std::lower_bound(
            tables::kNamedEntities, entities_end, match,
            [](const tables::NamedEntity& e, const std::string& m) { return e.name < m; });
        std::optional<UnicodeString> decoded;
        if (found != entities_end && found->name == match) {
          decoded = UnicodeString::fromUTF8(
              icu::StringPiece(found->text.data(), static_cast<int32_t>(found->text.size())));
        } else if (body == i + 2) {
          decoded = decode_charref(match);
        }
        out.append(decoded ? *decoded : text.tempSubStringBetween(i, end + 1));
        i = end + 1;
        continue;
      }
    }
    out.append(text[i]);
    ++i;
  }
  return out;
}

UnicodeString fix_c1_controls(const UnicodeString& text) {
  return map_code_points(text, [](UChar32 c, UnicodeString& out) {
    if (c < 0x80 || c > 0x9F) return false;
    out.append(static_cast<UChar32>(tables::kC1AsWindows1252[c - 0x80]));
    return true;
  });
}

UnicodeString fix_latin_ligatures(const UnicodeString& text) {
  return map_code_points(text, [](UChar32 c, UnicodeString& out) {
    const auto* end = tables::kLatinLigatures + tables::kLatinLigatureCount;
    const auto* found =
        std::lower_bound(tables::kLatinLigatures, end, static_cast<char32_t>(c),
                         [](const tables::Ligature& l, char32_t v) { return l.ligature < v; });
    if (found == end || found->ligature != static_cast<char32_t>(c)) return false;
    for (char32_t letter : found->letters) out.append(static_cast<UChar32>(letter));
    return true;
  });
}

UnicodeString fix_character_width(const UnicodeString& text) {
  const auto& width = unicode_data().width;
  return map_code_points(text, [&width](UChar32 c, UnicodeString& out) {
    const auto found = width.find(c);
    if (found == width.end()) return false;
    out.append(found->second);
    return true;
  });
}

UnicodeString uncurl_quotes(const UnicodeString& text) {
  return map_code_points(text, [](UChar32 c, UnicodeString& out) {
    const auto v = static_cast<char32_t>(c);
    if (contains(tables::kSingleQuotes, tables::kSingleQuoteCount, v)) {
      out.append(static_cast<UChar32>('\''));
    } else if (contains(tables::kDoubleQuotes, tables::kDoubleQuoteCount, v)) {
      out.append(static_cast<UChar32>('"'));
    } else {
      return false;
    }
    return true;
  });
}

// CRLF, CR, U+2028, U+2029 and U+0085 become '\n'.
UnicodeString fix_line_breaks(const UnicodeString& text) {
  UnicodeString out;
  for (int32_t i = 0; i < text.length(); ++i) {
    const char16_t c = text[i];
    if (c == u'\r' && i + 1 < text.length() && text[i + 1] == u'\n') continue;
    const bool line_break = c == u'\r' || c == 0x2028 || c == 0x2029 || c == 0x85;
    out.append(line_break ? char16_t{u'\n'} : c);
  }
  return out;
}

UnicodeString remove_terminal_escapes(const UnicodeString& text) {
  if (text.indexOf(char16_t{0x1B}) < 0) return text;
  UErrorCode status = U_ZERO_ERROR;
  std::unique_ptr<icu::RegexMatcher> matcher(unicode_data().terminal_escape->matcher(text, status));
  check_icu(status, "terminal escape matcher");
  UnicodeString out = matcher->replaceAll(UnicodeString(), status);
  check_icu(status, "terminal escape replace");
  return out;
}

UnicodeString remove_control_chars(const UnicodeString& text) {
  return map_code_points(text, [](UChar32 c, UnicodeString&) {
    return contains(tables::kRemovedControls, tables::kRemovedControlCount,
                    static_cast<char32_t>(c));
  });
}

// ftfy.fix_and_explain on one segment with fix_encoding off: the fixers in ftfy's order, then
// NFC, until a pass changes nothing.
UnicodeString fix_segment(UnicodeString text, bool unescape) {
  const icu::Normalizer2& nfc = *unicode_data().nfc;
  while (true) {
    const UnicodeString before = text;
    if (unescape) text = unescape_html(text);
    text = fix_c1_controls(text);
    text = fix_latin_ligatures(text);
    text = fix_character_width(text);
    text = uncurl_quotes(text);
    text = fix_line_breaks(text);
    // fix_surrogates: valid UTF-8 holds no surrogates.
    text = remove_terminal_escapes(text);
    text = remove_control_chars(text);
    UErrorCode status = U_ZERO_ERROR;
    text = nfc.normalize(text, status);
    check_icu(status, "NFC");
    if (text == before) return text;
  }
}

// ftfy.fix_text: lines (each with its '\n') fixed one at a time. unescape_html="auto" turns
// itself off at the first line holding a '<' (text that looks like HTML keeps its entities),
// and stays off for the lines after it.
UnicodeString fix_text(const UnicodeString& text) {
  UnicodeString out;
  bool unescape = true;
  int32_t pos = 0;
  while (pos < text.length()) {
    int32_t end = text.indexOf(char16_t{u'\n'}, pos);
    end = end < 0 ? text.length() : end + 1;
    if (text.countChar32(pos, end - pos) > kMaxDecodeLength) {
      end = text.moveIndex32(pos, kMaxDecodeLength);
    }
    const UnicodeString segment = text.tempSubStringBetween(pos, end);
    if (unescape && segment.indexOf(char16_t{u'<'}) >= 0) unescape = false;
    out.append(fix_segment(segment, unescape));
    pos = end;
  }
  return out;
}

// tokenization_clip.whitespace_clean: re.sub(r"\s+", " ", text).strip(); the `regex` module's
// \s is White_Space.
UnicodeString whitespace_clean(const UnicodeString& text) {
  UnicodeString collapsed;
  bool in_space = false;
  for (int32_t i = 0; i < text.length(); i += U16_LENGTH(text.char32At(i))) {
    const UChar32 c = text.char32At(i);
    const bool space = u_hasBinaryProperty(c, UCHAR_WHITE_SPACE);
    if (!space) collapsed.append(c);
    if (space && !in_space) collapsed.append(static_cast<UChar32>(' '));
    in_space = space;
  }
  int32_t begin = 0;
  int32_t end = collapsed.length();
  while (begin < end && is_python_space(static_cast<char32_t>(collapsed.char32At(begin)))) {
    begin = collapsed.moveIndex32(begin, 1);
  }
  while (end > begin && is_python_space(static_cast<char32_t>(collapsed.char32At(end - 1)))) {
    end = collapsed.moveIndex32(end, -1);
  }
  return UnicodeString(collapsed, begin, end - begin);
}

UnicodeString from_utf8(std::string_view text) {
  return UnicodeString::fromUTF8(icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
}

std::string to_utf8(const UnicodeString& text) {
  std::string out;
  text.toUTF8String(out);
  return out;
}

}  // namespace

bool is_python_space(char32_t c) {
  const auto code_point = static_cast<UChar32>(c);
  return u_hasBinaryProperty(code_point, UCHAR_WHITE_SPACE) || (c >= 0x1C && c <= 0x1F);
}

std::string_view python_strip(std::string_view text, bool left, bool right) {
  const auto* data = reinterpret_cast<const uint8_t*>(text.data());
  auto begin = static_cast<int32_t>(0);
  auto end = static_cast<int32_t>(text.size());
  while (left && begin < end) {
    int32_t next = begin;
    UChar32 c = 0;
    U8_NEXT(data, next, end, c);
    if (c < 0 || !is_python_space(static_cast<char32_t>(c))) break;
    begin = next;
  }
  while (right && end > begin) {
    int32_t previous = end;
    UChar32 c = 0;
    U8_PREV(data, begin, previous, c);
    if (c < 0 || !is_python_space(static_cast<char32_t>(c))) break;
    end = previous;
  }
  return text.substr(static_cast<std::size_t>(begin), static_cast<std::size_t>(end - begin));
}

std::string ftfy_fix_text(std::string_view text) { return to_utf8(fix_text(from_utf8(text))); }

std::string clip_clean_text(std::string_view text) {
  UnicodeString cleaned = whitespace_clean(fix_text(from_utf8(text)));
  cleaned.toLower(icu::Locale::getRoot());  // Python's str.lower: full mappings, final sigma
  return to_utf8(cleaned);
}

std::vector<std::string> clip_split_words(std::string_view cleaned) {
  const UnicodeString text = from_utf8(cleaned);
  UErrorCode status = U_ZERO_ERROR;
  std::unique_ptr<icu::RegexMatcher> matcher(unicode_data().clip_words->matcher(text, status));
  check_icu(status, "word matcher");
  std::vector<std::string> words;
  while (matcher->find(status)) {
    check_icu(status, "word split");
    words.push_back(to_utf8(matcher->group(status)));
  }
  check_icu(status, "word split");
  return words;
}

}  // namespace dde::text
