// data::CaptionTokenizer on the tiny fixtures' tokenizer folders (scripts/prepare_tiny.sh): it
// checks each folder against the manifest before any caption is tokenized, and a caption that
// is not UTF-8 is a counted bad pair. Parity of its ids with the Python tokenizer:
// exported_shards_test.cpp (loader batches) and tests/python/test_clip_tokenizer.py.
#include "dde/data/caption_tokenizer.hpp"

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "dde/data/data_error.hpp"
#include "dde/models/manifest.hpp"
#include "dde/pairs/caption_tokenizers.hpp"
#include "dde/util/error.hpp"

namespace dde::data::caption_test {
namespace {

namespace fs = std::filesystem;

std::vector<CaptionTokenizerSpec> fixture_specs(const std::string& family) {
  const char* env = std::getenv("DDE_FIXTURES_DIR");
  const fs::path fixtures = env ? fs::path(env) : fs::path(DDE_SOURCE_DIR) / "fixtures";
  const fs::path manifest = fixtures / "export" / family / "manifest.json";
  if (!fs::exists(manifest)) {
    ADD_FAILURE() << "no fixtures under " << fixtures << " (run scripts/prepare_tiny.sh)";
    return {};
  }
  return pairs::caption_tokenizer_specs(models::load_manifest(manifest.string()));
}

std::string error_of(const std::vector<CaptionTokenizerSpec>& specs) {
  try {
    CaptionTokenizer tokenizer(specs);
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected dde::Error";
  return "";
}

TEST(CaptionTokenizer, GivesEveryEncoderItsListAndTheManifestsEmptyIds) {
  for (const std::string family : {"sd15", "sdxl"}) {
    const std::vector<CaptionTokenizerSpec> specs = fixture_specs(family);
    ASSERT_EQ(specs.size(), family == "sd15" ? 1U : 2U);
    const CaptionTokenizer tokenizer(specs);
    const std::vector<std::vector<int64_t>> empty = tokenizer.encode("");
    ASSERT_EQ(empty.size(), specs.size());
    for (size_t t = 0; t < specs.size(); ++t) {
      EXPECT_EQ(empty[t], specs[t].empty_prompt_ids) << family << " " << t;
      EXPECT_EQ(tokenizer.infos()[t].max_length, specs[t].max_length);
      EXPECT_EQ(tokenizer.infos()[t].vocab_sha256, specs[t].vocab_sha256);
      EXPECT_EQ(tokenizer.infos()[t].name, specs[t].name);
    }
    const std::vector<std::vector<int64_t>> ids = tokenizer.encode("a red cube");
    EXPECT_NE(ids[0], empty[0]);
  }
}

TEST(CaptionTokenizer, RefusesAFolderThatIsNotTheExports) {
  const std::vector<CaptionTokenizerSpec> good = fixture_specs("sdxl");
  ASSERT_EQ(good.size(), 2U);
  auto missing = good;
  missing[1].dir.clear();  // an export made before the folders were copied
  std::string message = error_of(missing);
  EXPECT_NE(message.find("no tokenizer folder"), std::string::npos) << message;
  EXPECT_NE(message.find("text_encoder_2"), std::string::npos) << message;
  EXPECT_NE(message.find("export_models"), std::string::npos) << message;
  auto gone = good;
  gone[0].dir += "_gone";
  message = error_of(gone);
  EXPECT_NE(message.find("is not a folder"), std::string::npos) << message;
  auto other_vocab = good;
  other_vocab[1].vocab_sha256 = std::string(64, '0');
  message = error_of(other_vocab);
  EXPECT_NE(message.find("not the one the model was exported with"), std::string::npos) << message;
  EXPECT_NE(message.find("vocab.json"), std::string::npos) << message;
  auto other_pad = good;  // sdxl's second tokenizer pads with "!", the first with EOS
  other_pad[1].empty_prompt_ids = good[0].empty_prompt_ids;
  ASSERT_NE(good[1].empty_prompt_ids, good[0].empty_prompt_ids);
  message = error_of(other_pad);
  EXPECT_NE(message.find("ids of the empty caption"), std::string::npos) << message;
}

TEST(CaptionTokenizer, ACaptionThatIsNotUtf8IsABadPairNamedByItsPlace) {
  const CaptionTokenizer tokenizer(fixture_specs("sd15"));
  std::vector<std::vector<int64_t>> ids;
  tokenize_record_caption(tokenizer, "", "shard-000001.tar: key 7", ids);  // "" is valid
  EXPECT_EQ(ids.size(), 1U);
  try {
    tokenize_record_caption(tokenizer, std::string("a red \xff cube"), "shard-000001.tar: key 7",
                            ids);
    ADD_FAILURE() << "expected BadPairError";
  } catch (const BadPairError& e) {
    const std::string message = e.what();
    EXPECT_EQ(e.reason(), kBadCaption);
    EXPECT_NE(message.find("shard-000001.tar: key 7: caption"), std::string::npos) << message;
    EXPECT_NE(message.find("0xFF"), std::string::npos) << message;
    EXPECT_NE(message.find("at byte 6"), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace dde::data::caption_test
