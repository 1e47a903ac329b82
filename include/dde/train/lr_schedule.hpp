// The learning rate of each optimizer step (optim.lr, optim.warmup_steps, optim.schedule,
// optim.min_lr_ratio). A pure function of the step: a resumed run continues the same curve.
#pragma once

#include <cstdint>
#include <string>

namespace dde::train {

// diffusers get_constant_schedule_with_warmup: lr * min(1, step / warmup), step counted
// from 0 at the first optimizer update (so the first update has lr 0 when warmup > 0).
double constant_with_warmup(int64_t step, double base_lr, int64_t warmup_steps);

// The same warm-up, then `schedule`: "constant" keeps base_lr (the paper's); "cosine" and
// "linear" decay from base_lr at the end of warm-up to min_lr_ratio * base_lr at max_steps
// (diffusers get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup, with a floor).
double scheduled_lr(const std::string& schedule, int64_t step, double base_lr, int64_t warmup_steps,
                    int64_t max_steps, double min_lr_ratio);

}  // namespace dde::train
