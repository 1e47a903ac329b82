// Token ids from caption text: for shards exported without ids (caption-only, docs/formats.md
// section 2) and for typed validation prompts. One CLIP tokenizer per text encoder of the model
// (text::ClipTokenizer, docs/tokenizer.md), read from the folders the export copied next to the
// manifest and checked there against the manifest's record of them. Torch-free; immutable once
// loaded, so the decode workers share one.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "dde/data/shard_index.hpp"
#include "dde/text/clip_tokenizer.hpp"

namespace dde::data {

// One text encoder's tokenizer as the model's manifest records it.
struct CaptionTokenizerSpec {
  std::string name;                       // the text encoder's: "text_encoder", "text_encoder_2"
  std::string dir;                        // its tokenizer folder; "" = the export copied none
  std::string vocab_sha256;               // of dir/vocab.json at export
  int64_t max_length = 0;                 // ids per caption
  std::vector<int64_t> empty_prompt_ids;  // the pipeline's ids of "" at export
  std::string manifest;                   // the manifest's path, for messages
};

class CaptionTokenizer {
 public:
  // Loads every folder. A folder that is missing (an export made before they were copied),
  // a vocab.json whose sha256 is not the manifest's, or a tokenizer whose ids of "" are not the
  // manifest's (another pad token) is a dde::Error naming the folder and what to do.
  explicit CaptionTokenizer(const std::vector<CaptionTokenizerSpec>& specs);

  // One [max_length] id list per text encoder, in manifest order. An empty caption is valid
  // (the unconditional prompt). Throws text::InvalidUtf8Error.
  std::vector<std::vector<int64_t>> encode(std::string_view caption) const;

  // The tokenizers as index.json records them: what caption-only shards adopt.
  const std::vector<TokenizerInfo>& infos() const { return infos_; }

 private:
  std::vector<text::ClipTokenizer> tokenizers_;
  std::vector<int64_t> max_lengths_;
  std::vector<TokenizerInfo> infos_;
};

// The reason a caption that cannot be tokenized (not UTF-8) is counted under.
inline constexpr const char* kBadCaption = "bad_caption";

// The ids of a pair read from caption-only shards: record.input_ids from its caption.
// Invalid UTF-8 is a BadPairError (kBadCaption) naming `where` (shard and key) and the byte.
void tokenize_record_caption(const CaptionTokenizer& tokenizer, const std::string& caption,
                             const std::string& where,
                             std::vector<std::vector<int64_t>>& input_ids);

}  // namespace dde::data
