// CLIP's byte-level BPE tokenizer, read from a pipeline's tokenizer folder (tokenizer/,
// tokenizer_2/). It gives the ids of the pipeline's Python tokenizer:
//   transformers.CLIPTokenizer.from_pretrained(dir)(caption, padding="max_length",
//                                                   max_length=77, truncation=True).input_ids
// (transformers 4.57, the slow tokenizer diffusers loads, with ftfy 6.3 installed), except where
// ftfy repairs mojibake; docs/tokenizer.md lists the differences and counts them. Torch-free;
// a loaded tokenizer is immutable, so threads share one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "dde/util/error.hpp"

namespace dde::text {

// A caption that is not UTF-8: bad input the caller counts or reports with its own "where"
// (shard and key, line number). byte_offset() is the first byte of the bad sequence.
class InvalidUtf8Error : public Error {
 public:
  InvalidUtf8Error(std::string_view caption, std::size_t byte_offset);
  std::size_t byte_offset() const { return byte_offset_; }

 private:
  std::size_t byte_offset_;
};

// A token matched in the raw caption before any clean-up and given its id directly
// (transformers' AddedToken: the special tokens, and tokenizer_config.json's
// added_tokens_decoder; SDXL's tokenizer_2 has "!" among them, its pad token).
struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool lstrip = false;  // eats the whitespace on its left
  bool rstrip = false;  // eats the whitespace on its right
};

class ClipTokenizer {
 public:
  // Reads DIR/vocab.json, DIR/merges.txt and, when present, DIR/tokenizer_config.json and
  // DIR/special_tokens_map.json. A missing or malformed file is a dde::Error naming it (and
  // the line, in merges.txt).
  static ClipTokenizer load(const std::string& dir);

  // [max_length] ids: BOS, the caption's tokens cut to max_length - 2, EOS, then pad ids.
  // An empty caption is valid (BOS, EOS, padding). Throws InvalidUtf8Error.
  std::vector<int32_t> encode(std::string_view caption, int max_length) const;
  // encode(caption, max_length()).
  std::vector<int32_t> encode(std::string_view caption) const;

  // The caption's tokens, without BOS, EOS or padding (CLIPTokenizer.tokenize).
  std::vector<std::string> tokenize(std::string_view caption) const;

  // An added token's id, else the vocabulary's, else the unknown token's
  // (PreTrainedTokenizer._convert_token_to_id_with_added_voc).
  int32_t token_id(std::string_view token) const;

  int32_t bos_id() const { return bos_id_; }
  int32_t eos_id() const { return eos_id_; }
  int32_t pad_id() const { return pad_id_; }
  // tokenizer_config.json's model_max_length (77 for CLIP); 0 when the folder has none.
  int max_length() const { return max_length_; }
  const std::vector<AddedToken>& added_tokens() const { return added_tokens_; }
  std::size_t vocab_size() const { return vocab_.size(); }
  const std::string& dir() const { return dir_; }

 private:
  ClipTokenizer() = default;

  // The caption cut at the added tokens, in order: {text, the added token or nullptr}.
  struct Piece {
    std::string_view text;
    const AddedToken* added = nullptr;
  };
  std::vector<Piece> split_on_added_tokens(std::string_view caption) const;
  // CLIPTokenizer.bpe on one byte-encoded word: its tokens, the last one ending in "</w>".
  std::vector<std::string> bpe(const std::string& word) const;

  std::string dir_;
  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<std::string, int32_t> merge_ranks_;  // "first second" -> rank
  std::vector<AddedToken> added_tokens_;
  int32_t unk_id_ = 0;
  int32_t bos_id_ = 0;
  int32_t eos_id_ = 0;
  int32_t pad_id_ = 0;
  int max_length_ = 0;
};

}  // namespace dde::text
