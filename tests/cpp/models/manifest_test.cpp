// load_manifest on the manifests the real Python export wrote (scripts/prepare_tiny.sh makes
// them under $DDE_FIXTURES_DIR, default <repo>/fixtures), and on broken copies of them: every
// error names the manifest's path and the field (docs/formats.md, section 1).
#include "dde/models/manifest.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "dde/util/error.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::models {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

fs::path fixtures_dir() {
  const char* env = std::getenv("DDE_FIXTURES_DIR");
  return env ? fs::path(env) : fs::path(DDE_SOURCE_DIR) / "fixtures";
}

fs::path export_dir(const std::string& family) { return fixtures_dir() / "export" / family; }

json read_json(const fs::path& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// Runs f, expects a dde::Error whose message holds every part.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
    return;
  }
  ADD_FAILURE() << "expected dde::Error";
}

// The ids a CLIP tokenizer gives "" padded to max_length: BOS, EOS, then the pad token, read
// from the exported tokenizer folder (independent of how export_models computed them).
std::vector<int64_t> empty_prompt_ids_from_tokenizer(const fs::path& tokenizer, size_t length) {
  const json vocab = read_json(tokenizer / "vocab.json");
  const json special = read_json(tokenizer / "special_tokens_map.json");
  const json& pad = special.at("pad_token");
  const std::string pad_token =
      pad.is_string() ? pad.get<std::string>() : pad.at("content").get<std::string>();
  std::vector<int64_t> ids(length, vocab.at(pad_token).get<int64_t>());
  ids[0] = vocab.at("<|startoftext|>").get<int64_t>();
  ids[1] = vocab.at("<|endoftext|>").get<int64_t>();
  return ids;
}

class ManifestFile : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* family : {"sd15", "sdxl"}) {
      const fs::path path = export_dir(family) / "manifest.json";
      ASSERT_TRUE(fs::is_regular_file(path))
          << path << " missing: run scripts/prepare_tiny.sh (or set DDE_FIXTURES_DIR)";
    }
    dir_ = fs::temp_directory_path() /
           ("dde_manifest_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(dir_, ignored);
  }

  // The fixture manifest of `family` with every component file made absolute, so a copy in
  // another folder still finds them.
  static json fixture_manifest(const std::string& family) {
    const fs::path dir = export_dir(family);
    json m = read_json(dir / "manifest.json");
    for (json& b : m["unet"]["blocks"]) b["file"] = (dir / b["file"].get<std::string>()).string();
    for (json& e : m["text_encoders"]) e["file"] = (dir / e["file"].get<std::string>()).string();
    for (const char* key : {"encoder", "decoder"}) {
      m["vae"][key] = (dir / m["vae"][key].get<std::string>()).string();
    }
    return m;
  }

  std::string write_text(const std::string& text) const {
    const fs::path path = dir_ / "manifest.json";
    std::ofstream(path) << text;
    return path.string();
  }
  std::string write(const json& manifest) const { return write_text(manifest.dump(2)); }

  fs::path dir_;
};

TEST_F(ManifestFile, Sd15LoadsWithTheExportedValues) {
  const fs::path dir = export_dir("sd15");
  const Manifest m = load_manifest((dir / "manifest.json").string());
  EXPECT_EQ(m.family, Family::kSd15);
  EXPECT_STREQ(family_name(m.family), "sd15");
  EXPECT_EQ(m.resolution, 64);
  EXPECT_EQ(m.latent_channels, 4);
  EXPECT_EQ(m.latent_downsample, 8);
  EXPECT_DOUBLE_EQ(m.scaling_factor, 0.18215);
  EXPECT_EQ(m.num_train_timesteps, 1000);
  EXPECT_DOUBLE_EQ(m.beta_start, 0.00085);
  EXPECT_DOUBLE_EQ(m.beta_end, 0.012);
  EXPECT_EQ(m.cross_attention_dim, 32);
  EXPECT_FALSE(m.added_cond.has_value());
  EXPECT_FALSE(m.pooled_from.has_value());
  EXPECT_TRUE(fs::equivalent(m.directory, dir));
  // Component files are resolved against the manifest's folder.
  // The UNet as units in diffusers' order, for the fixture's config (DownBlock2D +
  // CrossAttnDownBlock2D, layers_per_block 1; the up blocks have 2 resnets each): one unit per
  // resnet and per sampler; the input and down units push 4 skips, the up resnets pop them.
  const std::vector<std::string> names = {"input",
                                          "down_blocks.0.0",
                                          "down_blocks.0.downsample",
                                          "down_blocks.1.0",
                                          "mid_block",
                                          "up_blocks.0.0",
                                          "up_blocks.0.1",
                                          "up_blocks.0.upsample",
                                          "up_blocks.1.0",
                                          "up_blocks.1.1",
                                          "output"};
  ASSERT_EQ(m.unet_blocks.size(), names.size());
  std::vector<int64_t> pops;
  std::vector<bool> pushes, sizes;
  for (size_t i = 0; i < names.size(); ++i) {
    EXPECT_EQ(m.unet_blocks[i].name, names[i]);
    EXPECT_TRUE(fs::equivalent(m.unet_blocks[i].file, dir / "unet" / (names[i] + ".pt")));
    pops.push_back(m.unet_blocks[i].pops);
    pushes.push_back(m.unet_blocks[i].push_output);
    sizes.push_back(m.unet_blocks[i].takes_size);
  }
  EXPECT_EQ(pops, (std::vector<int64_t>{0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0}));
  EXPECT_EQ(pushes, (std::vector<bool>{true, true, true, true, false, false, false, false, false,
                                       false, false}));
  EXPECT_EQ(sizes, (std::vector<bool>{false, false, false, false, false, false, false, true, false,
                                      false, false}));
  EXPECT_EQ(m.unet_blocks[0].kind, UNetBlockKind::kInput);
  EXPECT_EQ(m.unet_blocks[3].kind, UNetBlockKind::kDown);
  EXPECT_EQ(m.unet_blocks[4].kind, UNetBlockKind::kMid);
  EXPECT_EQ(m.unet_blocks[7].kind, UNetBlockKind::kUp);
  EXPECT_EQ(m.unet_blocks[10].kind, UNetBlockKind::kOutput);
  using Rules = std::vector<std::pair<std::string, std::string>>;
  EXPECT_EQ(m.unet_blocks[3].params, (Rules{{"resnet.", "down_blocks.1.resnets.0."},
                                            {"attn.", "down_blocks.1.attentions.0."}}));
  EXPECT_EQ(m.unet_blocks[2].params, (Rules{{"samplers.", "down_blocks.0.downsamplers."}}));
  EXPECT_TRUE(fs::equivalent(m.vae_encoder_file, dir / "vae_encoder.pt"));
  EXPECT_TRUE(fs::equivalent(m.vae_decoder_file, dir / "vae_decoder.pt"));
  // The diffusers unet config travels verbatim (checkpoints write it as unet/config.json).
  const json unet_config = json::parse(m.unet_config_json);
  EXPECT_EQ(unet_config.at("_class_name"), "UNet2DConditionModel");
  EXPECT_EQ(unet_config.at("cross_attention_dim"), 32);

  ASSERT_EQ(m.text_encoders.size(), 1u);
  const TextEncoderInfo& e = m.text_encoders[0];
  EXPECT_EQ(e.name, "text_encoder");
  EXPECT_TRUE(fs::equivalent(e.file, dir / "text_encoder.pt"));
  EXPECT_EQ(e.hidden_output, "last");
  EXPECT_EQ(e.hidden_size, 32);
  EXPECT_EQ(e.pooled_size, 32);
  EXPECT_EQ(e.max_length, 77);
  EXPECT_EQ(e.vocab_sha256.size(), 64u);
  EXPECT_EQ(e.empty_prompt_ids, empty_prompt_ids_from_tokenizer(dir / "tokenizer", 77));
}

TEST_F(ManifestFile, SdxlLoadsWithTwoEncodersAndAddedConditioning) {
  const fs::path dir = export_dir("sdxl");
  const Manifest m = load_manifest((dir / "manifest.json").string());
  EXPECT_EQ(m.family, Family::kSdxl);
  EXPECT_STREQ(family_name(m.family), "sdxl");
  EXPECT_EQ(m.resolution, 64);
  EXPECT_EQ(m.latent_channels, 4);
  EXPECT_DOUBLE_EQ(m.scaling_factor, 0.13025);
  EXPECT_EQ(m.cross_attention_dim, 64);
  ASSERT_TRUE(m.added_cond.has_value());
  EXPECT_EQ(m.added_cond->text_embeds_dim, 32);
  EXPECT_EQ(m.added_cond->time_ids_dim, 6);
  ASSERT_TRUE(m.pooled_from.has_value());
  EXPECT_EQ(*m.pooled_from, "text_encoder_2");

  ASSERT_EQ(m.text_encoders.size(), 2u);
  const char* names[] = {"text_encoder", "text_encoder_2"};
  const char* tokenizers[] = {"tokenizer", "tokenizer_2"};
  for (size_t i = 0; i < 2; ++i) {
    const TextEncoderInfo& e = m.text_encoders[i];
    EXPECT_EQ(e.name, names[i]);
    EXPECT_TRUE(fs::equivalent(e.file, dir / (std::string(names[i]) + ".pt")));
    EXPECT_EQ(e.hidden_output, "penultimate");
    EXPECT_EQ(e.hidden_size, 32);
    EXPECT_EQ(e.max_length, 77);
    // The second tokenizer pads with "!" (SDXL's tokenizer_2), the first with EOS.
    EXPECT_EQ(e.empty_prompt_ids, empty_prompt_ids_from_tokenizer(dir / tokenizers[i], 77))
        << e.name;
  }
  EXPECT_EQ(m.text_encoders[1].pooled_size, m.added_cond->text_embeds_dim);
  EXPECT_NE(m.text_encoders[0].empty_prompt_ids, m.text_encoders[1].empty_prompt_ids);
}

TEST_F(ManifestFile, AnAbsolutizedCopyLoadsLikeTheOriginal) {
  // The base of every error case below must itself be valid.
  for (const char* family : {"sd15", "sdxl"}) {
    const std::string path = write(fixture_manifest(family));
    const Manifest copy = load_manifest(path);
    const Manifest original = load_manifest((export_dir(family) / "manifest.json").string());
    EXPECT_EQ(copy.path, path);
    EXPECT_EQ(copy.family, original.family);
    ASSERT_EQ(copy.unet_blocks.size(), original.unet_blocks.size());
    for (size_t i = 0; i < copy.unet_blocks.size(); ++i) {
      EXPECT_TRUE(fs::equivalent(copy.unet_blocks[i].file, original.unet_blocks[i].file));
    }
    EXPECT_EQ(copy.text_encoders.size(), original.text_encoders.size());
  }
}

TEST_F(ManifestFile, MissingFileNamesThePathAndTheExportTool) {
  const std::string path = (dir_ / "nope" / "manifest.json").string();
  expect_error([&] { load_manifest(path); }, {"cannot open manifest", path, "export_models"});
}

TEST_F(ManifestFile, NotJsonNamesThePath) {
  const std::string path = write_text("{\"format\": \"dde-manifest\", \"version\": 1,");
  expect_error([&] { load_manifest(path); }, {"not valid JSON", path});
}

TEST_F(ManifestFile, WrongFormatStringNamesTheField) {
  json m = fixture_manifest("sd15");
  m["format"] = "dde-shards";
  const std::string path = write(m);
  expect_error([&] { load_manifest(path); },
               {"not a dde manifest", path + ": format", "dde-manifest", "dde-shards"});
}

TEST_F(ManifestFile, UnknownVersionNamesTheField) {
  json m = fixture_manifest("sd15");
  m["version"] = 3;
  std::string path = write(m);
  expect_error([&] { load_manifest(path); },
               {"unsupported manifest version", path + ": version", "expected 2", "got 3"});
  // A version-1 manifest (the UNet as one graph) says why it must be re-exported.
  m["version"] = 1;
  path = write(m);
  expect_error([&] { load_manifest(path); },
               {"one traced graph", "cannot be checkpointed", path + ": version", "export_models"});
}

TEST_F(ManifestFile, UnetBlocksMustBalanceAndRunInOrder) {
  json m = fixture_manifest("sd15");
  m["unet"]["blocks"][4]["push_output"] = true;  // the mid block pushing a skip too many
  std::string path = write(m);
  expect_error([&] { load_manifest(path); },
               {"skip connections do not balance", path + ": unet.blocks", "1 left over"});

  m = fixture_manifest("sd15");
  m["unet"]["blocks"][5]["pops"] = 9;
  path = write(m);
  expect_error([&] { load_manifest(path); },
               {"pops more skips than were pushed", path + ": unet.blocks[5].pops"});

  m = fixture_manifest("sd15");
  std::swap(m["unet"]["blocks"][4], m["unet"]["blocks"][5]);  // up before mid
  path = write(m);
  expect_error([&] { load_manifest(path); }, {"out of order", path + ": unet.blocks[4].kind"});

  m = fixture_manifest("sd15");
  m["unet"]["blocks"][3]["params"] = json::array();
  path = write(m);
  expect_error([&] { load_manifest(path); },
               {"bad parameter prefix rules", path + ": unet.blocks[3].params"});

  m = fixture_manifest("sd15");
  m["unet"]["blocks"][2]["kind"] = "sideways";
  path = write(m);
  expect_error([&] { load_manifest(path); },
               {"unknown UNet block kind", path + ": unet.blocks[2].kind", "sideways"});
}

TEST_F(ManifestFile, MissingFieldsAreNamedByTheirDottedPath) {
  const std::vector<std::vector<std::string>> cases = {
      {"family"},
      {"resolution"},
      {"latent", "scaling_factor"},
      {"schedule", "beta_end"},
      {"unet", "blocks"},
      {"unet", "added_cond"},
      {"vae", "decoder"},
      {"text_embedding", "pooled_from"},
  };
  for (const std::vector<std::string>& keys : cases) {
    json m = fixture_manifest("sd15");
    json* node = &m;
    std::string field;
    for (size_t i = 0; i + 1 < keys.size(); ++i) {
      node = &(*node)[keys[i]];
      field += keys[i] + ".";
    }
    node->erase(keys.back());
    field += keys.back();
    const std::string path = write(m);
    SCOPED_TRACE(field);
    expect_error([&] { load_manifest(path); }, {"missing field", path + ": " + field});
  }
  // Inside the text encoder list the index is part of the name.
  json m = fixture_manifest("sdxl");
  m["text_encoders"][1].erase("empty_prompt_ids");
  const std::string path = write(m);
  expect_error([&] { load_manifest(path); },
               {"missing field", path + ": text_encoders[1].empty_prompt_ids"});
}

TEST_F(ManifestFile, MissingComponentFileNamesTheFieldAndTheFile) {
  json m = fixture_manifest("sd15");
  m["unet"]["blocks"][3]["file"] = "unet/gone.pt";  // relative: against the manifest's folder
  std::string path = write(m);
  expect_error([&] { load_manifest(path); },
               {"component file not found", path + ": unet.blocks[3].file",
                (dir_ / "unet" / "gone.pt").string()});

  m = fixture_manifest("sdxl");
  m["text_encoders"][1]["file"] = (dir_ / "te2.pt").string();
  path = write(m);
  expect_error(
      [&] { load_manifest(path); },
      {"component file not found", path + ": text_encoders[1].file", (dir_ / "te2.pt").string()});

  m = fixture_manifest("sd15");
  m["vae"]["encoder"] = "vae_encoder.pt";  // exists next to the original, not next to the copy
  path = write(m);
  expect_error([&] { load_manifest(path); }, {"component file not found", path + ": vae.encoder"});
}

TEST_F(ManifestFile, SdxlWithoutAddedConditioningIsRefused) {
  json m = fixture_manifest("sdxl");
  m["unet"]["added_cond"] = nullptr;
  const std::string path = write(m);
  expect_error([&] { load_manifest(path); },
               {"added conditioning does not fit the family", path + ": unet.added_cond",
                "an object for sdxl", "null"});

  // And the converse: an sd15 manifest must not carry it.
  m = fixture_manifest("sd15");
  m["unet"]["added_cond"] = {{"text_embeds_dim", 32}, {"time_ids_dim", 6}};
  const std::string sd15_path = write(m);
  expect_error([&] { load_manifest(sd15_path); },
               {"added conditioning does not fit the family", sd15_path + ": unet.added_cond",
                "null for sd15"});
}

TEST_F(ManifestFile, BadValuesNameTheFieldAndTheValue) {
  json m = fixture_manifest("sd15");
  m["family"] = "sd3";
  std::string path = write(m);
  expect_error([&] { load_manifest(path); }, {"unknown model family", path + ": family", "sd3"});

  m = fixture_manifest("sd15");
  m["latent"]["downsample"] = 0;
  path = write(m);
  expect_error([&] { load_manifest(path); },
               {"bad value", path + ": latent.downsample", "a positive integer"});

  m = fixture_manifest("sd15");
  m["text_encoders"][0]["empty_prompt_ids"] = json::array({1, 2, 3});
  path = write(m);
  expect_error(
      [&] { load_manifest(path); },
      {"bad empty prompt ids", path + ": text_encoders[0].empty_prompt_ids", "77 token ids"});

  m = fixture_manifest("sdxl");
  m["text_embedding"]["dim"] = 48;
  path = write(m);
  expect_error([&] { load_manifest(path); },
               {"does not add up", path + ": text_embedding.dim", "64", "48"});
}

TEST(ManifestSize, OversizedManifestIsRefusedByItsSize) {
  const fs::path path =
      fs::temp_directory_path() / ("dde_manifest_size_" + std::to_string(::getpid()) + ".json");
  std::ofstream(path) << "{}";
  fs::resize_file(path, util::kMaxManifestBytes + 1);  // sparse
  try {
    load_manifest(path.string());
    ADD_FAILURE() << "expected dde::Error";
  } catch (const dde::Error& e) {
    const std::string message = e.what();
    for (const std::string& part : {std::string("manifest too large"), path.string(),
                                    std::to_string(util::kMaxManifestBytes) + " bytes",
                                    std::to_string(util::kMaxManifestBytes + 1) + " bytes"}) {
      EXPECT_NE(message.find(part), std::string::npos) << part << " not in: " << message;
    }
  }
  fs::remove(path);
}

}  // namespace
}  // namespace dde::models
