#include "dde/objective/correction_ema.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "dde/objective/methods.hpp"
#include "dde/util/error.hpp"
#include "objective/worked_values.hpp"
#include "util/expect_error.hpp"

namespace dde::objective {
namespace {

namespace w = worked;

const NoiseSchedule& schedule() {
  static const NoiseSchedule s = NoiseSchedule::scaled_linear(1000, 0.00085, 0.012);
  return s;
}

torch::Tensor f64(std::initializer_list<double> v) {
  return torch::tensor(std::vector<double>(v), torch::kFloat64);
}
torch::Tensor steps(std::initializer_list<int64_t> v) {
  return torch::tensor(std::vector<int64_t>(v), torch::kInt64);
}
double at(const torch::Tensor& x, int64_t i) { return x[i].item<double>(); }

// Section 6's EMA example, as two micro-batches of one optimizer step: (the worked pair, a pair at
// t = 100 with all four errors equal) and (a pair at t = 7 with e = (0.5, 0.6, 0.5, 0.5)).
void accumulate_worked_step(CorrectionEma& ema) {
  const PairErrors first{f64({w::kPairPolicyW, 0.04}), f64({w::kPairPolicyL, 0.04}),
                         f64({w::kPairRefW, 0.04}), f64({w::kPairRefL, 0.04})};
  const auto t_first = steps({100, 100});
  ema.accumulate(t_first, transition_estimate(first, t_first, schedule()));
  const PairErrors second{f64({0.5}), f64({0.5}), f64({0.6}), f64({0.5})};
  const auto t_second = steps({7});
  ema.accumulate(t_second, transition_estimate(second, t_second, schedule()));
}

constexpr double kTol = 1e-7;  // section 6 prints 8 significant digits

TEST(CorrectionEma, WorkedExample) {
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.apply();
  EXPECT_EQ(ema.updates(), 1);
  const auto& E = ema.values();
  w::expect_worked_value("E[100]", at(E, 100), 2.2928609e-07, kTol);
  w::expect_worked_value("E[7]", at(E, 7), 6.3949131e-04, kTol);
  EXPECT_EQ(E.count_nonzero().item<int64_t>(), 2);
  const auto C = ema.correction(steps({0, 7, 50, 100, 999}));
  EXPECT_EQ(C.scalar_type(), torch::kFloat64);
  w::expect_worked_value("C_0", at(C, 0), 6.3972060e-04, kTol);
  w::expect_worked_value("C_7", at(C, 1), 2.2928609e-07, kTol);
  w::expect_worked_value("C_50", at(C, 2), 2.2928609e-07, kTol);
  EXPECT_EQ(at(C, 3), 0.0);  // C_100
  EXPECT_EQ(at(C, 4), 0.0);  // C_999: the sum over k > T-1 is empty
}

TEST(CorrectionEma, UpdateIsDelayedUntilApply) {
  CorrectionEma ema(1000, 0.9);
  const auto t = steps({0, 50});
  accumulate_worked_step(ema);
  EXPECT_TRUE(torch::equal(ema.correction(t), torch::zeros({2}, torch::kFloat64)));
  EXPECT_EQ(ema.values().count_nonzero().item<int64_t>(), 0);
  EXPECT_EQ(ema.updates(), 0);
  ema.apply();
  const auto after_first = ema.correction(t);
  EXPECT_GT(at(after_first, 0), 0.0);
  // Step 2's accumulation leaves what step 2's loss reads untouched.
  accumulate_worked_step(ema);
  accumulate_worked_step(ema);
  EXPECT_TRUE(torch::equal(ema.correction(t), after_first));
  EXPECT_TRUE(torch::equal(ema.pending_count()[100], torch::tensor(4.0, torch::kFloat64)));
}

TEST(CorrectionEma, OnlyTimestepsThatOccurredMove) {
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.apply();
  const double e100 = at(ema.values(), 100);
  const double e7 = at(ema.values(), 7);
  ema.accumulate(steps({7, 7}), f64({1.0, 3.0}));  // mean 2
  ema.apply();
  EXPECT_EQ(at(ema.values(), 100), e100);
  EXPECT_NEAR(at(ema.values(), 7), 0.9 * e7 + 0.1 * 2.0, 1e-15);
  // A step without pairs changes nothing but the counter.
  const auto before = ema.values().clone();
  ema.apply();
  EXPECT_TRUE(torch::equal(ema.values(), before));
  EXPECT_EQ(ema.updates(), 3);
}

TEST(CorrectionEma, ReducedPendingSumsGiveEveryRankTheSameE) {
  // Two "ranks" see different pairs; summing their pending vectors in place (what the
  // all-reduce does) gives both the E of one process that saw every pair.
  CorrectionEma rank0(1000, 0.9), rank1(1000, 0.9), single(1000, 0.9);
  rank0.accumulate(steps({3, 100}), f64({1.0, 2.0}));
  rank1.accumulate(steps({3, 998}), f64({5.0, -1.0}));
  single.accumulate(steps({3, 100, 3, 998}), f64({1.0, 2.0, 5.0, -1.0}));
  const auto sum = rank0.pending_sum() + rank1.pending_sum();
  const auto count = rank0.pending_count() + rank1.pending_count();
  for (CorrectionEma* rank : {&rank0, &rank1}) {
    rank->pending_sum().copy_(sum);
    rank->pending_count().copy_(count);
    rank->apply();
  }
  single.apply();
  EXPECT_TRUE(torch::equal(rank0.values(), single.values()));
  EXPECT_TRUE(torch::equal(rank1.values(), single.values()));
  EXPECT_NEAR(at(single.values(), 3), 0.1 * 3.0, 1e-15);
  EXPECT_EQ(rank0.pending_count().sum().item<double>(), 0.0);
}

TEST(CorrectionEma, CorrectionIsTheSuffixSum) {
  CorrectionEma ema(16, 0.0);  // mu = 0: E is the last step's mean
  torch::manual_seed(3);
  const auto d = torch::randn({16}, torch::kFloat64);
  ema.accumulate(torch::arange(16, torch::kInt64), d);
  ema.apply();
  const auto C = ema.correction(torch::arange(16, torch::kInt64));
  for (int64_t t = 0; t < 16; ++t) {
    const double expected = t + 1 < 16 ? d.slice(0, t + 1).sum().item<double>() : 0.0;
    EXPECT_NEAR(at(C, t), expected, 1e-12) << "t = " << t;
  }
}

TEST(CorrectionEma, StateRoundTrip) {
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.apply();
  accumulate_worked_step(ema);
  ema.apply();
  const auto state = ema.state();
  EXPECT_EQ(state.E.size(), 1000u);
  EXPECT_EQ(state.momentum, 0.9);
  EXPECT_EQ(state.updates, 2);
  CorrectionEma restored(1000, 0.9);
  restored.accumulate(steps({5}), f64({1.0}));  // pending work is dropped by load_state
  restored.load_state(state);
  EXPECT_TRUE(torch::equal(restored.values(), ema.values()));
  EXPECT_EQ(restored.updates(), 2);
  const auto t = torch::arange(1000, torch::kInt64);
  EXPECT_TRUE(torch::equal(restored.correction(t), ema.correction(t)));
  EXPECT_EQ(restored.pending_count().sum().item<double>(), 0.0);
  // Both continue identically.
  accumulate_worked_step(ema);
  accumulate_worked_step(restored);
  ema.apply();
  restored.apply();
  EXPECT_TRUE(torch::equal(restored.values(), ema.values()));
}

TEST(CorrectionEma, ClearPendingDropsTheStep) {
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.clear_pending();
  ema.apply();
  EXPECT_EQ(ema.values().count_nonzero().item<int64_t>(), 0);
}

TEST(CorrectionEma, NonFiniteStepMustBeSkippedNotApplied) {
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.apply();
  const auto before = ema.values().clone();
  ema.accumulate(steps({7, 9}), f64({std::nan(""), 1.0}));  // accepted: the guard decides
  try {
    ema.apply();
    FAIL() << "expected dde::Error";
  } catch (const dde::Error& e) {
    EXPECT_NE(std::string(e.what()).find("clear_pending"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(torch::equal(ema.values(), before));  // a refused apply() changes nothing
  EXPECT_EQ(ema.updates(), 1);
  ema.clear_pending();
  ema.apply();
  EXPECT_TRUE(torch::equal(ema.values(), before));
}

TEST(CorrectionEma, RejectsBadArguments) {
  expect_error_mentions([] { CorrectionEma(1000, 1.0); }, {"momentum", "[0, 1)"});
  expect_error_mentions([] { CorrectionEma(1000, -0.1); }, {"momentum"});
  expect_error_mentions([] { CorrectionEma(0, 0.9); }, {"num_timesteps"});
  CorrectionEma ema(1000, 0.9);
  expect_error_mentions([&] { ema.accumulate(steps({1000}), f64({1.0})); }, {"[0, 1000)"});
  expect_error_mentions([&] { ema.accumulate(steps({1, 2}), f64({1.0})); }, {"accumulate: t"});
  expect_error_mentions([&] { ema.correction(steps({-1})); }, {"correction: t"});
  ema.pending_sum() = torch::zeros({10}, torch::kFloat64);
  expect_error_mentions([&] { ema.apply(); }, {"pending_sum", "in place"});

  CorrectionEma target(1000, 0.9);
  auto state = CorrectionEma(500, 0.9).state();
  expect_error_mentions([&] { target.load_state(state); }, {"length T = 1000", "500"});
  state = CorrectionEma(1000, 0.5).state();
  expect_error_mentions([&] { target.load_state(state); }, {"momentum", "0.5"});
  state = CorrectionEma(1000, 0.9).state();
  state.E[3] = std::nan("");
  expect_error_mentions([&] { target.load_state(state); }, {"finite"});
}

}  // namespace
}  // namespace dde::objective
