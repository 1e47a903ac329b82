#include "dde/checkpoint/training_checkpoint.hpp"

#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "dde/util/error.hpp"
#include "dde/util/input_limits.hpp"

namespace fs = std::filesystem;

namespace {

using dde::checkpoint::NamedTensors;

fs::path fresh_state_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("dde_tc_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

dde::checkpoint::SharedState example_shared(bool sharded) {
  dde::checkpoint::SharedState s;
  s.step = 7;
  s.skipped_steps = 1;
  s.nonfinite_in_row = 0;
  s.world_size = 2;
  s.method = "dde";
  s.optimizer_name = "adafactor";
  s.optimizer_sharded = sharded;
  if (!sharded)
    s.optimizer = {{"step.w", torch::tensor(int64_t{7})}, {"exp_avg_sq.b", torch::ones({3})}};
  s.correction = torch::arange(5, torch::kFloat64);
  s.correction_momentum = 0.9;
  s.correction_updates = 6;
  s.unet_config_json = "{\"_class_name\": \"UNet2DConditionModel\"}";
  s.unet = {{"w", torch::randn({2, 3})}, {"b", torch::randn({3})}};
  s.config_yaml = "run:\n  seed: 0\n";
  return s;
}

bool same(const NamedTensors& a, const NamedTensors& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first || !torch::equal(a[i].second, b[i].second)) return false;
  }
  return true;
}

TEST(TrainingCheckpoint, SharedAndRankStateRoundTrip) {
  const fs::path dir = fresh_state_dir("roundtrip");
  const auto written = example_shared(/*sharded=*/false);
  dde::checkpoint::write_shared_state(dir.string(), written);
  dde::checkpoint::RankState own;
  own.rank = 1;
  own.world_size = 2;
  own.epoch = 3;
  own.pairs_consumed = 40;
  dde::checkpoint::write_rank_state(dir.string(), own);
  for (const char* file : {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                           "training_state.safetensors", "trainer_state.json",
                           "correction_ema.json", "config.yaml", "rank-00001.json"}) {
    EXPECT_TRUE(fs::exists(dir / file)) << file;
  }
  EXPECT_FALSE(fs::exists(dir / "optimizer-rank-00001.safetensors"));

  const auto read = dde::checkpoint::read_shared_state(dir.string());
  EXPECT_EQ(read.step, 7);
  EXPECT_EQ(read.skipped_steps, 1);
  EXPECT_EQ(read.world_size, 2);
  EXPECT_EQ(read.method, "dde");
  EXPECT_EQ(read.optimizer_name, "adafactor");
  EXPECT_FALSE(read.optimizer_sharded);
  EXPECT_TRUE(same(read.optimizer, written.optimizer));
  EXPECT_TRUE(torch::equal(read.correction, written.correction));
  EXPECT_EQ(read.correction_updates, 6);
  EXPECT_EQ(read.unet_config_json, written.unet_config_json);
  EXPECT_TRUE(same(read.unet, written.unet));
  EXPECT_EQ(read.config_yaml, written.config_yaml);
  const auto rank = dde::checkpoint::read_rank_state(dir.string(), 1, read);
  EXPECT_EQ(rank.epoch, 3);
  EXPECT_EQ(rank.pairs_consumed, 40);
  EXPECT_TRUE(same(dde::checkpoint::optimizer_state_for(dir.string(), read, rank, true),
                   written.optimizer));
}

TEST(TrainingCheckpoint, ShardedStateIsReadPerRankOrWhole) {
  const fs::path dir = fresh_state_dir("sharded");
  dde::checkpoint::write_shared_state(dir.string(), example_shared(/*sharded=*/true));
  for (int64_t r = 0; r < 2; ++r) {
    dde::checkpoint::RankState own;
    own.rank = r;
    own.world_size = 2;
    own.optimizer_shard = {{"step.p" + std::to_string(r), torch::tensor(r)}};
    dde::checkpoint::write_rank_state(dir.string(), own);
  }
  const auto saved = dde::checkpoint::read_shared_state(dir.string());
  EXPECT_TRUE(saved.optimizer_sharded);
  EXPECT_TRUE(saved.optimizer.empty());
  const auto own = dde::checkpoint::read_rank_state(dir.string(), 1, saved);
  const auto mine = dde::checkpoint::optimizer_state_for(dir.string(), saved, own, true);
  ASSERT_EQ(mine.size(), 1U);
  EXPECT_EQ(mine[0].first, "step.p1");
  const auto all = dde::checkpoint::optimizer_state_for(dir.string(), saved, own, false);
  ASSERT_EQ(all.size(), 2U);
  EXPECT_EQ(all[0].first, "step.p0");
}

TEST(TrainingCheckpoint, ResumeChecksNameWhatDiffers) {
  const auto saved = example_shared(false);
  EXPECT_NO_THROW(dde::checkpoint::check_resumable("d", saved, {"dde", "adafactor", 2}));
  const auto message = [&](const dde::checkpoint::ResumingRun& run) {
    try {
      dde::checkpoint::check_resumable("d", saved, run);
    } catch (const dde::Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message({"uniform", "adafactor", 2}).find("another method"), std::string::npos);
  EXPECT_NE(message({"dde", "adafactor", 1}).find("another world size"), std::string::npos);
  EXPECT_NE(message({"dde", "adamw", 2}).find("optim.name"), std::string::npos);
}

TEST(TrainingCheckpoint, ForeignTrainerStateIsRefused) {
  const fs::path dir = fresh_state_dir("foreign");
  dde::checkpoint::write_shared_state(dir.string(), example_shared(false));
  std::ofstream(dir / "trainer_state.json") << "{\"format\": \"other\", \"version\": 1}";
  EXPECT_THROW(dde::checkpoint::read_shared_state(dir.string()), dde::Error);
}

// What a damaged file gives: a dde::Error naming the file (and the key), never a raw JSON error.
std::string read_error(const fs::path& dir, bool rank_file = false) {
  try {
    const auto saved = dde::checkpoint::read_shared_state(dir.string());
    if (rank_file) dde::checkpoint::read_rank_state(dir.string(), 1, saved);
  } catch (const dde::Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(TrainingCheckpoint, DamagedTrainerStateIsAnErrorNamingTheFile) {
  const fs::path dir = fresh_state_dir("damaged");
  dde::checkpoint::write_shared_state(dir.string(), example_shared(false));
  const std::string good = R"("format": "dde-checkpoint", "version": 1, "skipped_steps": 0,
    "nonfinite_in_row": 0, "world_size": 2, "method": "dde",
    "optimizer": {"name": "adafactor", "sharded": false},
    "correction": {"momentum": 0.9, "updates": 6})";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"{\"format\": \"dde-checkpoint\", \"ver", "parse error"},
      {"{" + good + ", \"step\": 1e400}", "number overflow"},
      {"{" + good + ", \"step\": 1.5}", "trainer_state.json: step"},
      {"{" + good + ", \"step\": -3}", "trainer_state.json: step"},
      {"{" + good + ", \"step\": 18446744073709551615}", "trainer_state.json: step"},
      {"{" + good + "}", "trainer_state.json: step"},
      {"[1, 2]", "a JSON object"},
  };
  for (const auto& [text, says] : cases) {
    std::ofstream(dir / "trainer_state.json", std::ios::trunc) << text;
    const std::string message = read_error(dir);
    EXPECT_NE(message.find("trainer_state.json"), std::string::npos) << text << "\n" << message;
    EXPECT_NE(message.find(says), std::string::npos) << text << "\n" << message;
  }
  std::ofstream(dir / "trainer_state.json", std::ios::trunc) << "{" << good << ", \"step\": 7}";
  EXPECT_EQ(read_error(dir), "no error");
  std::ofstream(dir / "rank-00001.json", std::ios::trunc)
      << R"({"rank": 1, "world_size": 2, "loader": {"epoch": 1e400, "pairs_consumed": 4}})";
  EXPECT_NE(read_error(dir, /*rank_file=*/true).find("rank-00001.json"), std::string::npos);
}

TEST(TrainingCheckpoint, ResumeConfigRefusesDataStreamChangesAndReturnsTheRest) {
  const std::string saved_yaml = R"(run: {output_dir: runs/x, seed: 3}
model: {manifest: m/manifest.json}
data: {index: d/index.json}
optim: {lr: 1.0e-5}
train: {global_batch: 8, micro_batch: 2, max_steps: 10}
)";
  const auto changes = [&](const std::string& extra) {
    const auto now = dde::config::config_from_yaml(YAML::Load(saved_yaml + extra), "<now>");
    std::string keys;
    for (const auto& c : dde::checkpoint::check_resume_config("ck", saved_yaml, now)) {
      keys += c.key + ":" + c.before + "->" + c.after + " ";
    }
    return keys;
  };
  EXPECT_EQ(changes(""), "");
  EXPECT_EQ(changes("logging: {every: 5}\n"), "logging.every:1->5 ");
  const auto refused = [&](const std::string& yaml) {
    try {
      dde::checkpoint::check_resume_config(
          "ck", saved_yaml, dde::config::config_from_yaml(YAML::Load(yaml), "<now>"));
    } catch (const dde::Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  std::string seed = saved_yaml;
  seed.replace(seed.find("seed: 3"), 7, "seed: 4");
  const std::string message = refused(seed);
  EXPECT_NE(message.find("changes the data stream"), std::string::npos) << message;
  EXPECT_NE(message.find("ck/config.yaml: run.seed"), std::string::npos) << message;
  std::string batch = saved_yaml;
  batch.replace(batch.find("global_batch: 8"), 15, "global_batch: 4");
  EXPECT_NE(refused(batch).find("train.global_batch"), std::string::npos);
  std::string ties = saved_yaml;
  ties.replace(ties.find("index: d/index.json"), 19, "index: d/index.json, keep_ties: true");
  EXPECT_NE(refused(ties).find("data.keep_ties false"), std::string::npos) << refused(ties);
  std::string micro = saved_yaml;
  micro.replace(micro.find("micro_batch: 2"), 14, "micro_batch: 4");
  EXPECT_EQ(refused(micro), "no error");  // the loader counts pairs: allowed, logged
}

TEST(TrainingCheckpoint, ResumeConfigThatDoesNotParseNamesTheFile) {
  const auto now = dde::config::config_from_yaml(
      YAML::Load("{run: {output_dir: r}, model: {manifest: m}, data: {index: d}}"), "<now>");
  try {
    dde::checkpoint::check_resume_config("ck", "run: [unclosed", now);
    FAIL() << "no error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("ck/config.yaml"), std::string::npos) << e.what();
  }
}

TEST(TrainingCheckpoint, OversizedJsonIsRefusedByItsSize) {
  const fs::path dir = fresh_state_dir("oversized");
  dde::checkpoint::write_shared_state(dir.string(), example_shared(false));
  const fs::path path = dir / "trainer_state.json";
  fs::resize_file(path, dde::util::kMaxCheckpointJsonBytes + 1);  // sparse
  const std::string message = read_error(dir);
  for (const std::string& part :
       {std::string("checkpoint JSON too large"), path.string(),
        std::to_string(dde::util::kMaxCheckpointJsonBytes) + " bytes",
        std::to_string(dde::util::kMaxCheckpointJsonBytes + 1) + " bytes"}) {
    EXPECT_NE(message.find(part), std::string::npos) << part << " not in: " << message;
  }
  fs::remove_all(dir);
}

}  // namespace
