// The table's shape (sections and keys), equality and the resume diff.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "dde/config/config.hpp"
#include "field_table.hpp"

namespace dde::config {

namespace detail {
namespace {

// Sections and their keys, in file order.
const std::vector<std::pair<std::string, std::vector<std::string>>>& schema() {
  static const auto sections = [] {
    std::vector<std::pair<std::string, std::vector<std::string>>> out;
    for_each_field([&](const Field& field, auto, auto) {
      if (out.empty() || out.back().first != field.section) {
        out.emplace_back(field.section, std::vector<std::string>{});
      }
      out.back().second.emplace_back(field.key);
    });
    return out;
  }();
  return sections;
}

}  // namespace

std::vector<std::string> section_names() {
  std::vector<std::string> names;
  for (const auto& [section, keys] : schema()) {
    if (section.find('.') == std::string::npos) names.push_back(section);
  }
  return names;
}

std::vector<std::string> section_keys(const std::string& section) {
  std::vector<std::string> keys;
  for (const auto& [name, fields] : schema()) {
    if (name == section) {
      keys.insert(keys.end(), fields.begin(), fields.end());
    } else if (name.rfind(section + ".", 0) == 0 &&
               name.find('.', section.size() + 1) == std::string::npos) {
      keys.push_back(name.substr(section.size() + 1));
    }
  }
  return keys;
}

bool is_section(const std::string& name) {
  const auto& sections = schema();
  return std::any_of(sections.begin(), sections.end(),
                     [&](const auto& s) { return s.first == name; });
}

}  // namespace detail

bool operator==(const TrainConfig& a, const TrainConfig& b) {
  bool equal = true;
  detail::for_each_field(
      [&](const detail::Field&, auto sp, auto mp) { equal = equal && (a.*sp).*mp == (b.*sp).*mp; });
  return equal;
}

bool operator!=(const TrainConfig& a, const TrainConfig& b) { return !(a == b); }

bool operator==(const PromptList& a, const PromptList& b) {
  return a.count == b.count && a.texts == b.texts && a.file == b.file;
}
bool operator!=(const PromptList& a, const PromptList& b) { return !(a == b); }

std::vector<ConfigChange> config_changes(const TrainConfig& before, const TrainConfig& after) {
  std::vector<ConfigChange> changes;
  detail::for_each_field([&](const detail::Field& field, auto sp, auto mp) {
    const std::string old_text = detail::value_text((before.*sp).*mp);
    const std::string new_text = detail::value_text((after.*sp).*mp);
    if (old_text != new_text) {
      changes.push_back({field.path(), old_text, new_text});
    }
  });
  return changes;
}

}  // namespace dde::config
