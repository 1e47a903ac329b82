// Emitting: to_yaml, every field in file order (load(to_yaml(c)) == c).
#include <yaml-cpp/yaml.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "field_table.hpp"

namespace dde::config {

namespace detail {
namespace {

// One value: strings double-quoted, floats with a '.', lists in flow style.
template <typename T>
void write_value(YAML::Emitter& out, const T& value) {
  if constexpr (std::is_same_v<T, std::string>) {
    out << YAML::DoubleQuoted << value;
  } else if constexpr (std::is_same_v<T, double>) {
    std::string text = number_text(value);
    if (text.find_first_of(".eEni") == std::string::npos) {
      text += ".0";  // keep it a float for readers that type scalars (Python's yaml)
    }
    out << text;
  } else if constexpr (std::is_same_v<T, bool>) {
    out << (value ? "true" : "false");
  } else if constexpr (std::is_same_v<T, std::vector<int64_t>>) {
    out << YAML::Flow << YAML::BeginSeq;
    for (const int64_t item : value) {
      out << item;
    }
    out << YAML::EndSeq;
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    out << YAML::Flow << YAML::BeginSeq;
    for (const std::string& item : value) out << YAML::DoubleQuoted << item;
    out << YAML::EndSeq;
  } else if constexpr (std::is_same_v<T, PromptList>) {
    // a count as a number, a file as a quoted string, captions as a list of quoted strings
    if (!value.typed()) {
      out << value.count;
    } else if (!value.file.empty()) {
      out << YAML::DoubleQuoted << value.file;
    } else {
      out << YAML::Flow << YAML::BeginSeq;
      for (const std::string& item : value.texts) out << YAML::DoubleQuoted << item;
      out << YAML::EndSeq;
    }
  } else {
    out << value;
  }
}

// The value alone, as to_yaml prints it inside its section.
template <typename T>
std::string yaml_text_of(const T& value) {
  YAML::Emitter out;
  write_value(out, value);
  return out.c_str();
}

class Emitter {
 public:
  Emitter() { out_ << YAML::BeginMap; }

  template <typename T>
  void field(const std::string& section, const std::string& key, const T& value) {
    open(section);
    out_ << YAML::Key << key << YAML::Value;
    write_value(out_, value);
  }

  std::string finish() {
    for (size_t i = 0; i <= open_.size(); ++i) out_ << YAML::EndMap;
    return std::string(out_.c_str()) + "\n";
  }

 private:
  // Closes the maps of the sections left and opens those entered: "eval" then "eval.sample"
  // nests sample's map in eval's.
  void open(const std::string& section) {
    std::vector<std::string> parts;
    std::stringstream stream(section);
    for (std::string part; std::getline(stream, part, '.');) parts.push_back(part);
    size_t common = 0;
    while (common < parts.size() && common < open_.size() && parts[common] == open_[common]) {
      ++common;
    }
    for (; open_.size() > common; open_.pop_back()) out_ << YAML::EndMap;
    for (size_t i = common; i < parts.size(); ++i) {
      out_ << YAML::Key << parts[i] << YAML::Value << YAML::BeginMap;
      open_.push_back(parts[i]);
    }
  }

  YAML::Emitter out_;
  std::vector<std::string> open_;  // the sections whose maps are open, outermost first
};

}  // namespace

std::string yaml_text(const std::string& v) { return yaml_text_of(v); }
std::string yaml_text(double v) { return yaml_text_of(v); }
std::string yaml_text(bool v) { return yaml_text_of(v); }
std::string yaml_text(int64_t v) { return yaml_text_of(v); }
std::string yaml_text(uint64_t v) { return yaml_text_of(v); }
std::string yaml_text(const std::vector<int64_t>& v) { return yaml_text_of(v); }
std::string yaml_text(const PromptList& v) { return yaml_text_of(v); }
std::string yaml_text(const std::vector<std::string>& v) { return yaml_text_of(v); }

}  // namespace detail

std::string to_yaml(const TrainConfig& config) {
  detail::Emitter emitter;
  detail::for_each_field([&](const detail::Field& field, auto sp, auto mp) {
    emitter.field(field.section, field.key, (config.*sp).*mp);
  });
  return emitter.finish();
}

}  // namespace dde::config
