// The per-block UNet on the exported tiny fixtures (scripts/prepare_tiny.sh): gradient
// checkpointing gives the same outputs and gradients as the plain forward, every parameter
// gets a gradient through the recomputation, and the bf16 paths really run in bf16.
// (Parity with diffusers' whole forward: tests/python/test_unet_blocks.py.)
#include "dde/models/unet.hpp"

#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "dde/models/autocast.hpp"
#include "dde/models/manifest.hpp"

namespace dde::models {
namespace {

namespace fs = std::filesystem;

Manifest fixture_manifest(const std::string& family) {
  const char* env = std::getenv("DDE_FIXTURES_DIR");
  const fs::path dir = env ? fs::path(env) : fs::path(DDE_SOURCE_DIR) / "fixtures";
  const fs::path path = dir / "export" / family / "manifest.json";
  if (!fs::is_regular_file(path)) {
    ADD_FAILURE() << path << " missing: run scripts/prepare_tiny.sh (or set DDE_FIXTURES_DIR)";
  }
  return load_manifest(path.string());
}

struct Inputs {
  torch::Tensor x, t;
  Conditioning cond;
  torch::Tensor weights;  // the loss is sum(eps * weights)
};

Inputs make_inputs(const Manifest& m, int64_t batch, int64_t size) {
  torch::manual_seed(7);
  Inputs in;
  in.x = torch::randn({batch, m.latent_channels, size, size});
  in.t = torch::randint(0, 1000, {batch}, torch::kLong);
  in.cond.text = torch::randn({batch, 77, m.cross_attention_dim});
  if (m.added_cond) {
    in.cond.pooled = torch::randn({batch, m.added_cond->text_embeds_dim});
    in.cond.time_ids = torch::randint(0, 65, {batch, 6}).to(torch::kFloat32);
  }
  in.weights = torch::randn({batch, m.latent_channels, size, size});
  return in;
}

struct Result {
  torch::Tensor eps;
  std::vector<std::pair<std::string, torch::Tensor>> grads;
};

Result forward_backward(const Manifest& m, bool checkpointing, bool bf16) {
  UNetOptions options;
  options.trainable = true;
  options.gradient_checkpointing = checkpointing;
  UNet unet(m, torch::kCPU, options);
  const Inputs in = make_inputs(m, /*batch=*/3, /*size=*/8);
  Result r;
  {
    const AutocastScope autocast(torch::kCPU, bf16);
    r.eps = unet.predict_noise(in.x, in.t, in.cond);
  }
  (r.eps.to(torch::kFloat32) * in.weights).sum().backward();
  for (const auto& [name, p] : unet.named_parameters()) {
    r.grads.emplace_back(name, p.grad().defined() ? p.grad().clone() : torch::Tensor());
  }
  r.eps = r.eps.detach().to(torch::kFloat32);
  return r;
}

// max |a - b| / max |b|
double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  const double scale = b.abs().max().item<double>();
  return (a - b).abs().max().item<double>() / (scale > 0 ? scale : 1.0);
}

class UNetBlocks : public ::testing::TestWithParam<std::tuple<std::string, bool>> {};

TEST_P(UNetBlocks, CheckpointingGivesTheSameOutputsAndGradients) {
  const auto& [family, bf16] = GetParam();
  const Manifest m = fixture_manifest(family);
  const Result plain = forward_backward(m, /*checkpointing=*/false, bf16);
  const Result recomputed = forward_backward(m, /*checkpointing=*/true, bf16);
  // The forward is the same kernels on the same inputs (recomputation only repeats it).
  EXPECT_TRUE(torch::equal(recomputed.eps, plain.eps));
  ASSERT_EQ(plain.grads.size(), recomputed.grads.size());
  // Some gradients are zero analytically (a per-channel bias right before a one-channel-per-group
  // GroupNorm) and only rounding noise numerically: a tensor whose gradient is below 1e-3 of the
  // model's largest is compared at the model's scale, every other one at its own.
  double model_scale = 0.0;
  for (const auto& [name, g] : plain.grads)
    model_scale = std::max(model_scale, g.abs().max().item<double>());
  // The recomputation changes only the order in which the autograd engine sums the gradient
  // contributions of a tensor with several consumers (the time embedding feeds every block, a skip
  // feeds two). Reordering a sum of k terms moves it by at most (k - 1) u sum|g_i| (u the unit
  // roundoff: 2^-24 in fp32, 2^-8 in bf16); with k at most the block count and sum|g_i| taken as at
  // most 4 times the tensor's largest gradient (the contributions do not cancel beyond that), the
  // bound is 4 k u of the tensor's scale: the same on every CPU kernel set, since only the order of
  // summation differs between the two runs. (Measured on AVX2 and the scalar set: fp32 8.5e-7 and
  // 8.0e-7, against 4 k u = 2.6e-6 for the tiny fixtures' 11 blocks; bf16 2.3e-2 at most, each
  // block output rounded to bf16 once more, against 5e-2.)
  const double unit_roundoff = bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -24);
  const double blocks = static_cast<double>(m.unet_blocks.size());
  const double tolerance = bf16 ? 5e-2 : 4.0 * blocks * unit_roundoff;
  double worst = 0.0;
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    const auto& [name, g] = plain.grads[i];
    const torch::Tensor& h = recomputed.grads[i].second;
    ASSERT_TRUE(g.defined()) << name;
    // The trap of checkpointing from C++: the noisy latents do not require grad, so a block
    // whose parameters are not explicit inputs of the recomputation gets no gradient at all.
    ASSERT_TRUE(h.defined()) << name << ": no gradient with checkpointing";
    EXPECT_GT(h.abs().max().item<double>(), 0.0) << name << ": zero gradient with checkpointing";
    const double own = g.abs().max().item<double>();
    const double scale = own < 1e-3 * model_scale ? model_scale : own;
    const double err = (h - g).abs().max().item<double>() / scale;
    worst = std::max(worst, err);
    EXPECT_LE(err, tolerance) << name;
  }
  std::cout << "[ checkpointing ] " << family << (bf16 ? " bf16" : " fp32") << ": "
            << plain.grads.size() << " parameters, worst gradient relative error " << worst << "\n";
}

INSTANTIATE_TEST_SUITE_P(Families, UNetBlocks,
                         ::testing::Combine(::testing::Values("sd15", "sdxl"),
                                            ::testing::Values(false, true)));

// A test that fails if autocast were silently off: under the scope the UNet's convolutions and
// matmuls run in bf16, so the output moves away from fp32 by bf16 rounding (and not further).
// With fp32_output_head (the default) the output head runs in fp32: the prediction stays float32
// and its error against fp32 is the body's bf16 rounding only; without it, the output is bf16.
TEST(UNetPrecision, AutocastScopeRunsTheUNetInBf16) {
  for (const bool fp32_head : {true, false}) {
    const Manifest m = fixture_manifest("sd15");
    UNetOptions options;
    options.fp32_output_head = fp32_head;
    UNet unet(m, torch::kCPU, options);
    const Inputs in = make_inputs(m, 2, 8);
    torch::NoGradGuard no_grad;
    const torch::Tensor fp32 = unet.predict_noise(in.x, in.t, in.cond);
    torch::Tensor bf16;
    {
      const AutocastScope autocast(torch::kCPU, true);
      EXPECT_TRUE(at::autocast::is_autocast_enabled(torch::kCPU));
      bf16 = unet.predict_noise(in.x, in.t, in.cond);
    }
    EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
    EXPECT_EQ(bf16.scalar_type(), fp32_head ? torch::kFloat32 : torch::kBFloat16);
    const double err = relative_error(bf16.to(torch::kFloat32), fp32);
    EXPECT_GT(err, 1e-4) << "bf16 autocast did not change the result: is it on?";
    EXPECT_LT(err, 5e-2);
  }
}

// model.frozen_dtype: bf16 holds the weights in bf16 and still runs (under its own autocast).
TEST(UNetPrecision, FrozenBf16UNetHoldsBf16WeightsAndAgreesWithFp32) {
  const Manifest m = fixture_manifest("sdxl");
  UNetOptions frozen;
  frozen.dtype = torch::kBFloat16;
  UNet low(m, torch::kCPU, frozen);
  UNet full(m, torch::kCPU, UNetOptions{});
  for (const auto& [name, p] : low.named_parameters()) {
    ASSERT_EQ(p.scalar_type(), torch::kBFloat16) << name;
  }
  const Inputs in = make_inputs(m, 2, 8);
  torch::NoGradGuard no_grad;
  const torch::Tensor a = low.predict_noise(in.x, in.t, in.cond).to(torch::kFloat32);
  const torch::Tensor b = full.predict_noise(in.x, in.t, in.cond);
  const double err = relative_error(a, b);
  EXPECT_GT(err, 1e-4);
  EXPECT_LT(err, 5e-2);
  EXPECT_FALSE(at::autocast::is_autocast_enabled(torch::kCPU));
}

TEST(UNetPrecision, ATrainableUNetMustBeFp32) {
  const Manifest m = fixture_manifest("sd15");
  UNetOptions bad;
  bad.trainable = true;
  bad.dtype = torch::kBFloat16;
  EXPECT_THROW(UNet(m, torch::kCPU, bad), std::exception);
}

}  // namespace
}  // namespace dde::models
