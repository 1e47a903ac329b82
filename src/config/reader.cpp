// Reading a YAML tree into the struct: keys checked against the table, values parsed by type,
// errors located at file:line:column (or at the --set that wrote them).
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <filesystem>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"
#include "field_table.hpp"

namespace dde::config {

namespace detail {

std::string node_text(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Null:
      return "null (no value)";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    case YAML::NodeType::Scalar:
      return "'" + node.Scalar() + "'";
    case YAML::NodeType::Undefined:
      break;
  }
  return "nothing";
}

namespace {

// The whole text as one number (std::from_chars; a leading '+' allowed, as YAML does).
template <typename T>
bool parse_number(const std::string& text, T& out) {
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  if (begin != end && *begin == '+') {
    ++begin;
  }
  const auto result = std::from_chars(begin, end, out);
  return begin != end && result.ec == std::errc() && result.ptr == end;
}

bool parse_scalar(const std::string& text, std::string& out) {
  out = text;
  return true;
}
bool parse_scalar(const std::string& text, int64_t& out) { return parse_number(text, out); }
bool parse_scalar(const std::string& text, uint64_t& out) {
  return !text.empty() && text[0] != '-' && parse_number(text, out);
}
bool parse_scalar(const std::string& text, double& out) {
  // YAML 1.2 spells the special floats .inf, -.inf, .nan (validation rejects them later).
  for (const char* inf : {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"}) {
    if (text == inf) {
      out = std::numeric_limits<double>::infinity();
      return true;
    }
  }
  for (const char* inf : {"-.inf", "-.Inf", "-.INF"}) {
    if (text == inf) {
      out = -std::numeric_limits<double>::infinity();
      return true;
    }
  }
  if (text == ".nan" || text == ".NaN" || text == ".NAN") {
    out = std::numeric_limits<double>::quiet_NaN();
    return true;
  }
  return parse_number(text, out);
}
bool parse_scalar(const std::string& text, bool& out) {
  std::string lower = text;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  if (lower == "true" || lower == "yes" || lower == "on") {
    out = true;
    return true;
  }
  if (lower == "false" || lower == "no" || lower == "off") {
    out = false;
    return true;
  }
  return false;
}

class TreeReader {
 public:
  TreeReader(std::string source, std::vector<std::pair<std::string, std::string>> overrides)
      : source_(std::move(source)), overrides_(std::move(overrides)) {}

  TrainConfig read(const YAML::Node& root) {
    if (root.IsDefined() && !root.IsNull() && !root.IsMap()) {
      throw Error({"wrong type for config file", origin("", root.Mark()),
                   "a map of sections (" + join(section_names()) + ")", node_text(root),
                   "write 'section:' lines with indented 'key: value' lines below"});
    }
    check_keys(root);
    TrainConfig config;
    const TrainConfig defaults;
    for_each_field([&](const Field& field, auto sp, auto mp) {
      const Entry entry = lookup(root, field.section, field.key);
      if (entry.value.IsDefined()) {
        read_value(field.path(), entry, (defaults.*sp).*mp, (config.*sp).*mp);
      }
    });
    validate_impl(config, [&](const std::string& path) { return locate(root, path); });
    return config;
  }

 private:
  struct Entry {
    YAML::Node value;  // undefined when the key is absent
    YAML::Mark mark;   // of the value, or of the key when the value is empty
  };

  static Entry lookup(const YAML::Node& root, const std::string& section, const std::string& key) {
    Entry entry{YAML::Node(YAML::NodeType::Undefined), YAML::Mark::null_mark()};
    if (!root.IsDefined() || !root.IsMap()) {
      return entry;
    }
    YAML::Node section_node = root;  // reset(), not operator=: that would rewrite the tree
    std::stringstream parts(section);
    for (std::string part; std::getline(parts, part, '.');) {
      if (!section_node.IsDefined() || !section_node.IsMap()) return entry;
      const YAML::Node& parent = section_node;
      const YAML::Node child = parent[part];  // invalid (not reset()-able) when absent
      if (!child.IsDefined()) return entry;
      section_node.reset(child);
    }
    if (!section_node.IsDefined() || !section_node.IsMap()) {
      return entry;
    }
    for (const auto& item : section_node) {
      if (item.first.IsScalar() && item.first.Scalar() == key) {
        entry.value = item.second;
        entry.mark = item.second.IsNull() ? item.first.Mark() : item.second.Mark();
      }
    }
    return entry;
  }

  // "file.yaml:3:5: optim.lr", "--set optim.lr=-1: optim.lr", or "file.yaml: run.output_dir".
  std::string origin(const std::string& path, const YAML::Mark& mark) const {
    std::string from = source_;
    for (const auto& [override_path, text] : overrides_) {
      if (path == override_path || path.rfind(override_path + ".", 0) == 0) {
        from = "--set " + text;
      }
    }
    if (from == source_ && mark.line >= 0) {
      from += ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
    }
    return path.empty() ? from : from + ": " + path;
  }

  std::string locate(const YAML::Node& root, const std::string& path) const {
    const auto dot = path.rfind('.');
    return origin(path, lookup(root, path.substr(0, dot), path.substr(dot + 1)).mark);
  }

  void check_keys(const YAML::Node& root) const {
    if (!root.IsDefined() || !root.IsMap()) {
      return;
    }
    std::set<std::string> seen_sections;
    for (const auto& section_entry : root) {
      const std::string section = key_text(section_entry.first, "");
      if (!is_section(section) || section.find('.') != std::string::npos) {
        throw Error({"unknown config section", origin(section, section_entry.first.Mark()),
                     "one of the sections " + join(section_names()), "'" + section + "'",
                     "did you mean '" + closest(section, section_names()) + "'?"});
      }
      if (!seen_sections.insert(section).second) {
        throw Error({"duplicate config section", origin(section, section_entry.first.Mark()),
                     "each section once", "'" + section + "' again", "merge the two blocks"});
      }
      check_section(section, section_entry.second);
    }
  }

  // The keys of one section's map (and of its subsections', recursively).
  void check_section(const std::string& section, const YAML::Node& body) const {
    const std::vector<std::string> keys = section_keys(section);
    if (body.IsNull()) {
      return;
    }
    if (!body.IsMap()) {
      throw Error({"wrong type for config section", origin(section, body.Mark()),
                   "a map with keys " + join(keys), node_text(body),
                   "write '" + section + ":' followed by indented 'key: value' lines"});
    }
    std::set<std::string> seen_keys;
    for (const auto& entry : body) {
      const std::string key = key_text(entry.first, section + ".");
      const std::string path = section + "." + key;
      if (std::find(keys.begin(), keys.end(), key) == keys.end()) {
        const auto synonym = peer_synonyms().find(key);
        throw Error({"unknown config key", origin(path, entry.first.Mark()),
                     "one of the " + section + " keys " + join(keys), "'" + key + "'",
                     synonym != peer_synonyms().end()
                         ? "'" + key + "' is the peers' name: here it is " + synonym->second
                         : "did you mean '" + section + "." + closest(key, keys) + "'?"});
      }
      if (!seen_keys.insert(key).second) {
        throw Error({"duplicate config key", origin(path, entry.first.Mark()),
                     "each key once per section", "'" + key + "' again",
                     "delete one of the two lines"});
      }
      if (is_section(path)) check_section(path, entry.second);
    }
  }

  std::string key_text(const YAML::Node& key, const std::string& prefix) const {
    if (!key.IsScalar()) {
      throw Error({"bad config key", origin(prefix + "?", key.Mark()), "a plain name",
                   node_text(key), "keys are names such as 'lr'"});
    }
    return key.Scalar();
  }

  template <typename T>
  void read_value(const std::string& path, const Entry& entry, const T& default_value,
                  T& out) const {
    const YAML::Node& node = entry.value;
    if constexpr (std::is_same_v<T, std::string>) {
      if (node.IsNull()) {
        out.clear();  // "key:" with no value reads as the empty string
        return;
      }
    }
    if (!node.IsScalar() || !parse_scalar(node.Scalar(), out)) {
      std::string example = value_text(default_value);
      if constexpr (std::is_same_v<T, std::string>) {
        example = default_value.empty() ? "some/path" : default_value;
      }
      throw Error({"wrong type for config key", origin(path, entry.mark), type_text<T>(),
                   node_text(node), "write e.g. " + path + ": " + example});
    }
  }

  // A YAML sequence of integers ([100, 500] or one "- 100" line per element).
  void read_value(const std::string& path, const Entry& entry,
                  const std::vector<int64_t>& default_value, std::vector<int64_t>& out) const {
    const YAML::Node& node = entry.value;
    bool ok = node.IsSequence();
    out.clear();
    for (size_t i = 0; ok && i < node.size(); ++i) {
      int64_t item = 0;
      ok = node[i].IsScalar() && parse_scalar(node[i].Scalar(), item);
      out.push_back(item);
    }
    if (!ok) {
      throw Error({"wrong type for config key", origin(path, entry.mark),
                   type_text<std::vector<int64_t>>(), node_text(node),
                   "write e.g. " + path + ": " + value_text(default_value)});
    }
  }

  // A YAML sequence of strings (["to_q", "to_v"] or one "- to_q" line per element).
  void read_value(const std::string& path, const Entry& entry,
                  const std::vector<std::string>& default_value,
                  std::vector<std::string>& out) const {
    const YAML::Node& node = entry.value;
    bool ok = node.IsSequence();
    out.clear();
    for (size_t i = 0; ok && i < node.size(); ++i) {
      ok = node[i].IsScalar();
      if (ok) out.push_back(node[i].Scalar());
    }
    if (!ok) {
      throw Error({"wrong type for config key", origin(path, entry.mark),
                   type_text<std::vector<std::string>>(), node_text(node),
                   "write e.g. " + path + ": " + yaml_text(default_value)});
    }
  }

  // eval.sample.prompts: a plain integer is a count; a list of scalars the captions; any other
  // scalar (a quoted "8" too) the path of a file of captions.
  void read_value(const std::string& path, const Entry& entry, const PromptList&,
                  PromptList& out) const {
    const YAML::Node& node = entry.value;
    out = PromptList{};
    bool ok = false;
    if (node.IsScalar()) {
      int64_t count = 0;
      if (node.Tag() != "!" && parse_scalar(node.Scalar(), count)) {
        out.count = count;
        ok = true;
      } else {
        out.count = 0;
        out.file = node.Scalar();
        ok = !out.file.empty();
      }
    } else if (node.IsSequence()) {
      out.count = 0;
      ok = node.size() > 0;
      for (size_t i = 0; ok && i < node.size(); ++i) {
        ok = node[i].IsScalar();
        if (ok) out.texts.push_back(node[i].Scalar());
      }
    }
    if (!ok) {
      throw Error({"wrong type for config key", origin(path, entry.mark), type_text<PromptList>(),
                   node_text(node),
                   "write e.g. " + path + ": 8, or " + path +
                       ": [\"a red cube\", \"\"] (\"\" is the unconditional image), or " + path +
                       ": prompts.txt"});
    }
  }

  std::string source_;
  std::vector<std::pair<std::string, std::string>> overrides_;  // (dotted path, "--set" text)
};

}  // namespace
}  // namespace detail

TrainConfig config_from_yaml(const YAML::Node& root, const std::string& source_name) {
  return detail::TreeReader(source_name, {}).read(root);
}

TrainConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    throw Error({"config file not found", path, "a readable YAML file",
                 std::filesystem::exists(path, ec) ? "not a regular file" : "no such file",
                 "paths are relative to the working directory (" +
                     std::filesystem::current_path(ec).string() + ")"});
  }
  const std::string content = util::read_text_file(path, util::kMaxConfigFileBytes, "config file",
                                                   "a config is a few KB: is this the right file?");
  YAML::Node root;
  try {
    check_yaml_text(content, path);
    root = YAML::Load(content);
  } catch (const YAML::ParserException& e) {
    throw Error(
        {"YAML parse error: " + e.msg,
         path + ":" + std::to_string(e.mark.line + 1) + ":" + std::to_string(e.mark.column + 1), "",
         "", "fix the YAML syntax at that position"});
  }
  std::vector<std::pair<std::string, std::string>> origins;
  for (const auto& text : overrides) {
    detail::apply_override(root, text, origins);
  }
  return detail::TreeReader(path, std::move(origins)).read(root);
}

}  // namespace dde::config
