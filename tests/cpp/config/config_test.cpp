#include "dde/config/config.hpp"

#include <gtest/gtest.h>
#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "dde/util/error.hpp"

namespace dde::config {
namespace {

namespace fs = std::filesystem;

const char* kMinimal = R"(run:
  output_dir: runs/x
model:
  manifest: m/manifest.json
data:
  index: d/index.json
)";

// A scratch folder per test, removed afterwards.
class ConfigFile : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dde_config_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& text, const std::string& name = "cfg.yaml") {
    auto path = (dir_ / name).string();
    std::ofstream(path) << text;
    return path;
  }

  fs::path dir_;
};

// Runs f, expects a dde::Error whose message holds every part; returns the message.
std::string error_of(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
  } catch (const dde::Error& e) {
    std::string message = e.what();
    for (const auto& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos) << "'" << part << "' not in: " << message;
    }
    return message;
  }
  ADD_FAILURE() << "expected dde::Error";
  return "";
}

TrainConfig from_text(const std::string& text) {
  return config_from_yaml(YAML::Load(text), "<test>");
}

TEST(ConfigDefaults, AreTheDocumentedOnes) {
  const TrainConfig c;
  EXPECT_EQ(c.run.output_dir, "");
  EXPECT_EQ(c.run.seed, 0u);
  EXPECT_EQ(c.run.device, "auto");
  EXPECT_EQ(c.model.reference_manifest, "");
  EXPECT_EQ(c.data.resolution, 0);
  EXPECT_FALSE(c.data.random_crop);
  EXPECT_TRUE(c.data.random_flip);
  EXPECT_EQ(c.data.caption_dropout, 0.2);
  EXPECT_EQ(c.data.shuffle_buffer, 1000);
  EXPECT_EQ(c.data.workers, 4);
  EXPECT_EQ(c.data.prefetch_batches, 4);
  EXPECT_FALSE(c.data.keep_ties);
  EXPECT_EQ(c.data.cache, "");
  EXPECT_EQ(c.method.name, "dde");
  EXPECT_EQ(c.method.beta, 5000.0);
  EXPECT_EQ(c.method.correction_scale, 1.0);
  EXPECT_EQ(c.method.ema_momentum, 0.9);
  EXPECT_EQ(c.method.gamma, 0.9);
  EXPECT_EQ(c.method.sampler_steps, 50);
  EXPECT_EQ(c.method.t_lo, 0);
  EXPECT_EQ(c.method.t_hi, -1);
  EXPECT_EQ(c.optim.name, "adamw");
  EXPECT_EQ(c.optim.lr, 2.048e-5);
  EXPECT_EQ(c.optim.warmup_steps, 500);
  EXPECT_EQ(c.optim.beta1, 0.9);
  EXPECT_EQ(c.optim.beta2, 0.999);
  EXPECT_EQ(c.optim.weight_decay, 0.01);
  EXPECT_EQ(c.optim.eps, 1e-8);
  EXPECT_EQ(c.optim.grad_clip, 1.0);
  EXPECT_EQ(c.optim.max_nonfinite_in_row, 10);
  EXPECT_EQ(c.train.global_batch, 2048);
  EXPECT_EQ(c.train.micro_batch, 1);
  EXPECT_EQ(c.train.max_steps, 2000);
  EXPECT_EQ(c.train.precision, "fp32");
  EXPECT_EQ(c.checkpoint.every, 100);
  EXPECT_EQ(c.checkpoint.keep, 3);
  EXPECT_EQ(c.logging.every, 1);
  EXPECT_FALSE(c.logging.per_sample);
  EXPECT_TRUE(c.logging.progress);
  EXPECT_EQ(c.dist.backend, "auto");
  EXPECT_EQ(c.dist.timeout_s, 600);
  EXPECT_EQ(c.dist.init_method, "auto");
  EXPECT_EQ(c.data.eval_index, "");
  EXPECT_EQ(c.eval.every, 100);
  EXPECT_EQ(c.eval.t_bins, (std::vector<int64_t>{100, 300, 500, 700, 900}));
  EXPECT_EQ(c.eval.seed, 0u);
  EXPECT_FALSE(c.dist.shard_optimizer);
}

TEST(ConfigDefaults, FillEverythingTheFileLeavesOut) {
  const auto c = from_text(kMinimal);
  TrainConfig expected;
  expected.run.output_dir = "runs/x";
  expected.model.manifest = "m/manifest.json";
  expected.data.index = "d/index.json";
  EXPECT_EQ(c, expected);
  EXPECT_NO_THROW(validate(c));
  // The defaults alone miss the three required paths.
  EXPECT_THROW(validate(TrainConfig{}), dde::Error);
}

TEST(ConfigErrors, UnknownKeyNamesPathAllowedKeysAndSuggestion) {
  error_of([] { from_text(std::string(kMinimal) + "optim:\n  lrr: 1e-4\n"); },
           {"unknown config key", "<test>:8:3: optim.lrr", "'lrr'",
            "name, lr, warmup_steps, schedule, min_lr_ratio, beta1, beta2, weight_decay, eps",
            "did you mean 'optim.lr'?"});
  // The peers' flag names get their key here, not the closest spelling in the section.
  error_of([] { from_text(std::string(kMinimal) + "optim:\n  learning_rate: 1e-4\n"); },
           {"unknown config key", "optim.learning_rate", "the peers' name: here it is optim.lr"});
  error_of([] { from_text(std::string(kMinimal) + "train:\n  gradient_accumulation_steps: 4\n"); },
           {"unknown config key", "train.global_batch (accumulation = global_batch"});
  error_of([] { from_text(std::string(kMinimal) + "method:\n  beta_dpo: 2500\n"); },
           {"unknown config key", "method.beta", "its 2500 is our 5000"});
  error_of([] { from_text(std::string(kMinimal) + "  worker: 2\n"); },
           {"unknown config key", "data.worker", "did you mean 'data.workers'?"});
}

TEST(ConfigErrors, UnknownSectionSuggestsTheClosest) {
  error_of([] { from_text(std::string(kMinimal) + "optimizer:\n  lr: 1e-4\n"); },
           {"unknown config section", "optimizer", "run, model, data, method, optim, train",
            "did you mean 'optim'?"});
}

TEST(ConfigErrors, WrongTypeNamesKeyValueAndType) {
  error_of([] { from_text(std::string(kMinimal) + "optim:\n  lr: fast\n"); },
           {"wrong type for config key", "<test>:8:7: optim.lr", "expected a number", "got 'fast'",
            "write e.g. optim.lr: 2.048e-05"});
  error_of([] { from_text(std::string(kMinimal) + "  workers: 2.5\n"); },
           {"wrong type", "data.workers", "an integer", "'2.5'"});
  error_of([] { from_text(std::string(kMinimal) + "  random_flip: maybe\n"); },
           {"wrong type", "data.random_flip", "a boolean", "'maybe'"});
  error_of([] { from_text(std::string(kMinimal) + "  workers: [1, 2]\n"); },
           {"wrong type", "data.workers", "a list"});
  error_of([] { from_text(std::string(kMinimal) + "  workers:\n"); },
           {"wrong type", "<test>:7:3: data.workers", "null", "write e.g. data.workers: 4"});
  error_of([] { from_text("run:\n  output_dir: x\n  seed: -1\n"); },
           {"wrong type", "run.seed", "a non-negative integer", "'-1'"});
  error_of([] { from_text(std::string(kMinimal) + "optim: 3\n"); },
           {"wrong type for config section", "optim", "a map with keys name, lr", "'3'"});
  error_of([] { from_text("- 1\n- 2\n"); }, {"wrong type for config file", "a list"});
}

TEST(ConfigErrors, OutOfRangeNamesKeyValueAndRange) {
  error_of([] { from_text(std::string(kMinimal) + "optim:\n  lr: -1\n"); },
           {"config value out of range", "<test>:8:7: optim.lr", "expected > 0", "got -1",
            "the default is 2.048e-05"});
  error_of([] { from_text(std::string(kMinimal) + "  caption_dropout: 1.5\n"); },
           {"out of range", "data.caption_dropout", "in [0, 1]", "1.5"});
  error_of([] { from_text(std::string(kMinimal) + "method:\n  ema_momentum: 1\n"); },
           {"out of range", "method.ema_momentum", "in [0, 1)", "got 1"});
  error_of([] { from_text(std::string(kMinimal) + "method:\n  gamma: 0\n"); },
           {"out of range", "method.gamma", "in (0, 1]"});
  error_of([] { from_text(std::string(kMinimal) + "method:\n  beta: .nan\n"); },
           {"out of range", "method.beta", "got nan"});
  error_of([] { from_text(std::string(kMinimal) + "method:\n  beta: .inf\n"); },
           {"out of range", "method.beta", "got inf"});
  error_of([] { from_text(std::string(kMinimal) + "  workers: 0\n"); },
           {"out of range", "data.workers", "in [1, 256]", "got 0"});
  error_of([] { from_text(std::string(kMinimal) + "  resolution: 500\n"); },
           {"out of range", "data.resolution", "multiple of 8"});
  error_of([] { from_text(std::string(kMinimal) + "method:\n  name: dpo\n"); },
           {"not allowed", "method.name",
            "one of sft, uniform, discounted, dde_single, dde_step, dde", "'dpo'"});
  error_of([] { from_text(std::string(kMinimal) + "train:\n  precision: fp16\n"); },
           {"not allowed", "train.precision", "one of fp32, bf16", "use bf16", "GradScaler"});
  error_of([] { from_text(std::string(kMinimal) + "dist:\n  backend: mpi\n"); },
           {"not allowed", "dist.backend", "auto, gloo, nccl"});
  error_of([] { from_text(std::string(kMinimal) + "optim:\n  name: lion\n"); },
           {"not allowed", "optim.name", "one of adamw, adafactor", "'lion'"});
}

TEST(ConfigErrors, CrossFieldChecks) {
  error_of([] { from_text(std::string(kMinimal) + "method:\n  t_lo: 700\n  t_hi: 200\n"); },
           {"empty timestep window", "method.t_hi", "t_hi > t_lo = 700", "got 200"});
  error_of(
      [] { from_text(std::string(kMinimal) + "train:\n  global_batch: 10\n  micro_batch: 4\n"); },
      {"not divisible", "train.global_batch", "multiple of train.micro_batch = 4", "got 10"});
}

TEST(ConfigErrors, RandomCropWithALatentCacheNamesBothKeys) {
  error_of(
      [] { from_text(std::string(kMinimal) + "  cache: c/index.json\n  random_crop: true\n"); },
      {"random crop with a latent cache", "data.random_crop", "data.cache", "c/index.json"});
  EXPECT_EQ(from_text(std::string(kMinimal) + "  cache: c/index.json\n").data.cache,
            "c/index.json");
}

TEST(ConfigErrors, MissingRequiredKey) {
  error_of([] { from_text("model:\n  manifest: m\ndata:\n  index: i\n"); },
           {"missing required config key", "<test>: run.output_dir", "--set run.output_dir="});
  error_of([] { from_text("run:\n  output_dir: o\ndata:\n  index: i\n"); },
           {"missing required config key", "model.manifest"});
  error_of([] { from_text("run:\n  output_dir: ''\nmodel:\n  manifest: m\ndata:\n  index: i\n"); },
           {"missing required config key", "run.output_dir"});
}

TEST(ConfigErrors, DuplicateKey) {
  error_of([] { from_text(std::string(kMinimal) + "  workers: 2\n  workers: 3\n"); },
           {"duplicate config key", "data.workers"});
}

TEST_F(ConfigFile, FileNotFound) {
  const auto path = (dir_ / "missing.yaml").string();
  error_of([&] { load_config(path); }, {"config file not found", path, "working directory"});
  error_of([&] { load_config(dir_.string()); }, {"config file not found", "not a regular file"});
}

TEST_F(ConfigFile, YamlParseErrorHasLineAndColumn) {
  const auto path = write("run:\n  output_dir: x\n  seed: [1, 2\n");
  const auto message = error_of([&] { load_config(path); }, {"YAML parse error", path + ":"});
  EXPECT_NE(message.find(path + ":4:"), std::string::npos) << message;
}

TEST_F(ConfigFile, LoadsAndKeepsPathsAsWritten) {
  const auto path =
      write(std::string(kMinimal) + "model:\n  reference_manifest: ../ref/m.json\n", "other.yaml");
  error_of([&] { load_config(path); }, {"duplicate config section", "model"});
  const auto good = write(
      "run:\n  output_dir: ./out\nmodel:\n  manifest: ../x/manifest.json\n"
      "  reference_manifest:\ndata:\n  index: d/index.json\n");
  const auto c = load_config(good);
  EXPECT_EQ(c.run.output_dir, "./out");
  EXPECT_EQ(c.model.manifest, "../x/manifest.json");  // not resolved against the file's folder
  EXPECT_EQ(c.model.reference_manifest, "");          // "key:" with no value is ""
}

TEST_F(ConfigFile, OverridesApplyInOrderOverTheFile) {
  const auto path = write(std::string(kMinimal) + "  workers: 8\noptim:\n  lr: 3.0e-5\n");
  const auto c =
      load_config(path, {"optim.lr=1e-4", "method.name=uniform", "data.random_flip=false",
                         "run.seed=18446744073709551615", "dist.backend=gloo", "method.t_hi=700",
                         "method.t_hi = 800", "run.output_dir=runs/with space"});
  EXPECT_EQ(c.optim.lr, 1e-4);
  EXPECT_EQ(c.method.name, "uniform");
  EXPECT_FALSE(c.data.random_flip);
  EXPECT_EQ(c.data.workers, 8);  // untouched file value
  EXPECT_EQ(c.run.seed, 18446744073709551615ull);
  EXPECT_EQ(c.dist.backend, "gloo");  // section absent from the file
  EXPECT_EQ(c.method.t_hi, 800);      // the later override wins
  EXPECT_EQ(c.run.output_dir, "runs/with space");
  EXPECT_EQ(c.data.index, "d/index.json");
}

TEST_F(ConfigFile, FlowMapOverrideMergesIntoTheSection) {
  const auto path = write(std::string(kMinimal) + "  workers: 8\n");
  const auto c = load_config(path, {"data={shuffle_buffer: 16, prefetch_batches: 2}"});
  EXPECT_EQ(c.data.shuffle_buffer, 16);
  EXPECT_EQ(c.data.prefetch_batches, 2);
  EXPECT_EQ(c.data.workers, 8);
  EXPECT_EQ(c.data.index, "d/index.json");
}

TEST_F(ConfigFile, OverrideErrorsNameTheOverride) {
  const auto path = write(kMinimal);
  for (const std::string bad :
       {"optim.lr", "=3", "optim..lr=1", ".lr=1", "optim.=1", "optim.l r=1", "optim.lr=[1, 2"}) {
    error_of([&] { load_config(path, {bad}); },
             {"bad --set override", "--set " + bad, "optim.lr=1e-4"});
  }
  error_of([&] { load_config(path, {"optim.lrr=1"}); },
           {"unknown config key", "--set optim.lrr=1: optim.lrr", "did you mean 'optim.lr'?"});
  error_of([&] { load_config(path, {"optim.lr=-1"}); },
           {"out of range", "--set optim.lr=-1: optim.lr", "> 0"});
  error_of([&] { load_config(path, {"data.workers=many"}); },
           {"wrong type", "--set data.workers=many: data.workers", "an integer", "'many'"});
  error_of([&] { load_config(path, {"run.output_dir.x=1"}); },
           {"bad --set override", "not a section"});
  // Errors in keys the override did not touch still point into the file.
  const auto bad_file = write(std::string(kMinimal) + "  workers: 0\n", "bad.yaml");
  error_of([&] { load_config(bad_file, {"optim.lr=1e-4"}); }, {"bad.yaml:7:12: data.workers"});
}

TEST_F(ConfigFile, EmptyFileGivesDefaultsThatNeedTheRequiredKeys) {
  const auto path = write("");
  error_of([&] { load_config(path); }, {"missing required config key", "run.output_dir"});
  const auto c = load_config(path, {"run.output_dir=o", "model.manifest=m", "data.index=i"});
  EXPECT_EQ(c.train.global_batch, 2048);
}

TEST(ConfigYaml, RoundTrips) {
  TrainConfig c = from_text(kMinimal);
  c.run.output_dir = "true";  // strings that YAML would type otherwise
  c.run.seed = 18446744073709551615ull;
  c.model.reference_manifest = "null";
  c.data.index = "a dir/with: colon #and hash";
  c.data.caption_dropout = 1.0 / 3.0;
  c.data.resolution = 1024;
  c.method.name = "dde_step";
  c.method.correction_scale = -0.125;
  c.method.t_lo = 200;
  c.method.t_hi = 700;
  c.optim.lr = 2.048e-5;
  c.optim.eps = 1e-12;
  c.optim.grad_clip = 0.0;
  c.train.precision = "bf16";
  c.logging.per_sample = true;
  const std::string text = to_yaml(c);
  const auto back = from_text(text);
  EXPECT_EQ(back, c) << text;
  EXPECT_EQ(to_yaml(back), text);
  EXPECT_NE(text.find("optim:\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  lr: 2.048e-05\n"), std::string::npos) << text;
  EXPECT_NE(text.find("  grad_clip: 0.0\n"), std::string::npos) << text;
  // Every default round-trips too.
  const auto defaults = from_text(kMinimal);
  EXPECT_EQ(from_text(to_yaml(defaults)), defaults);
}

TEST(ConfigYaml, EqualityComparesEveryField) {
  const auto a = from_text(kMinimal);
  auto b = a;
  EXPECT_TRUE(a == b);
  b.dist.timeout_s = 601;
  EXPECT_TRUE(a != b);
  b = a;
  b.logging.progress = false;
  EXPECT_FALSE(a == b);
}

TEST(ConfigYaml, ChangesListEveryDifferingKeyInFileOrder) {
  const auto a = from_text(kMinimal);
  EXPECT_TRUE(config_changes(a, a).empty());
  auto b = a;
  b.train.global_batch = 16;
  b.run.seed = 7;
  b.optim.lr = 1e-5;
  b.eval.t_bins = {1, 2};
  const auto changes = config_changes(a, b);
  ASSERT_EQ(changes.size(), 4U);
  EXPECT_EQ(changes[0].key, "run.seed");
  EXPECT_EQ(changes[0].before, "0");
  EXPECT_EQ(changes[0].after, "7");
  EXPECT_EQ(changes[1].key, "optim.lr");
  EXPECT_EQ(changes[1].after, "1e-05");
  EXPECT_EQ(changes[2].key, "train.global_batch");
  EXPECT_EQ(changes[3].key, "eval.t_bins");
  EXPECT_EQ(changes[3].after, "[1, 2]");
}

TEST(ConfigTimesteps, WindowAgainstTheSchedule) {
  auto c = from_text(kMinimal);
  EXPECT_EQ(effective_t_hi(c.method, 1000), 1000);
  EXPECT_NO_THROW(validate_against_timesteps(c, 1000));
  c.method.t_lo = 200;
  c.method.t_hi = 700;
  EXPECT_EQ(effective_t_hi(c.method, 1000), 700);
  EXPECT_NO_THROW(validate_against_timesteps(c, 1000));
  error_of([&] { validate_against_timesteps(c, 500); },
           {"timestep window outside the schedule", "t_hi <= 500", "[200, 700)"});
  c.method.t_lo = 1000;
  c.method.t_hi = -1;
  error_of([&] { validate_against_timesteps(c, 1000); },
           {"0 <= t_lo < t_hi <= 1000", "[1000, 1000) (t_hi = -1 means T)"});
}

TEST(ConfigEval, TBinsAreAListOfTimesteps) {
  const auto flow = from_text(std::string(kMinimal) + "eval:\n  t_bins: [0, 999]\n  every: 7\n");
  EXPECT_EQ(flow.eval.t_bins, (std::vector<int64_t>{0, 999}));
  EXPECT_EQ(flow.eval.every, 7);
  const auto block = from_text(std::string(kMinimal) + "eval:\n  t_bins:\n    - 250\n    - 750\n");
  EXPECT_EQ(block.eval.t_bins, (std::vector<int64_t>{250, 750}));
  EXPECT_NO_THROW(validate_against_timesteps(block, 1000));
  error_of([&] { validate_against_timesteps(flow, 999); },
           {"evaluation timestep outside the schedule", "eval.t_bins", "[0, 999)", "got 999"});
  error_of([] { from_text(std::string(kMinimal) + "eval:\n  t_bins: 500\n"); },
           {"wrong type for config key", "eval.t_bins", "a list of integers", "'500'",
            "[100, 300, 500, 700, 900]"});
  error_of([] { from_text(std::string(kMinimal) + "eval:\n  t_bins: [100, x]\n"); },
           {"wrong type for config key", "<test>:8:11: eval.t_bins", "a list of integers"});
  error_of([] { from_text(std::string(kMinimal) + "eval:\n  t_bins: []\n"); },
           {"empty config list", "eval.t_bins", "at least one value"});
  error_of([] { from_text(std::string(kMinimal) + "eval:\n  t_bins: [100, -1]\n"); },
           {"config value out of range", "eval.t_bins", "every element >= 0", "[100, -1]"});
  error_of([] { from_text(std::string(kMinimal) + "eval:\n  every: 0\n"); },
           {"config value out of range", "eval.every", ">= 1"});
}

TEST_F(ConfigFile, TBinsOverrideAndRoundTrip) {
  const std::string path = write(kMinimal);
  const auto c = load_config(path, {"eval.t_bins=[10, 20, 30]", "data.eval_index=d/eval.json"});
  EXPECT_EQ(c.eval.t_bins, (std::vector<int64_t>{10, 20, 30}));
  EXPECT_EQ(c.data.eval_index, "d/eval.json");
  const std::string text = to_yaml(c);
  EXPECT_NE(text.find("  t_bins: [10, 20, 30]\n"), std::string::npos) << text;
  EXPECT_EQ(from_text(text), c);
  error_of([&] { load_config(path, {"eval.t_bins=[1.5]"}); },
           {"--set eval.t_bins=[1.5]: eval.t_bins", "a list of integers"});
}

TEST_F(ConfigFile, SampleIsASubsectionOfEval) {
  const std::string text =
      std::string(kMinimal) + "eval:\n  every: 5\n  sample:\n    every: 10\n    guidance: 7.5\n";
  const std::string path = write(text);
  const auto c = load_config(path);
  EXPECT_EQ(c.eval.every, 5);
  EXPECT_EQ(c.sample.every, 10);
  EXPECT_DOUBLE_EQ(c.sample.guidance, 7.5);
  EXPECT_EQ(c.sample.prompts.count, 4);  // a default
  // The emitted YAML nests it again and reads back equal.
  const std::string yaml = to_yaml(c);
  EXPECT_NE(yaml.find("eval:\n  every: 5\n"), std::string::npos) << yaml;
  EXPECT_NE(yaml.find("  sample:\n    every: 10\n"), std::string::npos) << yaml;
  EXPECT_EQ(from_text(yaml), c);
  // --set reaches into it, one key or a map.
  EXPECT_EQ(load_config(path, {"eval.sample.steps=30"}).sample.steps, 30);
  const auto both = load_config(path, {"eval.sample={prompts: 2, seed: 3}"});
  EXPECT_EQ(both.sample.prompts.count, 2);
  EXPECT_EQ(both.sample.seed, 3U);
  EXPECT_EQ(both.sample.every, 10);  // merged key by key
  // Its errors name the dotted path and where it is.
  error_of(
      [&] { load_config(path, {"eval.sample.steps=0"}); },
      {"config value out of range", "--set eval.sample.steps=0: eval.sample.steps", "[1, 1000]"});
  error_of([&] { load_config(write(text + "    stepz: 3\n", "typo.yaml")); },
           {"unknown config key", "eval.sample.stepz", "did you mean 'eval.sample.steps'?"});
  error_of([&] { load_config(write(std::string(kMinimal) + "eval:\n  sample: 3\n", "t.yaml")); },
           {"wrong type for config section", "eval.sample", "a map with keys every, prompts"});
  error_of([&] { load_config(write(std::string(kMinimal) + "eval:\n  sampel: {}\n", "s.yaml")); },
           {"unknown config key", "did you mean 'eval.sample'?"});
  // A subsection is not a top-level section.
  error_of([&] { load_config(write(std::string(kMinimal) + "sample:\n  every: 1\n", "u.yaml")); },
           {"unknown config section", "'sample'"});
  auto changed = c;
  changed.sample.seed = 9;
  const auto changes = config_changes(c, changed);
  ASSERT_EQ(changes.size(), 1U);
  EXPECT_EQ(changes[0].key, "eval.sample.seed");
}

// eval.sample.prompts: a count, typed captions or a file of them; each form reads back from
// to_yaml, and the wrong shapes are errors that show the three forms.
TEST_F(ConfigFile, SamplePromptsAreACountCaptionsOrAFile) {
  const auto with = [&](const std::string& value) {
    return from_text(std::string(kMinimal) + "eval:\n  sample:\n    prompts: " + value + "\n");
  };
  const PromptList count = with("8").sample.prompts;
  EXPECT_EQ(count.count, 8);
  EXPECT_FALSE(count.typed());
  const auto typed = with(R"(["a \"red\" cube", "", "日本の猫 🐈", "8"])");
  const PromptList& texts = typed.sample.prompts;
  EXPECT_TRUE(texts.typed());
  EXPECT_EQ(texts.count, 0);
  EXPECT_EQ(texts.texts, (std::vector<std::string>{"a \"red\" cube", "", "日本の猫 🐈", "8"}));
  EXPECT_EQ(from_text(to_yaml(typed)), typed) << to_yaml(typed);
  const auto file = with("captions/watch.txt");
  EXPECT_EQ(file.sample.prompts.file, "captions/watch.txt");
  EXPECT_EQ(file.sample.prompts.count, 0);
  EXPECT_EQ(from_text(to_yaml(file)), file) << to_yaml(file);
  EXPECT_EQ(with("\"8\"").sample.prompts.file, "8");  // quoted: a file name, not a count
  EXPECT_EQ(from_text(to_yaml(with("\"8\""))), with("\"8\""));
  // --set takes every form
  const std::string path = write(kMinimal);
  EXPECT_EQ(load_config(path, {R"(eval.sample.prompts=["x", "y"])"}).sample.prompts.texts,
            (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(load_config(path, {"eval.sample.prompts=p.txt"}).sample.prompts.file, "p.txt");
  // the resume diff names the key with both values
  const auto changes = config_changes(with("4"), typed);
  ASSERT_EQ(changes.size(), 1U);
  EXPECT_EQ(changes[0].key, "eval.sample.prompts");
  EXPECT_EQ(changes[0].before, "4");
  EXPECT_EQ(changes[0].after, R"(['a "red" cube', '', '日本の猫 🐈', '8'])");
  // wrong shapes and sizes
  for (const std::string bad : {"[]", "{a: 1}", "\"\"", "[[1]]", "[{a: 1}]"}) {
    error_of([&] { with(bad); },
             {"wrong type for config key", "eval.sample.prompts",
              "a count, a list of captions or a file path", "is the unconditional image"});
  }
  error_of([&] { with("0"); }, {"config value out of range", "eval.sample.prompts", "[1, 64]"});
  error_of([&] { with("65"); }, {"config value out of range", "eval.sample.prompts", "[1, 64]"});
  std::string many = "[";
  for (int i = 0; i < 65; ++i) many += (i ? ", " : "") + std::string("\"c\"");
  error_of([&] { with(many + "]"); },
           {"too many captions", "eval.sample.prompts", "[1, 64]", "65 captions"});
  EXPECT_EQ(with(many.substr(0, many.size() - 5) + "]").sample.prompts.texts.size(), 64U);
  // A file that is not there is found before the run starts, named by its key.
  auto missing = from_text(kMinimal);
  missing.model.manifest = write("{}", "manifest.json");  // the other inputs are there
  missing.data.index = write("{}", "index.json");
  missing.sample.prompts = PromptList{0, {}, (dir_ / "nope.txt").string()};
  error_of([&] { check_input_files(missing); }, {"input file not found", "eval.sample.prompts = ",
                                                 "nope.txt", "write the captions one per line"});
}

// model.lora: a subsection of model with a list of names; off by default, every value checked.
TEST(ConfigLora, IsASubsectionOfModelWithTargetNames) {
  const TrainConfig defaults = from_text(kMinimal);
  EXPECT_EQ(defaults.lora.rank, 0);
  EXPECT_EQ(defaults.lora.alpha, 0.0);
  EXPECT_EQ(defaults.lora.targets, (std::vector<std::string>{"to_q", "to_k", "to_v", "to_out.0"}));
  const std::string whole =
      "run:\n  output_dir: runs/x\nmodel:\n  manifest: m/manifest.json\n  lora:\n    rank: 8\n"
      "    alpha: 16\n    targets: [to_q, \"to_out.0\", ff.net.2]\ndata:\n  index: d/index.json\n";
  const TrainConfig c = from_text(whole);
  EXPECT_EQ(c.lora.rank, 8);
  EXPECT_EQ(c.lora.alpha, 16.0);
  EXPECT_EQ(c.lora.targets, (std::vector<std::string>{"to_q", "to_out.0", "ff.net.2"}));
  const std::string yaml = to_yaml(c);
  EXPECT_NE(yaml.find("  lora:\n    rank: 8\n"), std::string::npos) << yaml;
  EXPECT_EQ(from_text(yaml), c);
  const auto changes = config_changes(defaults, c);
  ASSERT_EQ(changes.size(), 3U);
  EXPECT_EQ(changes[2].key, "model.lora.targets");
  EXPECT_EQ(changes[2].after, "['to_q', 'to_out.0', 'ff.net.2']");
  const auto with = [&](const std::string& lora) {
    return from_text("run:\n  output_dir: r\nmodel:\n  manifest: m.json\n  lora: " + lora +
                     "\ndata:\n  index: i.json\n");
  };
  error_of([&] { with("{rank: -1}"); },
           {"config value out of range", "model.lora.rank", "[0, 1024]"});
  error_of([&] { with("{rank: 2000}"); }, {"config value out of range", "model.lora.rank"});
  error_of([&] { with("{alpha: -1}"); }, {"config value out of range", "model.lora.alpha"});
  error_of([&] { with("{targets: []}"); }, {"empty config list", "model.lora.targets"});
  error_of([&] { with("{targets: to_q}"); },
           {"wrong type for config key", "model.lora.targets", "a list of strings"});
  error_of([&] { with("{targets: [[to_q]]}"); },
           {"wrong type for config key", "model.lora.targets"});
  for (const std::string bad : {"\"\"", "\"to q\"", "\".to_q\"", "\"to_q.\"", "\"a..b\""}) {
    error_of([&] { with("{targets: [" + bad + "]}"); },
             {"bad name in config list", "model.lora.targets", "to_out.0"});
  }
  error_of([&] { with("{rnak: 8}"); }, {"unknown config key", "did you mean 'model.lora.rank'?"});
  // the reference is the base with its adapters off: a second reference model is a contradiction
  error_of(
      [&] {
        from_text(
            "run:\n  output_dir: r\nmodel:\n  manifest: m.json\n  reference_manifest: o.json\n"
            "  lora: {rank: 8}\ndata:\n  index: i.json\n");
      },
      {"LoRA with a separate reference model", "model.reference_manifest",
       "drop model.reference_manifest"});
}

TEST(ConfigBatch, AccumulationSteps) {
  auto c = from_text(kMinimal);
  EXPECT_EQ(accumulation_steps(c, 8), 256);
  EXPECT_EQ(accumulation_steps(c, 1), 2048);
  c.train.global_batch = 4;
  c.train.micro_batch = 2;
  EXPECT_EQ(accumulation_steps(c, 1), 2);
  EXPECT_EQ(accumulation_steps(c, 2), 1);
  error_of([&] { accumulation_steps(c, 3); },
           {"does not split over the ranks", "train.global_batch", "2 x 3", "got 4"});
  error_of([&] { accumulation_steps(c, 0); }, {"bad world size", ">= 1 rank", "got 0"});
}

}  // namespace
}  // namespace dde::config
