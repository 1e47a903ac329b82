#include "dde/train/lr_schedule.hpp"

#include <gtest/gtest.h>

#include <cmath>

#include "dde/util/error.hpp"

namespace {

using dde::train::scheduled_lr;

TEST(LrSchedule, ConstantIsTheWarmUpThenTheBaseRate) {
  for (const int64_t step : {0, 1, 2, 3, 4, 50, 100}) {
    EXPECT_DOUBLE_EQ(scheduled_lr("constant", step, 1e-4, 4, 100, 0.0),
                     dde::train::constant_with_warmup(step, 1e-4, 4));
  }
  EXPECT_DOUBLE_EQ(scheduled_lr("constant", 100, 1e-4, 4, 100, 0.5), 1e-4);  // no floor applies
}

TEST(LrSchedule, CosineAndLinearDecayToTheFloorAtMaxSteps) {
  // warm-up 10 (2 of 10 -> 0.2 lr), then decay over the 90 remaining steps.
  for (const char* s : {"cosine", "linear"}) {
    EXPECT_DOUBLE_EQ(scheduled_lr(s, 2, 1.0, 10, 100, 0.1), 0.2) << s;
    EXPECT_DOUBLE_EQ(scheduled_lr(s, 10, 1.0, 10, 100, 0.1), 1.0) << s;
    EXPECT_NEAR(scheduled_lr(s, 100, 1.0, 10, 100, 0.1), 0.1, 1e-12) << s;
    EXPECT_NEAR(scheduled_lr(s, 150, 1.0, 10, 100, 0.1), 0.1, 1e-12) << s;  // past the end
    EXPECT_NEAR(scheduled_lr(s, 55, 1.0, 10, 100, 0.1), 0.55, 1e-12) << s;  // the midpoint
  }
  EXPECT_NEAR(scheduled_lr("linear", 40, 2.0, 10, 100, 0.0), 2.0 * (1 - 30.0 / 90), 1e-12);
  EXPECT_NEAR(scheduled_lr("cosine", 40, 2.0, 10, 100, 0.0),
              2.0 * 0.5 * (1 + std::cos(M_PI * 30.0 / 90)), 1e-12);
  // Monotone after the warm-up.
  double previous = 2.0;
  for (int64_t step = 10; step <= 100; ++step) {
    const double lr = scheduled_lr("cosine", step, 2.0, 10, 100, 0.0);
    EXPECT_LE(lr, previous + 1e-15);
    previous = lr;
  }
}

TEST(LrSchedule, AnUnknownScheduleIsAnError) {
  EXPECT_THROW((void)scheduled_lr("step", 50, 1.0, 10, 100, 0.0), dde::Error);
}

}  // namespace
