// The text clean-up and word split of transformers' CLIPTokenizer with ftfy installed
// (tokenization_clip.py, CLIPTokenizer._tokenize):
//   words = re.findall(pat, whitespace_clean(ftfy.fix_text(text)).lower())
// with ICU for every Unicode operation. UTF-8 in and out; the input must be valid UTF-8
// (find_invalid_utf8). Torch-free and thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace dde::text {

// ftfy.fix_text(text) with ftfy 6.3's default configuration, except `fix_encoding` (mojibake
// repair, a heuristic not reproduced: docs/tokenizer.md). Per line: HTML entities (unless the
// line or an earlier one has a '<'), C1 controls read as Windows-1252, Latin ligatures, full- and
// halfwidth forms, curly quotes, line breaks, terminal escapes, control characters, then NFC;
// repeated until nothing changes.
std::string ftfy_fix_text(std::string_view text);

// whitespace_clean(ftfy_fix_text(text)).lower(): runs of White_Space become one space, the ends
// are stripped, and the text is lower-cased with Unicode's full case mapping (Python's str.lower).
std::string clip_clean_text(std::string_view text);

// re.findall(CLIPTokenizer.pat, cleaned) on clip_clean_text's output: the special tokens, the
// contractions, runs of letters, single digits, runs of other non-space characters.
std::vector<std::string> clip_split_words(std::string_view cleaned);

// Python's str.isspace: White_Space, and U+001C..U+001F (bidi classes B and S).
bool is_python_space(char32_t c);

// `text` without the leading (`left`) and trailing (`right`) characters that are
// is_python_space: Python's str.lstrip() / rstrip() / strip() on UTF-8.
std::string_view python_strip(std::string_view text, bool left, bool right);

}  // namespace dde::text
