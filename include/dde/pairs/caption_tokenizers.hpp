// The model's tokenizers as the data side reads them (data::CaptionTokenizer): one spec per
// text encoder of the manifest, in its order.
#pragma once

#include <vector>

#include "dde/data/caption_tokenizer.hpp"
#include "dde/models/manifest.hpp"

namespace dde::pairs {

std::vector<data::CaptionTokenizerSpec> caption_tokenizer_specs(const models::Manifest& manifest);

}  // namespace dde::pairs
