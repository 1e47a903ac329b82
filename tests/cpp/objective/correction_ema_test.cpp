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

// Section 7.2's worked value: one update with d = x at t gives E[t] = 0.1 x, n[t] = 1, Ê[t] = x.
TEST(CorrectionEma, DebiasWorkedValue) {
  const double x = 0.37;
  CorrectionEma plain(1000, 0.9);
  CorrectionEma debiased(1000, 0.9, torch::kCPU, /*debias=*/true);
  EXPECT_FALSE(plain.debias());
  EXPECT_TRUE(debiased.debias());
  for (CorrectionEma* ema : {&plain, &debiased}) {
    ema->accumulate(steps({100}), f64({x}));
    ema->apply();
    EXPECT_NEAR(at(ema->values(), 100), 0.1 * x, 1e-16);  // E is updated the same either way
    EXPECT_EQ(ema->update_counts()[100].item<int64_t>(), 1);
  }
  const auto t = steps({0, 99, 100});
  const auto C_plain = plain.correction(t);
  const auto C_debiased = debiased.correction(t);
  EXPECT_NEAR(at(C_plain, 1), 0.1 * x, 1e-16);  // C_99
  EXPECT_DOUBLE_EQ(at(C_debiased, 1), x);       // C_99 = Ê[100] = x
  EXPECT_DOUBLE_EQ(at(C_debiased, 0), x);       // C_0: every other n[k] = 0 reads as 0
  EXPECT_EQ(at(C_debiased, 2), 0.0);            // C_100: the sum over k > 100 is empty
}

TEST(CorrectionEma, DebiasedConstantInputIsTheInput) {
  // E[k] after n updates with the same d is (1 - mu^n) d: Ê[k] = d for every n, where E lags.
  CorrectionEma ema(1000, 0.9, torch::kCPU, /*debias=*/true);
  for (int step = 1; step <= 5; ++step) {
    ema.accumulate(steps({10, 10}), f64({1.5, 2.5}));  // mean 2 at t = 10
    if (step % 2 == 1) {
      ema.accumulate(steps({20}), f64({-1.0}));  // at t = 20 on odd steps only
    }
    ema.apply();
    EXPECT_NEAR(at(ema.values(), 10), (1.0 - std::pow(0.9, step)) * 2.0, 1e-14);
    EXPECT_NEAR(at(ema.correction(steps({15})), 0), -1.0, 1e-14) << "step " << step;  // Ê[20]
    EXPECT_NEAR(at(ema.correction(steps({5})), 0), 2.0 - 1.0, 1e-14) << "step " << step;
  }
}

TEST(CorrectionEma, WorkedExampleUnchangedWithDebiasOff) {
  CorrectionEma ema(1000, 0.9, torch::kCPU, /*debias=*/false);
  accumulate_worked_step(ema);
  ema.apply();
  const auto C = ema.correction(steps({0, 7}));
  w::expect_worked_value("C_0 (debias off)", at(C, 0), 6.3972060e-04, kTol);
  w::expect_worked_value("C_7 (debias off)", at(C, 1), 2.2928609e-07, kTol);
  // With debias, one update each: Ê = E / 0.1.
  CorrectionEma debiased(1000, 0.9, torch::kCPU, /*debias=*/true);
  accumulate_worked_step(debiased);
  debiased.apply();
  EXPECT_TRUE(torch::equal(debiased.values(), ema.values()));
  EXPECT_NEAR(at(debiased.correction(steps({0})), 0), 6.3972060e-03, 1e-10);
}

TEST(CorrectionEma, UpdateCountsCountAppliesPerTimestep) {
  CorrectionEma ema(1000, 0.9);
  const auto& n = ema.update_counts();
  EXPECT_EQ(n.scalar_type(), torch::kInt64);
  EXPECT_EQ(n.sizes(), torch::IntArrayRef({1000}));
  EXPECT_EQ(n.count_nonzero().item<int64_t>(), 0);
  ema.accumulate(steps({3, 3, 5}), f64({1.0, 2.0, 3.0}));  // t = 3 twice: one update
  ema.apply();
  ema.accumulate(steps({5, 7}), f64({1.0, 1.0}));
  ema.accumulate(steps({5}), f64({1.0}));  // a second micro-batch of the same step
  ema.apply();
  ema.apply();  // a step without pairs
  ema.accumulate(steps({999}), f64({1.0}));
  ema.clear_pending();  // a skipped step
  ema.apply();
  EXPECT_EQ(ema.updates(), 4);
  EXPECT_EQ(ema.update_counts()[3].item<int64_t>(), 1);
  EXPECT_EQ(ema.update_counts()[5].item<int64_t>(), 2);
  EXPECT_EQ(ema.update_counts()[7].item<int64_t>(), 1);
  EXPECT_EQ(ema.update_counts().sum().item<int64_t>(), 4);
  // A refused apply() leaves the counts alone.
  ema.accumulate(steps({3}), f64({std::nan("")}));
  EXPECT_THROW(ema.apply(), dde::Error);
  EXPECT_EQ(ema.update_counts()[3].item<int64_t>(), 1);
}

TEST(CorrectionEma, StateRoundTripsUpdateCounts) {
  CorrectionEma ema(1000, 0.9, torch::kCPU, /*debias=*/true);
  accumulate_worked_step(ema);
  ema.apply();
  ema.accumulate(steps({7, 500}), f64({1e-3, -2e-3}));
  ema.apply();
  const auto state = ema.state();
  ASSERT_EQ(state.counts.size(), 1000u);
  EXPECT_EQ(state.counts[7], 2);
  EXPECT_EQ(state.counts[100], 1);
  EXPECT_EQ(state.counts[500], 1);
  EXPECT_EQ(state.counts[0], 0);
  CorrectionEma restored(1000, 0.9, torch::kCPU, /*debias=*/true);
  restored.load_state(state);
  EXPECT_TRUE(torch::equal(restored.update_counts(), ema.update_counts()));
  const auto t = torch::arange(1000, torch::kInt64);
  EXPECT_TRUE(torch::equal(restored.correction(t), ema.correction(t)));
  // Both continue identically.
  ema.accumulate(steps({7}), f64({5e-4}));
  restored.accumulate(steps({7}), f64({5e-4}));
  ema.apply();
  restored.apply();
  EXPECT_TRUE(torch::equal(restored.correction(t), ema.correction(t)));
  EXPECT_EQ(restored.update_counts()[7].item<int64_t>(), 3);
}

TEST(CorrectionEma, StateWithoutCountsLoadsAsZeros) {
  // A checkpoint written before section 7.2: E and updates only.
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.apply();
  auto old = ema.state();
  old.counts.clear();
  CorrectionEma restored(1000, 0.9);
  restored.load_state(old);
  EXPECT_EQ(restored.update_counts().count_nonzero().item<int64_t>(), 0);
  EXPECT_TRUE(torch::equal(restored.values(), ema.values()));
  const auto t = torch::arange(1000, torch::kInt64);
  EXPECT_TRUE(torch::equal(restored.correction(t), ema.correction(t)));
  // With debias it would read C_t = 0 where E says otherwise: refused, naming the way out.
  CorrectionEma debiased(1000, 0.9, torch::kCPU, /*debias=*/true);
  expect_error_mentions([&] { debiased.load_state(old); },
                        {"without update counts", "E[7]", "ema_debias: false"});
  // An all-zero E without counts is a fresh start either way.
  debiased.load_state(CorrectionEma(1000, 0.9).state());
  old = CorrectionEma(1000, 0.9).state();
  old.counts.clear();
  debiased.load_state(old);
  EXPECT_EQ(debiased.update_counts().count_nonzero().item<int64_t>(), 0);
}

TEST(CorrectionEma, RejectsBadUpdateCounts) {
  CorrectionEma ema(1000, 0.9);
  accumulate_worked_step(ema);
  ema.apply();
  CorrectionEma target(1000, 0.9);
  auto state = ema.state();
  ASSERT_EQ(state.counts.size(), 1000u);
  state.counts.resize(500);
  expect_error_mentions([&] { target.load_state(state); }, {"counts", "length T = 1000", "500"});
  state = ema.state();
  state.counts[3] = -1;
  expect_error_mentions([&] { target.load_state(state); }, {"counts", "0 <= n[k] <= updates"});
  state = ema.state();
  state.counts[3] = 2;  // more updates of E[3] than apply() calls
  expect_error_mentions([&] { target.load_state(state); }, {"updates = 1", "2"});
  // Counts that miss a nonzero E[k] are refused with debias only.
  state = ema.state();
  state.counts[7] = 0;
  target.load_state(state);
  CorrectionEma debiased(1000, 0.9, torch::kCPU, /*debias=*/true);
  expect_error_mentions([&] { debiased.load_state(state); }, {"E[7]", "n[k] >= 1"});
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
