// docs/config.md and the field table it is generated from (src/config/field_table.hpp).
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <fstream>
#include <set>
#include <sstream>
#include <string>

#include "config/field_table.hpp"  // src/config: the private field table
#include "dde/config/config.hpp"

namespace dde::config {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream content;
  content << in.rdbuf();
  return content.str();
}

TEST(ConfigTable, EveryFieldAndSectionHasADocLine) {
  std::set<std::string> sections;
  detail::for_each_field([&](const detail::Field& field, auto, auto) {
    const std::string doc = field.doc;
    EXPECT_FALSE(doc.empty()) << field.path() << " has no doc string in the field table";
    EXPECT_EQ(doc.find('\n'), std::string::npos) << field.path() << ": the doc is one line";
    sections.insert(field.section);
  });
  for (const auto& section : sections) {
    EXPECT_STRNE(detail::section_doc(section), "") << "section " << section << " has no doc";
  }
}

TEST(ConfigReference, ListsEveryKeyOfToYamlWithItsDefault) {
  const std::string reference = config_reference_markdown();
  const YAML::Node tree = YAML::Load(to_yaml(TrainConfig{}));
  int keys = 0;
  for (const auto& section : tree) {
    for (const auto& key : section.second) {
      if (key.second.IsMap()) continue;  // eval.sample: its keys are listed under it
      const std::string path = section.first.Scalar() + "." + key.first.Scalar();
      EXPECT_NE(reference.find("| `" + path + "` |"), std::string::npos) << path;
      ++keys;
    }
  }
  EXPECT_GT(keys, 50);
  EXPECT_NE(reference.find("| `optim.lr` | a number | `2.048e-05` | > 0 |"), std::string::npos);
  EXPECT_NE(reference.find("| `eval.sample.steps` | an integer | `20` | in [1, 1000] |"),
            std::string::npos);
  EXPECT_NE(reference.find("| `run.device` | a string | `\"auto\"` | one of `auto`, `cpu`"),
            std::string::npos);
}

TEST(ConfigReference, DocsConfigMdIsUpToDate) {
  const std::string committed = read_text(std::string(DDE_SOURCE_DIR) + "/docs/config.md");
  const std::string generated = config_reference_markdown();
  if (committed == generated) return;
  std::istringstream a(committed), b(generated);
  std::string line_a, line_b;
  int line = 0;
  bool more_a = true, more_b = true;
  do {
    ++line;
    more_a = static_cast<bool>(std::getline(a, line_a));
    more_b = static_cast<bool>(std::getline(b, line_b));
  } while (more_a && more_b && line_a == line_b);
  ADD_FAILURE() << "docs/config.md differs from the field table (src/config/field_table.hpp) "
                << "from line " << line << ":\n  committed: " << (more_a ? line_a : "(end of file)")
                << "\n  generated: " << (more_b ? line_b : "(end of file)")
                << "\nRegenerate it: build/dde_train --config-reference > docs/config.md";
}

}  // namespace
}  // namespace dde::config
