// LoRA on the per-block UNet (docs/method.md §8.2), on the exported tiny fixtures: the policy is
// the base at step 0 to the bit, equals the UNet with merged weights W0 + (alpha / r) B A once B
// is not zero, its base view is the base whatever the policy did before, and gradients reach only
// A and B, as dA = s B^T G and dB = s G A^T of the merged weight's gradient G, with and without
// gradient checkpointing.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "dde/models/manifest.hpp"
#include "dde/models/unet.hpp"
#include "dde/util/error.hpp"

namespace dde::models::lora_test {
namespace {

namespace fs = std::filesystem;

Manifest fixture(const std::string& family) {
  const char* env = std::getenv("DDE_FIXTURES_DIR");
  const fs::path dir = env ? fs::path(env) : fs::path(DDE_SOURCE_DIR) / "fixtures";
  return load_manifest((dir / "export" / family / "manifest.json").string());
}

struct Inputs {
  torch::Tensor x, t, weights;
  Conditioning cond;
};

Inputs inputs(const Manifest& m) {
  torch::manual_seed(11);
  Inputs in;
  in.x = torch::randn({2, m.latent_channels, 8, 8});
  in.t = torch::tensor({100, 700}, torch::kLong);
  in.cond.text = torch::randn({2, 77, m.cross_attention_dim});
  if (m.added_cond) {
    in.cond.pooled = torch::randn({2, m.added_cond->text_embeds_dim});
    in.cond.time_ids = torch::randint(0, 65, {2, 6}).to(torch::kFloat32);
  }
  in.weights = torch::randn({2, m.latent_channels, 8, 8});
  return in;
}

UNetOptions lora_options(int64_t rank, double alpha, bool checkpointing = false) {
  UNetOptions o;
  o.trainable = true;
  o.gradient_checkpointing = checkpointing;
  o.lora = {rank, alpha, {"to_q", "to_k", "to_v", "to_out.0"}, /*seed=*/3};
  return o;
}

torch::Tensor predict(UNet& unet, const Inputs& in) {
  torch::NoGradGuard no_grad;
  return unet.predict_noise(in.x, in.t, in.cond);
}

// Every B of `unet` set to seeded random values (a trained policy's adapters).
void randomize_b(UNet& unet) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(5);
  for (const auto& [name, p] : unet.named_parameters()) {
    if (name.find(".lora_B.") != std::string::npos) p.copy_(0.05 * torch::randn(p.sizes()));
  }
}

// name -> tensor of the adapters
std::map<std::string, torch::Tensor> adapters(const UNet& unet) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& [name, p] : unet.named_parameters()) out[name] = p;
  return out;
}

// The full UNet's weights with W0 + scale B A at every adapted layer, computed as the policy
// computes its effective weights.
void merge_into(UNet& full, const UNet& lora, double scale) {
  const auto a = adapters(lora);
  std::vector<std::pair<std::string, torch::Tensor>> merged;
  int64_t adapted = 0;
  for (const auto& [name, w] : full.named_parameters()) {
    const std::string module = name.substr(0, name.size() - std::string(".weight").size());
    const auto it = a.find(module + ".lora_A.weight");
    if (name.size() > 7 && name.substr(name.size() - 7) == ".weight" && it != a.end()) {
      merged.emplace_back(
          name, torch::addmm(w, a.at(module + ".lora_B.weight"), it->second, 1.0, scale).detach());
      ++adapted;
    } else {
      merged.emplace_back(name, w.detach().clone());
    }
  }
  ASSERT_EQ(adapted * 2, static_cast<int64_t>(a.size()));
  full.load_parameters(merged, "merged");
}

class Lora : public ::testing::TestWithParam<std::string> {};

TEST_P(Lora, IsTheBaseAtStepZeroAndItsBaseViewAlways) {
  const Manifest m = fixture(GetParam());
  const Inputs in = inputs(m);
  UNet base(m, torch::kCPU, UNetOptions{});
  UNet policy(m, torch::kCPU, lora_options(4, 8.0));
  ASSERT_TRUE(policy.has_adapters());
  const torch::Tensor expected = predict(base, in);
  EXPECT_TRUE(torch::equal(predict(policy, in), expected));  // B = 0: W0 + 0 = W0 exactly
  const auto view = policy.base_view();
  EXPECT_FALSE(view->has_adapters());
  randomize_b(policy);
  EXPECT_FALSE(torch::equal(predict(policy, in), expected));
  // the policy put W0 back after each block: its view (the reference) is the base
  EXPECT_TRUE(torch::equal(predict(*view, in), expected));
  {  // also after a forward that built a graph, and one with checkpointing that threw nothing
    const torch::Tensor eps = policy.predict_noise(in.x, in.t, in.cond);
    EXPECT_TRUE(torch::equal(predict(*view, in), expected));
    (eps * in.weights).sum().backward();
  }
  EXPECT_TRUE(torch::equal(predict(*view, in), expected));
}

TEST_P(Lora, NamesShapesAndOnlyAdaptersTrain) {
  const Manifest m = fixture(GetParam());
  UNet policy(m, torch::kCPU, lora_options(4, 0.0));
  const auto modules = policy.adapted_modules();
  ASSERT_FALSE(modules.empty());
  ASSERT_EQ(policy.named_parameters().size(), 2 * modules.size());
  for (size_t i = 0; i < modules.size(); ++i) {
    const auto& [a_name, a] = policy.named_parameters()[2 * i];
    const auto& [b_name, b] = policy.named_parameters()[2 * i + 1];
    EXPECT_EQ(a_name, modules[i] + ".lora_A.weight");
    EXPECT_EQ(b_name, modules[i] + ".lora_B.weight");
    EXPECT_EQ(a.size(0), 4);
    EXPECT_EQ(b.size(1), 4);
    EXPECT_TRUE(a.requires_grad() && b.requires_grad());
    EXPECT_TRUE(torch::equal(b, torch::zeros_like(b)));
    // peft's init: A uniform in +-1/sqrt(in), not all zero
    EXPECT_LE(a.abs().max().item<double>(), 1.0 / std::sqrt(static_cast<double>(a.size(1))));
    EXPECT_GT(a.abs().max().item<double>(), 0.0);
    const std::string& last = modules[i].substr(modules[i].rfind(".to_") + 1);
    EXPECT_TRUE(last == "to_q" || last == "to_k" || last == "to_v" || last == "to_out.0")
        << modules[i];
  }
  // the same seed draws the same A; another seed another
  UNet again(m, torch::kCPU, lora_options(4, 0.0));
  EXPECT_TRUE(
      torch::equal(again.named_parameters()[0].second, policy.named_parameters()[0].second));
}

class LoraGradients : public ::testing::TestWithParam<std::tuple<std::string, bool>> {
};  // family, checkpointing

TEST_P(LoraGradients, AreTheMergedWeightsGradientsThroughTheAdapters) {
  const auto& [family, checkpointing] = GetParam();
  const Manifest m = fixture(family);
  const Inputs in = inputs(m);
  const double alpha = 2.0, rank = 4.0, scale = alpha / rank;
  UNet policy(m, torch::kCPU, lora_options(4, alpha, checkpointing));
  randomize_b(policy);
  UNetOptions full_options;
  full_options.trainable = true;
  UNet full(m, torch::kCPU, full_options);
  merge_into(full, policy, scale);

  const torch::Tensor eps_full = full.predict_noise(in.x, in.t, in.cond);
  (eps_full * in.weights).sum().backward();
  const torch::Tensor eps_lora = policy.predict_noise(in.x, in.t, in.cond);
  (eps_lora * in.weights).sum().backward();
  // the same weights, bit for bit, through the same kernels
  EXPECT_TRUE(torch::equal(eps_lora.detach(), eps_full.detach()));

  std::map<std::string, torch::Tensor> grads;
  for (const auto& [name, w] : full.named_parameters()) grads[name] = w.grad();
  const auto a = adapters(policy);
  double g_max = 0.0;  // the largest gradient of any adapted weight
  for (const std::string& module : policy.adapted_modules()) {
    g_max = std::max(g_max, grads.at(module + ".weight").abs().max().item<double>());
  }
  // Checkpointing reorders the sums that form G (unet_test.cpp: within 4 k u of the model's
  // largest gradient, k the block count); without it G is the same computation, bit for bit.
  const double u = std::ldexp(1.0, -24);
  const double g_noise =
      checkpointing ? 4.0 * static_cast<double>(m.unet_blocks.size()) * u * g_max : 0.0;
  double worst = 0.0;
  for (const std::string& module : policy.adapted_modules()) {
    const torch::Tensor G = grads.at(module + ".weight").to(torch::kFloat64);
    const torch::Tensor A = a.at(module + ".lora_A.weight").to(torch::kFloat64);
    const torch::Tensor B = a.at(module + ".lora_B.weight").to(torch::kFloat64);
    const torch::Tensor gA = a.at(module + ".lora_A.weight").grad();
    const torch::Tensor gB = a.at(module + ".lora_B.weight").grad();
    ASSERT_TRUE(gA.defined() && gB.defined()) << module;
    const torch::Tensor want_a = scale * B.t().mm(G), want_b = scale * G.mm(A.t());
    // fp32 against the float64 chain rule of the full UNet's G: a sum of n fp32 products, each
    // rounded, is within (n + 2) u of the sum of the products' magnitudes; G's reordering noise
    // enters through the other factor's magnitudes.
    const auto bound = [&](const torch::Tensor& x, const torch::Tensor& y, int64_t n,
                           double noise_weight) {
      return (static_cast<double>(n) + 2.0) * u * scale * x.abs().mm(y.abs()).max().item<double>() +
             scale * g_noise * noise_weight;
    };
    const double err_a = (gA.to(torch::kFloat64) - want_a).abs().max().item<double>();
    const double err_b = (gB.to(torch::kFloat64) - want_b).abs().max().item<double>();
    EXPECT_LE(err_a, bound(B.t(), G, G.size(0), B.abs().sum(0).max().item<double>())) << module;
    EXPECT_LE(err_b, bound(G, A.t(), G.size(1), A.abs().sum(1).max().item<double>())) << module;
    EXPECT_GT(gA.abs().max().item<double>(), 0.0) << module;
    worst = std::max(worst, std::max(err_a, err_b));
  }
  // the base weights themselves get nothing
  EXPECT_EQ(policy.parameters().size(), a.size());
  std::cout << "[ lora ] " << family << (checkpointing ? " checkpointed" : "")
            << ": worst adapter gradient error " << worst << "\n";
}

TEST(LoraTargets, AreCheckedAgainstTheUNet) {
  const Manifest m = fixture("sd15");
  UNetOptions o = lora_options(4, 0.0);
  o.lora.targets = {"to_q", "to_qq"};
  try {
    UNet unet(m, torch::kCPU, o);
    ADD_FAILURE() << "expected dde::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("matches no layer"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'to_qq'"), std::string::npos) << e.what();
  }
  o.lora.targets = {"conv1"};
  try {
    UNet unet(m, torch::kCPU, o);
    ADD_FAILURE() << "expected dde::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a linear layer"), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Families, Lora, ::testing::Values("sd15", "sdxl"));
INSTANTIATE_TEST_SUITE_P(Families, LoraGradients,
                         ::testing::Combine(::testing::Values("sd15", "sdxl"),
                                            ::testing::Values(false, true)));

}  // namespace
}  // namespace dde::models::lora_test
