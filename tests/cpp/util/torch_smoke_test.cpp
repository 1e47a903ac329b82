// Proves the build links LibTorch and runs a tensor op on this machine.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "dde/util/log.hpp"

TEST(TorchSmoke, MatmulOnCpu) {
  const torch::Tensor a = torch::arange(6, torch::kFloat32).reshape({2, 3});
  const torch::Tensor b = torch::ones({3, 1});
  const torch::Tensor c = torch::matmul(a, b);
  EXPECT_FLOAT_EQ(c[0][0].item<float>(), 3.0F);
  EXPECT_FLOAT_EQ(c[1][0].item<float>(), 12.0F);
  dde::log::info("torch smoke: c = [{}, {}]", c[0][0].item<float>(), c[1][0].item<float>());
}
