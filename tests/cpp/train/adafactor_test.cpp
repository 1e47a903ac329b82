#include "dde/train/adafactor.hpp"

#include <gtest/gtest.h>

#include <map>

#include "dde/util/error.hpp"

namespace {

using dde::train::Adafactor;
using dde::train::NamedTensors;

NamedTensors fresh_params(int seed) {
  torch::manual_seed(seed);
  return {{"w", torch::randn({4, 3}).requires_grad_(true)},
          {"b", torch::randn({3}).requires_grad_(true)},
          {"k", torch::randn({2, 2, 3, 3}).requires_grad_(true)}};
}

void grad_step(dde::train::Optimizer& opt, NamedTensors& params, int step) {
  torch::manual_seed(100 + step);
  for (auto& [name, p] : params) p.mutable_grad() = torch::randn_like(p);
  opt.step(1e-2);
  opt.zero_grad();
}

NamedTensors copy_of(const NamedTensors& params) {
  NamedTensors out;
  for (const auto& [name, p] : params)
    out.emplace_back(name, p.detach().clone().requires_grad_(true));
  return out;
}

// Parity with transformers is tests/python/test_adafactor_parity.py; here: the state layout and
// an exact save -> load -> continue.
TEST(Adafactor, FactorsTwoOrMoreDimensionsAndKeepsFullStateOtherwise) {
  NamedTensors params = fresh_params(0);
  Adafactor opt(params, {});
  grad_step(opt, params, 0);
  std::map<std::string, torch::Tensor> state;
  for (const auto& [name, t] : opt.state()) state[name] = t;
  EXPECT_EQ(state.at("exp_avg_sq_row.w").sizes(), torch::IntArrayRef({4}));
  EXPECT_EQ(state.at("exp_avg_sq_col.w").sizes(), torch::IntArrayRef({3}));
  EXPECT_EQ(state.at("exp_avg_sq_row.k").sizes(), torch::IntArrayRef({2, 2, 3}));
  EXPECT_EQ(state.at("exp_avg_sq_col.k").sizes(), torch::IntArrayRef({2, 2, 3}));
  EXPECT_EQ(state.at("exp_avg_sq.b").sizes(), torch::IntArrayRef({3}));
  EXPECT_EQ(state.at("step.b").item<int64_t>(), 1);
  EXPECT_EQ(state.count("exp_avg_sq.w"), 0U);
}

TEST(Adafactor, StateRoundTripContinuesBitExactly) {
  NamedTensors straight = fresh_params(1);
  Adafactor a(straight, {});
  for (int s = 0; s < 3; ++s) grad_step(a, straight, s);
  NamedTensors resumed = copy_of(straight);
  Adafactor b(resumed, {});
  b.load_state(a.state(), "test");
  for (int s = 3; s < 6; ++s) {
    grad_step(a, straight, s);
    grad_step(b, resumed, s);
  }
  for (size_t i = 0; i < straight.size(); ++i) {
    EXPECT_TRUE(torch::equal(straight[i].second, resumed[i].second)) << straight[i].first;
  }
}

TEST(Adafactor, MissingOrMisshapenStateIsAClearError) {
  NamedTensors params = fresh_params(2);
  Adafactor opt(params, {});
  NamedTensors state = opt.state();
  state.erase(state.begin());
  try {
    opt.load_state(state, "ckpt/training_state.safetensors");
    FAIL() << "no error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("exp_avg_sq_row.w"), std::string::npos) << e.what();
  }
  NamedTensors adamw_like{{"exp_avg_sq_row.w", torch::zeros({3})}};
  EXPECT_THROW(opt.load_state(adamw_like, "x"), dde::Error);
}

}  // namespace
