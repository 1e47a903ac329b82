// The YAML a config may not hold (src/config/yaml_guard.cpp): each hostile input is refused by
// name, at its file:line:column, before yaml-cpp builds a tree (and before any bad_alloc).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/util/error.hpp"
#include "dde/util/input_limits.hpp"
#include "util/expect_error.hpp"

namespace dde::config {
namespace {

namespace fs = std::filesystem;

const std::string kRequired = "model:\n  manifest: m/manifest.json\ndata:\n  index: d/index.json\n";

class YamlGuard : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dde_yaml_guard_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string write(const std::string& text) const {
    std::string path = (dir_ / "cfg.yaml").string();
    std::ofstream(path, std::ios::binary) << text;
    return path;
  }

  // load_config(text) is refused with a message holding every part (`@` stands for the path).
  void refused(const std::string& text, std::vector<std::string> parts,
               const std::vector<std::string>& overrides = {}) const {
    const std::string path = write(text);
    for (auto& part : parts) {
      if (part.rfind('@', 0) == 0) part = path + part.substr(1);
    }
    expect_error_mentions([&] { load_config(path, overrides); }, parts);
  }

  fs::path dir_;
};

std::string repeat(const std::string& text, int64_t n) {
  std::string out;
  out.reserve(text.size() * static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) out += text;
  return out;
}

// A list of n integers on one flow line.
std::string flow_list(int64_t n) { return "[" + repeat("1, ", n - 1) + "1]"; }

TEST_F(YamlGuard, FileOverTheLimitIsRefusedBeforeReading) {
  const std::string text = "run:\n  output_dir: r\n" + kRequired;
  refused(text + "#" + std::string(util::kMaxConfigFileBytes - text.size(), 'x') + "\n",
          {"config file too large", "@", "at most 1048576 bytes", "got 1048578 bytes"});
}

TEST_F(YamlGuard, MillionEntryListIsRefusedByTheLimitNotByBadAlloc) {
  const std::string list = flow_list(1'000'000);
  refused("run:\n  output_dir: r\n" + kRequired + "eval:\n  t_bins: " + list + "\n",
          {"config file too large", "@", "at most 1048576 bytes"});
  refused("run:\n  output_dir: r\n" + kRequired, {"--set override too large", "--set eval.t_bins"},
          {"eval.t_bins=" + list});
}

TEST_F(YamlGuard, ListOverTheLimitNamesTheKeyLimitAndSize) {
  refused(
      "run:\n  output_dir: r\n" + kRequired + "eval:\n  t_bins: " + flow_list(5000) + "\n",
      {"YAML list too long", "@:8:11: eval.t_bins", "at most 4096 entries", "got 5000 entries"});
  refused("run:\n  output_dir: r\n" + kRequired,
          {"YAML list too long", "--set eval.t_bins:1:1", "at most 4096 entries", "5000 entries"},
          {"eval.t_bins=" + flow_list(5000)});
}

TEST_F(YamlGuard, MapOverTheLimitNamesTheKeyLimitAndSize) {
  std::string keys;
  for (int i = 0; i < 1100; ++i) keys += "  k" + std::to_string(i) + ": 1\n";
  refused("run:\n  output_dir: r\n" + kRequired + "train:\n" + keys,
          {"YAML map too large", "@:8:3: train", "at most 1024 entries", "got 1100 entries"});
}

TEST_F(YamlGuard, StringOverTheLimitNamesTheKeyLimitAndSize) {
  const std::string long_path(5000, 'p');
  refused("run:\n  output_dir: " + long_path + "\n" + kRequired,
          {"YAML string too long", "@:2:15: run.output_dir", "at most 4096 bytes", "5000 bytes"});
  refused("run:\n  output_dir: r\n" + kRequired,
          {"YAML string too long", "--set run.output_dir:1:1", "at most 4096 bytes", "5000 bytes"},
          {"run.output_dir=" + long_path});
}

TEST_F(YamlGuard, DeepNestingIsRefusedByNameWithoutCrashing) {
  const std::string base = "run:\n  output_dir: r\n" + kRequired;
  for (const int64_t n : {500, 100'000}) {
    SCOPED_TRACE(n);
    // Flow style: [[[...]]] and {a: {a: ...}}.
    refused(base + "eval:\n  t_bins: " + repeat("[", n) + repeat("]", n) + "\n",
            {"YAML nested too deeply", "@:8:", "at most 32 levels"});
    refused(base + "x: " + repeat("{a: ", n) + "1" + repeat("}", n) + "\n",
            {"YAML nested too deeply", "@:7:", "at most 32 levels"});
    // Block style: "- - - x" on one line.
    refused(base + "x:\n" + repeat("- ", n) + "x\n",
            {"YAML nested too deeply", "@:8:", "at most 32 levels"});
    refused(base, {"YAML nested too deeply", "--set eval.t_bins:1:", "at most 32 levels"},
            {"eval.t_bins=" + repeat("[", n) + repeat("]", n)});
  }
  // Block style by indentation, 500 levels.
  std::string indented = base + "x:\n";
  for (int i = 1; i <= 500; ++i) indented += std::string(2 * i, ' ') + "k:\n";
  refused(indented, {"YAML nested too deeply", "@:", "at most 32 levels"});
}

TEST_F(YamlGuard, BracketsInQuotesAndCommentsAreNotNesting) {
  const std::string brackets = repeat("[{", 40);
  const std::string path =
      write("run:  # " + brackets + "\n  output_dir: '" + brackets + "''s'  # " + brackets + "\n" +
            kRequired + "# " + brackets + "\neval:\n  t_bins: [\"" + brackets + "\\\"\"]\n");
  expect_error_mentions([&] { load_config(path); },
                        {"wrong type for config key", "eval.t_bins", "a list of integers"});
  EXPECT_EQ(
      load_config(write("run:\n  output_dir: '" + brackets + "'  # " + brackets + "\n" + kRequired))
          .run.output_dir,
      brackets);
}

TEST_F(YamlGuard, MergeKeyIsRefusedByName) {
  refused("run:\n  output_dir: r\n" + kRequired + "train:\n  <<: {micro_batch: 1}\n",
          {"YAML merge keys (<<) are not supported", "@:8:3: train"});
}

TEST_F(YamlGuard, AnchorIsRefusedByName) {
  refused("run:\n  output_dir: &dir runs/x\n" + kRequired,
          {"YAML anchors and aliases are not supported", "@:2:15", "&dir"});
}

TEST_F(YamlGuard, AliasIsRefusedByName) {
  refused("run:\n  output_dir: *dir\n" + kRequired,
          {"YAML anchors and aliases are not supported", "@:2:15", "an alias"});
}

TEST_F(YamlGuard, TagsAreRefusedByName) {
  refused("run:\n  output_dir: !!str runs/x\n" + kRequired,
          {"YAML tags are not supported", "@:2:15: run.output_dir", "tag:yaml.org,2002:str"});
  refused("run:\n  output_dir: r\n" + kRequired + "train: !custom\n  micro_batch: 1\n",
          {"YAML tags are not supported", "@:7:8: train", "the tag !custom"});
  refused("run:\n  output_dir: r\n" + kRequired, {"YAML tags are not supported", "--set"},
          {"optim.lr=!!float 1"});
}

TEST_F(YamlGuard, DuplicateKeyIsRefusedByName) {
  refused("run:\n  output_dir: r\n  output_dir: s\n" + kRequired,
          {"duplicate config key", "@:3:3: run.output_dir"});
}

}  // namespace
}  // namespace dde::config
