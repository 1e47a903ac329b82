#include "dde/models/autocast.hpp"

#include <ATen/autocast_mode.h>

namespace dde::models {

AutocastScope::AutocastScope(c10::DeviceType type, bool enabled) : type_(type), active_(enabled) {
  if (!active_) return;
  previous_enabled_ = at::autocast::is_autocast_enabled(type_);
  previous_dtype_ = at::autocast::get_autocast_dtype(type_);
  at::autocast::set_autocast_enabled(type_, true);
  at::autocast::set_autocast_dtype(type_, at::kBFloat16);
}

AutocastScope::~AutocastScope() {
  if (!active_) return;
  at::autocast::set_autocast_enabled(type_, previous_enabled_);
  at::autocast::set_autocast_dtype(type_, previous_dtype_);
  // Cached low-precision copies of weights must not outlive the forward that made them: the
  // optimizer updates the fp32 weights before the next one.
  if (!previous_enabled_) at::autocast::clear_cache();
}

}  // namespace dde::models
