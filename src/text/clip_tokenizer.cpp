// ClipTokenizer: a caption to ids, as transformers' slow CLIPTokenizer does it (transformers 4.57):
// PreTrainedTokenizer.tokenize cuts the caption at the added tokens; CLIPTokenizer._tokenize
// cleans each other piece, splits it into words, maps each word's UTF-8 bytes to characters
// (bytes_to_unicode) and applies BPE; prepare_for_model adds BOS and EOS, truncates and pads.
#include "dde/text/clip_tokenizer.hpp"

#include <unicode/utf8.h>

#include <array>
#include <limits>
#include <string>
#include <utility>

#include "dde/text/text_cleanup.hpp"
#include "dde/text/utf8.hpp"

namespace dde::text {

namespace {

// CLIP's bytes_to_unicode: the printable Latin-1 bytes stand for themselves, the other 68 bytes
// for U+0100, U+0101, ... in byte order. [byte] -> the UTF-8 of its character.
const std::array<std::string, 256>& byte_symbols() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> symbols;
    UChar32 next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      const UChar32 c = printable ? b : next++;
      char utf8[U8_MAX_LENGTH];
      int32_t length = 0;
      U8_APPEND_UNSAFE(utf8, length, c);
      symbols[b].assign(utf8, static_cast<std::size_t>(length));
    }
    return symbols;
  }();
  return table;
}

// The end-of-word marker BPE appends to a word's last symbol.
constexpr const char* kEndOfWord = "</w>";

}  // namespace

std::vector<ClipTokenizer::Piece> ClipTokenizer::split_on_added_tokens(
    std::string_view caption) const {
  // tokenization_utils.Trie.split: the longest added token at the earliest position.
  std::vector<Piece> pieces;
  std::size_t start = 0;
  std::size_t i = 0;
  while (i < caption.size()) {
    const AddedToken* found = nullptr;
    for (const AddedToken& token : added_tokens_) {
      if (!token.content.empty() && caption.compare(i, token.content.size(), token.content) == 0 &&
          (found == nullptr || token.content.size() > found->content.size())) {
        found = &token;
      }
    }
    if (found == nullptr) {
      ++i;
      continue;
    }
    if (i > start) pieces.push_back({caption.substr(start, i - start), nullptr});
    pieces.push_back({caption.substr(i, found->content.size()), found});
    i += found->content.size();
    start = i;
  }
  if (start < caption.size()) pieces.push_back({caption.substr(start), nullptr});
  // An added token with rstrip (lstrip) eats the whitespace of the piece after (before) it.
  for (std::size_t k = 0; k < pieces.size(); ++k) {
    if (pieces[k].added == nullptr) continue;
    if (pieces[k].added->rstrip && k + 1 < pieces.size()) {
      pieces[k + 1].text = python_strip(pieces[k + 1].text, true, false);
    }
    if (pieces[k].added->lstrip && k > 0) {
      pieces[k - 1].text = python_strip(pieces[k - 1].text, false, true);
    }
  }
  return pieces;
}

std::vector<std::string> ClipTokenizer::bpe(const std::string& word) const {
  // CLIPTokenizer.cache starts with these two, which BPE would otherwise split.
  if (word == "<|startoftext|>" || word == "<|endoftext|>") return {word};
  std::vector<std::string> symbols;  // the word's characters (1 or 2 UTF-8 bytes each)
  for (std::size_t i = 0; i < word.size();) {
    const std::size_t length = U8_COUNT_TRAIL_BYTES(static_cast<uint8_t>(word[i])) + 1;
    symbols.push_back(word.substr(i, length));
    i += length;
  }
  if (symbols.empty()) return symbols;
  symbols.back() += kEndOfWord;
  std::string key;
  while (symbols.size() > 1) {
    // The adjacent pair with the lowest merge rank; none left: done.
    int32_t best_rank = std::numeric_limits<int32_t>::max();
    std::size_t best = symbols.size();
    for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
      key.assign(symbols[i]).append(" ").append(symbols[i + 1]);
      const auto found = merge_ranks_.find(key);
      if (found != merge_ranks_.end() && found->second < best_rank) {
        best_rank = found->second;
        best = i;
      }
    }
    if (best == symbols.size()) break;
    // Merge every occurrence of the pair, left to right.
    const std::string first = symbols[best];
    const std::string second = symbols[best + 1];
    std::vector<std::string> merged;
    merged.reserve(symbols.size());
    for (std::size_t i = 0; i < symbols.size(); ++i) {
      if (i + 1 < symbols.size() && symbols[i] == first && symbols[i + 1] == second) {
        merged.push_back(first + second);
        ++i;
      } else {
        merged.push_back(std::move(symbols[i]));
      }
    }
    symbols = std::move(merged);
  }
  return symbols;
}

std::vector<std::string> ClipTokenizer::tokenize(std::string_view caption) const {
  if (const auto bad = find_invalid_utf8(caption)) throw InvalidUtf8Error(caption, *bad);
  const std::array<std::string, 256>& symbols = byte_symbols();
  std::vector<std::string> tokens;
  for (const Piece& piece : split_on_added_tokens(caption)) {
    if (piece.text.empty()) continue;
    if (piece.added != nullptr) {
      tokens.push_back(piece.added->content);
      continue;
    }
    for (const std::string& word : clip_split_words(clip_clean_text(piece.text))) {
      std::string encoded;
      for (const char byte : word) encoded += symbols[static_cast<uint8_t>(byte)];
      for (std::string& token : bpe(encoded)) tokens.push_back(std::move(token));
    }
  }
  return tokens;
}

int32_t ClipTokenizer::token_id(std::string_view token) const {
  for (const AddedToken& added : added_tokens_) {
    if (added.content == token) return added.id;
  }
  const auto found = vocab_.find(std::string(token));
  return found != vocab_.end() ? found->second : unk_id_;
}

std::vector<int32_t> ClipTokenizer::encode(std::string_view caption, int max_length) const {
  if (max_length < 2) {
    throw Error({"max_length too small", dir_, "at least 2 (BOS and EOS)",
                 std::to_string(max_length), "pass the text encoder's length (77 for CLIP)"});
  }
  const auto length = static_cast<std::size_t>(max_length);
  std::vector<int32_t> ids;
  ids.reserve(length);
  ids.push_back(bos_id_);
  for (const std::string& token : tokenize(caption)) {
    if (ids.size() == length - 1) break;  // truncation keeps EOS
    ids.push_back(token_id(token));
  }
  ids.push_back(eos_id_);
  ids.resize(length, pad_id_);
  return ids;
}

std::vector<int32_t> ClipTokenizer::encode(std::string_view caption) const {
  if (max_length_ == 0) {
    throw Error({"no model_max_length", dir_ + "/tokenizer_config.json", "the tokenizer's length",
                 "none", "pass max_length (77 for CLIP)"});
  }
  return encode(caption, max_length_);
}

}  // namespace dde::text
