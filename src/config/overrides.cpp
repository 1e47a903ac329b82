// --set overrides: "section.key=value", the value parsed as YAML, written into the tree before it
// is read, so that a --set value passes the same checks as the file's.
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"
#include "field_table.hpp"

namespace dde::config::detail {

namespace {

bool is_name(const std::string& part) {
  if (part.empty() || std::isdigit(static_cast<unsigned char>(part[0]))) {
    return false;
  }
  return std::all_of(part.begin(), part.end(),
                     [](unsigned char ch) { return std::isalnum(ch) || ch == '_'; });
}

[[noreturn]] void bad_override(const std::string& text, const std::string& why) {
  throw Error({"bad --set override", "--set " + text,
               "section.key=value, e.g. optim.lr=1e-4 or method.name=uniform", "'" + text + "'",
               why});
}

// Sets parent[parts[i]..] = value; a map value merges into an existing map key by key. Records the
// dotted path of every assigned leaf in `origins`.
void set_path(YAML::Node parent, const std::vector<std::string>& parts, size_t i,
              const YAML::Node& value, const std::string& text,
              std::vector<std::pair<std::string, std::string>>& origins,
              const std::string& prefix) {
  const std::string& key = parts[i];
  const std::string path = prefix.empty() ? key : prefix + "." + key;
  const YAML::Node existing = parent[key];
  if (i + 1 == parts.size()) {
    if (value.IsMap() && existing.IsDefined() && existing.IsMap()) {
      for (const auto& entry : value) {
        if (!entry.first.IsScalar()) {
          bad_override(text, "map keys must be names");
        }
        set_path(existing, {entry.first.Scalar()}, 0, entry.second, text, origins, path);
      }
      return;
    }
    parent[key] = value;
    origins.emplace_back(path, text);
    return;
  }
  if (!existing.IsDefined() || existing.IsNull()) {
    parent[key] = YAML::Node(YAML::NodeType::Map);
  } else if (!existing.IsMap()) {
    bad_override(text, "'" + path + "' is " + node_text(existing) + ", not a section");
  }
  set_path(parent[key], parts, i + 1, value, text, origins, path);
}

}  // namespace

void apply_override(YAML::Node& root, const std::string& text,
                    std::vector<std::pair<std::string, std::string>>& origins) {
  util::check_size(static_cast<int64_t>(text.size()), util::kMaxConfigFileBytes, "--set override",
                   "--set " + text.substr(0, std::min(text.find('='), size_t{80})),
                   "a --set value is a number, a name or a short list");
  const auto equals = text.find('=');
  if (equals == std::string::npos) {
    bad_override(text, "missing '='");
  }
  std::string key = text.substr(0, equals);
  key.erase(key.find_last_not_of(" \t") + 1);
  key.erase(0, std::min(key.find_first_not_of(" \t"), key.size()));
  std::vector<std::string> parts;
  std::stringstream stream(key);
  for (std::string part; std::getline(stream, part, '.');) {
    parts.push_back(part);
  }
  if (key.empty() || key.back() == '.' || parts.empty() ||
      !std::all_of(parts.begin(), parts.end(), is_name)) {
    bad_override(text, "the key must be a dotted path of names such as optim.lr");
  }
  YAML::Node value;
  try {
    const std::string value_text = text.substr(equals + 1);
    check_yaml_text(value_text, "--set " + key);
    value = YAML::Load(value_text);
  } catch (const YAML::Exception& e) {
    bad_override(text, "the value is not valid YAML: " + e.msg);
  }
  if (!root.IsMap()) {
    root = YAML::Node(YAML::NodeType::Map);
  }
  set_path(root, parts, 0, value, text, origins, "");
}

}  // namespace dde::config::detail
