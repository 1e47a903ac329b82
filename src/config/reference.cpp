// docs/config.md: the field table as markdown, one table per section.
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/util/input_limits.hpp"
#include "field_table.hpp"

namespace dde::config {

namespace detail {
namespace {

const char* kPreamble =
    "# Configuration reference\n"
    "\n"
    "Every key of the YAML file that `dde_train --config FILE` reads (and `--set "
    "section.key=value`\n"
    "overrides), by section, in file order. A key left out keeps its default; unknown keys and\n"
    "values outside the allowed range are errors that name the key.\n"
    "\n"
    "Generated from the field table in `src/config/field_table.hpp`; do not edit by hand. After a\n"
    "change to the table, run `build/dde_train --config-reference > docs/config.md`\n"
    "(`tests/cpp/config/reference_test.cpp` fails until then).\n";

// The YAML a config may hold, with the limits of dde/util/input_limits.hpp.
std::string yaml_subset_text() {
  const auto n = [](int64_t v) { return std::to_string(v); };
  return "\n"
         "The file is plain YAML: maps, lists and scalars. Anchors and aliases (`&a`, `*a`), "
         "merge\n"
         "keys (`<<`), tags (`!!str`, `!custom`) and duplicate keys are refused, each with its\n"
         "file:line:column: write every value out where it is used. Sizes are checked before\n"
         "anything is read into memory (`include/dde/util/input_limits.hpp`): the file (and each\n"
         "`--set` value) at most " +
         n(util::kMaxConfigFileBytes / util::kMiB) + " MiB, nesting at most " +
         n(util::kMaxConfigDepth) + " levels, a list at most " + n(util::kMaxConfigListEntries) +
         " entries,\na map at most " + n(util::kMaxConfigMapEntries) + " keys, a string at most " +
         n(util::kMaxConfigStringBytes) + " bytes.\n";
}

// Markdown table cells cannot hold a bare '|'.
std::string cell(const std::string& text) {
  std::string out;
  for (const char ch : text) {
    out += ch == '|' ? std::string("\\|") : std::string(1, ch);
  }
  return out;
}

std::string code(const std::string& text) { return "`" + text + "`"; }

std::string allowed_text(const Rule& rule, const std::string&) {
  if (rule.required) return "non-empty";
  if (rule.choices.empty()) return "any";
  std::vector<std::string> choices;
  for (const auto& choice : rule.choices) choices.push_back(code(choice));
  return "one of " + join(choices);
}
std::string allowed_text(const Rule& rule, int64_t) {
  const std::string multiple =
      rule.multiple_of > 0 ? ", a multiple of " + std::to_string(rule.multiple_of) : "";
  return range_text(rule) + multiple;
}
std::string allowed_text(const Rule& rule, double) { return range_text(rule); }
std::string allowed_text(const Rule&, bool) { return "any"; }
std::string allowed_text(const Rule&, uint64_t) { return "any"; }
std::string allowed_text(const Rule& rule, const std::vector<std::string>&) {
  return rule.required ? "non-empty" : "any";
}
std::string allowed_text(const Rule& rule, const PromptList&) {
  return "a count " + range_text(rule) + ", as many captions, or a file of as many";
}
std::string allowed_text(const Rule& rule, const std::vector<int64_t>&) {
  return (rule.required ? "non-empty, every element " : "every element ") + range_text(rule);
}

void section_header(std::string& out, const std::string& section) {
  out += "\n## " + code(section) + "\n\n";
  const std::string doc = section_doc(section);
  if (!doc.empty()) out += doc + "\n\n";
  out += "| key | type | default | allowed | description |\n";
  out += "| --- | --- | --- | --- | --- |\n";
}

}  // namespace
}  // namespace detail

std::string config_reference_markdown() {
  const TrainConfig defaults;
  std::string out = detail::kPreamble + detail::yaml_subset_text();
  std::string section;
  detail::for_each_field([&](const detail::Field& field, auto sp, auto mp) {
    using T = std::decay_t<decltype((defaults.*sp).*mp)>;
    if (section != field.section) {
      section = field.section;
      detail::section_header(out, section);
    }
    const T& value = (defaults.*sp).*mp;
    out += "| " + detail::code(field.path()) + " | " + detail::type_text<T>() + " | " +
           detail::cell(detail::code(detail::yaml_text(value))) + " | " +
           detail::cell(detail::allowed_text(field.rule, value)) + " | " + detail::cell(field.doc) +
           " |\n";
  });
  return out;
}

}  // namespace dde::config
