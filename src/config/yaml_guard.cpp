// The YAML a config may hold, checked before yaml-cpp builds a tree: the text's size, its nesting
// depth (a scan of the text: yaml-cpp's parser recurses, and deep enough nesting overflows the
// stack), then one pass over the parser's events that refuses anchors, aliases, tags, merge keys
// and over-long lists, maps and strings, each located at source:line:column. Limits:
// dde/util/input_limits.hpp.
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>

#include <sstream>
#include <string>
#include <vector>

#include "dde/config/config.hpp"
#include "dde/util/error.hpp"
#include "dde/util/file_read.hpp"
#include "dde/util/input_limits.hpp"

namespace dde::config {

namespace {

constexpr const char* kFlattenHint =
    "a config nests 4 levels at most (section, subsection, key, list): check the indentation and "
    "the brackets";

std::string guard_where(const std::string& source, int64_t line, int64_t column,
                        const std::string& path = "") {
  const std::string at = source + ":" + std::to_string(line + 1) + ":" + std::to_string(column + 1);
  return path.empty() ? at : at + ": " + path;
}

[[noreturn]] void too_deep(const std::string& source, int64_t line, int64_t column) {
  const std::string limit = std::to_string(util::kMaxConfigDepth);
  throw Error({"YAML nested too deeply", guard_where(source, line, column),
               "at most " + limit + " levels", "more than " + limit + " levels", kFlattenHint});
}

// One line's structure for the depth scan, conservatively (never fewer levels than yaml-cpp
// sees): the block levels opened by its indentation and its '- ' / '? ' indicators, and its flow
// brackets outside quoted strings and comments. A quoted string ends at the end of the line here,
// so that a stray quote cannot hide the brackets of the lines after it.
class DepthScan {
 public:
  explicit DepthScan(const std::string& source) : source_(source) {}

  void line(const std::string& text, size_t begin, size_t end) {
    size_t i = begin;
    while (i < end && (text[i] == ' ' || text[i] == '\t')) ++i;
    if (flow_ == 0 && i < end && text[i] != '#') {
      open_block(i - begin, i - begin);
      while (i < end && (text[i] == '-' || text[i] == '?') &&
             (i + 1 == end || text[i + 1] == ' ')) {
        i += 1;
        while (i < end && text[i] == ' ') ++i;
        open_block(i - begin, i - begin);
      }
    }
    brackets(text, i, end, i - begin);
    ++line_;
  }

 private:
  void open_block(size_t column, size_t at) {
    while (!indents_.empty() && indents_.back() > column) indents_.pop_back();
    if (indents_.empty() || indents_.back() < column) indents_.push_back(column);
    check(at);
  }

  void check(size_t column) const {
    if (static_cast<int64_t>(indents_.size()) + flow_ > util::kMaxConfigDepth) {
      too_deep(source_, line_, static_cast<int64_t>(column));
    }
  }

  void brackets(const std::string& text, size_t i, size_t end, size_t column) {
    const size_t begin = i - column;
    bool at_start = true;  // a quote or comment may start here
    for (; i < end; ++i) {
      const char ch = text[i];
      if (at_start && (ch == '\'' || ch == '"')) {
        i = quote_end(text, i, end);
      } else if (at_start && ch == '#') {
        return;
      } else if (ch == '[' || ch == '{') {
        ++flow_;
        check(i - begin);
      } else if ((ch == ']' || ch == '}') && flow_ > 0) {
        --flow_;
      }
      at_start = ch == ' ' || ch == '\t' || ch == '[' || ch == '{' || ch == ',';
    }
  }

  // The index of the quote that closes the one at `i`, or `end`.
  static size_t quote_end(const std::string& text, size_t i, size_t end) {
    const char quote = text[i];
    for (++i; i < end; ++i) {
      if (quote == '"' && text[i] == '\\') {
        ++i;
      } else if (text[i] == quote) {
        if (quote == '\'' && i + 1 < end && text[i + 1] == '\'') {
          ++i;  // '' is an escaped quote
        } else {
          return i;
        }
      }
    }
    return end;
  }

  const std::string& source_;
  std::vector<size_t> indents_;  // columns of the open block levels
  int64_t flow_ = 0;             // open flow brackets
  int64_t line_ = 0;
};

// The parser's events, in document order: each node is checked for an anchor, a tag, a merge
// key, its size (a scalar's bytes, a collection's entries, counted to its end) and its depth.
class EventGuard : public YAML::EventHandler {
 public:
  explicit EventGuard(const std::string& source) : source_(source) {}

  void OnDocumentStart(const YAML::Mark&) override {}
  void OnDocumentEnd() override {}
  void OnAnchor(const YAML::Mark& mark, const std::string& name) override {
    refuse_anchor(mark, "the anchor &" + name);
  }
  void OnAlias(const YAML::Mark& mark, YAML::anchor_t) override {
    refuse_anchor(mark, "an alias (*name)");
  }
  void OnNull(const YAML::Mark& mark, YAML::anchor_t) override { enter(mark, "?"); }
  void OnScalar(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t,
                const std::string& value) override {
    bool is_key = false;
    const std::string path = enter(mark, tag, &is_key);
    if (is_key && value == "<<" && tag == "?") {
      throw Error({"YAML merge keys (<<) are not supported", where(mark, path),
                   "the keys written out in each map", "'<<'",
                   "copy the keys into this map: a config has no anchors to merge"});
    }
    if (static_cast<int64_t>(value.size()) > util::kMaxConfigStringBytes) {
      throw Error({"YAML string too long", where(mark, is_key ? path + " (a key)" : path),
                   "at most " + std::to_string(util::kMaxConfigStringBytes) + " bytes",
                   std::to_string(value.size()) + " bytes", "a config value is a name or a path"});
    }
    if (is_key) frames_.back().key = value;
  }
  void OnSequenceStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {
    open(mark, tag, false);
  }
  void OnSequenceEnd() override { close(); }
  void OnMapStart(const YAML::Mark& mark, const std::string& tag, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {
    open(mark, tag, true);
  }
  void OnMapEnd() override { close(); }

 private:
  struct Frame {
    bool map = false;
    YAML::Mark mark;
    std::string path;     // dotted, of this collection
    int64_t entries = 0;  // keys of a map, items of a list
    bool at_key = true;   // a map's next node is a key
    std::string key;      // a map's last key
  };

  std::string where(const YAML::Mark& mark, const std::string& path) const {
    return guard_where(source_, mark.line, mark.column, path);
  }

  [[noreturn]] void refuse_anchor(const YAML::Mark& mark, const std::string& actual) const {
    throw Error({"YAML anchors and aliases are not supported", where(mark, ""),
                 "every value written out", actual, "write the value out where it is used"});
  }

  // The dotted path of the node starting at `mark`, counted in its parent; its tag refused.
  std::string enter(const YAML::Mark& mark, const std::string& tag, bool* is_key = nullptr) {
    std::string path;
    if (!frames_.empty()) {
      Frame& parent = frames_.back();
      const bool key = parent.map && parent.at_key;
      if (is_key != nullptr) *is_key = key;
      if (parent.map) parent.at_key = !parent.at_key;
      if (!parent.map || key) ++parent.entries;
      path = !parent.map           ? parent.path + "[" + std::to_string(parent.entries - 1) + "]"
             : key                 ? parent.path
             : parent.path.empty() ? parent.key
                                   : parent.path + "." + parent.key;
    }
    if (tag != "?" && tag != "!") {  // yaml-cpp's tags of untagged plain and quoted nodes
      throw Error({"YAML tags are not supported", where(mark, path), "untagged values",
                   "the tag " + tag, "delete the tag: each key's type is fixed (docs/config.md)"});
    }
    return path;
  }

  void open(const YAML::Mark& mark, const std::string& tag, bool map) {
    bool is_key = false;
    std::string path = enter(mark, tag, &is_key);
    if (is_key) frames_.back().key = "?";
    if (static_cast<int64_t>(frames_.size()) >= util::kMaxConfigDepth) {
      too_deep(source_, mark.line, mark.column);
    }
    Frame frame;
    frame.map = map;
    frame.mark = mark;
    frame.path = std::move(path);
    frames_.push_back(std::move(frame));
  }

  void close() {
    const Frame& f = frames_.back();
    const int64_t limit = f.map ? util::kMaxConfigMapEntries : util::kMaxConfigListEntries;
    if (f.entries > limit) {
      throw Error({f.map ? "YAML map too large" : "YAML list too long", where(f.mark, f.path),
                   "at most " + std::to_string(limit) + " entries",
                   std::to_string(f.entries) + " entries",
                   f.map ? "a config section has a few keys" : "shorten the list"});
    }
    frames_.pop_back();
  }

  const std::string& source_;
  std::vector<Frame> frames_;  // the collections open
};

void check_yaml_depth(const std::string& text, const std::string& source) {
  DepthScan scan(source);
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string::npos) end = text.size();
    scan.line(text, begin, end);
    begin = end + 1;
  }
}

}  // namespace

void check_yaml_text(const std::string& text, const std::string& source) {
  util::check_size(static_cast<int64_t>(text.size()), util::kMaxConfigFileBytes, "YAML text",
                   source, "a config is a few KB");
  check_yaml_depth(text, source);
  std::istringstream in(text);
  YAML::Parser parser(in);
  EventGuard guard(source);
  try {
    while (parser.HandleNextDocument(guard)) {
    }
  } catch (const YAML::ParserException& e) {
    // yaml-cpp refuses an alias without its anchor before the event: the same refusal.
    if (e.msg.rfind(YAML::ErrorMsg::UNKNOWN_ANCHOR, 0) == 0) {
      throw Error({"YAML anchors and aliases are not supported",
                   guard_where(source, e.mark.line, e.mark.column), "every value written out",
                   "an alias (*name)", "write the value out where it is used"});
    }
    throw;
  }
}

}  // namespace dde::config
