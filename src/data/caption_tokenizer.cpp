#include "dde/data/caption_tokenizer.hpp"

#include <fmt/format.h>

#include <filesystem>
#include <utility>

#include "dde/data/data_error.hpp"
#include "dde/text/utf8.hpp"
#include "dde/util/error.hpp"

namespace dde::data {
namespace {

namespace fs = std::filesystem;

constexpr const char* kReexportModel =
    "re-export the model with python -m dde_tools.export_models (it copies the pipeline's "
    "tokenizer folders next to manifest.json), or export the shards with --tokenizer";

std::string ids_text(const std::vector<int64_t>& ids) {
  std::string out;
  for (size_t i = 0; i < ids.size() && i < 8; ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
  return "[" + out + (ids.size() > 8 ? ", ...]" : "]");
}

}  // namespace

CaptionTokenizer::CaptionTokenizer(const std::vector<CaptionTokenizerSpec>& specs) {
  for (const CaptionTokenizerSpec& spec : specs) {
    const std::string where = fmt::format("{}: text encoder {}", spec.manifest, spec.name);
    std::error_code ec;
    if (spec.dir.empty() || !fs::is_directory(spec.dir, ec)) {
      throw Error({"the model has no tokenizer folder for its text encoder", where,
                   "a tokenizer folder named by the manifest",
                   spec.dir.empty() ? "the manifest names none" : spec.dir + " is not a folder",
                   kReexportModel});
    }
    text::ClipTokenizer tokenizer = text::ClipTokenizer::load(spec.dir);
    const std::string vocab = (fs::path(spec.dir) / "vocab.json").string();
    const std::string actual = file_sha256(vocab);
    if (!spec.vocab_sha256.empty() && actual != spec.vocab_sha256) {
      throw Error({"the tokenizer folder is not the one the model was exported with", vocab,
                   "sha256 " + spec.vocab_sha256 + " (the manifest's vocab_sha256)", actual,
                   kReexportModel});
    }
    const std::vector<int32_t> empty = tokenizer.encode("", static_cast<int>(spec.max_length));
    const std::vector<int64_t> empty_ids(empty.begin(), empty.end());
    if (empty_ids != spec.empty_prompt_ids) {
      throw Error({"the tokenizer folder does not give the manifest's ids of the empty caption",
                   spec.dir, ids_text(spec.empty_prompt_ids) + " (empty_prompt_ids)",
                   ids_text(empty_ids),
                   "its special tokens or pad token differ from the export's: " +
                       std::string(kReexportModel)});
    }
    // vocab_size 0: the ids come from the tokenizer itself; the text encoder's embedding rows
    // still bound them (PairLoaderOptions::vocab_sizes).
    infos_.push_back(TokenizerInfo{spec.name, actual, spec.max_length, 0});
    max_lengths_.push_back(spec.max_length);
    tokenizers_.push_back(std::move(tokenizer));
  }
}

std::vector<std::vector<int64_t>> CaptionTokenizer::encode(std::string_view caption) const {
  std::vector<std::vector<int64_t>> out;
  out.reserve(tokenizers_.size());
  for (size_t t = 0; t < tokenizers_.size(); ++t) {
    const std::vector<int32_t> ids =
        tokenizers_[t].encode(caption, static_cast<int>(max_lengths_[t]));
    out.emplace_back(ids.begin(), ids.end());
  }
  return out;
}

void tokenize_record_caption(const CaptionTokenizer& tokenizer, const std::string& caption,
                             const std::string& where,
                             std::vector<std::vector<int64_t>>& input_ids) {
  try {
    input_ids = tokenizer.encode(caption);
  } catch (const text::InvalidUtf8Error& e) {
    throw BadPairError(
        kBadCaption,
        {"pair caption is not UTF-8", where + ": caption", "UTF-8 text",
         fmt::format("bytes {} at byte {}", text::hex_bytes(caption, e.byte_offset()),
                     e.byte_offset()),
         "fix the caption in the source data and export again (the pair is skipped and counted)"});
  }
}

}  // namespace dde::data
