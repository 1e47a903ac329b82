// The allowed values of one config field (a Rule), as a check and as text for messages and docs.
// Private to src/config/.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dde::config::detail {

struct Rule {
  bool required = false;             // strings: must be non-empty
  std::vector<std::string> choices;  // strings: one of these
  bool has_min = false, min_open = false, has_max = false, max_open = false;
  double min = 0.0, max = 0.0;
  int64_t multiple_of = 0;  // integers: value % multiple_of == 0

  bool admits(double v) const {
    if (!std::isfinite(v)) {
      return false;
    }
    if (has_min && (min_open ? !(v > min) : !(v >= min))) {
      return false;
    }
    if (has_max && (max_open ? !(v < max) : !(v <= max))) {
      return false;
    }
    return true;
  }
};

// The shortest text that reads back as `v` (std::to_chars).
inline std::string number_text(double v) {
  char buffer[64];
  const auto result = std::to_chars(buffer, buffer + sizeof(buffer), v);
  return std::string(buffer, result.ptr);
}

inline std::string join(const std::vector<std::string>& items,
                        const std::string& separator = ", ") {
  std::string out;
  for (const auto& item : items) {
    out += (out.empty() ? "" : separator) + item;
  }
  return out;
}

// The numeric bounds: "in [0, 1)", ">= 1", "< 5" or "a finite number".
inline std::string range_text(const Rule& r) {
  if (r.has_min && r.has_max) {
    return "in " + std::string(r.min_open ? "(" : "[") + number_text(r.min) + ", " +
           number_text(r.max) + (r.max_open ? ")" : "]");
  }
  if (r.has_min) {
    return (r.min_open ? "> " : ">= ") + number_text(r.min);
  }
  if (r.has_max) {
    return (r.max_open ? "< " : "<= ") + number_text(r.max);
  }
  return "a finite number";
}

inline Rule any() { return {}; }
inline Rule required() {
  Rule r;
  r.required = true;
  return r;
}
inline Rule one_of(std::vector<std::string> choices) {
  Rule r;
  r.choices = std::move(choices);
  return r;
}
inline Rule at_least(double min) {
  Rule r;
  r.has_min = true;
  r.min = min;
  return r;
}
inline Rule above(double min) {
  Rule r = at_least(min);
  r.min_open = true;
  return r;
}
inline Rule between(double min, bool min_open, double max, bool max_open) {
  Rule r;
  r.has_min = r.has_max = true;
  r.min = min;
  r.max = max;
  r.min_open = min_open;
  r.max_open = max_open;
  return r;
}
inline Rule multiple_of(int64_t k) {
  Rule r = at_least(0);
  r.multiple_of = k;
  return r;
}
inline Rule at_most(Rule r, double max) {
  r.has_max = true;
  r.max = max;
  return r;
}

// Lists: non-empty, every element within `each`.
inline Rule non_empty_list(Rule each) {
  each.required = true;
  return each;
}

}  // namespace dde::config::detail
