#include "dde/train/adamw.hpp"

#include <gtest/gtest.h>

#include "dde/train/lr_schedule.hpp"

namespace {

// Our fused AdamW must follow torch::optim::AdamW (the reference semantics) step by step.
TEST(AdamW, MatchesTorchOptimAdamW) {
  torch::manual_seed(0);
  const torch::Tensor w0 = torch::randn({5, 3});
  const torch::Tensor b0 = torch::randn({3});
  torch::Tensor w = w0.clone().requires_grad_(true);
  torch::Tensor b = b0.clone().requires_grad_(true);
  torch::Tensor rw = w0.clone().requires_grad_(true);
  torch::Tensor rb = b0.clone().requires_grad_(true);
  dde::train::AdamW ours({{"w", w}, {"b", b}}, {0.9, 0.999, 1e-8, 1e-2});
  torch::optim::AdamW ref(
      {rw, rb}, torch::optim::AdamWOptions(1e-2).betas({0.9, 0.999}).eps(1e-8).weight_decay(1e-2));
  for (int i = 0; i < 5; ++i) {
    const torch::Tensor x = torch::randn({4, 5});
    (torch::matmul(x, w) + b).pow(2).sum().backward();
    (torch::matmul(x, rw) + rb).pow(2).sum().backward();
    ours.step(1e-2);
    ref.step();
    ours.zero_grad();
    ref.zero_grad();
  }
  // Both run the same elementwise formula in float32 with their own operation order: per step the
  // update (at most lr / (1 - beta1) = 0.1 in size here) differs by a few roundings of it, and the
  // gradients by the rounding of the weights. Bound on paper: 5 steps x 0.1 x 8 roundings of 2^-24
  // = 2.4e-7 relative to the update, far inside 1e-6 relative + 1e-7 absolute on weights of O(1)
  // whatever kernel set sums the matmul (the gradients of both come from the same kernel).
  EXPECT_TRUE(torch::allclose(w, rw, 1e-6, 1e-7)) << (w - rw).abs().max();
  EXPECT_TRUE(torch::allclose(b, rb, 1e-6, 1e-7));
  EXPECT_EQ(ours.steps_taken(), 5);
}

TEST(AdamW, StateRoundTripContinuesIdentically) {
  torch::manual_seed(1);
  torch::Tensor a = torch::randn({4}).requires_grad_(true);
  dde::train::AdamW opt_a({{"p", a}}, {});
  auto grad_step = [](dde::train::AdamW& opt, torch::Tensor& p, int seed) {
    p.mutable_grad() = torch::full_like(p, 0.1 * seed);
    opt.step(1e-3);
    opt.zero_grad();
  };
  grad_step(opt_a, a, 1);
  torch::Tensor b = a.detach().clone().requires_grad_(true);
  dde::train::AdamW opt_b({{"p", b}}, {});
  opt_b.load_state(opt_a.state(), "test");
  grad_step(opt_a, a, 2);
  grad_step(opt_b, b, 2);
  EXPECT_TRUE(torch::equal(a, b));
}

TEST(ClipGradNorm, ScalesToMaxNormAndReturnsNormBeforeClipping) {
  torch::Tensor p = torch::zeros({2}).requires_grad_(true);
  p.mutable_grad() = torch::tensor({3.0F, 4.0F});
  const double norm = dde::train::clip_grad_norm({p}, 1.0);
  EXPECT_DOUBLE_EQ(norm, 5.0);
  EXPECT_NEAR(p.grad().norm().item<double>(), 1.0, 1e-5);
}

TEST(LrSchedule, LinearWarmupThenConstantAsDiffusers) {
  EXPECT_DOUBLE_EQ(dde::train::constant_with_warmup(0, 1e-4, 4), 0.0);
  EXPECT_DOUBLE_EQ(dde::train::constant_with_warmup(2, 1e-4, 4), 5e-5);
  EXPECT_DOUBLE_EQ(dde::train::constant_with_warmup(4, 1e-4, 4), 1e-4);
  EXPECT_DOUBLE_EQ(dde::train::constant_with_warmup(0, 1e-4, 0), 1e-4);
}

}  // namespace
