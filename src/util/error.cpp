#include "dde/util/error.hpp"

#include <utility>

namespace dde {

std::string format_error(const ErrorInfo& info) {
  std::string message = info.what;
  if (!info.where.empty()) {
    message += " (" + info.where + ")";
  }
  if (!info.expected.empty() || !info.actual.empty()) {
    message += ": expected " + (info.expected.empty() ? std::string("?") : info.expected) +
               ", got " + (info.actual.empty() ? std::string("?") : info.actual);
  }
  if (!info.hint.empty()) {
    message += ". " + info.hint;
  }
  return message;
}

Error::Error(ErrorInfo info) : std::runtime_error(format_error(info)), info_(std::move(info)) {}

}  // namespace dde
