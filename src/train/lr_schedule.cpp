#include "dde/train/lr_schedule.hpp"

#include <algorithm>
#include <cmath>

#include "dde/util/error.hpp"

namespace dde::train {

double constant_with_warmup(int64_t step, double base_lr, int64_t warmup_steps) {
  if (step < warmup_steps) {
    return base_lr * static_cast<double>(step) /
           static_cast<double>(std::max<int64_t>(1, warmup_steps));
  }
  return base_lr;
}

double scheduled_lr(const std::string& schedule, int64_t step, double base_lr, int64_t warmup_steps,
                    int64_t max_steps, double min_lr_ratio) {
  if (schedule == "constant" || step < warmup_steps) {
    if (schedule != "constant" && schedule != "cosine" && schedule != "linear") {
      throw Error({"unknown learning-rate schedule", "optim.schedule", "constant, cosine or linear",
                   schedule, ""});
    }
    return constant_with_warmup(step, base_lr, warmup_steps);
  }
  const double span = static_cast<double>(std::max<int64_t>(1, max_steps - warmup_steps));
  const double progress = std::clamp(static_cast<double>(step - warmup_steps) / span, 0.0, 1.0);
  double decay = 0;  // 1 at the end of warm-up, 0 at max_steps
  if (schedule == "cosine") {
    decay = 0.5 * (1.0 + std::cos(M_PI * progress));
  } else if (schedule == "linear") {
    decay = 1.0 - progress;
  } else {
    throw Error({"unknown learning-rate schedule", "optim.schedule", "constant, cosine or linear",
                 schedule, ""});
  }
  return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * decay);
}

}  // namespace dde::train
