// Scoped bf16 autocast for one device type (libtorch-notes.md: C++ never clears the autocast
// weight-cast cache for us, so leaving a scope that switched autocast on clears it).
#pragma once

#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

namespace dde::models {

class AutocastScope {
 public:
  // enabled = false leaves the current state alone (a scope that does nothing).
  AutocastScope(c10::DeviceType type, bool enabled);
  ~AutocastScope();
  AutocastScope(const AutocastScope&) = delete;
  AutocastScope& operator=(const AutocastScope&) = delete;

 private:
  c10::DeviceType type_;
  bool active_;
  bool previous_enabled_ = false;
  c10::ScalarType previous_dtype_ = c10::ScalarType::BFloat16;
};

}  // namespace dde::models
