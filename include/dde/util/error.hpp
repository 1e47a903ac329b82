// One exception type for bad input at every boundary (config, data, model files, peers).
// The message always says what is wrong, where, expected vs. actual, and what to do;
// main() catches it, logs it and exits non-zero.
#pragma once

#include <stdexcept>
#include <string>

namespace dde {

struct ErrorInfo {
  std::string what;      // "unknown config key", "shard truncated", ...
  std::string where;     // "configs/x.yaml: optim.lr", "shard-000003.tar: member 17", ...
  std::string expected;  // optional
  std::string actual;    // optional
  std::string hint;      // optional: what the user should do
};

class Error : public std::runtime_error {
 public:
  explicit Error(ErrorInfo info);
  const ErrorInfo& info() const { return info_; }

 private:
  ErrorInfo info_;
};

// "what (where): expected E, got A. hint"
std::string format_error(const ErrorInfo& info);

}  // namespace dde
