#include "dde/train/metrics_log.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "dde/util/input_limits.hpp"
#include "util/expect_error.hpp"

namespace dde::train {
namespace {

namespace fs = std::filesystem;

fs::path metrics_path(const std::string& name) {
  return fs::temp_directory_path() /
         ("dde_metrics_log_" + std::to_string(::getpid()) + "_" + name + ".jsonl");
}

TEST(MetricsLog, ResumeKeepsTheStepsUpToTheCheckpoint) {
  const fs::path path = metrics_path("keep");
  std::ofstream(path) << "{\"kind\":\"step\",\"step\":1}\n{\"kind\":\"step\",\"step\":2}\n";
  { MetricsLog log(path.string(), 1); }
  std::ifstream in(path);
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{\"kind\":\"step\",\"step\":1}\n");
  fs::remove(path);
}

TEST(MetricsLog, ResumeRefusesALineOverTheLimit) {
  const fs::path path = metrics_path("long_line");
  {
    std::ofstream out(path, std::ios::binary);
    out << "{\"kind\":\"step\",\"step\":1}\n";
    out << std::string(util::kMaxMetricsLineBytes + 1, ' ') << "\n";
  }
  expect_error_mentions([&] { MetricsLog(path.string(), 1); },
                        {"line too long", path.string(),
                         "at most " + std::to_string(util::kMaxMetricsLineBytes) + " bytes"});
  fs::remove(path);
}

}  // namespace
}  // namespace dde::train
