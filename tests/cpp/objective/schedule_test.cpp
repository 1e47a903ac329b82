#include "dde/objective/schedule.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "dde/util/error.hpp"
#include "objective/worked_values.hpp"

namespace dde::objective {
namespace {

using worked::expect_worked_value;

NoiseSchedule sd_schedule() { return NoiseSchedule::scaled_linear(1000, 0.00085, 0.012); }

// Section 6 gives the tables to 7 significant digits: rounding alone allows 5e-7 relative.
constexpr double kTableTol = 1e-6;

TEST(NoiseSchedule, SingleShotTableMatchesWorkedValues) {
  const auto s = sd_schedule();
  ASSERT_EQ(s.num_timesteps, 1000);
  ASSERT_EQ(s.single_shot.size(), 1000u);
  expect_worked_value("c_0", s.single_shot[0], 8.507231e-04, kTableTol);
  expect_worked_value("c_100", s.single_shot[100], 1.182887e-01, kTableTol);
  expect_worked_value("c_500", s.single_shot[500], 2.618826e+00, kTableTol);
  expect_worked_value("c_999", s.single_shot[999], 2.135877e+02, kTableTol);
}

TEST(NoiseSchedule, StepwiseTableMatchesWorkedValues) {
  const auto s = sd_schedule();
  ASSERT_EQ(s.stepwise.size(), 1000u);
  expect_worked_value("lambda_0", s.stepwise[0], 1.000851e+00, kTableTol);
  expect_worked_value("lambda_100", s.stepwise[100], 1.310206e-02, kTableTol);
  expect_worked_value("lambda_500", s.stepwise[500], 6.685738e-03, kTableTol);
}

TEST(NoiseSchedule, SingleShotCrossesOneAt354AndIncreases) {
  const auto s = sd_schedule();
  EXPECT_LT(s.single_shot[353], 1.0);
  EXPECT_GE(s.single_shot[354], 1.0);
  for (size_t t = 1; t < s.single_shot.size(); ++t) {
    ASSERT_GT(s.single_shot[t], s.single_shot[t - 1]) << "t = " << t;
  }
}

TEST(NoiseSchedule, ScaledLinearEndpointsAndIdentities) {
  const auto s = sd_schedule();
  EXPECT_NEAR(s.betas.front(), 0.00085, 1e-15);
  EXPECT_NEAR(s.betas.back(), 0.012, 1e-15);
  // beta at the midpoint of the sqrt-linear ramp
  const double mid = std::sqrt(0.00085) + (std::sqrt(0.012) - std::sqrt(0.00085)) * 500.0 / 999.0;
  EXPECT_NEAR(s.betas[500], mid * mid, 1e-16);
  double abar = 1.0;
  for (size_t t = 0; t < 1000; ++t) {
    abar *= 1.0 - s.betas[t];
    ASSERT_DOUBLE_EQ(s.alphas[t], 1.0 - s.betas[t]);
    ASSERT_DOUBLE_EQ(s.alphas_cumprod[t], abar);
  }
}

TEST(NoiseSchedule, TableIsAFloat64CopyOnTheCpu) {
  const auto s = sd_schedule();
  const auto c = s.table(s.single_shot);
  EXPECT_EQ(c.scalar_type(), torch::kFloat64);
  EXPECT_TRUE(c.device().is_cpu());
  ASSERT_EQ(c.sizes(), torch::IntArrayRef({1000}));
  EXPECT_EQ(c[354].item<double>(), s.single_shot[354]);
  EXPECT_THROW(s.table(std::vector<double>(3, 0.0)), dde::Error);
}

TEST(NoiseSchedule, RejectsBadArguments) {
  EXPECT_THROW(NoiseSchedule::scaled_linear(0, 0.00085, 0.012), dde::Error);
  EXPECT_THROW(NoiseSchedule::scaled_linear(1000, 0.0, 0.012), dde::Error);
  EXPECT_THROW(NoiseSchedule::scaled_linear(1000, 0.00085, 1.0), dde::Error);
  EXPECT_THROW(NoiseSchedule::scaled_linear(1000, std::nan(""), 0.012), dde::Error);
  try {
    NoiseSchedule::scaled_linear(-3, 0.00085, 0.012);
    FAIL() << "expected dde::Error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_timesteps"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("-3"), std::string::npos) << e.what();
  }
}

TEST(AddNoise, MatchesTheClosedFormPerSample) {
  const auto s = sd_schedule();
  torch::manual_seed(0);
  const auto x0 = torch::randn({3, 4, 2, 2});
  const auto eps = torch::randn({3, 4, 2, 2});
  const auto t = torch::tensor({0, 354, 999}, torch::kInt64);
  const auto xt = add_noise(s, x0, eps, t);
  EXPECT_EQ(xt.scalar_type(), torch::kFloat32);
  ASSERT_EQ(xt.sizes(), x0.sizes());
  for (int64_t i = 0; i < 3; ++i) {
    const double abar = s.alphas_cumprod[static_cast<size_t>(t[i].item<int64_t>())];
    const auto expected = std::sqrt(abar) * x0[i] + std::sqrt(1.0 - abar) * eps[i];
    EXPECT_TRUE(torch::allclose(xt[i], expected, 1e-6, 1e-6)) << "sample " << i;
  }
}

TEST(AddNoise, KeepsDtype) {
  const auto s = sd_schedule();
  const auto x0 = torch::ones({2, 3}, torch::kFloat64);
  const auto eps = torch::zeros({2, 3}, torch::kFloat64);
  const auto xt = add_noise(s, x0, eps, torch::tensor({5, 7}, torch::kInt64));
  EXPECT_EQ(xt.scalar_type(), torch::kFloat64);
  EXPECT_DOUBLE_EQ(xt[1][2].item<double>(), std::sqrt(s.alphas_cumprod[7]));
}

TEST(AddNoise, RejectsBadArguments) {
  const auto s = sd_schedule();
  const auto x0 = torch::zeros({2, 3});
  const auto eps = torch::zeros({2, 3});
  EXPECT_THROW(add_noise(s, x0, eps, torch::tensor({1, 1000}, torch::kInt64)), dde::Error);
  EXPECT_THROW(add_noise(s, x0, eps, torch::tensor({-1, 0}, torch::kInt64)), dde::Error);
  EXPECT_THROW(add_noise(s, x0, eps, torch::tensor({1, 2}, torch::kInt32)), dde::Error);
  EXPECT_THROW(add_noise(s, x0, eps, torch::tensor({1, 2, 3}, torch::kInt64)), dde::Error);
  EXPECT_THROW(add_noise(s, x0, torch::zeros({2, 4}), torch::tensor({1, 2}, torch::kInt64)),
               dde::Error);
  try {
    add_noise(s, x0, eps, torch::tensor({3, 1000}, torch::kInt64));
    FAIL() << "expected dde::Error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("[0, 1000)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("max 1000"), std::string::npos) << e.what();
  }
}

}  // namespace
// diffusers' DDIMScheduler(steps_offset=1, timestep_spacing="leading").set_timesteps(n).timesteps
TEST(Ddim, TimestepsAreDiffusersLeadingSpacing) {
  EXPECT_EQ(ddim_timesteps(1000, 4), (std::vector<int64_t>{751, 501, 251, 1}));
  const auto fifty = ddim_timesteps(1000, 50);
  ASSERT_EQ(fifty.size(), 50U);
  EXPECT_EQ(fifty.front(), 981);
  EXPECT_EQ(fifty[1], 961);
  EXPECT_EQ(fifty.back(), 1);
  EXPECT_EQ(ddim_timesteps(1000, 3), (std::vector<int64_t>{667, 334, 1}));  // r = 333
  EXPECT_EQ(ddim_timesteps(1000, 500).front(), 999);
  EXPECT_THROW(ddim_timesteps(1000, 1000), Error);  // the first would be T
  EXPECT_THROW(ddim_timesteps(1000, 0), Error);
}

TEST(Ddim, StepIsTheDeterministicUpdate) {
  const auto s = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012);
  const torch::Tensor x = torch::tensor({0.5, -1.0}, torch::kFloat64);
  const torch::Tensor eps = torch::tensor({0.25, 2.0}, torch::kFloat64);
  const double a = s.alphas_cumprod[501], ap = s.alphas_cumprod[251];
  const torch::Tensor x0 = (x - std::sqrt(1 - a) * eps) / std::sqrt(a);
  const torch::Tensor want = std::sqrt(ap) * x0 + std::sqrt(1 - ap) * eps;
  EXPECT_TRUE(torch::allclose(ddim_step(s, x, eps, 501, 251), want, 1e-12, 1e-12));
  // Past t = 0 the last step lands on abar_0 (set_alpha_to_one false): x0 almost exactly.
  const double a0 = s.alphas_cumprod[0];
  const torch::Tensor last = ddim_step(s, x, eps, 1, -249);
  const torch::Tensor x0_at_1 =
      (x - std::sqrt(1 - s.alphas_cumprod[1]) * eps) / std::sqrt(s.alphas_cumprod[1]);
  EXPECT_TRUE(
      torch::allclose(last, std::sqrt(a0) * x0_at_1 + std::sqrt(1 - a0) * eps, 1e-12, 1e-12));
  // The noise term is kept (eta 0 is not x0 alone): a changed eps changes the result.
  EXPECT_FALSE(torch::allclose(ddim_step(s, x, eps * 2, 501, 251), want));
  EXPECT_THROW(ddim_step(s, x, eps, 1000, 900), Error);
  EXPECT_THROW(ddim_step(s, x, eps, 500, 500), Error);
}

}  // namespace dde::objective
