#include "dde/pairs/caption_tokenizers.hpp"

namespace dde::pairs {

std::vector<data::CaptionTokenizerSpec> caption_tokenizer_specs(const models::Manifest& manifest) {
  std::vector<data::CaptionTokenizerSpec> specs;
  for (const models::TextEncoderInfo& e : manifest.text_encoders) {
    specs.push_back(
        {e.name, e.tokenizer_dir, e.vocab_sha256, e.max_length, e.empty_prompt_ids, manifest.path});
  }
  return specs;
}

}  // namespace dde::pairs
